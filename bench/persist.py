"""Persistence during a mass event: a relay with `--hosts` hosts dies; how fast do the transitions
reach SQL, on SQLite and on PostgreSQL? (`--holds-only`: only how long the writer holds the event
loop while it writes such an event, in-process, for each of `--holds-hosts`; see "writer holds".)

Setup per database and run: a fresh broker and `relaybeat monitor` on that database (SQLite in a
temporary directory; PostgreSQL in a fresh schema, as tests/conftest.py's postgres_url does), one
synthetic relay carrying every host, bundles every second until all hosts are `up` and written.
Then the relay stops and its Last Will (`offline` on its status topic) is published: the monitor
turns the relay `down` and every host `unreachable` in one batch. The benchmark polls the
database itself every 5 ms for rows newer than before the event and reports the time until the
first and until all of them are queryable, and transitions/s.

Meanwhile a thread asks the monitor's `GET /healthz` again and again (one request at a time): the
API is served on the monitor's event loop, so the slowest answer from the event until every row is
queryable is an end-to-end bound on the longest hold of that loop (a request's own cost included;
its median, taken before the event, is reported beside it).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import secrets
import sqlite3
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
from sqlalchemy import make_url

from bench import synth
from bench.procs import Lab
from bench.report import Report, figure, med, spread, table
from relaybeat.monitor.clock import HandClock
from relaybeat.monitor.states import Transition


def plain_url(url: str) -> str:
    """A libpq URL (what psycopg.connect takes) from a SQLAlchemy one."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _counter(
    db: str, url: str, schema: str | None, admin_url: str
) -> tuple[Callable[[int], tuple[int, int]], Callable[[], None]]:
    """A function returning (rows with id > after, max id), and a closer."""
    if db == "sqlite":
        connection = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=5)

        def count(after: int) -> tuple[int, int]:
            n, top = connection.execute("SELECT count(*), max(id) FROM transitions WHERE id > ?", (after,)).fetchone()
            return int(n), int(top or after)

        return count, connection.close
    pg = psycopg.connect(admin_url, autocommit=True)

    def count_pg(after: int) -> tuple[int, int]:
        row = pg.execute(f'SELECT count(*), max(id) FROM "{schema}".transitions WHERE id > %s', (after,)).fetchone()
        assert row is not None
        return int(row[0]), int(row[1] or after)

    return count_pg, pg.close


async def _one(args: Any, db: str) -> dict[str, Any]:
    prefix = f"bench{secrets.token_hex(3)}/"
    schema = None
    admin_url = plain_url(args.pg_url)
    with Lab("persist") as lab:
        if db == "postgresql":
            schema = f"relaybeat_bench_{uuid.uuid4().hex[:12]}"
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(f'CREATE SCHEMA "{schema}"')
            url = f"{args.pg_url}?options={quote(f'-csearch_path={schema}')}"
        else:
            url = f"sqlite:///{lab.dir / 'persist.db'}"
        try:
            broker = lab.broker(args.broker)
            monitor = lab.monitor(broker, prefix, db_url=url)
            relays = synth.Relays(broker.port, prefix, 1, args.hosts, interval_ms=5000, tag="dying")
            # Two small relays that keep beating, as the rest of a fleet would.
            others = synth.Relays(broker.port, prefix, 2, 10, interval_ms=5000, tag="alive")
            await relays.connect()
            await others.connect()
            count, close = _counter(db, url, schema, admin_url)
            try:
                async with httpx.AsyncClient(base_url=monitor.api, timeout=30) as http:
                    await synth.round_all(relays, http)
                    await synth.round_all(others, http)
                    # Every relay keeps sending (a silent fleet would make the monitor blind, and a
                    # blind monitor decides nothing); the dying one stops just before its will.
                    stop_dying, stop_others = asyncio.Event(), asyncio.Event()
                    dying = asyncio.create_task(synth.paced(relays, args.hosts * 2.0, stop_dying))
                    alive = asyncio.create_task(synth.paced(others, 2 * 10 * 2.0, stop_others))
                    wanted = args.hosts + 20 + 3
                    deadline = time.monotonic() + 60
                    while count(0)[0] < wanted:
                        if time.monotonic() > deadline:
                            msg = f"initial transitions not written: {count(0)} of {wanted}"
                            raise TimeoutError(msg)
                        await asyncio.sleep(0.05)
                    with HealthProbe(monitor.api) as probe:
                        await asyncio.sleep(1.0)
                        _, baseline = count(0)
                        stop_dying.set()
                        await dying
                        cpu0 = monitor.proc.cpu_s()
                        event = time.time()
                        relays.say_offline(relays.ids[0])
                        first = None
                        expected = args.hosts + 1
                        got = 0
                        deadline = time.monotonic() + 60
                        while got < expected and time.monotonic() < deadline:
                            got, _ = count(baseline)
                            now = time.time()
                            if got and first is None:
                                first = now
                            if got < expected:
                                await asyncio.sleep(0.005)
                        done = time.time()
                    cpu = monitor.proc.cpu_s() - cpu0
                    state = monitor.count(state="unreachable")
                    stop_others.set()
                    await alive
            finally:
                close()
                relays.close()
                others.close()
        finally:
            if schema is not None:
                with (
                    contextlib.suppress(Exception),
                    psycopg.connect(admin_url, autocommit=True) as admin,
                ):
                    admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
    first_s = (first - event) if first else float("nan")
    all_s = done - event
    return {
        "db": db,
        "hosts": args.hosts,
        "transitions_expected": expected,
        "transitions_written": got,
        "unreachable_in_api": state,
        "first_queryable_s": first_s,
        "all_queryable_s": all_s,
        "transitions_per_s_from_event": got / all_s,
        "monitor_cpu_s": cpu,
        "healthz_worst_ms": probe.worst_s(event, done) * 1e3,
        "healthz_median_before_ms": probe.median_s(event) * 1e3,
    }


class HealthProbe:
    """A thread asking `GET /healthz` one request at a time: each answer's latency, by when it was sent."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.samples: list[tuple[float, float]] = []  # (sent, seconds to answer)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="healthz-probe", daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30) as http:
            while not self._stop.is_set():
                sent = time.time()
                started = time.perf_counter()
                http.get("/healthz")
                self.samples.append((sent, time.perf_counter() - started))

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(35)

    def worst_s(self, since: float, until: float) -> float:
        """The slowest answer to a request sent within [since, until] (or answered after `since`)."""
        return max((s for sent, s in self.samples if sent + s >= since and sent <= until), default=float("nan"))

    def median_s(self, until: float) -> float:
        got = [s for sent, s in self.samples if sent + s < until]
        return statistics.median(got) if got else float("nan")


def run(args: Any, out: Any) -> Report:
    report = Report("persist", vars(args))
    if args.holds_only:
        holds = writer_holds(args, report)
        report.data = {"writer_holds": holds}
        fig, axes = figure(1, 1, width=6, height=3.6)
        ax = axes[0][0]
        ax.bar(list(holds), [s["flush_hold_max_ms"]["median"] for s in holds.values()], color="#4f81bd")
        ax.axhline(5, color="red", linestyle=":", label="5 ms (the issue)")
        ax.set_ylabel("longest loop turn in the flush (ms)")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7)
        ax.set_title("writer: a relay's death written, in-process", fontsize=10)
        report.save(out, {"persist_holds": fig})
        return report
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.reps):
        for db in args.databases:
            result = asyncio.run(_one(args, db))
            runs.setdefault(db, []).append(result)
            print(f"  rep {rep + 1} {db}: {result}", flush=True)
    keys = (
        "first_queryable_s",
        "all_queryable_s",
        "transitions_per_s_from_event",
        "monitor_cpu_s",
        "transitions_written",
        "healthz_worst_ms",
        "healthz_median_before_ms",
    )
    summary = {db: {k: spread(r[k] for r in rs) for k in keys} for db, rs in runs.items()}
    report.data = {"runs": runs, "summary": summary}
    report.say(
        f"\npersistence: a relay with {args.hosts:,} hosts dies (its Last Will); {args.reps} run(s), median [min–max]\n"
    )
    rows = [
        (db, med(s["transitions_written"]), med({k: v * 1000 for k, v in s["first_queryable_s"].items() if k != "n"}
                                                | {"n": s["first_queryable_s"]["n"]}),
         med({k: v * 1000 for k, v in s["all_queryable_s"].items() if k != "n"} | {"n": s["all_queryable_s"]["n"]}),
         med(s["transitions_per_s_from_event"]), med(s["monitor_cpu_s"], 2), med(s["healthz_worst_ms"], 1),
         med(s["healthz_median_before_ms"], 1))
        for db, s in summary.items()
    ]  # fmt: skip
    report.say(table(["database", "transitions", "first queryable (ms)", "all queryable (ms)",
                      "transitions/s (event → all queryable)", "monitor CPU s",
                      "slowest /healthz, event → all queryable (ms)", "/healthz median before (ms)"],
                      rows))  # fmt: skip
    fig, axes = figure(1, 1, width=6, height=3.6)
    ax = axes[0][0]
    dbs = list(summary)
    ax.bar(dbs, [summary[d]["all_queryable_s"]["median"] * 1000 for d in dbs], color="#4f81bd", label="all queryable")
    ax.bar(
        dbs, [summary[d]["first_queryable_s"]["median"] * 1000 for d in dbs], color="#9bbb59", label="first queryable"
    )
    ax.axhline(1000, color="red", linestyle=":", label="1 s target")
    ax.set_ylabel("ms after the relay's death")
    ax.legend(fontsize=7)
    ax.set_title(f"mass event: relay with {args.hosts:,} hosts dies", fontsize=10)
    report.save(out, {"persist": fig})
    return report


# ------------------------------------------------------------------------------------ writer holds
# The writer's part of a relay's death, in-process on a real database (SQLite in a temporary
# directory, or a fresh PostgreSQL schema), with the monitor's journal: the decisions as the expiry
# part hands them over (`emit`, EXPIRE_STEP at a time), then the batch that writes them all
# (`Writer.flush`) while a probe task counts the event loop's turns. The longest turn is the longest
# hold of the loop; the loop thread's CPU time per turn is reported beside it (it does not count
# waiting for the GIL or for a busy machine's CPU). What the monitor held before the event is
# frozen out of the collector's view, as `Monitor.restore` does (`gc.freeze`).


class Turns:
    """A task that only yields: the wall and loop-thread CPU time of every turn of the event loop."""

    def __init__(self) -> None:
        self.walls: list[float] = []
        self.cpus: list[float] = []
        self._stop = False

    async def run(self) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        while not self._stop:
            await asyncio.sleep(0)
            now_wall, now_cpu = time.perf_counter(), time.thread_time()
            self.walls.append(now_wall - wall)
            self.cpus.append(now_cpu - cpu)
            wall, cpu = now_wall, now_cpu

    def stop(self) -> None:
        self._stop = True


async def _writer_holds(hosts: int, url: str, journal: Path) -> dict[str, float]:
    from relaybeat.monitor.detector import Policy
    from relaybeat.monitor.service import Monitor, MonitorSettings, keep_collector_off_the_hot_path
    from relaybeat.monitor.store import Store
    from relaybeat.relay.mqtt import BrokerURL
    from relaybeat.relay.wire import OFFLINE, Bundle, HostEntry, LeafStatus, encode_bundle

    store = await Store.open(url)
    try:
        await store.upgrade()
        clock = HandClock()
        settings = MonitorSettings(
            BrokerURL.parse("mqtt://127.0.0.1:1"),
            Policy(misses=3),
            journal=journal,
            max_bundle_entries=max(hosts, 200_000),
            max_bundle_bytes=1 << 30,
        )
        monitor = Monitor(settings, store, clock)
        await monitor.writer.replay()  # opens the journal, as `restore` does
        entries = tuple(HostEntry(f"h{i:06d}", 1, 0, 1000, LeafStatus.OK) for i in range(hosts))
        monitor.take("relaybeat/bundle/r1", encode_bundle(Bundle("r1", "boot-r1", 1, 1000, entries)))
        monitor.expire()
        await monitor.flush()
        del entries
        keep_collector_off_the_hot_path()  # as after `restore`
        try:
            clock.t += 0.5
            emits: list[float] = []
            emit = monitor.writer.emit

            def timed(transitions: list[Transition]) -> None:
                started = time.perf_counter()
                emit(transitions)
                emits.append(time.perf_counter() - started)

            monitor.expiry.decide = monitor.ingest.decide = timed
            monitor.take("relaybeat/relay/r1/status", OFFLINE)
            monitor.expire()
            decided = len(monitor.pending())
            turns = Turns()
            probe = asyncio.create_task(turns.run())
            await asyncio.sleep(0)
            started = time.perf_counter()
            await monitor.flush()
            flush_s = time.perf_counter() - started
            turns.stop()
            await probe
            saved = Turns()  # the restart checkpoint: every host's last-seen time
            probe = asyncio.create_task(saved.run())
            await asyncio.sleep(0)
            await monitor.checkpoint(since=0.0)
            saved.stop()
            await probe
        finally:
            gc.unfreeze()
        monitor.writer.close()
        return {
            "transitions": decided,
            "emit_calls": len(emits),
            "emit_max_ms": max(emits) * 1e3,
            "flush_ms": flush_s * 1e3,
            "flush_turns": len(turns.walls),
            "flush_hold_max_ms": max(turns.walls) * 1e3,
            "flush_hold_cpu_max_ms": max(turns.cpus) * 1e3,
            "checkpoint_hold_max_ms": max(saved.walls) * 1e3,
        }
    finally:
        await store.close()


def writer_holds(args: Any, report: Report) -> dict[str, Any]:
    per: dict[str, Any] = {}
    for db in args.databases:
        for hosts in args.holds_hosts:
            runs = []
            for _ in range(args.reps):
                with tempfile.TemporaryDirectory(prefix="relaybeat-holds-") as tmp:
                    schema = None
                    if db == "postgresql":
                        schema = f"relaybeat_bench_{uuid.uuid4().hex[:12]}"
                        with psycopg.connect(plain_url(args.pg_url), autocommit=True) as admin:
                            admin.execute(f'CREATE SCHEMA "{schema}"')
                        url = f"{args.pg_url}?options={quote(f'-csearch_path={schema}')}"
                    else:
                        url = f"sqlite:///{Path(tmp) / 'holds.db'}"
                    try:
                        runs.append(asyncio.run(_writer_holds(hosts, url, Path(tmp) / "monitor.journal")))
                    finally:
                        if schema is not None:
                            with psycopg.connect(plain_url(args.pg_url), autocommit=True) as admin:
                                admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
                print(f"  writer holds {db} {hosts:,} hosts: {runs[-1]}", flush=True)
            per[f"{db}, {hosts:,} hosts"] = {k: spread(r[k] for r in runs) for k in runs[0]}
    rows = [
        (name, med(s["transitions"]), med(s["emit_max_ms"], 1), med(s["flush_ms"]), med(s["flush_turns"]),
         med(s["flush_hold_max_ms"], 1), med(s["flush_hold_cpu_max_ms"], 1), med(s["checkpoint_hold_max_ms"], 1))
        for name, s in per.items()
    ]  # fmt: skip
    report.say(f"\nwriter holds: a relay's death written in-process, journaled; median [min–max] of {args.reps}\n")
    report.say(table(["database, relay's hosts", "transitions", "longest emit (ms, EXPIRE_STEP decisions)",
                      "flush (ms)", "loop turns in flush", "longest loop turn in flush (ms)",
                      "its loop-thread CPU (ms)", "longest loop turn in a checkpoint (ms)"], rows))  # fmt: skip
    return per
