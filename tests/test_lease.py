"""The lease on a real PostgreSQL database, in process: what a standby does when the active stops
in the middle of a write transaction (a SIGSTOP, a VM frozen, a stalled loop) and so holds the
lease row's share lock that its takeover must wait for."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from sqlalchemy.exc import DBAPIError

from relaybeat.monitor.cluster import Cluster, ClusterSettings, Role
from relaybeat.monitor.store import LeaseView, NotActive, Store

FAILOVER_S = 1.0


async def _promote(view: LeaseView) -> None:
    pass


def _demote() -> None:
    pass


async def _cluster(url: str, node: str) -> Cluster:
    store = await Store.open(url)
    return Cluster(ClusterSettings(node, FAILOVER_S), store, _promote, _demote)


async def _tick_until_active(cluster: Cluster, within_s: float) -> float:
    started = time.monotonic()
    while cluster.role is not Role.ACTIVE:
        assert time.monotonic() - started < within_s, f"{cluster.node_id} did not take over within {within_s} s"
        await cluster.tick()
        await asyncio.sleep(cluster.tick_s)
    return time.monotonic() - started


async def test_a_standby_takes_over_from_an_active_stopped_inside_a_write(postgres_url: str) -> None:
    bootstrap = await Store.open(postgres_url)
    await bootstrap.upgrade()
    await bootstrap.close()
    a, b = await _cluster(postgres_url, "node-a"), await _cluster(postgres_url, "node-b")
    open_write: list[contextlib.AbstractAsyncContextManager[object]] = []
    try:
        await _tick_until_active(a, 10 * FAILOVER_S)
        await b.tick()
        assert b.role is Role.STANDBY
        stuck = a.store._writing()  # the active enters a write (share-locks the lease row) ...
        await stuck.__aenter__()
        open_write.append(stuck)
        # ... and never gets further: no commit, no rollback, its lease not renewed. Without a bound on
        # an idle transaction, every takeover waits for that lock and fails on `lock_timeout`, forever.
        took_s = await _tick_until_active(b, 6 * FAILOVER_S + 4.0)
        assert b.epoch is not None
        assert b.epoch == (a.epoch or 0) + 1
        # node-a resumes: its transaction is gone, and nothing it writes now lands
        open_write.clear()
        with pytest.raises(DBAPIError, match="idle-in-transaction timeout"):  # the database ended it
            await stuck.__aexit__(None, None, None)
        await a.tick()
        assert a.role is Role.STANDBY
        with pytest.raises(NotActive):
            async with a.store._writing():
                pass
        print(f"\nnode-b active {took_s:.2f} s after node-a stopped inside a write (failover_s {FAILOVER_S})")
    finally:
        for write in open_write:  # the test failed while node-a held it: roll it back, or teardown waits
            await write.__aexit__(AssertionError, AssertionError(), None)
        await a.store.close()
        await b.store.close()
