"""The one read view of the fleet: what the API, the metrics and the dashboard show, and the few
writes the API makes.

Rules of this module:
- Readers never touch the detector, the store or the clock: they get frozen snapshots
  (`HostView`, `RelayView`) stamped into wall-clock time once, health, relay paths, history and
  availability from here, and do the API's writes (forget a host, acknowledge, maintenance)
  through the named methods here.
- Show a state only once its row is durable. A subject with transitions decided but not yet in SQL
  (`Monitor.pending()`) is shown as it was before the first of them: its `from_state`, since the
  durable row that began that state, and its flapping flag before a pending flapping row. So once
  a state is shown, the transition that led to it is in the history and the event stream.
  (A subject first heard of, whose first row is pending, is shown `unknown` since it was heard.)
  While the database refuses writes, decisions are shown as decided: the history answers 503 then
  (nothing shown can be missing from it), and an outage of SQL must not freeze the live view.
- Acknowledgements are the exception: they are about the outage the monitor decided. Acknowledging
  waits (briefly) for that outage's row so it can link it, and `current` follows the decision.
- Snapshots are taken without an await in between: a decision made while the view reads SQL for
  the durable `since` of pending subjects never leaks into what it shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from typing_extensions import Unpack

from relaybeat.monitor.availability import Availability, availability, report_window
from relaybeat.monitor.cluster import Role
from relaybeat.monitor.detector import HostTrack, RelayTrack
from relaybeat.monitor.maintenance import TargetKind, Window
from relaybeat.monitor.quality import Figures, Outage, figures
from relaybeat.monitor.records import FalseAlarmRow, HostRow, RelayRow, TransitionRow
from relaybeat.monitor.service import Monitor, MonitorObserver
from relaybeat.monitor.states import Event, Kind, State
from relaybeat.monitor.store import Acknowledgement, HistoryFilters, Matching, NodeView
from relaybeat.relay.parts import PartState

__all__ = [
    "AckView",
    "ClusterView",
    "FleetHealth",
    "FleetView",
    "HostView",
    "MaintenanceView",
    "Refused",
    "RelayView",
    "Standby",
    "StateCounts",
    "StatusEntry",
    "StatusPage",
    "StatusPageView",
    "Summary",
    "WorstHost",
    "iso",
]

OUTAGE_STATES = (State.DOWN, State.UNREACHABLE)
ACK_WRITE_WAIT_S = 2.0  # how long an acknowledgement waits for its outage's row to reach SQL
SQL_CHUNK = 500  # subjects per query when looking up durable rows (SQLite caps bound parameters)
STATUS_WINDOWS = (timedelta(hours=24), timedelta(days=30))  # the uptimes a status page shows
STATUS_CHANGES = 30  # state changes per subject on a status page's strip (newest last)


def iso(moment: datetime | None) -> str | None:
    """A shown moment as text: ISO 8601, milliseconds, `Z` for UTC.

    A page of 1,000 hosts shows 3,000 moments, most of them within a few seconds of each other: a
    UTC moment's whole second is formatted once (`_SECONDS`), then only its milliseconds."""
    if moment is None:
        return None
    if moment.tzinfo is not UTC:
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    second = moment.replace(microsecond=0)
    head = _SECONDS.get(second)
    if head is None:
        if len(_SECONDS) >= _SECONDS_KEPT:
            _SECONDS.clear()
        head = _SECONDS[second] = second.isoformat()[:19]
    return f"{head}.{moment.microsecond // 1000:03d}Z"


_SECONDS: dict[datetime, str] = {}  # a UTC whole second -> its ISO text, up to the seconds
_SECONDS_KEPT = 4096


# ------------------------------------------------------------------------------------ snapshots


@dataclass(frozen=True, slots=True, kw_only=True)
class HostView(HostRow):
    """A host as shown: its row (state and flapping as shown), and what the view adds."""

    path: tuple[str, ...]  # relays from the nearest up to the monitor
    timeout_s: float
    deadline: datetime | None
    timeout_basis: str | None = None  # how a timeout from targets was derived; None: the fixed or adaptive rule


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayView(RelayRow):
    """A relay as shown: its row (state and flapping as shown), and what the view adds."""

    timeout_s: float
    hosts: int  # hosts heard through this relay
    children: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class QualityReport:
    """The detector's quality figures over a window (see `FleetView.quality`)."""

    since: datetime
    until: datetime
    fleet: dict[Kind, Figures]
    by_relay: dict[str, Figures]  # hosts heard through each relay now
    by_subject: dict[tuple[Kind, str], Figures]  # subjects with an outage in the window
    false_alarms: list[FalseAlarmRow]


def _via(monitor: Monitor, host_id: str) -> str | None:
    host = monitor.detector.hosts.get(host_id)
    return None if host is None else host.via


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetHealth:
    """What /healthz says (and /metrics repeats as gauges)."""

    status: str  # ok, or degraded while blind, while the database is away, or while a part is not running
    broker_connected: bool  # the main broker session, or the spare hearing in its place
    blind: bool
    spare_takeovers: int  # times the spare session heard in place of the lost main one
    broker: str | None  # the node the main session hears through (None while it does not)
    spare_broker: str | None  # the node the spare session is subscribed on (with a list of nodes)
    in_grace: bool
    database_ok: bool
    unwritten: int  # decisions made and journaled, not yet in SQL
    hosts: int
    relays: int
    received: dict[str, int]
    rejected: dict[str, int]  # the shell's reasons, then the detector's (prefixed detector_), each sorted
    parts: dict[str, str]  # each service part's state (running, stalled, stopped, failed)
    role: str = "active"  # active, or standby (a hot standby: reads only)
    node: str | None = None  # this monitor's node id (with a cluster)
    active_node: str | None = None  # the node holding the lease, as last read (with a cluster)


@dataclass(frozen=True, slots=True, kw_only=True)
class StateCounts:
    total: int
    states: dict[State, int]  # every state, zeros included
    flapping: int
    in_maintenance: int  # covered by a maintenance window right now


@dataclass(frozen=True, slots=True, kw_only=True)
class WorstHost:
    id: str
    state: State
    downtime_s: float
    outages: int
    uptime_ratio: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    hosts: StateCounts
    relays: StateCounts
    since: datetime
    until: datetime
    worst_hosts: list[WorstHost]


@dataclass(frozen=True, slots=True, kw_only=True)
class MaintenanceView:
    window: Window
    active: bool  # covering its targets right now
    hosts: int  # hosts its target includes right now, active or not
    relays: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AckView:
    ack: Acknowledgement
    current: bool  # the subject is still in the outage this acknowledges (as decided)


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """A write the view will not do: `reason` is not_found, no_outage, bad_window or already_removed."""

    reason: str
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusPage:
    """A public read-only page (`/status/<name>`): the hosts whose id matches one of `hosts` (globs),
    and every relay in `relays` with the relays below it and all their hosts. Nothing else shows."""

    name: str
    title: str
    hosts: tuple[str, ...] = ()
    relays: tuple[str, ...] = ()

    def shows(self, kind: Kind, subject: str, relay_path: Sequence[str]) -> bool:
        """`relay_path`: the relays between the subject and the monitor, nearest first."""
        if kind is Kind.RELAY and subject in self.relays:
            return True
        if any(relay in self.relays for relay in relay_path):
            return True
        return kind is Kind.HOST and any(fnmatch.fnmatchcase(subject, glob) for glob in self.hosts)


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusEntry:
    """One subject on a status page: its state as shown, uptimes, and its latest state changes."""

    kind: Kind
    id: str
    state: State
    since: datetime
    in_maintenance: bool
    uptime_24h: float | None  # up / (up + down) over the last 24 h; None when neither
    uptime_30d: float | None
    changes: tuple[tuple[datetime, State], ...]  # the latest STATUS_CHANGES in 30 days, oldest first


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusPageView:
    page: StatusPage
    at: datetime
    hosts: list[StatusEntry]
    relays: list[StatusEntry]


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterView:
    """The monitors of one database (`GET /api/v1/cluster`): who this is, who is active, every node."""

    node: str | None  # None: no cluster (SQLite, or PostgreSQL without a lease)
    role: str
    epoch: int | None  # the lease epoch this node holds (active only)
    active_node: str | None
    active_api: str | None
    last_renewal: datetime | None
    failover_s: float | None
    nodes: list[NodeView]


@dataclass(frozen=True, slots=True, kw_only=True)
class Standby:
    """A write this monitor refuses because it is not the active one, and where the active is."""

    detail: str
    active: str | None
    active_api: str | None


@dataclass(slots=True)
class _Before:
    """How a subject with pending transitions is shown: as before the first of them."""

    state: State | None = None  # None: no pending state change (only flapping or restart rows)
    left_at: datetime | None = None  # when the first pending state change happened
    flapping: bool | None = None  # None: no pending flapping row


@dataclass(slots=True)
class _Pending:
    """`Monitor.pending()` indexed by subject, read once per snapshot."""

    by_subject: dict[tuple[Kind, str], _Before] = field(default_factory=dict)

    @classmethod
    def of(cls, monitor: Monitor) -> _Pending:
        """While the database refuses writes, decisions are shown as decided: history answers 503
        then, so nothing shown can be missing from it, and an outage must not freeze the fleet view."""
        pending = cls()
        for t in monitor.pending() if monitor.database_ok else ():
            before = pending.by_subject.setdefault((t.kind, t.subject), _Before())
            if t.event is Event.TRANSITION and before.state is None:
                before.state, before.left_at = t.from_state, t.at
            elif t.event in (Event.FLAPPING_START, Event.FLAPPING_END) and before.flapping is None:
                before.flapping = t.event is Event.FLAPPING_END
        return pending

    def state(self, kind: Kind, subject: str, live: State) -> State:
        before = self.by_subject.get((kind, subject))
        return live if before is None or before.state is None else before.state

    def flapping(self, kind: Kind, subject: str, live: bool) -> bool:
        before = self.by_subject.get((kind, subject))
        return live if before is None or before.flapping is None else before.flapping

    def changing(self, kind: Kind, subjects: Iterable[str]) -> dict[str, _Before]:
        """Of `subjects`, those with a pending state change."""
        found = ((s, self.by_subject.get((kind, s))) for s in subjects)
        return {s: before for s, before in found if before is not None and before.state is not None}


# ------------------------------------------------------------------------------------- the view


class FleetView:
    """What the API, the metrics and the dashboard read, over one running `Monitor`."""

    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor

    # --- time and paths ---

    def now(self) -> datetime:
        """Now on the monitor's clock, in wall time (like every transition time)."""
        clock = self._monitor.clock
        return clock.wall(clock.now())

    def relay_path(self, kind: Kind, subject: str) -> list[str]:
        return self._monitor.relay_path(kind, subject)

    def has(self, kind: Kind, subject: str) -> bool:
        detector = self._monitor.detector
        return subject in (detector.hosts if kind is Kind.HOST else detector.relays)

    # --- hosts and relays as shown ---

    async def host(self, host_id: str) -> HostView | None:
        track = self._monitor.detector.hosts.get(host_id)
        return None if track is None else (await self._host_views([track]))[0]

    async def hosts(
        self, state: State | None = None, relay: str | None = None, offset: int = 0, limit: int | None = None
    ) -> tuple[list[HostView], int]:
        """A page of hosts in id order (filtered by shown state and relay), and how many matched."""
        monitor = self._monitor
        tracks = monitor.detector.hosts
        ids = monitor.sorted_host_ids()
        if state is not None or relay is not None:
            pending = _Pending.of(monitor)
            if state is not None and state is not State.UP:  # the few in it, not the whole fleet
                changing = {s for (k, s), b in pending.by_subject.items() if k is Kind.HOST and b.state is not None}
                ids = sorted(monitor.detector.unwell[state] | (changing & tracks.keys()))
            elif relay is not None:  # the hosts heard via a relay are those in its columns
                behind = monitor.detector.relays.get(relay)
                ids = sorted(behind.hosts) if behind is not None else []
            ids = [
                i
                for i in ids
                if (state is None or pending.state(Kind.HOST, i, tracks[i].state) == state)
                and (relay is None or tracks[i].via == relay)
            ]
        end = None if limit is None else offset + limit
        return await self._host_views([tracks[i] for i in ids[offset:end]]), len(ids)

    async def relay(self, relay_id: str) -> RelayView | None:
        track = self._monitor.detector.relays.get(relay_id)
        return None if track is None else (await self._relay_views([track]))[0]

    async def relays(self, state: State | None = None) -> list[RelayView]:
        """Every relay in id order (of one shown state)."""
        tracks = [track for _, track in sorted(self._monitor.detector.relays.items())]
        shown = await self._relay_views(tracks)
        return [r for r in shown if state is None or r.state == state]

    def counts(self, kind: Kind) -> StateCounts:
        """Subjects per shown state, flapping and in maintenance right now."""
        monitor = self._monitor
        tracks: dict[str, HostTrack] | dict[str, RelayTrack]
        detector = monitor.detector
        tracks = detector.hosts if kind is Kind.HOST else detector.relays
        # The detector's tallies, with each pending decision shown as not yet made: no walk over the fleet
        states, flapping = Counter(detector.tally[kind]), detector.flapping_tally[kind]
        for (pending_kind, subject), before in _Pending.of(monitor).by_subject.items():
            track = tracks.get(subject) if pending_kind is kind else None
            if track is None:
                continue
            if before.state is not None:
                states[track.state] -= 1
                states[before.state] += 1
            if before.flapping is not None:
                flapping += before.flapping - track.flapping
        now = self.now()
        covered = 0
        if monitor.maintenance.active(now):  # only a window open now makes anyone's walk worth it
            covered = sum(1 for s in tracks if monitor.in_maintenance(kind, s, now))
        return StateCounts(
            total=len(tracks),
            states={state: states[state] for state in State},
            flapping=flapping,
            in_maintenance=covered,
        )

    async def _host_views(self, tracks: Sequence[HostTrack]) -> list[HostView]:
        monitor = self._monitor
        detector, wall = monitor.detector, monitor.clock.wall
        pending = _Pending.of(monitor)
        shown = []
        for h in tracks:  # no await in this loop: one moment's snapshot
            deadline = detector.deadline_of(h)
            shown.append(
                HostView(
                    id=h.id,
                    state=pending.state(Kind.HOST, h.id, h.state),
                    relay=h.via,
                    path=tuple(monitor.relay_path(Kind.HOST, h.id)),
                    last_seen=None if h.last_seen is None else wall(h.last_seen),
                    since=wall(h.since),
                    interval_s=h.interval_s,
                    timeout_s=detector.timeout_s(h),
                    deadline=None if deadline is None else wall(deadline),
                    timeout_basis=self.timeout_basis(h.id),
                    seq=h.seq,
                    flapping=pending.flapping(Kind.HOST, h.id, h.flapping),
                    source=h.source,
                )
            )
        sinces = await self._durable_sinces(Kind.HOST, pending.changing(Kind.HOST, (h.id for h in tracks)))
        return [replace(h, since=sinces[h.id]) if h.id in sinces else h for h in shown]

    async def _relay_views(self, tracks: Sequence[RelayTrack]) -> list[RelayView]:
        monitor = self._monitor
        detector, wall = monitor.detector, monitor.clock.wall
        pending = _Pending.of(monitor)
        shown = [
            RelayView(
                id=r.id,
                state=pending.state(Kind.RELAY, r.id, r.state),
                parent=r.parent,
                last_seen=None if r.last_seen is None else wall(r.last_seen),
                since=wall(r.since),
                flush_s=r.flush_s,
                timeout_s=detector.timeout_s(r),
                boot=r.boot,
                seq=None if r.seq < 0 else r.seq,
                hosts=r.cols.held,
                children=tuple(sorted(r.children)),
                flapping=pending.flapping(Kind.RELAY, r.id, r.flapping),
            )
            for r in tracks
        ]
        sinces = await self._durable_sinces(Kind.RELAY, pending.changing(Kind.RELAY, (r.id for r in tracks)))
        return [replace(r, since=sinces[r.id]) if r.id in sinces else r for r in shown]

    async def _durable_sinces(self, kind: Kind, changing: dict[str, _Before]) -> dict[str, datetime]:
        """When each subject entered the state it is shown in: the `at` of the durable row that began
        it. A subject without one (first heard of, or its row landed while we read) is shown since
        its first pending change."""
        if not changing:
            return {}
        ids = sorted(changing)
        durable: dict[str, TransitionRow] = {}
        for start in range(0, len(ids), SQL_CHUNK):
            durable |= await self._monitor.store.latest_changes(kind, ids[start : start + SQL_CHUNK])
        sinces = {}
        for subject, before in changing.items():
            left = before.left_at
            if left is None:  # set together with `state`, which `changing` requires
                continue
            row = durable.get(subject)
            matches = row is not None and row.to_state == before.state and row.at <= left
            sinces[subject] = row.at if row is not None and matches else left
        return sinces

    # --- cluster ---

    async def cluster(self) -> ClusterView:
        monitor = self._monitor
        c = monitor.cluster
        if c is None:
            return ClusterView(node=None, role=monitor.role.value, epoch=None, active_node=None, active_api=None,
                               last_renewal=None, failover_s=None, nodes=[])  # fmt: skip
        return ClusterView(
            node=c.node_id,
            role=c.role.value,
            epoch=c.epoch,
            active_node=c.active_node,
            active_api=c.active_api,
            last_renewal=c.last_renewal,
            failover_s=c.settings.failover_s,
            nodes=await monitor.store.cluster_nodes(),
        )

    def not_active(self, why: str | None = None) -> Standby | None:
        """Why this monitor refuses writes (a standby: naming the active); None when it takes them.
        `why`: a write already refused by the database (the lease was lost on the way)."""
        c = self._monitor.cluster
        if c is None or (c.role is Role.ACTIVE and why is None):
            return None
        where = f" at {c.active_api}" if c.active_api else ""
        active = f"the active is {c.active_node}{where}" if c.active_node else "no monitor is active right now"
        detail = why or f"monitor {c.node_id} is a standby and takes no writes"
        return Standby(detail=f"{detail}: {active}", active=c.active_node, active_api=c.active_api)

    # --- health ---

    def health(self) -> FleetHealth:
        monitor = self._monitor
        detector = monitor.detector
        blind = detector.blind
        rejected = dict(sorted(monitor.rejections.counts.items()))
        rejected |= {f"detector_{reason}": n for reason, n in sorted(detector.ignored.items())}
        parts = monitor.part_states()
        database_ok = monitor.database_ok
        running = all(state is PartState.RUNNING for state in parts.values())
        return FleetHealth(
            status="ok" if running and not blind and database_ok else "degraded",
            broker_connected=not detector.disconnected,
            blind=blind,
            spare_takeovers=monitor.spare_takeovers,
            broker=monitor.broker,
            spare_broker=monitor.spare_broker,
            in_grace=monitor.in_grace,
            database_ok=database_ok,
            unwritten=monitor.unwritten,
            hosts=len(detector.hosts),
            relays=len(detector.relays),
            received=dict(monitor.received),
            rejected=rejected,
            parts={name: state.value for name, state in parts.items()},
            role=monitor.role.value,
            node=None if monitor.cluster is None else monitor.cluster.node_id,
            active_node=None if monitor.cluster is None else monitor.cluster.active_node,
        )

    @property
    def write_failures(self) -> int:
        return self._monitor.write_failures

    @property
    def loop_lag_s(self) -> float:
        return self._monitor.loop_lag_s

    def observe(self, observer: MonitorObserver) -> None:
        """Have `observer` told of decisions and writes as they happen (the metrics' histograms)."""
        self._monitor.observers.append(observer)

    # --- history ---

    @property
    def last_written_id(self) -> int:
        """The id of the newest history row the monitor wrote."""
        return self._monitor.last_written_id

    async def wait_written(self, timeout_s: float, after_id: int | None = None) -> None:
        """Until the next batch reaches SQL (with `after_id`: until rows after it are in SQL), or
        `timeout_s` passed."""
        monitor = self._monitor
        async with monitor.written:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    if after_id is None:
                        await monitor.written.wait()
                    else:
                        await monitor.written.wait_for(lambda: monitor.last_written_id > after_id)

    async def history(self, **filters: Unpack[HistoryFilters]) -> list[TransitionRow]:
        """Rows of the `transitions` table (see `Store.history`)."""
        return await self._monitor.store.history(**filters)

    # --- availability ---

    def report_window(self, since: datetime | None, until: datetime | None) -> tuple[datetime, datetime] | str:
        """`[since, until)` of a report, cut at now (see `monitor.availability.report_window`)."""
        return report_window(since, until, self.now())

    async def availability(self, kind: Kind, subject: str, since: datetime, until: datetime) -> Availability:
        initial, changes = await self._monitor.store.state_changes(kind, since, until, subject)
        spans = self._monitor.maintenance.intervals(kind, subject, self.relay_path(kind, subject))
        wrong = [
            (f.opened_at, f.closed_at)
            for f in await self._monitor.store.false_alarms(kind=kind, subject=subject, since=since, until=until)
        ]
        return availability(
            initial.get(subject, State.UNKNOWN), [(at, state) for _, at, state in changes], spans, since, until, wrong
        )

    async def summary(self, since: datetime, until: datetime, worst: int) -> Summary:
        """The fleet per shown state now, and the `worst` hosts by downtime in `[since, until)`."""
        hosts, relays = self.counts(Kind.HOST), self.counts(Kind.RELAY)
        return Summary(
            hosts=hosts,
            relays=relays,
            since=since,
            until=until,
            worst_hosts=(await self._worst_hosts(since, until))[:worst] if worst else [],
        )

    async def _worst_hosts(self, since: datetime, until: datetime) -> list[WorstHost]:
        monitor = self._monitor
        initial, changes = await monitor.store.state_changes(Kind.HOST, since, until)
        by_host: dict[str, list[tuple[datetime, State]]] = {}
        for subject, at, state in changes:
            by_host.setdefault(subject, []).append((at, state))
        # Only a host that was down at `since` or went down in the window can have downtime.
        candidates = {h for h, s in initial.items() if s == State.DOWN}
        candidates |= {h for h, hs in by_host.items() if any(s == State.DOWN for _, s in hs)}
        tracks = monitor.detector.hosts
        pending = _Pending.of(monitor)
        wrong: dict[str, list[tuple[datetime, datetime]]] = {}
        for f in await monitor.store.false_alarms(kind=Kind.HOST, since=since, until=until):
            wrong.setdefault(f.subject, []).append((f.opened_at, f.closed_at))
        worst = []
        for host_id in sorted(candidates & tracks.keys()):
            spans = monitor.maintenance.intervals(Kind.HOST, host_id, self.relay_path(Kind.HOST, host_id))
            result = availability(
                initial.get(host_id, State.UNKNOWN),
                by_host.get(host_id, []),
                spans,
                since,
                until,
                wrong.get(host_id, ()),
            )
            if result.down > timedelta(0):
                worst.append(
                    WorstHost(
                        id=host_id,
                        state=pending.state(Kind.HOST, host_id, tracks[host_id].state),
                        downtime_s=result.down.total_seconds(),
                        outages=result.outages,
                        uptime_ratio=result.uptime_ratio,
                    )
                )
        worst.sort(key=lambda h: (-h.downtime_s, -h.outages, h.id))
        return worst

    # --- status pages ---

    async def status_page(self, page: StatusPage) -> StatusPageView:
        """What a public status page shows: only the subjects `page` names, as shown everywhere else,
        with their uptime over 24 h and 30 days and their latest state changes (from SQL)."""
        monitor = self._monitor
        detector = monitor.detector
        path = self.relay_path
        host_tracks = [t for i, t in sorted(detector.hosts.items()) if page.shows(Kind.HOST, i, path(Kind.HOST, i))]
        relay_tracks = [t for i, t in sorted(detector.relays.items()) if page.shows(Kind.RELAY, i, path(Kind.RELAY, i))]
        now = self.now()
        hosts, relays = await self._host_views(host_tracks), await self._relay_views(relay_tracks)
        return StatusPageView(
            page=page,
            at=now,
            hosts=await self._status_entries(Kind.HOST, [(h.id, h.state, h.since) for h in hosts], now),
            relays=await self._status_entries(Kind.RELAY, [(r.id, r.state, r.since) for r in relays], now),
        )

    async def _status_entries(
        self, kind: Kind, shown: list[tuple[str, State, datetime]], now: datetime
    ) -> list[StatusEntry]:
        if not shown:
            return []
        monitor = self._monitor
        since, until = now - max(STATUS_WINDOWS), now + timedelta(microseconds=1)  # a change made now is shown
        only = shown[0][0] if len(shown) == 1 else None  # one subject: ask SQL for it alone
        initial, changes = await monitor.store.state_changes(kind, since, until, only)
        by_subject: dict[str, list[tuple[datetime, State]]] = {}
        for subject, at, state in changes:
            by_subject.setdefault(subject, []).append((at, state))
        entries = []
        for subject, state, began in shown:
            mine = by_subject.get(subject, [])
            spans = monitor.maintenance.intervals(kind, subject, self.relay_path(kind, subject))
            start = initial.get(subject, State.UNKNOWN)
            uptime = [availability(start, mine, spans, now - w, now).uptime_ratio for w in STATUS_WINDOWS]
            entries.append(
                StatusEntry(
                    kind=kind,
                    id=subject,
                    state=state,
                    since=began,
                    in_maintenance=monitor.in_maintenance(kind, subject, now),
                    uptime_24h=uptime[0],
                    uptime_30d=uptime[1],
                    changes=tuple(mine[-STATUS_CHANGES:]),
                )
            )
        return entries

    # --- the detector's own quality ---

    async def quality(
        self,
        since: datetime,
        until: datetime,
        kind: Kind | None = None,
        subject: str | None = None,
        relay: str | None = None,
    ) -> QualityReport:
        """The detector's quality figures over `[since, until)` (monitor/quality.py): for the fleet
        (each kind), per relay (the hosts heard through it now) and per subject that had an outage.
        Filters: one kind, one subject, or the hosts and relays at or behind one relay (as now)."""
        monitor = self._monitor
        store = monitor.store
        matching = Matching(kind=kind, subject=subject, since=since, until=until)
        detections = await store.detections(**matching)
        alarms = await store.false_alarms(**matching)
        wrong = {f.opened_id: f for f in alarms if f.opened_id is not None}
        base = since
        outages: list[Outage] = []
        for d in detections:
            alarm = None if d.transition_id is None else wrong.pop(d.transition_id, None)
            outages.append(
                Outage(
                    kind=d.kind,
                    subject=d.subject,
                    at=((d.at or d.decided_at) - base).total_seconds(),
                    closed_at=None if alarm is None else (alarm.closed_at - base).total_seconds(),
                    detection_s=d.detection_s,
                    false_alarm=alarm is not None,
                )
            )
        for f in [*wrong.values(), *(f for f in alarms if f.opened_id is None)]:  # their detection was not kept
            outages.append(
                Outage(
                    kind=f.kind,
                    subject=f.subject,
                    at=(f.opened_at - base).total_seconds(),
                    closed_at=(f.closed_at - base).total_seconds(),
                    detection_s=None,
                    false_alarm=True,
                )
            )

        def behind(k: Kind, s: str) -> bool:
            return relay is None or (s == relay and k is Kind.RELAY) or relay in monitor.relay_path(k, s)

        outages = [o for o in outages if behind(o.kind, o.subject)]
        window = (until - since).total_seconds()
        kinds = [kind] if kind is not None else [Kind.HOST, Kind.RELAY]
        fleet: dict[Kind, Figures] = {}
        for k in kinds:
            tracks = monitor.detector.hosts if k is Kind.HOST else monitor.detector.relays
            count = sum(1 for s in tracks if (subject is None or s == subject) and behind(k, s))
            fleet[k] = figures([o for o in outages if o.kind is k], count, 0.0, window)
        by_relay: dict[str, Figures] = {}
        if kind in (None, Kind.HOST) and subject is None:
            hosts_of: dict[str, int] = {}
            for h in monitor.detector.hosts.values():
                if h.via is not None and behind(Kind.HOST, h.id):
                    hosts_of[h.via] = hosts_of.get(h.via, 0) + 1
            for relay_id, count in sorted(hosts_of.items()):
                mine = [o for o in outages if o.kind is Kind.HOST and _via(monitor, o.subject) == relay_id]
                by_relay[relay_id] = figures(mine, count, 0.0, window)
        by_subject = {
            (o.kind, o.subject): figures(
                [p for p in outages if (p.kind, p.subject) == (o.kind, o.subject)], 1, 0.0, window
            )
            for o in outages
        }
        return QualityReport(
            since=since,
            until=until,
            fleet=fleet,
            by_relay=by_relay,
            by_subject=dict(sorted(by_subject.items())),
            false_alarms=alarms,
        )

    def timeout_basis(self, host_id: str) -> str | None:
        """How a host's timeout was derived from targets (None: the fixed or adaptive rule)."""
        timeouts = self._monitor.timeouts
        advice = None if timeouts is None else timeouts.advice(host_id)
        return None if advice is None else advice.basis

    # --- writes: hosts ---

    async def forget_host(self, host_id: str) -> bool:
        """Forget a decommissioned host, live and in SQL (its history stays); False if unknown to both."""
        in_memory = self._monitor.forget_host(host_id)
        in_sql = await self._monitor.store.forget_host(host_id)
        return in_memory or in_sql

    # --- maintenance ---

    def maintenance_window(self, window_id: int) -> MaintenanceView | None:
        window = self._monitor.maintenance.get(window_id)
        return None if window is None else self._window_view(window, self.now())

    def maintenance_windows(self, include_past: bool) -> list[MaintenanceView]:
        """Windows in effect or still to come, newest first; with `include_past`, every window."""
        now = self.now()
        windows = self._monitor.maintenance.windows()
        if not include_past:
            windows = [w for w in windows if w.end is None or w.end > now]
        return [self._window_view(w, now) for w in reversed(windows)]

    async def add_maintenance(
        self,
        target_kind: TargetKind,
        target: str,
        *,
        starts_at: datetime | None,
        ends_at: datetime | None,
        duration_s: float | None,
        reason: str,
    ) -> MaintenanceView | Refused:
        """Record a window in SQL first, then in the live book, so a restart reloads what is marked."""
        now = self.now()
        span = maintenance_span(starts_at, ends_at, duration_s, now)
        if isinstance(span, str):
            return Refused(reason="bad_window", detail=span)
        monitor = self._monitor
        stored = await monitor.store.add_maintenance(target_kind, target, span[0], span[1], reason, now)
        monitor.maintenance.add(stored)
        return self._window_view(stored, now)

    async def remove_maintenance(self, window_id: int) -> MaintenanceView | Refused:
        """End a window now; it stays listed (with `include_past`) and in availability history."""
        monitor = self._monitor
        if monitor.maintenance.get(window_id) is None:
            return Refused(reason="not_found", detail=f"no maintenance window {str(window_id)!r}")
        now = self.now()
        removed = await monitor.store.remove_maintenance(window_id, now)
        if removed is None:
            return Refused(reason="already_removed", detail=f"maintenance window {window_id} was removed already")
        monitor.maintenance.add(removed)
        return self._window_view(removed, now)

    def _window_view(self, window: Window, now: datetime) -> MaintenanceView:
        detector = self._monitor.detector
        if window.target_kind is TargetKind.HOST:
            hosts, relays = int(window.target in detector.hosts), 0
        else:
            path = self.relay_path
            hosts = sum(1 for h in detector.hosts if window.matches(Kind.HOST, h, path(Kind.HOST, h)))
            relays = sum(1 for r in detector.relays if window.matches(Kind.RELAY, r, path(Kind.RELAY, r)))
        return MaintenanceView(window=window, active=window.active_at(now), hosts=hosts, relays=relays)

    # --- acknowledgements ---

    async def acknowledge(self, kind: Kind, subject: str, comment: str, by: str) -> AckView | Refused:
        """Acknowledge the outage the monitor decided for the subject, linked to the history row that
        began it. That row reaches SQL a few milliseconds after the decision, so this waits for one
        more write if need be (transition_id None if it never comes)."""
        monitor = self._monitor
        detector = monitor.detector
        track = (detector.hosts if kind is Kind.HOST else detector.relays).get(subject)
        if track is None:
            return Refused(reason="not_found", detail=f"no {kind.value} {subject!r}")
        state = track.state
        if state not in OUTAGE_STATES:
            return Refused(
                reason="no_outage", detail=f"{kind.value} {subject!r} is {state.value}: no outage to acknowledge"
            )
        transition_id = None
        for attempt in range(2):
            began = (await monitor.store.latest_changes(kind, [subject])).get(subject)
            if began is not None and began.to_state == state:
                transition_id = began.id
                break
            if attempt == 0:
                await self.wait_written(ACK_WRITE_WAIT_S)
        ack = await monitor.store.acknowledge(kind, subject, transition_id, comment, self.now(), by)
        return AckView(ack=ack, current=self._ack_current(ack))

    async def acknowledgements(
        self, kind: Kind | None, subject: str | None, current: bool | None, limit: int
    ) -> list[AckView]:
        """Newest first (`limit` applies before the `current` filter)."""
        acks = self._ack_views(await self._monitor.store.acknowledgements(kind, subject, limit))
        return [a for a in acks if current is None or a.current is current]

    def _ack_views(self, acks: Sequence[Acknowledgement]) -> list[AckView]:
        return [AckView(ack=ack, current=self._ack_current(ack)) for ack in acks]

    def _ack_current(self, ack: Acknowledgement) -> bool:
        """An acknowledgement holds while the subject stays in the outage it was made in (as decided:
        like `acknowledge`, it follows the monitor's decisions, not their rows)."""
        detector = self._monitor.detector
        track = (detector.hosts if ack.kind is Kind.HOST else detector.relays).get(ack.subject)
        if track is None or track.state not in OUTAGE_STATES:
            return False
        return ack.acknowledged_at >= self._monitor.clock.wall(track.since)


def maintenance_span(
    starts_at: datetime | None, ends_at: datetime | None, duration_s: float | None, now: datetime
) -> tuple[datetime, datetime | None] | str:
    """A window's `[start, end)` in UTC (start default now, end from `ends_at` or `duration_s`, or
    open), or why it is not a window."""
    try:
        start = now if starts_at is None else starts_at.astimezone(UTC)
        end = None if ends_at is None else ends_at.astimezone(UTC)
        if duration_s is not None:
            end = start + timedelta(seconds=duration_s)
    except OverflowError:
        return "the window reaches outside the years 1 to 9999 (UTC)"
    if ends_at is not None and duration_s is not None:
        return "give ends_at or duration_s, not both"
    if end is not None and end <= start:
        return f"ends_at ({iso(end)}) is not after starts_at ({iso(start)})"
    return start, end
