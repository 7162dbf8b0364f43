"""The monitor service: bundles in, decisions from the detector, transitions out to SQL.

It only moves bytes, time and rows:
- one MQTT session (persistent, QoS 1) feeds `take()`, which decodes and hands to the detector;
- one loop sleeps until the detector's next deadline and calls `expire()`;
- one writer batches transitions and current-state rows into SQL, off the hot path, retrying until
  the database takes them (nothing accepted is lost);
- with a journal (`MonitorSettings.journal`), every decision is appended to it as it is made, so a
  monitor killed before its batch commits writes it at the next start, dated when it was decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import aiomqtt

from monitor.detector import Detector, HostSnapshot, HostTrack, Policy, RelaySnapshot, RelayTrack
from monitor.journal import REWRITE_BYTES, Decision, Journal, encode
from monitor.maintenance import MaintenanceBook
from monitor.notify import AlertBook, Change, Plan, plan, remind, render
from monitor.outbox import NotifySettings, OutboxWorker
from monitor.states import Kind, State, Transition
from monitor.store import HostRow, NewMessage, NewTransition, RelayRow, Store
from relay.mqtt import BrokerURL, backlog, messages, payload_bytes, read_backlog, stay_connected
from relay.parts import Parts, PartState
from relay.rejections import Rejections
from relay.wire import (
    DEFAULT_MAX_BUNDLE_BYTES,
    DEFAULT_MAX_BUNDLE_ENTRIES,
    DEFAULT_PREFIX,
    INTERNAL_ERROR,
    Bundle,
    TopicKind,
    Topics,
    WireError,
    decode_beat,
    decode_bundle,
    decode_relay_status,
)

log = logging.getLogger("relaybeat.monitor")

STALL_S = 1.0  # the event loop blocked this long means unread input may be waiting: grace, not judgement
BEHIND_S = 1.0  # input still waiting after reading this long: the monitor is behind, news may be late
EXPIRY_QUANTUM_S = 0.02  # a deadline is decided at most this late (plus the loop's own latency)
DB_PROBE_S = 0.5  # how often the database probe reads one row
DB_PROBE_TIMEOUT_S = 1.0  # a probe not answered by then counts as the database being away


class Clock:
    """Monotonic seconds for decisions; wall-clock UTC only for what is stored and shown."""

    def __init__(self) -> None:
        self.offset = time.time() - time.monotonic()

    def now(self) -> float:
        return time.monotonic()

    def wall(self, t: float) -> datetime:
        return datetime.fromtimestamp(t + self.offset, UTC)

    def mono(self, moment: datetime) -> float:
        return moment.timestamp() - self.offset


class MonitorObserver(Protocol):
    """Watches the monitor without steering it (the metrics do): decisions as made, writes as done."""

    def decided(self, transitions: Sequence[Transition], now: float) -> None:
        """`transitions` were just decided at `now` (the monitor's clock, like `Transition.at`)."""

    def wrote(self, rows: int, seconds: float) -> None:
        """A batch of `rows` transitions reached SQL; the transaction took `seconds`."""


@dataclass(frozen=True, slots=True)
class MonitorSettings:
    broker: BrokerURL
    policy: Policy = field(default_factory=Policy)
    prefix: str = DEFAULT_PREFIX
    client_id: str = "relaybeat-monitor"
    accept_direct_beats: bool = True  # beats published straight to the monitor's broker (no relay)
    # The relays this monitor accepts bundles from, children in trees included; None: any relay.
    relays: frozenset[str] | None = None
    max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES
    max_bundle_entries: int = DEFAULT_MAX_BUNDLE_ENTRIES
    # How often last-seen times are saved for a restart. After a restart everyone gets a full timeout
    # of grace anyway, so these only feed reasons and the API until fresh news arrives: rarely is enough.
    checkpoint_s: float = 60.0
    notify: NotifySettings = field(default_factory=NotifySettings)  # webhooks; none by default
    # Write-ahead journal of decisions (monitor/journal.py): what was decided but not yet in SQL
    # survives kill -9 and is written at the next start. None: no journal (a crash loses that batch).
    journal: Path | None = None


class Monitor:
    def __init__(self, settings: MonitorSettings, store: Store, clock: Clock | None = None) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock or Clock()
        self.topics = Topics(settings.prefix)
        self.detector = Detector(settings.policy, self.clock.now())
        self.rejections = Rejections(log)
        self.ignored_log = Rejections(log)  # rate-limited warnings for bundles the detector ignores (it counts)
        self.received: Counter[str] = Counter()
        self.started_at = self.clock.now()
        self.db_ok = True  # the last SQL write went through (set by the writer)
        self.db_reachable = True  # the database probe's last read went through
        self.parts = Parts("monitor")  # the running tasks and their states, for /healthz
        self.written = asyncio.Condition()  # notified after each batch reaches SQL
        self.last_written_id = 0
        self.recent: deque[Transition] = deque(maxlen=200)  # the latest decisions, for live views
        self.maintenance = MaintenanceBook()  # loaded by restore(); transitions it covers are marked
        self.observers: list[MonitorObserver] = []
        self.write_failures = 0
        self.loop_lags_s: deque[float] = deque(maxlen=20)  # the last 5 s of event-loop lag probes
        self._unwritten: list[Transition] = []
        self._in_flight: list[Transition] = []  # the batch being written right now
        # Each decision's key is this monitor's prefix and its number in decision order; `_unwritten`
        # always holds numbers `_unwritten_from` up to `_decided` (a failed batch goes back in front).
        self._key_prefix = uuid.uuid4().hex[:16] + "-"
        self._decided = 0
        self._unwritten_from = 0
        self.journal: Journal | None = None  # opened by restore() when settings.journal is set
        self.journal_failures = 0
        self._journal_warned_at = -10.0
        self._wake = asyncio.Event()
        self._last_tick: float | None = None  # when the loop probe last ran (None: no probe running)
        self.stalls = 0
        self.behind = 0  # expiry passes that found input waiting and could not read it all first
        self._behind_since: float | None = None  # since when we have been behind (None: caught up)
        self._client: aiomqtt.Client | None = None  # the broker session's client, while there is one
        self._armed: float | None = None  # the deadline the expiry loop sleeps until (None: no deadline)
        self._sorted_ids: list[str] = []
        self._sorted_ids_for = -1
        self._write_wanted = asyncio.Event()
        self.alerts = AlertBook()  # what each webhook target has been told is down (loaded by restore)
        self.outbox = OutboxWorker(store, settings.notify)
        self._notify_lock = asyncio.Lock()  # one plan at a time against `alerts`
        everies = [t.remind_every_s for t in settings.notify.targets if t.remind_every_s is not None]
        self.remind_tick_s = max(0.01, min([30.0, *(every / 4 for every in everies)]))  # also drops stale alerts

    # ------------------------------------------------------------------------------- lifecycle

    async def restore(self) -> None:
        """Write what the journal holds and SQL lacks, then load current state from SQL; the
        detector's start-up grace protects everyone restored."""
        self.maintenance.load(await self.store.maintenance_windows())
        self.alerts.load(await self.store.alerts())
        if self.settings.journal is not None and self.journal is None:
            journal, decisions, torn = Journal.open(self.settings.journal)
            try:
                if torn:
                    log.warning("journal %s: skipped %d lines that are not decisions (torn?)", journal.path, torn)
                await self._replay(decisions)
                journal.clear()
            except BaseException:
                journal.close()
                raise
            self.journal = journal
        hosts, relays = await self.store.load()
        mono = self.clock.mono
        self.detector.restore(
            (
                HostSnapshot(
                    h.id, h.state, mono(h.since), None if h.last_seen is None else mono(h.last_seen),
                    h.relay, h.interval_s, h.seq, h.flapping,
                )
                for h in hosts
            ),
            (
                RelaySnapshot(
                    r.id, r.state, mono(r.since), None if r.last_seen is None else mono(r.last_seen),
                    r.parent, r.boot, r.seq, r.flush_s, r.flapping,
                )
                for r in relays
            ),
        )  # fmt: skip
        self.last_written_id = await self.store.last_transition_id()
        log.info("restored %d hosts and %d relays from the database", len(hosts), len(relays))

    async def _replay(self, decisions: Sequence[Decision]) -> None:
        """Write the journaled decisions SQL does not hold yet (a batch the last run never committed),
        with their state rows and their webhook messages, in one transaction."""
        if not decisions:
            return
        stored = await self.store.stored_keys(d.transition.key for d in decisions if d.transition.key is not None)
        missing = [d for d in decisions if d.transition.key not in stored]
        if missing:
            rows = [
                dataclasses.replace(t, maintenance=self.maintenance.covers(t.kind, t.subject, d.path, t.at))
                for d, t in ((d, d.transition) for d in missing)
            ]
            hosts = [d.state for d in missing if isinstance(d.state, HostRow)]
            relays = [d.state for d in missing if isinstance(d.state, RelayRow)]
            changes = [
                Change(t.kind, t.subject, t.from_state, t.to_state, t.at, t.reason, t.relay, d.path, t.maintenance,
                       t.event)
                for d, t in zip(missing, rows, strict=True)
            ]  # fmt: skip
            targets = self.settings.notify.targets
            notices = plan(changes, targets, self.alerts) if targets else Plan()
            messages = self._messages(notices)
            await self.store.write(rows, hosts, relays, messages=messages, opened=notices.opened, closed=notices.closed)
            self.alerts.apply(notices)
        log.log(
            logging.WARNING if missing else logging.INFO,
            "journal %s: wrote %d decisions the last run had not written (%d it had)",
            self.settings.journal, len(missing), len(decisions) - len(missing),
        )  # fmt: skip

    def close(self) -> None:
        """Release the journal (its lines stay for the next start if SQL does not hold them yet)."""
        if self.journal is not None:
            self.journal.close()
            self.journal = None

    async def run(self) -> None:
        """Until cancelled, or until one part fails (`PartFailed`, naming it); either way, whatever
        was decided is still written."""
        parts = {
            "consume": self._consume,
            "expire": self._expire_loop,
            "write": self._write_loop,
            "checkpoint": self._checkpoint_loop,
            "loop_lag": self.watch_loop_lag,
            "db_probe": self.probe_database,
        }
        if self.settings.notify.webhooks:
            parts["notify"] = self.notify
        try:
            await self.parts.run(parts)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.flush()), 5.0)

    async def probe_database(self) -> None:
        """Read one row every DB_PROBE_S, so an outage shows within a second even with nothing to write.

        Errors never end the probe: it only sets `db_reachable` (and says so once per change)."""
        while True:
            try:
                async with asyncio.timeout(DB_PROBE_TIMEOUT_S):
                    await self.store.last_transition_id()
            except Exception as exc:
                if self.db_reachable:
                    why = (str(exc).strip().splitlines() or [repr(exc)])[0]
                    log.warning("database unreachable (%s); /healthz is degraded until it answers", why)
                self.db_reachable = False
            else:
                if not self.db_reachable:
                    log.info("database reachable again")
                self.db_reachable = True
            await asyncio.sleep(DB_PROBE_S)

    # ---------------------------------------------------------------------------------- input

    async def _consume(self) -> None:
        s = self.settings
        await stay_connected(
            s.broker,
            lambda: s.broker.client(s.client_id, clean_session=False, keepalive=5),
            self._session,
            name="monitor",
            max_delay_s=1.0,
            on_state=self._connection_changed,
        )

    def _connection_changed(self, connected: bool) -> None:
        if connected != (not self.detector.disconnected):
            log.warning("monitor %s its broker", "regained" if connected else "lost")
        self.detector.set_connected(connected, self.clock.now())
        self._wake.set()

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.subscribe(self.topics.all_bundles, qos=1)
        await client.subscribe(self.topics.all_relay_statuses, qos=1)
        if self.settings.accept_direct_beats:
            await client.subscribe(self.topics.all_beats, qos=1)
        self._client = client
        try:
            async for message in messages(client):
                self.take(str(message.topic), payload_bytes(message.payload), retained=message.retain)
        finally:
            self._client = None
        raise aiomqtt.MqttError("broker closed the message stream")

    def take(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """One message from the broker. Bad input is counted and logged, never raised.

        `retained`: replayed by the broker on (re)subscribe, of unknown age. A retained relay status
        is what it is meant for; a retained beat or bundle is no evidence of life."""
        now = self.clock.now()
        try:
            kind, subject = self.topics.parse(topic)
            if retained and kind is not TopicKind.RELAY_STATUS:
                raise WireError("retained", "an old retained message: publish beats and bundles without retain")
            if kind is TopicKind.BUNDLE:
                bundle = decode_bundle(payload, self.settings.max_bundle_bytes, self.settings.max_bundle_entries)
                if bundle.relay != subject:
                    raise WireError("relay_mismatch", f"bundle for {bundle.relay!r} on {topic!r}")
                if self.settings.relays is not None:
                    unknown = _relay_ids(bundle) - self.settings.relays
                    if unknown:
                        raise WireError("unknown_relay", f"{sorted(unknown)[0]!r} is not in [monitor] relays")
                self.received["bundles"] += 1
                self.received["bundle_entries"] += bundle.entry_count()
                ignored = self.detector.ignored
                before = dict(ignored)
                self._emit(self.detector.observe(bundle, now))
                if ignored != before:  # a duplicate or older bundle (seq, boot): counted by the detector
                    for reason in [r for r, n in ignored.items() if n != before.get(r)]:
                        self.ignored_log.add(f"detector_{reason}", topic, "ignored: not newer than what was seen")
            elif kind is TopicKind.BEAT:
                if self.settings.accept_direct_beats:
                    self.received["beats"] += 1
                    self._emit(self.detector.observe_beat(subject, decode_beat(payload), now))
            elif not decode_relay_status(payload):
                self.received["relay_offline"] += 1
                self._emit(self.detector.relay_offline(subject, now))
        except WireError as err:
            self.rejections.add(err.reason, topic, err.detail)
        except Exception as exc:  # a bug, not bad input: counted and logged, and the next message is read
            self.rejections.add(
                INTERNAL_ERROR, topic, f"{type(exc).__name__} (a bug: please report)", with_traceback=True
            )
        deadline = self.detector.next_deadline()
        if deadline is not None and (self._armed is None or deadline < self._armed):
            self._wake.set()  # only when the expiry loop must wake earlier than it planned

    # ------------------------------------------------------------------------------- deadlines

    async def _expire_loop(self) -> None:
        while True:
            deadline = self._armed = self.detector.next_deadline()
            # At most one pass per EXPIRY_QUANTUM_S: thousands of hosts' deadlines (most of them merely
            # pushed back) are handled in a few passes a second, not one wake-up each.
            timeout = None if deadline is None else max(EXPIRY_QUANTUM_S, deadline - self.clock.now())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            await self._catch_up()
            self.expire()

    async def _catch_up(self) -> None:
        """Read what already reached us (aiomqtt's queue, our socket) before judging anyone on it: news
        that is late because we are behind is no silence. Input that outlasts BEHIND_S of reading (a
        flood) starts one timeout of grace, as a stall does; still behind after that, we decide anyway,
        so a flood that never ends cannot stop every decision."""
        client = self._client
        if client is None or not sum(backlog(client)):
            self._behind_since = None
            return
        if await read_backlog(client, BEHIND_S, self.clock.now):
            self._behind_since = None
            return
        self.behind += 1
        if self._behind_since is None:
            now = self._behind_since = self.clock.now()
            queued, unread = backlog(client)
            log.warning("monitor is behind its input (%d messages, %d bytes waiting): a timeout of grace "
                        "before new decisions", queued, unread)  # fmt: skip
            self.detector.regain_sight(now)

    def expire(self) -> None:
        """Hand the detector the current time: whatever deadline has passed is decided now.

        If the event loop was blocked for longer than STALL_S (the loop probe did not run), input may
        be waiting unread: a stalled monitor is as blind as a disconnected one, so everyone first
        gets a timeout of grace instead of being judged on news we have not read yet."""
        if self._last_tick is not None:
            self._check_stall()
        self._emit(self.detector.expire(self.clock.now()))

    def _check_stall(self) -> None:
        """Called by the loop probe and before each expiry pass, whichever runs first after a stall."""
        now = self.clock.now()
        if self._last_tick is not None and now - self._last_tick > STALL_S:
            log.warning("monitor stalled for %.1f s: a timeout of grace before new decisions", now - self._last_tick)
            self.stalls += 1
            self.detector.regain_sight(now)
        self._last_tick = now

    # ---------------------------------------------------------------------------------- output

    def _emit(self, transitions: list[Transition]) -> None:
        if transitions:
            self.recent.extend(transitions)
            first = self._decided
            self._decided += len(transitions)
            if self.journal is not None:
                try:
                    self.journal.append(self._journal_lines(transitions, first))
                except OSError as exc:  # the decisions still go to SQL; only a crash before that loses them
                    self._journal_failed(exc)
            self._unwritten.extend(transitions)
            self._write_wanted.set()
            now = self.clock.now()
            for observer in self.observers:
                observer.decided(transitions, now)

    def _key(self, number: int) -> str:
        return f"{self._key_prefix}{number}"

    def _journal_lines(self, transitions: Sequence[Transition], first: int) -> bytes:
        """The journal line of decisions numbered from `first`, with their subjects' rows as they are now."""
        hosts, relays = self.detector.hosts, self.detector.relays
        tracks = [(hosts if t.kind is Kind.HOST else relays).get(t.subject) for t in transitions]
        walked: dict[str | None, list[str]] = {}  # by the relay a path starts at: a subtree shares a few
        paths = []
        for t, track in zip(transitions, tracks, strict=True):
            start = t.relay if track is None else track.via if isinstance(track, HostTrack) else track.parent
            path = walked.get(start)
            if path is None:
                path = walked[start] = self.relay_path(t.kind, t.subject, t.relay)
            paths.append(path)
        return encode(self._key_prefix, first, transitions, self.clock.offset, tracks, paths)

    def _compact_journal(self) -> None:
        """After a commit: empty the journal if SQL now holds every decision, or keep only the pending
        ones if it grew large under a load that never let it drain."""
        if self.journal is None:
            return
        try:
            if not self._unwritten:
                self.journal.clear()
            elif self.journal.size > REWRITE_BYTES:
                self.journal.rewrite(self._journal_lines(self._unwritten, self._unwritten_from))
        except OSError as exc:
            self._journal_failed(exc)

    def _journal_failed(self, exc: OSError) -> None:
        self.journal_failures += 1
        now = time.monotonic()
        if now - self._journal_warned_at >= 10.0:  # a full disk fails every batch: say so every 10 s
            self._journal_warned_at = now
            log.warning(
                "journal %s: %s (%d failures so far); decisions still go to SQL, but a crash before that loses them",
                self.settings.journal, exc, self.journal_failures,
            )  # fmt: skip

    async def _write_loop(self) -> None:
        while True:
            await self._write_wanted.wait()
            await asyncio.sleep(0.02)  # let a burst (a relay's whole subtree) gather into one transaction
            await self.flush()

    async def flush(self) -> None:
        """Write everything decided so far; on a database error keep it and retry with backoff.

        A batch is retried only if it did not reach SQL; what follows a commit (ids, observers,
        waking readers) never sends it again. Cancelled mid-write, the batch is kept for the final
        flush in `run`."""
        attempt = 0
        while self._unwritten:
            batch, self._unwritten = self._unwritten, []
            first = self._unwritten_from
            self._unwritten_from += len(batch)
            self._in_flight = batch
            self._write_wanted.clear()
            try:
                rows, elapsed, queued = await self._write(batch, first)
            except BaseException as exc:
                self._unwritten[:0] = batch
                self._unwritten_from = first
                if not isinstance(exc, Exception):
                    raise
                self.db_ok = False
                self.write_failures += 1
                attempt += 1
                log.warning("database write failed (%s); %d transitions kept for retry", exc, len(self._unwritten))
                await asyncio.sleep(min(5.0, 0.1 * 2**attempt))
                continue
            finally:
                self._in_flight = []
            self.db_ok = True
            attempt = 0
            self._compact_journal()
            try:
                await self._after_write(rows, elapsed, queued)
            except Exception as exc:  # the rows are in SQL: only the bookkeeping failed
                log.warning("after writing %d transitions: %s", rows, exc)

    async def _write(self, batch: Sequence[Transition], first: int) -> tuple[int, float, bool]:
        """One transaction: transitions (numbered from `first`), current-state rows, webhook messages and alerts."""
        wall = self.clock.wall
        rows = [
            NewTransition.from_transition(t, at, self.in_maintenance(t.kind, t.subject, at, t.relay), self._key(n))
            for n, t, at in ((n, t, wall(t.at)) for n, t in enumerate(batch, first))
        ]
        host_ids = {t.subject for t in batch if t.kind is Kind.HOST}
        relay_ids = {t.subject for t in batch if t.kind is Kind.RELAY}
        hosts = [self.host_row(self.detector.hosts[h]) for h in sorted(host_ids) if h in self.detector.hosts]
        relays = [self.relay_row(self.detector.relays[r]) for r in sorted(relay_ids) if r in self.detector.relays]
        async with self._notify_lock:  # webhook messages and alerts go in the same transaction
            notices = self._plan(batch, rows)
            messages = self._messages(notices)
            started = time.perf_counter()
            await self.store.write(rows, hosts, relays, messages=messages, opened=notices.opened, closed=notices.closed)
            elapsed = time.perf_counter() - started
            self.alerts.apply(notices)
        return len(rows), elapsed, bool(messages)

    async def _after_write(self, rows: int, elapsed: float, queued: bool) -> None:
        if queued:
            self.outbox.poke()
        for observer in self.observers:
            observer.wrote(rows, elapsed)
        self.last_written_id = await self.store.last_transition_id()
        async with self.written:
            self.written.notify_all()

    # --------------------------------------------------------------------------- notifications

    def _plan(self, batch: Sequence[Transition], rows: Sequence[NewTransition]) -> Plan:
        targets = self.settings.notify.targets
        if not targets:
            return Plan()
        changes = [
            Change(
                t.kind, t.subject, t.from_state, t.to_state, row.at, t.reason, t.relay,
                tuple(self.relay_path(t.kind, t.subject, t.relay)), row.maintenance, t.event,
            )
            for t, row in zip(batch, rows, strict=True)
        ]  # fmt: skip
        return plan(changes, targets, self.alerts)

    def _messages(self, notices: Plan) -> list[NewMessage]:
        now = self.outbox.wall()
        messages = []
        for notice in notices.notices:
            key = uuid.uuid4().hex
            body = render(notice, key).decode()
            messages.append(NewMessage(notice.target, key, notice.type, notice.incident, body, now))
        return messages

    def _state_of(self, kind: Kind, subject: str) -> State | None:
        track = (self.detector.hosts if kind is Kind.HOST else self.detector.relays).get(subject)
        return None if track is None else track.state

    async def notify(self) -> None:
        """Deliver webhook messages and send reminders until cancelled; returns at once without webhooks."""
        if not self.settings.notify.webhooks:
            return
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.outbox.run())
            tasks.create_task(self._remind_loop())

    async def _remind_loop(self) -> None:
        while True:
            await asyncio.sleep(self.remind_tick_s)
            try:
                await self.remind()
            except Exception as exc:  # the database is down: the reminders wait for the next tick
                log.warning("reminders failed (%s); will retry", exc)

    async def remind(self) -> int:
        """Queue the reminders due now (and close alerts of forgotten subjects); how many were queued."""
        async with self._notify_lock:
            now = self.clock.wall(self.clock.now())
            due = remind(self.alerts, self.settings.notify.targets, now, self._state_of)
            if not due:
                return 0
            messages = self._messages(due)
            await self.store.write((), (), (), messages=messages, opened=due.opened, closed=due.closed)
            self.alerts.apply(due)
        if messages:
            self.outbox.poke()
        return len(messages)

    async def _checkpoint_loop(self) -> None:
        previous = self.clock.now()
        while True:
            await asyncio.sleep(self.settings.checkpoint_s)
            now = self.clock.now()
            try:
                await self.checkpoint(since=previous - 1)
                previous = now
            except Exception as exc:
                log.warning("checkpoint failed (%s); will retry next time", exc)

    async def checkpoint(self, since: float) -> None:
        """Save last-seen times of hosts heard since `since`, and the relays' rows, for a restart.

        A subject whose transition is not in SQL yet keeps its stored row until that transition is
        written with it (same transaction): a crash in between must not lose the history.
        """
        pending = {t.subject for t in (*self._unwritten, *self._in_flight)}
        wall = self.clock.wall
        hosts = [
            (h.id, wall(h.last_seen), h.seq)
            for h in self.detector.hosts.values()
            if h.last_seen is not None and h.last_seen >= since and h.id not in pending
        ]
        await self.store.save_last_seen(hosts)
        # Built only now, with no await before the write: a relay transition written meanwhile is
        # either pending (skipped) or already in SQL, and then these rows carry its state.
        pending = {t.subject for t in (*self._unwritten, *self._in_flight)}
        relays = [self.relay_row(r) for r in self.detector.relays.values() if r.id not in pending]
        await self.store.write((), (), relays)

    async def watch_loop_lag(self, every_s: float = 0.25) -> None:
        """Probe how late the event loop wakes a sleeper: a blocked loop delays every decision."""
        while True:
            started = time.monotonic()
            self._check_stall()
            await asyncio.sleep(every_s)
            self.loop_lags_s.append(max(0.0, time.monotonic() - started - every_s))

    @property
    def loop_lag_s(self) -> float:
        """The worst event-loop lag of the last few seconds."""
        return max(self.loop_lags_s, default=0.0)

    # ----------------------------------------------------------------------------------- views

    def host_row(self, host: HostTrack) -> HostRow:
        wall = self.clock.wall
        return HostRow(
            id=host.id,
            state=host.state,
            since=wall(host.since),
            last_seen=None if host.last_seen is None else wall(host.last_seen),
            relay=host.via,
            interval_s=host.interval_s,
            seq=host.seq,
            flapping=host.flapping,
        )

    def relay_row(self, relay: RelayTrack) -> RelayRow:
        wall = self.clock.wall
        return RelayRow(
            id=relay.id,
            state=relay.state,
            since=wall(relay.since),
            last_seen=None if relay.last_seen is None else wall(relay.last_seen),
            parent=relay.parent,
            boot=relay.boot,
            seq=None if relay.seq < 0 else relay.seq,
            flush_s=relay.flush_s,
            flapping=relay.flapping,
        )

    def sorted_host_ids(self) -> list[str]:
        """Host ids in order, for stable pages; re-sorted only when hosts come or go."""
        hosts = self.detector.hosts
        if self._sorted_ids_for != len(hosts):
            self._sorted_ids = sorted(hosts)
            self._sorted_ids_for = len(hosts)
        return self._sorted_ids

    def relay_path(self, kind: Kind, subject: str, fallback: str | None = None) -> list[str]:
        """The relays between a subject and the monitor, nearest first: for a host its relay and
        that relay's ancestors, for a relay its ancestors. `fallback` starts the walk for a subject
        the detector no longer holds (e.g. a transition's `relay`)."""
        relays = self.detector.relays
        if kind is Kind.HOST:
            host = self.detector.hosts.get(subject)
            relay_id = fallback if host is None else host.via
        else:
            relay = relays.get(subject)
            relay_id = fallback if relay is None else relay.parent
        path: list[str] = []
        while relay_id is not None and relay_id not in path and relay_id in relays:
            path.append(relay_id)
            relay_id = relays[relay_id].parent
        return path

    def in_maintenance(self, kind: Kind, subject: str, at: datetime, fallback: str | None = None) -> bool:
        """Whether a maintenance window covers the subject at `at` (for marking and notifications)."""
        return self.maintenance.covers(kind, subject, self.relay_path(kind, subject, fallback), at)

    def forget_host(self, host_id: str) -> bool:
        self._sorted_ids_for = -1
        return self.detector.forget_host(host_id)

    @property
    def database_ok(self) -> bool:
        """The database answers the probe and took the last write."""
        return self.db_ok and self.db_reachable

    def part_states(self) -> dict[str, PartState]:
        """Each part's state, a running one shown `stalled` when it is late: the event loop lagged
        over STALL_S in the last few seconds, or the expiry loop has not woken for a deadline
        STALL_S past due."""
        states = dict(self.parts.states)
        if states.get("loop_lag") is PartState.RUNNING and self.loop_lag_s > STALL_S:
            states["loop_lag"] = PartState.STALLED
        armed = self._armed
        if states.get("expire") is PartState.RUNNING and armed is not None and self.clock.now() - armed > STALL_S:
            states["expire"] = PartState.STALLED
        return states

    @property
    def in_grace(self) -> bool:
        """True during the first timeout after start or after regaining sight."""
        grace = self.detector.grace_from
        longest = max((self.detector.timeout_s(h) for h in self.detector.hosts.values()), default=0.0)
        return self.clock.now() < grace + longest

    def pending(self) -> list[Transition]:
        """Transitions decided but not yet known to be in SQL, in the order they were decided (the
        batch being written, then those waiting). The read view shows these subjects as they were
        before the first of them."""
        return [*self._in_flight, *self._unwritten]


def _relay_ids(bundle: Bundle) -> set[str]:
    """Every relay a bundle speaks for: its own and its children's, at any depth."""
    ids = {bundle.relay}
    for child in bundle.children:
        ids |= _relay_ids(child)
    return ids
