"""The monitor service: bundles in, decisions from the detector, transitions out to SQL.

It only moves bytes, time and rows. `Monitor` composes parts with one job each, every one a named
task (`relay.parts.Parts`, shown in /healthz):
- `consume` (monitor/ingest.py): one MQTT session (persistent, QoS 1) feeds `take()`, which decodes,
  validates and hands news to the detector; `spare` (with a list of broker nodes): a second session
  on another node, heard only while the main one is lost;
- `expire` (monitor/expiry.py): sleeps until the detector's next deadline and calls `expire()`;
  `loop_lag` probes the event loop for stalls;
- `write` and `checkpoint` (monitor/writer.py): every decision is stamped into wall time once,
  journaled (`MonitorSettings.journal`) and batched into SQL off the hot path, retrying until the
  database takes it (nothing accepted is lost);
- `notify` (monitor/notifier.py, with webhooks): delivers the messages planned with each batch;
- `db_probe` (here): reads one row every DB_PROBE_S, so an outage shows with nothing to write;
- `lease` and `follow` (monitor/cluster.py, on PostgreSQL with `cluster` settings): hot standby.
  Exactly one monitor of a database is active and writes; the others follow the same bundles on
  their own sessions, keep their decisions until the active's rows confirm them, and on takeover
  write exactly those it did not. With SQLite one monitor holds the file (`cluster.lock_database`, taken at start).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Generic, TypeVar, overload

from relaybeat.monitor.clock import Clock, SystemClock
from relaybeat.monitor.cluster import Cluster, ClusterSettings, Role
from relaybeat.monitor.detector import Detector, Policy
from relaybeat.monitor.expiry import LOOP_PROBE_S, STALL_S, Expiry, sleep_to_tick
from relaybeat.monitor.ingest import BEHIND_GRACE_S, Ingest
from relaybeat.monitor.journal import Journal
from relaybeat.monitor.maintenance import MaintenanceBook
from relaybeat.monitor.notifier import Notifier
from relaybeat.monitor.notify import BAD_STATES, AlertBook
from relaybeat.monitor.outbox import NotifySettings, OutboxWorker
from relaybeat.monitor.quality import Opening, Targets, TargetTimeouts, lookup_in
from relaybeat.monitor.records import Change
from relaybeat.monitor.states import Event, Kind, State, Transition
from relaybeat.monitor.store import LeaseView, Store
from relaybeat.monitor.writer import MonitorObserver, Writer
from relaybeat.relay.mqtt import Brokers, BrokerURL
from relaybeat.relay.parts import Parts, PartState
from relaybeat.relay.rejections import Rejections
from relaybeat.relay.wire import DEFAULT_MAX_BUNDLE_BYTES, DEFAULT_MAX_BUNDLE_ENTRIES, DEFAULT_PREFIX, Topics

__all__ = ["Monitor", "MonitorObserver", "MonitorSettings"]

log = logging.getLogger("relaybeat.monitor")
T = TypeVar("T")

# How often the database probe reads one row (`Store.ping`: ~0.03-0.2 ms of CPU each); a multiple of
# LOOP_PROBE_S, so it wakes with the loop probe (`sleep_to_tick`).
DB_PROBE_S = 2.0
DB_PROBE_TIMEOUT_S = 1.0  # a probe not answered by then counts as the database being away
FOLLOW_S = 0.2  # how often a standby reads the active's new rows
FLAP_ROWS = 200_000  # at most this many history rows of the flap window are read back at start
# The collector's thresholds (CPython's are 700, 10, 10): a full collection scans every live object
# (~100 ms of one hold at a 50,000-host mass event), and the monitor makes few cycles, so full ones
# come ten times more rarely.
GC_THRESHOLDS = (700, 10, 100)


def keep_collector_off_the_hot_path() -> None:
    """What start-up built lives on: frozen out of the collector, which need not scan it again."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@dataclass(frozen=True, slots=True)
class MonitorSettings:
    broker: BrokerURL | Brokers  # one broker, or the nodes of one cluster (tried in order)
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
    behind_grace_s: float = BEHIND_GRACE_S  # how long, per episode, being behind its input earns grace
    notify: NotifySettings = field(default_factory=NotifySettings)  # webhooks; none by default
    # Write-ahead journal of decisions (monitor/journal.py): what was decided but not yet in SQL
    # survives kill -9 and is written at the next start. None: no journal (a crash loses that batch).
    journal: Path | None = None
    # Timeouts from targets (monitor/quality.py) instead of interval × misses, per host-id glob too.
    targets: Targets = field(default_factory=Targets)
    targets_by_glob: tuple[tuple[str, Targets], ...] = ()
    # Hot standby on PostgreSQL (monitor/cluster.py): this node's id and failover_s. None: no lease
    # (one monitor per database, as before); ignored on SQLite, where one monitor holds the file.
    cluster: ClusterSettings | None = None


class _Shown(Generic[T]):
    """A read-only attribute of the monitor that is its part's attribute of the same name:
    `recent = _Shown[deque[Transition]]("writer")` reads `monitor.writer.recent`."""

    def __init__(self, part: str) -> None:
        self.part = part
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, monitor: None, owner: type) -> _Shown[T]: ...
    @overload
    def __get__(self, monitor: Monitor, owner: type) -> T: ...
    def __get__(self, monitor: Monitor | None, owner: type) -> _Shown[T] | T:
        if monitor is None:
            return self
        value: T = getattr(getattr(monitor, self.part), self.name)
        return value

    def __set__(self, monitor: Monitor, value: object) -> None:
        msg = f"Monitor.{self.name} is read-only: it is the {self.part}'s"
        raise AttributeError(msg)


class Monitor:
    """The parts, composed; and the few read-only accessors the read view (`monitor.view`) needs."""

    def __init__(self, settings: MonitorSettings, store: Store, clock: Clock | None = None) -> None:
        self.settings = settings
        self._store = store
        self.clock: Clock = clock or SystemClock()
        self.topics = Topics(settings.prefix)
        targeted = settings.targets.set or any(t.set for _, t in settings.targets_by_glob)
        self.timeouts = TargetTimeouts(settings.targets, settings.targets_by_glob) if targeted else None
        self.detector = Detector(settings.policy, self.clock.now(), timeouts=self.timeouts)
        self.started_at = self.clock.now()
        self.db_reachable = True  # the database probe's last read went through
        self.parts = Parts("monitor")  # the running tasks and their states, for /healthz
        self.maintenance = MaintenanceBook()  # loaded by restore(); transitions it covers are marked
        self.notifier = Notifier(settings.notify, store, self.clock, self._state_of)
        self.writer = Writer(
            store, self.detector, self.clock, self.maintenance, self.notifier, self.relay_path, settings.journal
        )
        self.expiry = Expiry(self.detector, self.clock, self.writer.emit, self._catch_up)
        self.ingest = Ingest(
            self.topics,
            self.detector,
            self.clock,
            self.writer.emit,
            self.expiry,
            accept_direct_beats=settings.accept_direct_beats,
            relays=settings.relays,
            max_bundle_bytes=settings.max_bundle_bytes,
            max_bundle_entries=settings.max_bundle_entries,
            behind_grace_s=settings.behind_grace_s,
        )
        self._sorted_ids: list[str] = []
        self._sorted_ids_for = -1
        self._grace_over: tuple[float, int] | None = None  # (grace_from, hosts) when in_grace last found it over
        self.cluster: Cluster | None = None  # set by restore() on PostgreSQL with cluster settings

    # ------------------------------------------------------------------------------- lifecycle

    @property
    def store(self) -> Store:
        return self._store

    @store.setter
    def store(self, store: Store) -> None:
        """Swap the database for every part (a tool or test that opens it in another event loop)."""
        self._store = self.writer.store = self.notifier.store = self.notifier.outbox.store = store

    @property
    def role(self) -> Role:
        """active, or standby (a hot standby that writes nothing); without a cluster always active."""
        return Role.ACTIVE if self.cluster is None else self.cluster.role

    async def restore(self) -> None:
        """Write what the journal holds and SQL lacks, then load current state from SQL; the
        detector's start-up grace protects everyone restored. A hot standby keeps its journal for
        the takeover instead (`promote`)."""
        cluster = self.settings.cluster
        if self.store.dialect == "postgresql" and cluster is not None:
            self.cluster = Cluster(cluster, self.store, self.promote, self.demote)
            self.writer.lost_lease = self.cluster.lost
            self.notifier.paused = True
        self.maintenance.load(await self.store.maintenance_windows())
        await self.notifier.load()
        if self.cluster is None:
            await self.writer.replay()
        else:  # the first lease tick: active now (its own journal written) or a standby (journal kept)
            self.writer.hold_journal()
            self.writer.last_written_id = await self.store.last_transition_id()
            await self.cluster.tick()
        hosts, relays = await self.store.load()
        mono = self.clock.mono
        self.detector.restore((h.snapshot(mono) for h in hosts), (r.snapshot(mono) for r in relays))
        await self._restore_flaps()
        self.writer.last_written_id = await self.store.last_transition_id()
        await self._resume_outages([(Kind.HOST, h.id) for h in hosts if h.state in BAD_STATES])
        await self._resume_outages([(Kind.RELAY, r.id) for r in relays if r.state in BAD_STATES])
        log.info("restored %d hosts and %d relays from the database", len(hosts), len(relays))
        del hosts, relays
        keep_collector_off_the_hot_path()

    async def _resume_outages(self, subjects: list[tuple[Kind, str]]) -> None:
        """Outages open at start are judged when they end, as if this monitor had decided them: the
        judge gets their opening transition and what the stored row held (seq, last seen)."""
        if not subjects:
            return
        kind = subjects[0][0]
        opened = await self.store.latest_changes(kind, [s for _, s in subjects])
        lookup = lookup_in(self.detector)
        mono = self.clock.mono
        for _, subject in subjects:
            row = opened.get(subject)
            evidence = lookup(kind, subject)
            if row is None or evidence is None or row.key is None:
                continue
            self.writer.judge.resume(
                Opening(
                    kind=kind,
                    subject=subject,
                    state=row.to_state,
                    key=row.key,
                    at=mono(row.at),
                    decided=mono(row.at),
                    evidence=evidence,
                    blamed=row.relay if row.to_state is State.UNREACHABLE else None,
                )
            )

    async def _restore_flaps(self) -> None:
        """Each subject's state changes within the flap window, from SQL: a restart neither ends a
        flapping episode nor forgets the changes that lead to one."""
        policy, mono = self.detector.policy, self.clock.mono
        since = self.clock.wall(self.clock.now() - policy.flap_window_s)
        rows = await self.store.history(since=since, limit=FLAP_ROWS, newest_first=False)
        changes: defaultdict[tuple[Kind, str], list[float]] = defaultdict(list)
        for row in rows:
            if row.event is Event.TRANSITION:
                changes[(row.kind, row.subject)].append(mono(row.at))
        hosts, relays = self.detector.hosts, self.detector.relays
        for (kind, subject), times in changes.items():
            track = (hosts if kind is Kind.HOST else relays).get(subject)
            if track is not None:
                track.flaps = tuple(times[-policy.flap_start :])

    async def promote(self, lease: LeaseView) -> None:
        """The lease is ours (the old active is fenced off): reload what the old active changed, then
        write what it did not; notifications resume."""
        self.maintenance.load(await self.store.maintenance_windows())
        await self.notifier.load()
        node = None if self.cluster is None else self.cluster.node_id
        await self.writer.promote(replay_own_journal=lease.previous_holder == node)
        self.notifier.paused = False
        self.notifier.outbox.poke()

    def demote(self) -> None:
        self.writer.demote()
        self.notifier.paused = True

    async def release(self) -> None:
        """A clean stop: with a lease, end it now so that a standby takes over at once."""
        if self.cluster is not None:
            await self.cluster.release()

    def close(self) -> None:
        """Release the journal (its lines stay for the next start if SQL does not hold them yet)."""
        self.writer.close()

    async def run(self) -> None:
        """Until cancelled, or until one part fails (`PartFailed`, naming it); either way, whatever
        was decided is still written."""
        s = self.settings
        parts = {
            "consume": lambda: self.ingest.run(s.broker, s.client_id),
            "expire": self.expiry.run,
            "write": self.writer.run,
            "checkpoint": lambda: self.writer.run_checkpoints(s.checkpoint_s),
            "loop_lag": self.watch_loop_lag,
            "db_probe": self.probe_database,
        }
        brokers = Brokers.of(s.broker)
        if len(brokers.urls) > 1:  # the nodes of one cluster: a spare session stands by on another node
            parts["spare"] = lambda: self.ingest.run_spare(brokers, s.client_id)
        if s.notify.webhooks:
            parts["notify"] = self.notify
        if self.cluster is not None:
            parts["lease"] = self.cluster.run
            parts["follow"] = lambda: self.writer.run_follow(FOLLOW_S)
        try:
            await self.parts.run(parts)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.flush()), 5.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.release()), 3.0)

    async def probe_database(self) -> None:
        """Read one row every DB_PROBE_S, so an outage shows within a few seconds even with nothing to write.

        Errors never end the probe: it only sets `db_reachable` (and says so once per change)."""
        while True:
            try:
                async with asyncio.timeout(DB_PROBE_TIMEOUT_S):
                    await self.store.ping()
            except Exception as exc:
                if self.db_reachable:
                    why = (str(exc).strip().splitlines() or [repr(exc)])[0]
                    log.warning("database unreachable (%s); /healthz is degraded until it answers", why)
                self.db_reachable = False
            else:
                if not self.db_reachable:
                    log.info("database reachable again")
                self.db_reachable = True
            await sleep_to_tick(DB_PROBE_S)

    async def _catch_up(self) -> None:
        await self.ingest.catch_up()

    # ------------------------------------------------------------- the parts' entry points

    def take(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """One message from the broker (see `Ingest.take`)."""
        self.ingest.take(topic, payload, retained)

    def expire(self) -> None:
        """Decide whatever deadline has passed (see `Expiry.expire`)."""
        self.expiry.expire()

    async def flush(self) -> None:
        """Write everything decided so far (see `Writer.flush`)."""
        await self.writer.flush()

    async def checkpoint(self, since: float) -> None:
        await self.writer.checkpoint(since)

    async def remind(self) -> int:
        return await self.notifier.remind()

    async def notify(self) -> None:
        await self.notifier.run()

    async def watch_loop_lag(self, every_s: float = LOOP_PROBE_S) -> None:
        await self.expiry.watch_loop_lag(every_s)

    def pending(self) -> list[Change]:
        """Decisions not yet known to be in SQL, in the order they were made (the batch being
        written, then those waiting). The read view shows these subjects as they were before the
        first of them."""
        return self.writer.pending()

    # ----------------------------------------------------------------------- read accessors
    # What the read view and the tools read of the parts, by the same name as in the part.

    received = _Shown[Counter[str]]("ingest")
    rejections = _Shown[Rejections]("ingest")
    behind = _Shown[int]("ingest")
    spare_takeovers = _Shown[int]("ingest")
    broker = _Shown[str | None]("ingest")
    spare_broker = _Shown[str | None]("ingest")
    recent = _Shown[deque[Transition]]("writer")  # the latest decisions, for live views
    observers = _Shown[list[MonitorObserver]]("writer")
    written = _Shown[asyncio.Condition]("writer")  # notified after each batch reaches SQL
    last_written_id = _Shown[int]("writer")
    db_ok = _Shown[bool]("writer")  # the last SQL write went through
    write_failures = _Shown[int]("writer")
    journal = _Shown[Journal | None]("writer")
    journal_failures = _Shown[int]("writer")
    unwritten = _Shown[int]("writer")
    alerts = _Shown[AlertBook]("notifier")
    outbox = _Shown[OutboxWorker]("notifier")
    stalls = _Shown[int]("expiry")
    loop_lag_s = _Shown[float]("expiry")  # the worst event-loop lag of the last few seconds

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
        if states.get("expire") is PartState.RUNNING and self.expiry.late_s() > STALL_S:
            states["expire"] = PartState.STALLED
        return states

    @property
    def in_grace(self) -> bool:
        """True during the first timeout after start or after regaining sight: while some host's
        timeout has not yet run since then. Once it is over it is not looked for again until the
        grace or the host count changes: /healthz does not walk a million hosts at every call
        (during the grace the walk stops at the first host still in it)."""
        detector = self.detector
        over = (detector.grace_from, len(detector.hosts))
        if self._grace_over == over:
            return False
        since = self.clock.now() - detector.grace_from
        if any(detector.timeout_s(h) > since for h in detector.hosts.values()):
            return True
        self._grace_over = over
        return False

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

    def _state_of(self, kind: Kind, subject: str) -> State | None:
        track = (self.detector.hosts if kind is Kind.HOST else self.detector.relays).get(subject)
        return None if track is None else track.state

    def forget_host(self, host_id: str) -> bool:
        self._sorted_ids_for = -1
        if self.timeouts is not None:
            self.timeouts.forget(host_id)
        return self.detector.forget_host(host_id)
