"""Webhook delivery end to end: a real monitor (fed through its own `take`, on a fake monotonic
clock), a real store (a SQLite file always, PostgreSQL too when RELAYBEAT_TEST_DB_URL is set), the
real outbox worker with httpx, and a real HTTP receiver on a free port (a few lines of asyncio
speaking HTTP/1.1) that records every request and answers what each test tells it to.

Nothing here sleeps and then asserts: tests wait (with a timeout) for requests or rows to appear.
Retries run on a short schedule (0.05 s doubling to 0.4 s, no jitter) so backoff is observable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from relaybeat.monitor.detector import Policy
from relaybeat.monitor.maintenance import TargetKind
from relaybeat.monitor.notify import NoticeType, Target
from relaybeat.monitor.outbox import NotifySettings, Webhook, backoff_s
from relaybeat.monitor.service import Monitor, MonitorSettings
from relaybeat.monitor.states import Event, Kind, State
from relaybeat.monitor.store import Batch, NewMessage, OutboxRow, Store, TransitionRow
from relaybeat.relay.mqtt import BrokerURL
from relaybeat.relay.ports import pick_free
from relaybeat.relay.wire import Bundle, HostEntry, LeafStatus, encode_bundle
from tests.conftest import CentralBroker
from tests.fakes import FakeClock

SECRET = "webhook-secret-0123456789"
WAIT_S = 15.0

# ------------------------------------------------------------------------------------ receiver


@dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    arrived: float  # time.monotonic()
    answer: int | str

    def json(self) -> Any:
        return orjson.loads(self.body)


class Receiver:
    """A tiny HTTP/1.1 server. Each request gets the next of `answers` (200 once they run out):
    a status code, or "stall" (answer nothing for `stall_s`)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.requests: list[Request] = []
        self.answers: deque[int | str] = deque()
        self.stall_s = 2.0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._arrived = asyncio.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._handlers):
            task.cancel()

    async def wait_for(self, count: int, timeout_s: float = WAIT_S) -> list[Request]:
        async with asyncio.timeout(timeout_s), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)
        return self.requests

    def bodies(self, path: str | None = None) -> list[Any]:
        return [r.json() for r in self.requests if path is None or r.path == path]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            _method, path, _version = head[0].split(" ", 2)
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name:
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            answer = self.answers.popleft() if self.answers else 200
            async with self._arrived:
                self.requests.append(Request(path, headers, body, time.monotonic(), answer))
                self._arrived.notify_all()
            if answer == "stall":
                await asyncio.sleep(self.stall_s)
                answer = 200
            writer.write(f"HTTP/1.1 {answer} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver(pick_free("127.0.0.1"))
    await server.start()
    yield server
    await server.stop()


# ------------------------------------------------------------------------------------- monitor


def hook(receiver: Receiver, name: str = "ops", path: str = "/hook", **target: Any) -> Webhook:
    return Webhook(Target(name, **target), receiver.url + path, SECRET, timeout_s=0.5)


@dataclass
class Site:
    """Drives a real monitor through relay bundles; `write()` puts what it decided into SQL."""

    monitor: Monitor
    clock: FakeClock
    boot: str = "boot1"
    seq: dict[str, int] = field(default_factory=dict)  # relays' bundle seqs and hosts' beat seqs

    def send(self, relay: str, **ages_ms: int) -> None:
        """One bundle from `relay` now, with each host's age: 0 is a new beat (its seq moves on),
        more is the last beat again, that long ago."""
        self.seq[relay] = self.seq.get(relay, 0) + 1
        for host, age in ages_ms.items():
            self.seq[host] = self.seq.get(host, 0) + (age == 0 or host not in self.seq)
        entries = tuple(HostEntry(h, self.seq[h], age, 1000, LeafStatus.OK) for h, age in sorted(ages_ms.items()))
        payload = encode_bundle(Bundle(relay, self.boot, self.seq[relay], 1000, entries))
        self.monitor.take(self.monitor.topics.bundle(relay), payload)

    async def write(self) -> None:
        self.monitor.expire()
        await self.monitor.flush()

    async def later(self, seconds: float) -> None:
        self.clock.t += seconds


async def open_monitor(
    db_url: str,
    webhooks: tuple[Webhook, ...],
    clock: FakeClock | None = None,
    broker: CentralBroker | None = None,
) -> Monitor:
    store = await Store.open(db_url)
    await store.upgrade()
    notify = NotifySettings(webhooks, retry_min_s=0.05, retry_max_s=0.4)
    url, prefix = ("mqtt://127.0.0.1:1", "relaybeat/") if broker is None else (broker.url, broker.prefix)
    settings = MonitorSettings(BrokerURL.parse(url), Policy(misses=3), prefix, notify=notify)
    monitor = Monitor(settings, store, clock or FakeClock())
    await monitor.restore()
    monitor.outbox.jitter = lambda: 1.0  # backoff exactly min_s × 2^n, so the gaps can be checked
    monitor.notifier.remind_tick_s = 0.05  # the fake clock jumps; look for due reminders often
    return monitor


@contextlib.asynccontextmanager
async def delivering(
    monitor: Monitor, run: Callable[[], Coroutine[Any, Any, None]] | None = None
) -> AsyncIterator[None]:
    """The monitor's notification tasks (or `run`) in the background for the block; then its store closes."""
    task = asyncio.create_task((run or monitor.notify)())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await monitor.store.close()


async def until(monitor: Monitor, check: Callable[[], Awaitable[bool]], timeout_s: float = WAIT_S) -> None:
    """Wait until `check()` holds, looking again after each step of the outbox worker."""
    worker = monitor.outbox
    async with asyncio.timeout(timeout_s):
        while True:
            seen = worker.steps
            if await check():
                return

            def moved(seen: int = seen) -> bool:
                return worker.steps > seen

            async with worker.progress:
                await worker.progress.wait_for(moved)


async def settled(monitor: Monitor) -> list[OutboxRow]:
    """Every outbox row, once none is pending any more."""

    async def nothing_pending() -> bool:
        return not await monitor.store.outbox(pending=True)

    await until(monitor, nothing_pending)
    return await monitor.store.outbox()


async def relay_with_hosts(site: Site, relay: str = "r1", hosts: tuple[str, ...] = ("a", "b", "c")) -> None:
    site.send(relay, **dict.fromkeys(hosts, 0))
    await site.write()


# ------------------------------------------------------------------------------------- tests


async def test_relay_death_sends_one_webhook_listing_all_its_hosts_and_recovery_one_more(
    db_url: str, receiver: Receiver
) -> None:
    monitor = await open_monitor(db_url, (hook(receiver),))
    site = Site(monitor, monitor.clock)  # type: ignore[arg-type]
    async with delivering(monitor):
        await relay_with_hosts(site)  # r1, a, b, c come up: nothing to say
        await site.later(10)  # r1 silent for 10 s (timeout 1 s × 3): r1 down, a b c unreachable
        await site.write()
        [outage] = await receiver.wait_for(1)
        rows = await settled(monitor)
        assert len(rows) == 1
        assert rows[0].delivered_at is not None
        assert rows[0].attempts == 1
        body = outage.json()
        assert (body["type"], body["incident"], body["relay"]) == ("outage", "relay:r1", "r1")
        assert body["hosts"] == ["a", "b", "c"]
        assert body["still_open"] == 4
        assert [(s["kind"], s["id"], s["to"]) for s in body["subjects"]] == [
            ("relay", "r1", "down"),
            ("host", "a", "unreachable"),
            ("host", "b", "unreachable"),
            ("host", "c", "unreachable"),
        ]
        history = await monitor.store.history(kind=Kind.HOST, newest_first=False)
        assert [t.to_state for t in history if t.event is Event.TRANSITION][-3:] == [State.UNREACHABLE] * 3

        site.send("r1", a=0, b=0, c=0)  # r1 is back and so is everyone behind it
        await site.write()
        [_, recovery] = await receiver.wait_for(2)
        body = recovery.json()
        assert (body["type"], body["incident"], body["resolved"], body["still_open"]) == (
            "recovery",
            "relay:r1",
            True,
            0,
        )
        assert [(s["id"], s["from"], s["to"]) for s in body["subjects"]] == [
            ("r1", "down", "up"),
            ("a", "unreachable", "up"),
            ("b", "unreachable", "up"),
            ("c", "unreachable", "up"),
        ]
        assert len(await settled(monitor)) == 2
        assert len(receiver.requests) == 2
        assert await monitor.store.alerts() == []
        assert len(monitor.alerts) == 0


async def test_signature_verifies_with_the_secret_and_headers_name_the_message(
    tmp_path: Path, receiver: Receiver
) -> None:
    unsigned = Webhook(Target("plain"), receiver.url + "/plain", None, timeout_s=0.5)
    monitor = await open_monitor(f"sqlite:///{tmp_path / 'sig.db'}", (hook(receiver), unsigned))
    site = Site(monitor, monitor.clock)  # type: ignore[arg-type]
    async with delivering(monitor):
        await relay_with_hosts(site, hosts=("a",))
        await site.later(10)
        site.send("r1", a=10_000)  # r1 speaks, a does not: a is down
        await site.write()
        requests = await receiver.wait_for(2)
    signed = next(r for r in requests if r.path == "/hook")
    headers = signed.headers
    timestamp = headers["x-relaybeat-timestamp"]
    expected = hmac.new(SECRET.encode(), timestamp.encode() + b"." + signed.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-relaybeat-signature"], f"sha256={expected}")
    assert abs(int(timestamp) - time.time()) < 60
    assert headers["idempotency-key"] == signed.json()["id"]
    assert headers["x-relaybeat-event"] == "outage"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("relaybeat")
    tampered = hmac.new(SECRET.encode(), timestamp.encode() + b"." + signed.body + b" ", hashlib.sha256).hexdigest()
    assert headers["x-relaybeat-signature"] != f"sha256={tampered}"
    wrong_key = hmac.new(b"not-the-secret", timestamp.encode() + b"." + signed.body, hashlib.sha256).hexdigest()
    assert headers["x-relaybeat-signature"] != f"sha256={wrong_key}"
    plain = next(r for r in requests if r.path == "/plain")
    assert "x-relaybeat-signature" not in plain.headers
    assert plain.json()["summary"].startswith("host a down")


async def test_a_failing_receiver_gets_retries_with_growing_gaps_then_exactly_one_success(
    db_url: str, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    receiver.answers.extend([503, 500, 429, 404])
    monitor = await open_monitor(db_url, (hook(receiver),))
    site = Site(monitor, monitor.clock)  # type: ignore[arg-type]
    async with delivering(monitor):
        await relay_with_hosts(site)
        await site.later(10)
        await site.write()
        requests = await receiver.wait_for(5)
        [row] = await settled(monitor)
    assert [r.answer for r in requests] == [503, 500, 429, 404, 200]
    assert len({r.json()["id"] for r in requests}) == 1  # the same message every time
    assert len({r.headers["idempotency-key"] for r in requests}) == 1
    gaps = [b.arrived - a.arrived for a, b in itertools.pairwise(requests)]
    floor = [backoff_s(n, monitor.settings.notify) for n in (1, 2, 3, 4)]
    assert floor == [0.05, 0.1, 0.2, 0.4]
    assert all(gap >= wait * 0.9 for gap, wait in zip(gaps, floor, strict=True)), gaps
    assert (row.attempts, row.last_error) == (5, None)
    assert row.delivered_at is not None
    await asyncio.sleep(0.5)  # longer than the longest backoff: nothing else comes
    assert len(receiver.requests) == 5
    failures = [r.getMessage() for r in caplog.records if r.name == "relaybeat.notify"]
    assert len(failures) == 4
    assert "for 'ops' failed (HTTP 503), attempt 1" in failures[0]
    assert str(receiver.port) not in caplog.text  # logs name the webhook, never its URL


async def test_a_receiver_that_is_down_gets_everything_in_order_once_it_is_back(db_url: str) -> None:
    receiver = Receiver(pick_free("127.0.0.1"))  # not listening yet: connection refused
    monitor = await open_monitor(db_url, (hook(receiver),))
    site = Site(monitor, monitor.clock)  # type: ignore[arg-type]
    try:
        async with delivering(monitor):
            await relay_with_hosts(site)
            await site.later(10)
            await site.write()  # outage queued
            site.send("r1", a=0, b=0, c=0)
            await site.write()  # recovery queued behind it

            async def retried() -> bool:
                rows = await monitor.store.outbox()
                return rows[0].attempts >= 3

            await until(monitor, retried)
            first, second = await monitor.store.outbox(pending=True)
            assert first.attempts >= 3
            assert second.attempts == 0
            assert first.last_error is not None
            assert "Connect" in first.last_error
            await receiver.start()
            requests = await receiver.wait_for(2)
            rows = await settled(monitor)
            await asyncio.sleep(0.5)
        assert [r.json()["type"] for r in receiver.requests] == ["outage", "recovery"]
        assert [r.json()["id"] for r in requests] == [row.key for row in rows]
        assert all(row.delivered_at is not None for row in rows)
    finally:
        await receiver.stop()


async def test_a_timed_out_attempt_is_retried_with_the_same_idempotency_key(tmp_path: Path, receiver: Receiver) -> None:
    receiver.answers.append("stall")  # the first attempt gets no answer within timeout_s (0.5 s)
    monitor = await open_monitor(f"sqlite:///{tmp_path / 'timeout.db'}", (hook(receiver),))
    site = Site(monitor, monitor.clock)  # type: ignore[arg-type]
    async with delivering(monitor):
        await relay_with_hosts(site)
        await site.later(10)
        await site.write()
        first, second = await receiver.wait_for(2)
        [row] = await settled(monitor)
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"] == row.key
    assert first.body == second.body  # the receiver can drop the repeat by its key
    assert row.attempts == 2
    assert row.delivered_at is not None


async def test_undelivered_messages_survive_a_monitor_restart_and_are_sent_once(
    db_url: str, central_broker: CentralBroker
) -> None:
    receiver = Receiver(pick_free("127.0.0.1"))  # down while the first monitor runs
    clock = FakeClock()
    first = await open_monitor(db_url, (hook(receiver),), clock)
    site = Site(first, clock)
    async with delivering(first):
        await relay_with_hosts(site)
        await site.later(10)
        await site.write()

        async def tried() -> bool:
            return (await first.store.outbox())[0].attempts >= 1

        await until(first, tried)
    # The first monitor is gone (its store closed). A new one starts on the same database, for real
    # (Monitor.run with an MQTT broker), and finds the message and what the receiver was told.
    await receiver.start()
    try:
        second = await open_monitor(db_url, (hook(receiver),), clock, central_broker)
        assert [(a.subject, a.state) for a in second.alerts.alerts()] == [
            ("a", State.UNREACHABLE),
            ("b", State.UNREACHABLE),
            ("c", State.UNREACHABLE),
            ("r1", State.DOWN),
        ]
        async with delivering(second, second.run):
            [outage] = await receiver.wait_for(1)
            assert outage.json()["type"] == "outage"
            assert outage.json()["hosts"] == ["a", "b", "c"]
            site = Site(second, clock, boot="boot2")  # r1 restarted too
            site.send("r1", a=0, b=0, c=0)
            await second.flush()
            [_, recovery] = await receiver.wait_for(2)
            rows = await settled(second)
            await asyncio.sleep(0.3)
        assert recovery.json()["type"] == "recovery"
        assert recovery.json()["resolved"] is True
        assert len(receiver.requests) == 2
        assert [r.key for r in rows] == [r.json()["id"] for r in receiver.requests]
    finally:
        await receiver.stop()


async def test_a_delivered_message_is_not_resent_while_recording_the_delivery_fails(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monitor = await open_monitor(f"sqlite:///{tmp_path / 'record.db'}", (hook(receiver),))
    real = monitor.store.outbox_delivered
    refusals = 3

    async def flaky(message_id: int, at: datetime, attempts: int) -> None:
        nonlocal refusals
        if refusals:
            refusals -= 1
            msg = "database went away"
            raise ConnectionError(msg)
        await real(message_id, at, attempts)

    monkeypatch.setattr(monitor.store, "outbox_delivered", flaky)
    site = Site(monitor, monitor.clock)  # type: ignore[arg-type]
    async with delivering(monitor):
        await relay_with_hosts(site)
        await site.later(10)
        await site.write()
        await receiver.wait_for(1)
        [row] = await settled(monitor)
        await asyncio.sleep(0.3)
    assert refusals == 0
    assert row.delivered_at is not None
    assert row.attempts == 1
    assert len(receiver.requests) == 1


async def test_filters_choose_what_each_webhook_hears(db_url: str, receiver: Receiver) -> None:
    hooks = (
        hook(receiver, "ops", "/ops"),
        hook(receiver, "db", "/db", hosts=("db-*",), states=frozenset({State.DOWN})),
        hook(receiver, "site2", "/site2", relays=("r2",)),
    )
    monitor = await open_monitor(db_url, hooks)
    site = Site(monitor, monitor.clock)  # type: ignore[arg-type]
    async with delivering(monitor):
        site.send("r1", **{"db-1": 0, "web-1": 0})
        site.send("r2", **{"db-2": 0})
        await site.write()
        await site.later(10)
        site.send("r1", **{"db-1": 10_000, "web-1": 0})  # db-1 silent behind a live relay: down
        site.send("r2", **{"db-2": 0})
        await site.write()
        await site.later(10)
        site.send("r2", **{"db-2": 0})  # r1 says nothing for 10 s: down, web-1 unreachable
        await site.write()
        await site.later(10)
        site.send("r2", **{"db-2": 10_000})  # db-2 silent behind r2: down
        await site.write()
        await receiver.wait_for(7)
        await settled(monitor)
        await asyncio.sleep(0.2)
    said = {path: [(b["type"], b["incident"], [s["id"] for s in b["subjects"]]) for b in receiver.bodies(path)]
            for path in ("/ops", "/db", "/site2")}  # fmt: skip
    assert said == {
        "/ops": [
            ("outage", "host:db-1", ["db-1"]),
            ("outage", "relay:r1", ["r1", "web-1"]),
            ("outage", "host:db-2", ["db-2"]),
        ],
        "/db": [("outage", "host:db-1", ["db-1"]), ("outage", "relay:r1", ["r1"]), ("outage", "host:db-2", ["db-2"])],
        "/site2": [("outage", "host:db-2", ["db-2"])],
    }


async def test_maintenance_suppresses_notifications_and_others_still_hear(db_url: str, receiver: Receiver) -> None:
    monitor = await open_monitor(db_url, (hook(receiver),))
    site = Site(monitor, monitor.clock)  # type: ignore[arg-type]
    async with delivering(monitor):
        site.send("r1", a=0, b=0)
        site.send("r2", x=0)
        await site.write()
        now = monitor.clock.wall(monitor.clock.now())
        window = await monitor.store.add_maintenance(TargetKind.RELAY, "r1", now, None, "swap the switch", now)
        monitor.maintenance.add(window)
        await site.later(10)
        site.send("r2", x=10_000)  # r1 silent (in maintenance): r1 down, a b unreachable; x down (not)
        await site.write()
        marked = [t for t in await monitor.store.history() if t.to_state in (State.DOWN, State.UNREACHABLE)]
        assert sorted((t.subject, t.maintenance) for t in marked) == [
            ("a", True),
            ("b", True),
            ("r1", True),
            ("x", False),
        ]
        [only] = await receiver.wait_for(1)
        assert only.json()["incident"] == "host:x"
        site.send("r1", a=0, b=0)  # back, still in maintenance: nothing either
        site.send("r2", x=0)
        await site.write()
        rows = await settled(monitor)
        await receiver.wait_for(2)
        await asyncio.sleep(0.2)
    assert [(r.type, r.incident) for r in rows] == [(NoticeType.OUTAGE, "host:x"), (NoticeType.RECOVERY, "host:x")]
    assert len(receiver.requests) == 2


async def test_reminders_repeat_while_down_and_stop_after_recovery(tmp_path: Path, receiver: Receiver) -> None:
    nag = hook(receiver, "nag", remind_every_s=60.0)
    monitor = await open_monitor(f"sqlite:///{tmp_path / 'remind.db'}", (nag,))
    site = Site(monitor, monitor.clock)  # type: ignore[arg-type]
    async with delivering(monitor):
        await relay_with_hosts(site, hosts=("a", "b"))
        await site.later(10)
        site.send("r1", a=10_000, b=0)  # a down
        await site.write()
        await receiver.wait_for(1)
        await site.later(30)
        site.send("r1", a=40_000, b=0)
        await site.write()
        assert await monitor.remind() == 0  # 30 s: not yet
        await site.later(31)
        [_, reminder] = await receiver.wait_for(2)  # the reminder loop finds it due
        body = reminder.json()
        assert (body["type"], body["incident"], body["hosts"]) == ("reminder", "host:a", ["a"])
        assert [s["to"] for s in body["subjects"]] == ["down"]
        assert await monitor.remind() == 0  # just reminded
        site.send("r1", a=0, b=0)
        await site.write()
        [*_, recovery] = await receiver.wait_for(3)
        assert recovery.json()["type"] == "recovery"
        await site.later(600)
        assert await monitor.remind() == 0
        await settled(monitor)
    assert [r.json()["type"] for r in receiver.requests] == ["outage", "reminder", "recovery"]


async def test_outbox_rows_are_written_in_the_transaction_of_their_transitions(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite:///{tmp_path / 'tx.db'}")
    try:
        await store.upgrade()
        now = datetime(2026, 1, 1, tzinfo=UTC)
        row = TransitionRow(
            kind=Kind.HOST, subject="a", from_state=State.UP, to_state=State.DOWN, at=now, reason="no beat"
        )
        message = NewMessage("ops", "same-key", NoticeType.OUTAGE, "host:a", "{}", now)
        with pytest.raises(Exception, match=r"(?i)unique"):
            await store.write(Batch(transitions=[row], messages=[message, message]))  # the second breaks the key
        assert await store.history() == []
        assert await store.outbox() == []
        await store.write(Batch(transitions=[row], messages=[message]))
        assert len(await store.history()) == 1
        assert [m.key for m in await store.outbox()] == ["same-key"]
        assert await store.outbox_purge(now + timedelta(days=1)) == 0  # pending rows are never purged
        await store.outbox_delivered((await store.outbox())[0].id, now, 1)
        assert await store.outbox_purge(now + timedelta(days=1)) == 1
    finally:
        await store.close()
