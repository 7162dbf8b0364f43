"""The detector: every liveness decision the monitor makes, and nothing else.

Rules of this module:
- Pure and synchronous. It reads no clock and does no I/O: callers pass `now` (monotonic seconds)
  and get back the transitions it decided, in order. Same inputs, same outputs.
- Evidence is a time on our clock when a subject was last heard: for a host in a bundle it is
  `receive time - ages along its path`. Evidence only moves forward: a duplicate, late or
  reordered bundle never moves anyone back in time.
- A subject's deadline is `max(last_seen, grace_from) + timeout`. `grace_from` is when the monitor
  (re)gained sight: at start and after any blindness everyone gets one full timeout of grace.
- While the monitor is blind (its broker is gone, or every relay went quiet at once) nothing turns
  `down`; deadlines simply wait.
- A dead relay makes its whole subtree `unreachable` in one batch, blaming the nearest dead relay.
  Hosts come back from fresh evidence only; the time of a death is taken from the evidence.
- A mass event decides its relays at once and owes the per-host part (a dead, stopped or recovered
  relay's hosts; a dead relay's deadline columns moving to the heap) as jobs, worked off in order by
  `expire(now, limit)` in steps of at most `limit` hosts (with no limit, before the call returns).
  Owed work is done first, in full, whenever anything could see the difference: a relay changes
  state, news of an owed host or relay arrives, a host is forgotten, state is restored. So the
  decisions, their times and their order are those of doing it all at once.
- Deadlines of relays and of direct hosts live in a heap with at most one live entry per subject;
  an entry may be early (the subject was heard since) and is then pushed back. A host behind a relay
  has no heap entry: the relay's bundles are its clock. Its deadline sits in its relay's columns
  (`RelayTrack.cols`, monitor/columns.py), updated in place by its news, and each bundle of that
  relay finds the hosts whose deadline it passed in one vectorised comparison, so the Python work
  per bundle is proportional to its news and its hosts' deadlines, not to the relay's hosts.
- Ordinary news by column (`Bundle.beats`, from the monitor's decoder of indexed deltas) is read in
  one vectorised pass: the rows that are a plain new beat of a host that is up, steady and heard
  through this relay move its evidence and deadline in place; every other row takes the full path,
  in order. The columns mirror what that pass reads of each host (`_sync` after every change;
  `column_faults` checks it), so the decisions are those of reading every row as a listed entry.
- A delta bundle says only what changed; a host it does not mention keeps its evidence. A relay
  whose bundles skip a seq (or whose first bundle of a boot is a delta, or that was restored from
  SQL) is out of sync: none of its hosts or child relays is declared silent until its next keyframe,
  and the shell is asked (`resync_wanted`) to request one from the top-level relay that carries it.
- A device a relay vouches for from a watched source (`Bundle.watched`) is `up` while the relay
  says so; `down` or `unreachable` (its bridge or Sparkplug node gone) at once, with its source's reason.
"""

from __future__ import annotations

import enum
import fnmatch
import heapq
import itertools
import math
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from statistics import NormalDist
from typing import Protocol, TypeVar

from relaybeat.errors import SettingsError
from relaybeat.monitor.columns import READY_SCHEDULED, READY_STEADY, READY_UP, READY_WAITING, SAME_BEAT_S, Columns
from relaybeat.monitor.states import TRANSITIONS, Event, Kind, State, Transition
from relaybeat.relay.wire import _STATUS_OF, Beat, Beats, Bundle, HostEntry, LeafStatus, Vouch

_UP_OR_UNKNOWN = (State.UP, State.UNKNOWN)
_NEVER = -math.inf  # one shared float: a host costs no extra object for "never"


@dataclass(frozen=True, slots=True)
class Policy:
    """Timing rules. See README "States and timing" for what each one means to an operator."""

    misses: int = 3
    default_interval_s: float = 5.0
    misses_by_glob: tuple[tuple[str, int], ...] = ()  # first matching host-id glob wins
    adaptive: bool = False  # phi accrual over each host's observed inter-arrival times
    phi_threshold: float = 8.0
    adaptive_min_samples: int = 8
    flap_window_s: float = 600.0
    flap_start: int = 6  # this many state changes within the window: flapping
    flap_stop: int = 3  # at most this many within the window: no longer flapping
    blind_min_relays: int = 2  # with fewer relays up, total silence means the relays died
    relay_memory: int = 8  # retired boot ids kept per relay, to reject late bundles of old boots

    def __post_init__(self) -> None:
        if self.misses < 1:
            msg = "misses must be >= 1"
            raise SettingsError(msg)
        if not 0 < self.flap_stop < self.flap_start:
            msg = "flap_stop must be > 0 and < flap_start"
            raise SettingsError(msg)
        if self.phi_threshold <= 0:
            msg = "phi_threshold must be > 0"
            raise SettingsError(msg)

    def misses_for(self, host: str) -> int:
        for pattern, misses in self.misses_by_glob:
            if fnmatch.fnmatchcase(host, pattern):
                return misses
        return self.misses

    @property
    def phi_z(self) -> float:
        """Standard deviations past the mean inter-arrival at which phi reaches the threshold."""
        return NormalDist().inv_cdf(1.0 - 10.0 ** (-self.phi_threshold)) if self.phi_threshold < 15 else 8.0


class TimeoutPolicy(Protocol):
    """A per-host timeout chosen outside the detector (monitor/quality.py: from targets). It hears
    each arrival; None from `timeout_s` means the fixed or adaptive rule applies."""

    def arrival(self, host: str, gap_s: float, beats: int, interval_s: float) -> None: ...

    def timeout_s(self, host: str) -> float | None: ...


class _Track:
    """What the detector holds for one subject (a host or a relay)."""

    __slots__ = ("flapping", "flaps", "grace_from", "id", "last_seen", "scheduled", "since", "state")

    def __init__(self, subject: str, state: State, since: float, last_seen: float | None) -> None:
        self.id = subject
        self.state = state
        self.since = since
        self.last_seen = last_seen
        self.grace_from = _NEVER  # its own grace: when its path came back with no news of it
        self.scheduled: float | None = None
        self.flapping = False
        self.flaps: tuple[float, ...] = ()  # times of recent state changes, within the flap window


class HostTrack(_Track):
    __slots__ = ("interval_s", "misses", "others", "said", "seq", "slot", "source", "stats", "via", "via_seen")

    def __init__(self, subject: str, state: State, since: float, last_seen: float | None) -> None:
        super().__init__(subject, state, since, last_seen)
        self.interval_s = 0.0
        self.misses = 0
        self.seq: int | None = None
        self.via: str | None = None  # the relay the freshest evidence came through; None = direct
        self.via_seen = _NEVER
        self.others: dict[str | None, float] | None = None  # other paths: relay -> last seen there
        self.stats: _Arrivals | None = None
        self.slot = -1  # its place in its relay's columns (-1: none, e.g. a direct host)
        self.source: str | None = None  # the watched source a relay vouches for it from; None: it beats
        self.said: tuple[Vouch, str] | None = None  # what that source last said, and the reason shown


class RelayTrack(_Track):
    __slots__ = (
        "boot", "children", "cols", "desynced", "flush_s", "online", "owed", "parent", "pending", "resync_asked",
        "retired", "seq",
    )  # fmt: skip

    def __init__(self, subject: str, state: State, since: float, last_seen: float | None) -> None:
        super().__init__(subject, state, since, last_seen)
        self.parent: str | None = None
        self.boot: str | None = None
        self.seq = -1
        self.flush_s = 1.0
        self.retired: deque[str] = deque()
        self.children: set[str] = set()
        # Subjects below whose deadline passed before this relay confirmed it by a later bundle.
        self.pending: list[AnyTrack] = []
        self.desynced = False  # a delta of it was missed: judge nothing behind it until a keyframe
        self.cols: Columns[HostTrack] = Columns()  # the hosts behind it, by slot: their deadlines and mirrors
        self.resync_asked = _NEVER  # when a keyframe was last asked for
        self.owed = 0  # jobs owed for the hosts in its columns (`Detector._jobs`)
        self.online: tuple[str, int] | None = None  # (boot, session) of its newest `online` that named one

    @property
    def hosts(self) -> set[str]:
        """The hosts whose freshest evidence came through this relay (`cols.held` counts them)."""
        return {host.id for host in self.cols.members if host is not None}


AnyTrack = HostTrack | RelayTrack  # what a track is; code narrows it with isinstance
_T = TypeVar("_T", HostTrack, RelayTrack)


class _Job(enum.Enum):
    TO_HEAP = "to_heap"  # a relay no longer live: its hosts' deadlines move from its columns to the heap
    UNREACHABLE = "unreachable"  # a relay died: its live hosts fail over or become unreachable
    STOPPED = "stopped"  # a relay stopped: its live hosts fail over; those it made unreachable go unknown
    RESUME = "resume"  # a relay is back: its unreachable (or unheard) hosts resume from their evidence


class _Owed:
    """Per-host work a mass event owes: one job over the slots of one relay's columns, in slot order,
    with what the event decided it from (`at`, the relay to blame, the grace of that moment)."""

    __slots__ = ("at", "blame", "end", "grace", "job", "next", "reason", "track")

    def __init__(self, job: _Job, track: RelayTrack, at: float, blame: RelayTrack, reason: str, grace: float) -> None:
        self.job = job
        self.track = track
        self.at = at
        self.blame = blame
        self.reason = reason
        self.grace = grace
        self.next = 0  # the next slot to do
        self.end = len(track.cols)  # no host joins a relay's columns while it has owed jobs


class _Arrivals:
    """Running mean and variance of a host's inter-arrival times (Welford, exponentially weighted)."""

    __slots__ = ("mean", "n", "var")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.var = 0.0

    def add(self, gap: float, weight: float = 0.1) -> None:
        self.n += 1
        if self.n == 1:
            self.mean = gap
            return
        diff = gap - self.mean
        self.mean += weight * diff
        self.var = (1 - weight) * (self.var + weight * diff * diff)


@dataclass(frozen=True, slots=True)
class HostSnapshot:
    """A host as stored, on the detector's clock: what `restore` takes."""

    id: str
    state: State
    since: float
    last_seen: float | None
    relay: str | None
    interval_s: float
    seq: int | None
    flapping: bool = False
    source: str | None = None


@dataclass(frozen=True, slots=True)
class RelaySnapshot:
    id: str
    state: State
    since: float
    last_seen: float | None
    parent: str | None
    boot: str | None
    seq: int | None
    flush_s: float
    flapping: bool = False


def _ready(host: HostTrack) -> int:
    """Its `Columns.ready` bits: what the vectorised pass may assume of it."""
    if host.last_seen is None or host.via_seen < host.last_seen:
        return 0  # its freshest news came another way
    if host.state is State.UP:
        heard = READY_UP
    elif host.state is State.UNKNOWN:
        heard = READY_WAITING
    else:
        return 0
    return heard | (0 if host.flapping else READY_STEADY) | (0 if host.scheduled is None else READY_SCHEDULED)


def _parent(track: AnyTrack) -> str | None:
    return track.parent if isinstance(track, RelayTrack) else None


def _fmt(seconds: float) -> str:
    return f"{seconds:g}"


class Detector:
    def __init__(self, policy: Policy, now: float, timeouts: TimeoutPolicy | None = None) -> None:
        self.policy = policy
        self.timeouts = timeouts
        self.hosts: dict[str, HostTrack] = {}
        self.relays: dict[str, RelayTrack] = {}
        self.grace_from = now
        self.disconnected = False  # told by the shell: the monitor's broker connection is down
        self.silent = False  # decided here: every relay went quiet at once
        self.last_bundle_at: float | None = None
        self.ignored: dict[str, int] = {}  # evidence dropped on purpose, by reason (counters)
        self.plain_rows = 0  # rows of `Bundle.beats` the vectorised pass took (a counter)
        # Subjects per kind and state, and flapping per kind, kept as they change: what /metrics and
        # /healthz report without a walk over a million hosts (`tally_faults` recounts them).
        self.tally: dict[Kind, Counter[State]] = {Kind.HOST: Counter(), Kind.RELAY: Counter()}
        self.flapping_tally: Counter[Kind] = Counter()
        # The hosts in each state but `up` (few, as a rule): what `GET /hosts?state=down` lists.
        self.unwell: dict[State, set[str]] = {state: set() for state in State if state is not State.UP}
        self._heap: list[tuple[float, int, AnyTrack]] = []
        self._root_pending: list[RelayTrack] = []  # top-level relays silent, not yet confirmed
        self._tie = itertools.count()
        self._z = policy.phi_z
        # Top-level relays to ask for a keyframe (`<prefix>relay/<id>/resync`); the shell drains it.
        self.resync_wanted: dict[str, None] = {}
        self._jobs: deque[_Owed] = deque()  # owed per-host work of mass events, in order
        self._deciding = 0  # jobs in `_jobs` that decide (all but TO_HEAP): a relay's change waits for them
        self._working = False  # inside `_work`: owed work is being done
        self._unsaid: list[Transition] = []  # owed work done by a call that returns no transitions

    # ------------------------------------------------------------------------------ public inputs

    @property
    def blind(self) -> bool:
        return self.disconnected or self.silent

    def observe(
        self, bundle: Bundle, now: float, sent: float | None = None, limit: int | None = None
    ) -> list[Transition]:
        """A bundle arrived from a relay connected to the monitor's broker, `sent` when by its relay's
        clock (monitor/dating.py; None: on arrival). Everything in it is dated from `sent`, so news
        that waited in a queue counts from when it was news, and stale news proves no one alive.

        `limit` (here and in the other inputs): do at most that many hosts of the per-host work a
        mass event owes, leaving the rest to `expire` (`due` says so); None: all of it."""
        out: list[Transition] = []
        news = self._is_news(bundle, now)
        if news:  # a duplicate proves nothing new about anyone, the network included
            self.last_bundle_at = now
            if self.silent:
                self.silent = False
                self.grace_from = now
        self._observe_relay(bundle, None, now if sent is None else min(sent, now), now, out)
        if news and self._root_pending:
            pending, self._root_pending = self._root_pending, []
            for relay in pending:
                self._recheck(relay, now, out)
        self._work(out, limit)
        return out

    def lost_track(
        self, header: Bundle, now: float, sent: float | None = None, limit: int | None = None
    ) -> list[Transition]:
        """A delta bundle the shell could not expand (it lacks the keyframe the delta refers to), as
        its `header` (no news): the relay is alive, but out of sync until its next keyframe."""
        relay = self.relays.get(header.relay)
        if relay is not None and relay.boot == header.boot and header.seq > relay.seq:
            relay.desynced = True  # a new boot, or a new relay, is out of sync at its first delta anyway
        return self.observe(header, now, sent, limit)

    def observe_beat(self, host: str, beat: Beat, now: float, limit: int | None = None) -> list[Transition]:
        """A leaf beat published straight to the monitor's broker (a small site with no relay)."""
        out: list[Transition] = []
        interval_ms = round((beat.interval_s or self.policy.default_interval_s) * 1000)
        self._observe_host(HostEntry(host, beat.seq, 0, interval_ms, beat.status), None, now, now, out)
        self._work(out, limit)
        return out

    def relay_online(self, relay_id: str, boot: str, session: int) -> None:
        """The relay said `online` for upstream session `session` of boot `boot`: no decision (its
        bundles are the evidence), but its wills of older sessions of that boot are stale from now."""
        relay = self.relays.get(relay_id)
        if relay is not None and (relay.online is None or relay.online[0] != boot or session > relay.online[1]):
            relay.online = (boot, session)

    def relay_offline(
        self, relay_id: str, now: float, limit: int | None = None, *, boot: str | None = None, session: int = 0
    ) -> list[Transition]:
        """The relay's Last Will arrived: a fast hint that it is gone; unless it names an upstream
        session older than one the same boot said `online` for since (`stale_will`, ignored): a
        connection the relay gave up on, let go by its broker only later."""
        out: list[Transition] = []
        relay = self.relays.get(relay_id)
        if relay is not None and relay.online is not None and relay.online[0] == boot and session < relay.online[1]:
            self._ignore("stale_will")
        elif relay is not None and relay.state == State.UP and not self.blind:
            self._relay_down(relay, now, f"relay {relay_id} said offline (status topic / last will)", out)
        self._work(out, limit)
        return out

    def relay_stopped(self, relay_id: str, now: float, limit: int | None = None) -> list[Transition]:
        """The relay said it stopped (a clean stop): `stopped`, which pages nobody. Whoever is behind it
        is not unreachable: each keeps its state until its own timeout passes, then goes `unknown`
        (no news is no evidence); a host heard recently through another live relay moves there.
        Evidence, not silence: it counts even while the monitor is blind."""
        out: list[Transition] = []
        relay = self.relays.get(relay_id)
        if relay is None or relay.state == State.STOPPED:
            return out
        self._move(relay, Kind.RELAY, State.STOPPED, now, f"relay {relay_id} said it stopped", relay.parent, out)
        relay.scheduled = None
        self._confirm_pending(relay, now, out)  # deadlines that passed awaiting its next bundle: judged now
        behind = [relay, *self.subtree(relay.id)]
        for track in behind[1:]:  # the relays first, then their hosts (owed: `_stopped_host`)
            if track.state == State.UNREACHABLE and self._path_end(track.parent) is relay:
                self._move(track, Kind.RELAY, State.UNKNOWN, now, f"relay {relay_id} stopped", relay_id, out)
                self._recheck(track, now, out)
        for track in behind:
            self._owe(_Job.STOPPED, track, now, relay, f"relay {relay_id} stopped")
        self._work(out, limit)
        return out

    def set_connected(self, connected: bool, now: float) -> None:
        """The shell reports the monitor's own broker connection. Regaining it starts a grace period."""
        if connected and self.disconnected:
            self.grace_from = now
            if self.last_bundle_at is not None:
                self.last_bundle_at = now  # total silence counts from when we could hear again
        self.disconnected = not connected

    def due(self, now: float) -> bool:
        """Whether `expire(now)` has something to do now: owed work, or a deadline passed."""
        return bool(self._jobs or self._unsaid) or (not self.blind and bool(self._heap) and self._heap[0][0] <= now)

    @property
    def owed(self) -> int:
        """Hosts' slots the owed jobs have still to do (0: nothing owed)."""
        return sum(job.end - job.next for job in self._jobs)

    def regain_sight(self, now: float) -> None:
        """The shell could not look for a while (its event loop was blocked): start a grace period."""
        self.grace_from = max(self.grace_from, now)

    def forget_host(self, host_id: str) -> bool:
        if self._jobs:
            self._touch(self.hosts.get(host_id), self._unsaid)  # what it decides, the next `expire` returns
        host = self.hosts.pop(host_id, None)
        if host is None:
            return False
        self._count(Kind.HOST, host_id, host.state, -1)
        self.flapping_tally[Kind.HOST] -= host.flapping
        host.scheduled = None
        if host.via is not None and host.via in self.relays:
            self._leave(host, self.relays[host.via])
        return True

    def next_deadline(self) -> float | None:
        """When `expire` may next have something to do; None while blind or with nothing scheduled."""
        if self.blind:
            return None
        candidates = [self._heap[0][0]] if self._heap else []
        silence = self._silence_deadline()
        if silence is not None:
            candidates.append(silence)
        return min(candidates) if candidates else None

    def expire(self, now: float, limit: int | None = None) -> list[Transition]:
        """Owed work first, then everything whose deadline has passed by `now`, in deadline order.
        With `limit`, stop once that many subjects (heap entries or owed hosts' slots) are done, or
        when a deadline made a mass event owe work: the rest stays due (`due`), so that a mass event
        is decided in steps between which the shell may read its input. The same decisions, in the
        same order, as one call without a limit."""
        out, self._unsaid = self._unsaid, []
        budget = math.inf if limit is None else limit
        budget -= self._work(out, limit)
        if self._jobs:
            return out
        silence = self._silence_deadline()
        if silence is not None and silence <= now:
            self.silent = True
        if self.blind:
            return out
        heap = self._heap
        while heap and heap[0][0] <= now and budget > 0:
            budget -= 1
            scheduled, _, track = heapq.heappop(heap)
            if track.scheduled != scheduled:
                continue  # superseded entry
            self._unschedule(track)
            self._recheck(track, now, out)
            if self._jobs:
                if limit is not None:
                    break  # a mass event: its hosts in the next steps, before any later deadline
                self._work(out, None)
        return out

    def restore(self, hosts: Iterable[HostSnapshot], relays: Iterable[RelaySnapshot]) -> None:
        """Load stored state at start-up; the start-up grace (grace_from) protects everyone."""
        for r in relays:
            relay = RelayTrack(r.id, r.state, r.since, r.last_seen)
            relay.parent, relay.boot, relay.flush_s, relay.flapping = r.parent, r.boot, r.flush_s, r.flapping
            relay.seq = -1 if r.seq is None else r.seq
            relay.desynced = True  # what it sent while we were away is not in SQL: wait for a keyframe
            self._enter(self.relays, relay, Kind.RELAY)
        for relay in self.relays.values():
            if relay.parent in self.relays:
                self.relays[relay.parent].children.add(relay.id)
            if relay.state == State.UP:
                self._schedule(relay, self._deadline(relay))
        for h in hosts:
            host = HostTrack(h.id, h.state, h.since, h.last_seen)
            host.interval_s, host.seq, host.flapping = h.interval_s, h.seq, h.flapping
            host.misses = self.policy.misses_for(h.id)
            host.via, host.source = h.relay, h.source
            host.via_seen = _NEVER if h.last_seen is None else h.last_seen
            self._enter(self.hosts, host, Kind.HOST)
            if h.relay is not None:
                self._join(host, self._relay(h.relay, h.since))
            if host.state == State.UP:
                self._schedule(host, self._deadline(host))

    # ------------------------------------------------------------------------------------ views

    def timeout_s(self, track: AnyTrack) -> float:
        if isinstance(track, RelayTrack):
            return track.flush_s * self.policy.misses
        if self.timeouts is not None:
            chosen = self.timeouts.timeout_s(track.id)
            if chosen is not None:
                return chosen
        stats = track.stats
        if self.policy.adaptive and stats is not None and stats.n >= self.policy.adaptive_min_samples:
            spread = max(math.sqrt(stats.var), 0.1 * stats.mean, 0.05)
            return max(stats.mean + self._z * spread, 2 * stats.mean)  # one lost beat never pages
        return track.interval_s * track.misses

    def deadline_of(self, track: AnyTrack) -> float | None:
        return self._deadline(track) if track.state in _UP_OR_UNKNOWN else None

    def nearest_dead_relay(self, relay_id: str | None) -> str | None:
        """Walk up from a relay to the first one that is down."""
        relay = self._walk_up(relay_id, (State.DOWN,))
        return None if relay is None else relay.id

    def _path_end(self, relay_id: str | None) -> RelayTrack | None:
        """Walk up from a relay to the first one that is down or stopped: where news stops."""
        return self._walk_up(relay_id, (State.DOWN, State.STOPPED))

    def _walk_up(self, relay_id: str | None, states: tuple[State, ...]) -> RelayTrack | None:
        seen: set[str] = set()
        while relay_id is not None and relay_id not in seen:
            seen.add(relay_id)
            relay = self.relays.get(relay_id)
            if relay is None:
                return None
            if relay.state in states:
                return relay
            relay_id = relay.parent
        return None

    def subtree(self, relay_id: str) -> Iterator[RelayTrack]:
        """The relays below `relay_id`, depth first, excluding itself."""
        stack = list(self.relays[relay_id].children)
        seen = {relay_id}
        while stack:
            child_id = stack.pop()
            if child_id in seen or child_id not in self.relays:
                continue
            seen.add(child_id)
            child = self.relays[child_id]
            yield child
            stack.extend(child.children)

    # ---------------------------------------------------------------------------------- internals

    def _deadline(self, track: AnyTrack) -> float:
        seen = track.last_seen if track.last_seen is not None else track.since
        return max(seen, self.grace_from, track.grace_from) + self.timeout_s(track)

    def _schedule(self, track: AnyTrack, deadline: float) -> None:
        if type(track) is HostTrack and track.slot >= 0:
            relay = self.relays[track.via]  # type: ignore[index]
            if relay.state in _UP_OR_UNKNOWN:  # a live relay's bundles are its clock: its column, exactly
                track.scheduled = relay.cols.deadlines[track.slot] = deadline
                self._sync(track)
                return
            # Behind a relay that is down or unreachable: no bundle of it will come, the heap decides
            # (always pushed: its `scheduled` may have been a column's, with no heap entry behind it).
            track.scheduled = deadline
            heapq.heappush(self._heap, (deadline, next(self._tie), track))
            self._sync(track)
            return
        if track.scheduled is not None and track.scheduled <= deadline:
            return  # an earlier entry is already in the heap; it will be pushed back when popped
        track.scheduled = deadline
        heapq.heappush(self._heap, (deadline, next(self._tie), track))

    def _silence_deadline(self) -> float | None:
        """When total silence from every relay would mean we, not they, lost the network."""
        if self.blind or self.last_bundle_at is None:
            return None
        up = self._top_relays_up()
        if len(up) < self.policy.blind_min_relays:
            return None
        flush = max(r.flush_s for r in up)
        return self.last_bundle_at + flush * max(1.0, self.policy.misses - 1)

    def _top_relays_up(self) -> list[RelayTrack]:
        return [r for r in self.relays.values() if r.parent is None and r.state == State.UP]

    def _silence_watched(self) -> bool:
        """Whether total silence would be taken as our own blindness (enough relays up to tell)."""
        return len(self._top_relays_up()) >= self.policy.blind_min_relays

    def _silence_reason(self, track: AnyTrack, deadline: float) -> str:
        seen = track.last_seen if track.last_seen is not None else track.since
        if isinstance(track, RelayTrack):
            return f"no bundle for {deadline - seen:.1f} s (flush {_fmt(track.flush_s)} s × {self.policy.misses})"
        if self.timeouts is not None and self.timeouts.timeout_s(track.id) is not None:
            return f"no beat for {deadline - seen:.1f} s (timeout from targets)"
        if self.policy.adaptive and track.stats is not None and track.stats.n >= self.policy.adaptive_min_samples:
            return f"no beat for {deadline - seen:.1f} s (phi ≥ {_fmt(self.policy.phi_threshold)})"
        return f"no beat for {deadline - seen:.1f} s (interval {_fmt(track.interval_s)} s × {track.misses})"

    def _move(
        self,
        track: AnyTrack,
        kind: Kind,
        state: State,
        at: float,
        reason: str,
        relay: str | None,
        out: list[Transition],
    ) -> None:
        if track.state == state:
            return
        if type(track) is RelayTrack:
            self._settle(out)  # owed decisions saw the relays as they were
        if (track.state, state) not in TRANSITIONS[kind]:
            self._ignore(f"unlisted_transition_{track.state}_{state}")  # a bug; the property tests want none
        at = max(at, track.since)  # history never goes back in time
        out.append(
            Transition(
                kind=kind, subject=track.id, from_state=track.state, to_state=state, at=at, reason=reason, relay=relay
            )
        )
        self._count(kind, track.id, track.state, -1)
        self._count(kind, track.id, state, +1)
        track.state = state
        track.since = at
        if type(track) is RelayTrack and state not in _UP_OR_UNKNOWN:
            self._columns_to_heap(track)
        self._count_flap(track, kind, at, relay, out)
        if type(track) is HostTrack:
            self._sync(track)

    def _columns_to_heap(self, relay: RelayTrack) -> None:
        """A relay that is down or unreachable sends no bundle that could judge its hosts: the
        deadlines in its columns move to the heap (owed: a job, done before any heap entry)."""
        self._owe(_Job.TO_HEAP, relay, 0.0, relay, "")

    def _count_flap(self, track: AnyTrack, kind: Kind, at: float, relay: str | None, out: list[Transition]) -> None:
        policy = self.policy
        horizon = at - policy.flap_window_s
        track.flaps = tuple(t for t in (*track.flaps, at) if t > horizon)[-policy.flap_start :]
        if not track.flapping and len(track.flaps) >= policy.flap_start:
            track.flapping = True
            self.flapping_tally[kind] += 1
            reason = f"{len(track.flaps)} state changes within {_fmt(policy.flap_window_s)} s"
            out.append(self._event(kind, track, at, reason, relay, Event.FLAPPING_START))

    def _check_flap_end(
        self, track: AnyTrack, kind: Kind, now: float, relay: str | None, out: list[Transition]
    ) -> None:
        horizon = now - self.policy.flap_window_s
        track.flaps = tuple(t for t in track.flaps if t > horizon)
        if len(track.flaps) <= self.policy.flap_stop:
            track.flapping = False
            self.flapping_tally[kind] -= 1
            reason = f"{len(track.flaps)} state changes within {_fmt(self.policy.flap_window_s)} s"
            out.append(self._event(kind, track, now, reason, relay, Event.FLAPPING_END))
            if type(track) is HostTrack:
                self._sync(track)

    def _relay(self, relay_id: str, now: float) -> RelayTrack:
        relay = self.relays.get(relay_id)
        if relay is None:
            relay = self._enter(self.relays, RelayTrack(relay_id, State.UNKNOWN, now, None), Kind.RELAY)
        return relay

    def _enter(self, tracks: dict[str, _T], track: _T, kind: Kind) -> _T:
        """A new subject, counted in the tallies."""
        tracks[track.id] = track
        self._count(kind, track.id, track.state, +1)
        self.flapping_tally[kind] += track.flapping
        return track

    def _count(self, kind: Kind, subject: str, state: State, by: int) -> None:
        """A subject comes into `state` (`by` +1) or leaves it (-1): the tallies and `unwell` follow."""
        self.tally[kind][state] += by
        if kind is Kind.HOST and state is not State.UP:
            if by > 0:
                self.unwell[state].add(subject)
            else:
                self.unwell[state].discard(subject)

    def tally_faults(self) -> list[str]:
        """Where the tallies disagree with a recount (the property tests' self-check; [] when sound)."""
        out = []
        for kind, tracks in ((Kind.HOST, self.hosts), (Kind.RELAY, self.relays)):
            counted: Counter[State] = Counter(t.state for t in tracks.values())
            if +self.tally[kind] != counted or -self.tally[kind]:
                out.append(f"{kind} states: tally {dict(self.tally[kind])} != counted {dict(counted)}")
            flapping = sum(t.flapping for t in tracks.values())
            if self.flapping_tally[kind] != flapping:
                out.append(f"{kind} flapping: tally {self.flapping_tally[kind]} != counted {flapping}")
        for state, ids in self.unwell.items():
            if ids != {h.id for h in self.hosts.values() if h.state is state}:
                out.append(f"hosts {state}: listed {sorted(ids)[:5]}... != the hosts in it")
        return out

    def _seq_allowance(self, last_seen: float, flush_s: float, now: float) -> float:
        """How far a relay's bundle seq may plausibly have moved since we last heard it."""
        return 10 + 2 * max(0.0, now - last_seen) / flush_s

    def _is_news(self, bundle: Bundle, now: float) -> bool:
        relay = self.relays.get(bundle.relay)
        if relay is None or bundle.boot not in (relay.boot, *relay.retired):
            return True
        if relay.boot != bundle.boot or bundle.seq <= relay.seq:
            return False  # a retired boot, or a duplicate
        return relay.last_seen is None or bundle.seq <= relay.seq + self._seq_allowance(
            relay.last_seen, relay.flush_s, now
        )

    def _observe_relay(
        self, bundle: Bundle, parent: str | None, above_sent: float, now: float, out: list[Transition]
    ) -> None:
        sent = above_sent - bundle.age_ms / 1000
        relay = self._relay(bundle.relay, now)
        self._pay(relay, out)  # news of a relay whose hosts are owed work: that work first
        if not self._admit(relay, bundle, parent, now, out):
            return
        relay.seq = bundle.seq
        relay.flush_s = bundle.flush_ms / 1000
        if relay.parent != parent:
            if relay.parent in self.relays:
                self.relays[relay.parent].children.discard(relay.id)
            if parent is not None:
                self.relays[parent].children.add(relay.id)
            relay.parent = parent
        first = relay.last_seen is None  # its first news ever (not restored, never heard)
        if relay.last_seen is None or sent > relay.last_seen:
            relay.last_seen = sent
        if relay.flapping:
            self._check_flap_end(relay, Kind.RELAY, now, parent, out)
        if relay.desynced:
            self._ask_resync(relay, now)

        was = relay.state
        self._judge_relay(relay, bundle.seq, parent, first, now, out)
        self._observe_entries(relay.id, bundle, sent, now, out)
        self._observe_watched(relay.id, bundle, sent, now, out)
        for child in bundle.children:
            self._observe_relay(child, relay.id, sent, now, out)
        if not relay.desynced:  # out of sync, its silence proves nothing: they wait
            if relay.pending:
                self._confirm_pending(relay, now, out)
            self._expire_behind(relay, now, out)
        if was != State.UP and relay.state == State.UP:
            self._resume_subtree(relay, now, out)

    def _judge_relay(
        self, relay: RelayTrack, seq: int, parent: str | None, first: bool, now: float, out: list[Transition]
    ) -> None:
        """A relay's own state from the bundle just admitted (its hosts are judged after)."""
        deadline = self._deadline(relay)
        was = relay.state
        if deadline > now:
            # Within its timeout, or within grace: only news fresher than its timeout makes it `up`
            # (a stale bundle, e.g. replayed from a queue, leaves it as it was until its deadline).
            if was != State.UP and relay.last_seen is not None and relay.last_seen + self.timeout_s(relay) > now:
                self._move(relay, Kind.RELAY, State.UP, now, f"bundle received (seq {seq})", parent, out)
            self._schedule(relay, deadline)
        elif first and was == State.UNKNOWN and parent is None:
            # A top-level relay's first news, already too old (its first bundle waits for its second to
            # confirm its clock; a monitor behind its input reads both late): no judgement in the very
            # bundle; its deadline decides it at the next expiry pass unless newer news came with it.
            self._schedule(relay, deadline)
        elif was not in (State.DOWN, State.STOPPED):  # old news of a stopped relay: still stopped
            # Heard, but through a parent whose copy is already too old: it died a while ago (or, if
            # it was unreachable, while it was out of sight), before its hosts are judged below.
            self._relay_silent(relay, deadline, out)

    @staticmethod
    def _event(kind: Kind, track: AnyTrack, at: float, reason: str, relay: str | None, event: Event) -> Transition:
        """A history row that records an event (restart, flapping) without changing the state."""
        return Transition(
            kind=kind,
            subject=track.id,
            from_state=track.state,
            to_state=track.state,
            at=at,
            reason=reason,
            relay=relay,
            event=event,
        )

    def _admit(self, relay: RelayTrack, bundle: Bundle, parent: str | None, now: float, out: list[Transition]) -> bool:
        """Whether a bundle is news from this relay (same boot, newer seq within reason, or a new
        boot); a new boot retires the old one and is recorded as a restart."""
        if relay.boot == bundle.boot:
            if bundle.seq == relay.seq and parent is not None:
                if bundle.keyframe and relay.desynced:
                    relay.desynced = False  # its parent's keyframe carries its full picture: in sync again
                    return True
                return False  # a parent folds a child's latest bundle into every flush: nothing new, nothing wrong
            if bundle.seq <= relay.seq:
                self._ignore("stale_bundle")
                return False
            if relay.last_seen is not None and bundle.seq > relay.seq + self._seq_allowance(
                relay.last_seen, relay.flush_s, now
            ):
                # Far ahead of what this relay could have sent since: forged or corrupt. Taking it
                # would make every genuine bundle after it look stale, and the relay look dead.
                self._ignore("future_seq")
                return False
            if bundle.keyframe:
                relay.desynced = False
            elif bundle.seq != relay.seq + 1:
                relay.desynced = True  # a delta in between was lost
            return True
        if bundle.boot in relay.retired:
            self._ignore("retired_boot")
            return False
        if relay.boot is not None:
            relay.retired.append(relay.boot)
            while len(relay.retired) > self.policy.relay_memory:
                relay.retired.popleft()
            reason = f"relay restarted (boot {relay.boot} → {bundle.boot})"
            out.append(self._event(Kind.RELAY, relay, now, reason, parent, Event.RESTART))
        relay.boot = bundle.boot
        relay.desynced = not bundle.keyframe  # a new boot's first bundle is a keyframe; we missed it
        return True

    def _ask_resync(self, relay: RelayTrack, now: float) -> None:
        """Ask for a keyframe through the top-level relay above `relay` (the one whose topic the
        monitor can publish to); again at most once per max(1 s, its timeout)."""
        if now - relay.resync_asked < max(1.0, relay.flush_s * self.policy.misses):
            return
        relay.resync_asked = now
        top, seen = relay, {relay.id}
        while top.parent is not None and top.parent in self.relays and top.parent not in seen:
            top = self.relays[top.parent]
            seen.add(top.id)
        self.resync_wanted[top.id] = None

    def take_resync_requests(self) -> list[str]:
        """The top-level relays to ask for a keyframe now (each once)."""
        wanted, self.resync_wanted = list(self.resync_wanted), {}
        return wanted

    def _observe_entries(self, rid: str, bundle: Bundle, sent: float, now: float, out: list[Transition]) -> None:
        """The host entries of one relay's bundle, sent at `sent` (the monitor's clock): its ordinary
        news by column first (`Bundle.beats`, in index order), then the entries it lists."""
        if bundle.beats is not None and len(bundle.beats):
            self._observe_beats(self.relays[rid], bundle.beats, sent, now, out)
        self._observe_listed(rid, bundle.hosts, sent, now, out)

    def _observe_beats(self, relay: RelayTrack, beats: Beats, sent: float, now: float, out: list[Transition]) -> None:
        """Ordinary news by column: one vectorised pass (`Columns.plain_news`) takes the rows the
        per-entry fast path below would take, moving evidence and deadlines in place; the other rows
        take the full path, in order. The same decisions as listing every row as an entry."""
        cols = relay.cols
        if self.policy.adaptive or self.timeouts is not None or relay.owed or not cols:
            self._observe_listed(relay.id, beats.entries(), sent, now, out)
            return
        hosts, rid = self.hosts, relay.id

        def slot_of(host_id: str) -> int:
            host = hosts.get(host_id)
            return -1 if host is None or host.via != rid else host.slot

        table = cols.slots_of(beats.ids, slot_of)
        waiting = now if relay.state in _UP_OR_UNKNOWN else None  # a live relay: its waiting hosts stay in its columns
        news = cols.plain_news(beats, table[beats.index], sent, self.grace_from, waiting)
        self.plain_rows += len(news.slots)
        members = cols.members
        for slot, seen, seq, deadline in zip(news.slots, news.seen, news.seqs, news.deadlines, strict=True):
            host = members[slot]
            host.last_seen = host.via_seen = seen  # type: ignore[union-attr]
            host.seq = None if seq < 0 else seq  # type: ignore[union-attr]
            host.scheduled = deadline  # type: ignore[union-attr]
        if not news.rest:
            return
        ids, status_of = beats.ids, _STATUS_OF
        index, seqs, ages = beats.index.tolist(), beats.seq.tolist(), beats.age_ms.tolist()
        intervals, statuses = beats.interval_ms.tolist(), beats.status.tolist()
        for row in news.rest:
            i, seq = index[row], seqs[row]
            entry = HostEntry(ids[i], None if seq < 0 else seq, ages[row], intervals[row], status_of[statuses[row]])
            self._observe_host(entry, rid, sent, now, out)
            if cols.map is table and cols.map_layout == cols.layout:  # the cache still holds: keep it true
                table[i] = slot_of(entry.id)

    def _observe_listed(
        self, rid: str, entries: Iterable[HostEntry], sent: float, now: float, out: list[Transition]
    ) -> None:
        hosts, up = self.hosts, State.UP
        plain = not self.policy.adaptive and self.timeouts is None
        cols = self.relays[rid].cols
        seen_at, seqs, deadlines = cols.seen, cols.seqs, cols.deadlines  # its columns' mirrors
        grace = self.grace_from
        for entry in entries:
            host = hosts.get(entry[0])
            # Fast paths for the common case: an up host, heard through the relay that brought its
            # freshest news so far. Anything unusual takes the full path in _observe_host.
            if host is not None and host.via == rid and host.state is up and host.via_seen >= host.last_seen:  # type: ignore[operator]
                seq = entry[1]
                seen = sent - entry[2] / 1000
                if seq == host.seq and seen - host.via_seen < SAME_BEAT_S:
                    continue  # the beat this relay already brought us: no news
                if (
                    plain
                    and seen > host.via_seen
                    and (seq is None or host.seq is None or seq > host.seq)
                    and entry[4] == "ok"
                    and entry[3] / 1000 == host.interval_s
                    and host.scheduled is not None
                    and not host.flapping
                ):
                    # A new beat: the news and its deadline move, in place (and their mirrors).
                    slot = host.slot
                    host.last_seen = host.via_seen = seen_at[slot] = seen
                    host.seq = seq
                    seqs[slot] = -1 if seq is None else seq
                    floor = grace if grace > host.grace_from else host.grace_from
                    deadline = (seen if seen > floor else floor) + host.interval_s * host.misses
                    host.scheduled = deadlines[slot] = deadline
                    continue
            self._observe_host(entry, rid, sent, now, out)

    def _observe_watched(self, rid: str, bundle: Bundle, sent: float, now: float, out: list[Transition]) -> None:
        """Devices the relay vouches for: `up` as if beating once per flush; `down` or `unreachable` at
        once (from `up` or `unknown`, as a dead relay's hosts), at the time their source said so."""
        for w in bundle.watched:
            host = self._host(w.id, bundle.flush_ms, now, out)
            host.source, host.said = w.source, (w.state, f"{w.source}: {w.reason}")
            if w.state is Vouch.UP:
                self._observe_host(HostEntry(w.id, None, w.age_ms, bundle.flush_ms, LeafStatus.OK), rid, sent, now, out)
            elif w.state is Vouch.DOWN or host.state in _UP_OR_UNKNOWN:
                if host.via != rid:
                    self._set_via(host, rid)
                self._move(host, Kind.HOST, State(w.state.value), sent - w.age_ms / 1000, host.said[1], rid, out)

    def _host(self, host_id: str, interval_ms: int, now: float, out: list[Transition]) -> HostTrack:
        host = self.hosts.get(host_id)
        if self._jobs:
            self._touch(host, out)
        if host is None:
            host = self._enter(self.hosts, HostTrack(host_id, State.UNKNOWN, now, None), Kind.HOST)
            host.misses = self.policy.misses_for(host_id)
            host.interval_s = interval_ms / 1000
        return host

    def _observe_host(
        self, entry: HostEntry, relay_id: str | None, sent: float, now: float, out: list[Transition]
    ) -> None:
        seen = sent - entry.age_ms / 1000
        if relay_id is not None and entry.id not in self.hosts and self._onboard(entry, relay_id, seen, now, out):
            return
        host = self._host(entry.id, entry.interval_ms, now, out)
        previous = host.last_seen
        fresher = previous is None or seen > previous
        path = host.via, host.via_seen
        if relay_id != host.via:
            self._consider_path(host, relay_id, seen)
        elif seen > host.via_seen:
            host.via_seen = seen
        if not fresher:  # no news (a repeat, or older than what another path brought): the cheap way out
            if (host.via, host.via_seen) != path:
                self._sync(host)
            if host.state == State.UNREACHABLE and host.via == relay_id:
                self._resume_host(host, now, out)
            return

        host.last_seen = seen
        if self.timeouts is not None and previous is not None:
            beats = 0 if entry.seq is None or host.seq is None else entry.seq - host.seq
            self.timeouts.arrival(host.id, seen - previous, beats, entry.interval_ms / 1000)
        if entry.seq is not None and entry.seq != host.seq:
            if host.seq is not None and entry.seq < host.seq:
                reason = f"leaf restarted (seq {host.seq} → {entry.seq})"
                out.append(self._event(Kind.HOST, host, now, reason, relay_id, Event.RESTART))
            if previous is not None and self.policy.adaptive:
                self._add_arrival(host, seen - previous)
            host.seq = entry.seq
        elif entry.seq is None and previous is not None and self.policy.adaptive and seen - previous > 0.01:
            self._add_arrival(host, seen - previous)
        host.interval_s = entry.interval_ms / 1000
        if host.flapping:
            self._check_flap_end(host, Kind.HOST, now, host.via, out)

        if entry.status == LeafStatus.STOPPING:
            self._move(host, Kind.HOST, State.STOPPED, seen, "leaf said it is stopping", host.via, out)
        else:
            self._resume_host(host, now, out)
        self._sync(host)

    def _onboard(self, entry: HostEntry, relay_id: str, seen: float, now: float, out: list[Transition]) -> bool:
        """A host first heard through a live relay, with a fresh plain beat: `unknown` -> `up`, as the
        full path below would decide it, in one step (a 1M-host fleet's first keyframes are a million
        of these). False, having changed nothing, when anything is unusual: the full path decides."""
        policy, relay = self.policy, self.relays[relay_id]
        if (
            policy.adaptive
            or self.timeouts is not None
            or entry.status != LeafStatus.OK
            or relay.state not in _UP_OR_UNKNOWN
        ):
            return False
        misses, interval_s = policy.misses_for(entry.id), entry.interval_ms / 1000
        if seen + interval_s * misses <= now:
            return False  # stale news: no `up` from it (the full path schedules or decides it)
        host = self._enter(self.hosts, HostTrack(entry.id, State.UP, now, seen), Kind.HOST)
        host.misses, host.interval_s, host.seq = misses, interval_s, entry.seq
        host.via, host.via_seen = relay_id, seen
        out.append(Transition(Kind.HOST, entry.id, State.UNKNOWN, State.UP, now, "beat received", relay_id))
        self._count_flap(host, Kind.HOST, now, relay_id, out)
        host.scheduled = deadline = self._deadline(host)
        cols = relay.cols
        host.slot = cols.join(host, deadline)
        cols.mirror(host.slot, host, _ready(host))
        return True

    def _add_arrival(self, host: HostTrack, gap: float) -> None:
        if host.stats is None:
            host.stats = _Arrivals()
        host.stats.add(gap)

    def _consider_path(self, host: HostTrack, relay_id: str | None, seen: float) -> None:
        """Evidence through a path other than the current one: switch only to clearly fresher news."""
        current = host.via
        current_ok = current is None or self.relays[current].state in _UP_OR_UNKNOWN
        if host.via_seen == -math.inf or not current_ok or seen > host.via_seen + host.interval_s:
            if host.via_seen != -math.inf:
                others = host.others if host.others is not None else {}
                others[current] = host.via_seen
                others.pop(relay_id, None)
                host.others = others
            self._set_via(host, relay_id)
            host.via_seen = seen
            return
        others = host.others if host.others is not None else {}
        if seen > others.get(relay_id, -math.inf):
            others[relay_id] = seen
        host.others = others

    def _set_via(self, host: HostTrack, relay_id: str | None) -> None:
        if host.via is not None and host.via in self.relays:
            self._leave(host, self.relays[host.via])
        host.via = relay_id
        if relay_id is not None:
            self._join(host, self.relays[relay_id])
        elif host.scheduled is not None:  # now a direct host: its deadline goes on the heap
            heapq.heappush(self._heap, (host.scheduled, next(self._tie), host))

    @staticmethod
    def _join(host: HostTrack, relay: RelayTrack) -> None:
        """Give a host a slot in the columns of the relay it is now heard through."""
        host.slot = relay.cols.join(host, math.inf if host.scheduled is None else host.scheduled)
        relay.cols.mirror(host.slot, host, _ready(host))

    @staticmethod
    def _leave(host: HostTrack, relay: RelayTrack) -> None:
        if host.slot >= 0:
            relay.cols.leave(host.slot)
            host.slot = -1

    def _sync(self, host: HostTrack) -> None:
        """After any change to a host: its mirror in its relay's columns follows."""
        if host.slot >= 0:
            self.relays[host.via].cols.mirror(host.slot, host, _ready(host))  # type: ignore[index]

    def _unschedule(self, track: AnyTrack) -> None:
        track.scheduled = None
        if type(track) is HostTrack:
            self._sync(track)

    def column_faults(self) -> list[str]:
        """Where a relay's columns disagree with its hosts: the property tests' self-check ([] when sound)."""
        out = [fault for relay in self.relays.values() for fault in relay.cols.faults(relay.id, _ready)]
        for host in self.hosts.values():  # and the other way round: a host heard via a relay is in its columns
            relay = self.relays.get(host.via) if host.via is not None else None
            if host.via is not None and (relay is None or host.slot < 0 or relay.cols.members[host.slot] is not host):
                out.append(f"{host.id}: heard via {host.via}, not in its columns")
        return out

    def _expire_behind(self, relay: RelayTrack, now: float, out: list[Transition]) -> None:
        """The hosts behind `relay` whose deadline its latest bundle (sent at `relay.last_seen`)
        passed: the relay is alive and said nothing newer of them. One vectorised comparison finds
        them; each is then decided as a heap entry would be."""
        sent = relay.last_seen
        if sent is None or not relay.cols:
            return
        self._pay(relay, out)  # it went down in this very bundle: its columns move to the heap first
        cols = relay.cols
        for slot in cols.due(sent):
            host = cols.members[slot]
            cols.deadlines[slot] = math.inf
            if host is None or host.scheduled is None:
                continue
            self._unschedule(host)
            self._recheck(host, now, out)

    def _resume_host(self, host: HostTrack, now: float, out: list[Transition]) -> None:
        """Decide a host from its evidence alone (its path is alive)."""
        if host.last_seen is None:
            return  # never heard: there is no evidence to decide from
        if host.state == State.STOPPED and host.last_seen <= host.since:
            return  # nothing newer than the stopping beat
        fresh_until = host.last_seen + self.timeout_s(host)
        if fresh_until > now:
            if host.state != State.UP:
                was = host.state
                reason = (
                    "beat received"
                    if was in (State.UNKNOWN, State.STOPPED)
                    else (f"beat received (was {was.value} for {now - host.since:.1f} s)")
                )
                if host.said is not None:
                    reason = host.said[1]
                self._move(host, Kind.HOST, State.UP, now, reason, host.via, out)
            self._schedule(host, self._deadline(host))
        elif self._deadline(host) <= now:
            if host.state != State.DOWN:
                self._host_silent(host, fresh_until, out)
        else:
            # Stale news within grace: no guess either way until the deadline.
            if host.state == State.UNREACHABLE:
                self._move(host, Kind.HOST, State.UNKNOWN, now, "path is back; no news yet", host.via, out)
            if host.state in _UP_OR_UNKNOWN:
                self._schedule(host, self._deadline(host))

    def _silent(self, track: AnyTrack, deadline: float, out: list[Transition]) -> None:
        """A deadline passed. Behind a relay, wait until that relay speaks after the deadline:
        only then is the silence the subject's and not the relay's."""
        upstream = track.via if isinstance(track, HostTrack) else _parent(track)
        relay = None if upstream is None else self.relays.get(upstream)
        unconfirmed = relay is not None and (relay.last_seen is None or relay.last_seen < deadline or relay.desynced)
        if unconfirmed and relay is not None and relay.state in _UP_OR_UNKNOWN and self._path_end(upstream) is None:
            relay.pending.append(track)
            return
        # A top-level relay: its silence is its own only once the monitor heard some other bundle
        # after its deadline; otherwise it may be our own network that is cut.
        heard_since = self.last_bundle_at is not None and self.last_bundle_at >= deadline
        if isinstance(track, RelayTrack) and track.parent is None and not heard_since and self._silence_watched():
            self._root_pending.append(track)
            return
        if isinstance(track, HostTrack):
            self._host_silent(track, deadline, out)
        else:
            self._relay_silent(track, deadline, out)

    def _confirm_pending(self, relay: RelayTrack, now: float, out: list[Transition]) -> None:
        pending, relay.pending = relay.pending, []
        for track in pending:
            self._recheck(track, now, out)

    def _recheck(self, track: AnyTrack, now: float, out: list[Transition]) -> None:
        """An unscheduled live subject: schedule its deadline, or handle its silence if it passed."""
        if self._jobs and type(track) is HostTrack:
            self._touch(track, out)
        if track.state not in _UP_OR_UNKNOWN or track.scheduled is not None:
            return
        deadline = self._deadline(track)
        if deadline > now:
            self._schedule(track, deadline)
        else:
            self._silent(track, deadline, out)

    def _host_silent(self, host: HostTrack, deadline: float, out: list[Transition]) -> None:
        """A host's deadline passed: down; unreachable if every path to it is dead; unknown if the
        relay on its path stopped (no news is no evidence either way)."""
        end = self._path_end(host.via)
        if end is not None and end.state == State.STOPPED:
            reason = f"no beat for {deadline - (host.last_seen or host.since):.1f} s; relay {end.id} stopped"
            self._move(host, Kind.HOST, State.UNKNOWN, deadline, reason, end.id, out)
            self._unschedule(host)
        elif end is not None:
            self._move(host, Kind.HOST, State.UNREACHABLE, deadline, f"relay {end.id} down", end.id, out)
        else:
            self._move(host, Kind.HOST, State.DOWN, deadline, self._silence_reason(host, deadline), host.via, out)

    def _relay_silent(self, relay: RelayTrack, deadline: float, out: list[Transition]) -> None:
        """A relay's deadline passed: down; unreachable if a relay above it is dead; unknown if the
        one above it stopped."""
        end = self._path_end(relay.parent)
        if end is not None:
            stopped = end.state == State.STOPPED
            state, blame = (State.UNKNOWN, "stopped") if stopped else (State.UNREACHABLE, "down")
            self._move(relay, Kind.RELAY, state, deadline, f"relay {end.id} {blame}", end.id, out)
            relay.scheduled = None
            if stopped:  # unknown too sends no bundle that could judge its hosts (_move did it for unreachable)
                self._columns_to_heap(relay)
        else:
            self._relay_down(relay, deadline, self._silence_reason(relay, deadline), out)

    def _relay_down(self, relay: RelayTrack, at: float, reason: str, out: list[Transition]) -> None:
        """A relay is down: its subtree's relays unreachable now, then their hosts (owed:
        `_unreachable_host`), so no host fails over to a relay of the subtree that is dying."""
        self._move(relay, Kind.RELAY, State.DOWN, at, reason, relay.parent, out)
        relay.scheduled = None
        relay.pending.clear()
        blame = f"relay {relay.id} down"
        behind = [relay]
        for track in self.subtree(relay.id):
            if self._path_end(track.id) is not relay:
                continue  # behind a relay below that stopped: its subjects go unknown at their own timeouts
            if track.state in _UP_OR_UNKNOWN:
                self._move(track, Kind.RELAY, State.UNREACHABLE, at, blame, relay.id, out)
                track.scheduled = None
                track.pending.clear()
            behind.append(track)
        for track in behind:
            self._owe(_Job.UNREACHABLE, track, at, relay, blame)

    # ------------------------------------------------------------------------- owed work

    def _owe(self, job: _Job, track: RelayTrack, at: float, blame: RelayTrack, reason: str) -> None:
        if not track.cols:
            return
        self._jobs.append(_Owed(job, track, at, blame, reason, self.grace_from))
        track.owed += 1
        if job is not _Job.TO_HEAP:
            self._deciding += 1

    def _touch(self, host: HostTrack | None, out: list[Transition]) -> None:
        """Input about a host: whatever is owed, done first if any of it may be this host's."""
        if host is not None and host.via is not None:
            relay = self.relays.get(host.via)
            if relay is not None and relay.owed:
                self._work(out, None)

    def _pay(self, relay: RelayTrack, out: list[Transition]) -> None:
        """Input about a relay: whatever is owed, done first if any of it is for its hosts."""
        if relay.owed:
            self._work(out, None)

    def _settle(self, out: list[Transition]) -> None:
        """Before a change that owed decisions may depend on (a relay's state): do them all."""
        if self._deciding and not self._working:
            self._work(out, None)

    def _work(self, out: list[Transition], limit: int | None) -> int:
        """Do owed work, in order, at most `limit` slots (None: all). Returns the slots done."""
        if not self._jobs or self._working:
            return 0
        self._working = True
        done = 0
        try:
            budget = math.inf if limit is None else limit
            jobs = self._jobs
            while jobs and done < budget:
                job = jobs[0]
                start = job.next
                stop = job.end if limit is None else min(job.end, start + int(budget - done))
                members = job.track.cols.members
                grace, self.grace_from = self.grace_from, job.grace  # as the event saw it
                try:
                    for slot in range(start, stop):
                        job.next = slot + 1
                        host = members[slot]
                        if host is not None:
                            self._do(job, slot, host, out)
                finally:
                    self.grace_from = grace
                done += stop - start
                if job.next >= job.end:
                    jobs.popleft()
                    job.track.owed -= 1
                    if job.job is not _Job.TO_HEAP:
                        self._deciding -= 1
        finally:
            self._working = False
        return done

    def _do(self, job: _Owed, slot: int, host: HostTrack, out: list[Transition]) -> None:
        """One owed host: what the mass event would have done to it at once."""
        kind = job.job
        if kind is _Job.TO_HEAP:
            deadlines = job.track.cols.deadlines
            if host.scheduled is not None and deadlines[slot] != math.inf:
                heapq.heappush(self._heap, (host.scheduled, next(self._tie), host))
                deadlines[slot] = math.inf
        elif kind is _Job.UNREACHABLE:
            if host.state in _UP_OR_UNKNOWN and not self._fail_over(host, job.at):
                self._move(host, Kind.HOST, State.UNREACHABLE, job.at, job.reason, job.blame.id, out)
                self._unschedule(host)
        elif kind is _Job.STOPPED:
            if host.state in _UP_OR_UNKNOWN:
                self._fail_over(host, job.at)
            elif host.state == State.UNREACHABLE and self._path_end(host.via) is job.blame:
                self._move(host, Kind.HOST, State.UNKNOWN, job.at, job.reason, job.blame.id, out)
        else:
            unheard = host.state == State.UNKNOWN and host.scheduled is None  # went unknown while it was stopped
            if (host.state == State.UNREACHABLE or unheard) and (host.said is None or host.said[0] is Vouch.UP):
                if self._deadline(host) <= job.at:
                    host.grace_from = job.at
                self._resume_host(host, job.at, out)
                self._sync(host)

    def _fail_over(self, host: HostTrack, now: float) -> bool:
        """The host's relay died: move it to another live path that heard it recently, if any."""
        if not host.others:
            return False
        timeout = self.timeout_s(host)
        live = [
            (seen, relay_id)
            for relay_id, seen in host.others.items()
            if seen + timeout > now and (relay_id is None or self.relays[relay_id].state == State.UP)
        ]
        if not live:
            return False
        seen, relay_id = max(live, key=lambda item: item[0])
        host.others[host.via] = host.via_seen
        del host.others[relay_id]
        self._set_via(host, relay_id)
        host.via_seen = seen
        self._sync(host)
        return True

    def _resume_subtree(self, relay: RelayTrack, now: float, out: list[Transition]) -> None:
        """A relay is up again: whoever behind it is still unreachable resumes from their own evidence.
        Whoever this bundle said nothing of, and whose evidence is too old to vouch for them, is not
        silent but unheard (a relay's new boot knows no one yet): one timeout of grace from now."""
        back = []
        for track in [relay, *self.subtree(relay.id)]:  # the relays first, then their hosts (owed)
            parent = None if track is relay or track.parent is None else self.relays.get(track.parent)
            if parent is not None and parent.state not in _UP_OR_UNKNOWN:
                continue  # still behind a dead relay (parents come before their children here)
            if track is not relay and track.state == State.UNREACHABLE:
                if self._deadline(track) <= now:
                    track.grace_from = now
                    self._move(track, Kind.RELAY, State.UNKNOWN, now, "path is back; no news yet", track.parent, out)
                else:
                    self._move(track, Kind.RELAY, State.UP, now, f"relay {relay.id} up again", track.parent, out)
                self._schedule(track, self._deadline(track))
            if track.state in _UP_OR_UNKNOWN:
                back.append(track)
        for track in back:
            if not track.cols.all_up():  # a resume changes nothing for a host that is up (e.g. just onboarded)
                self._owe(_Job.RESUME, track, now, relay, "")

    def _ignore(self, reason: str) -> None:
        self.ignored[reason] = self.ignored.get(reason, 0) + 1
