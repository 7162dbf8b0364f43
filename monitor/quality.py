"""How good the detector's own judgement is: its mistakes recognised, its quality figures, and
timeouts derived from targets (Chen, Toueg and Aguilera, "On the Quality of Service of Failure
Detectors", IEEE TC 2002).

Rules of this module:
- Pure and synchronous: no clock, no I/O. Times are the caller's (`now`, `at`, `seen`: monotonic
  seconds for the judge and the timeouts, any consistent unit for the figures).
- A mistake is proved, never guessed. An outage (`down` or `unreachable`) was a false alarm when the
  evidence that ended it shows the subject alive throughout:
  * `seq_continuity`: its sequence number continued across the outage with no restart, and grew by
    about as many beats as the outage lasted intervals (beats were lost or late, it kept beating); a
    subject that was frozen for longer than its timeout falls short by more than half a timeout and
    is not a mistake. The first beat back may be a late one at the head of a queue, so the judge
    keeps looking for two intervals after the return (`CONFIRM_INTERVALS`).
  * `dated_inside`: the evidence is dated (by its age) before the decision, or within one interval
    after it: it was on its way while the subject was declared dead.
  * `relay_false_alarm`: a host made `unreachable` by a relay whose own outage was a false alarm.
  A restart (seq went back, a relay's new boot) proves a real death: no false alarm.
- Figures over a window: T_D is the time from the last evidence of life to the decision, over real
  deaths (outages not proved false); λ_M is false alarms per subject-day of watching; T_M is the
  mean duration of a false alarm; P_A = 1 − E[T_M]/E[T_MR] with E[T_MR] = 1/λ_M: the share of time
  the detector's answer was right.
- Targets instead of knobs: a host's timeout is derived from its observed loss rate (from seq gaps)
  and jitter (inter-arrival residuals) so that false alarms stay below `target_false_alarms_per_day`
  and detection below `target_detection_s`; when both cannot hold, the false-alarm target wins and
  the detection time it can promise is reported.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from relaybeat.errors import SettingsError
from relaybeat.monitor.detector import Detector, HostTrack
from relaybeat.monitor.states import Event, Kind, State, Transition

__all__ = [
    "CONFIRM_INTERVALS",
    "DAY_S",
    "Evidence",
    "FalseAlarm",
    "Figures",
    "Judge",
    "Opening",
    "Outage",
    "Proof",
    "TargetTimeouts",
    "Targets",
    "TimeoutAdvice",
    "advise",
    "figures",
    "judge",
    "lookup_in",
]

DAY_S = 86400.0
CONFIRM_INTERVALS = 2.0  # after a return, keep judging newer evidence for this many intervals
BAD = frozenset({State.DOWN, State.UNREACHABLE})
LIFE = frozenset({State.UP, State.STOPPED})  # states entered only on fresh evidence of life


class Proof(StrEnum):
    SEQ_CONTINUITY = "seq_continuity"
    DATED_INSIDE = "dated_inside"
    RELAY_FALSE_ALARM = "relay_false_alarm"


@dataclass(frozen=True, slots=True, kw_only=True)
class Evidence:
    """What the detector holds of a subject: its last evidence of life (`seen`), the seq that came
    with it, the interval it beats at (a relay: its flush), and its timeout now."""

    seen: float | None
    seq: int | None
    interval_s: float
    timeout_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Opening:
    """An outage as decided: its transition (`key`), and what the detector held then."""

    kind: Kind
    subject: str
    state: State
    key: str
    at: float  # the transition's time (the deadline)
    decided: float  # when the decision was made
    evidence: Evidence
    blamed: str | None = None  # for `unreachable`: the relay blamed

    @property
    def detection_s(self) -> float | None:
        """From the last evidence of life to the decision (T_D of this outage, if it was a death)."""
        seen = self.evidence.seen
        return None if seen is None else max(0.0, self.decided - seen)


@dataclass(frozen=True, slots=True, kw_only=True)
class FalseAlarm:
    """An outage proved wrong: the transitions that opened and closed it, and the proof."""

    kind: Kind
    subject: str
    opened_key: str
    closed_key: str
    opened_at: float
    closed_at: float
    proof: Proof
    detail: str
    seq_before: int | None
    seq_after: int | None
    seen_before: float | None
    seen_after: float | None

    @property
    def duration_s(self) -> float:
        return max(0.0, self.closed_at - self.opened_at)


def judge(opening: Opening, back: Evidence, closed_at: float, restarted: bool) -> tuple[Proof, str] | None:
    """Whether `back` (what the detector holds after the outage ended at `closed_at`) proves the
    outage `opening` wrong; the proof and its explanation, or None."""
    if restarted:
        return None
    before = opening.evidence
    interval = before.interval_s
    if back.seen is None or before.seen is None or interval <= 0:
        return None
    if before.seq is not None and back.seq is not None and back.seq > before.seq:
        grew = back.seq - before.seq
        expected = (back.seen - before.seen) / interval
        slack = 0.5 * before.timeout_s / interval
        if grew >= expected - slack:
            return Proof.SEQ_CONTINUITY, (
                f"seq {before.seq} → {back.seq} across {back.seen - before.seen:.1f} s "
                f"(about {expected:.0f} beats at {interval:g} s): it kept beating, no restart"
            )
    if before.seen < back.seen <= opening.at + interval and back.seen < closed_at:
        when = opening.at - back.seen
        dated = f"{when:.1f} s before the decision" if when >= 0 else f"{-when:.1f} s after the decision"
        return Proof.DATED_INSIDE, f"a beat dated {dated} arrived late: it was alive, the news was late"
    return None


class Lookup(Protocol):
    """The detector's view of a subject now (None: it no longer holds it)."""

    def __call__(self, kind: Kind, subject: str) -> Evidence | None: ...


def lookup_in(detector: Detector) -> Lookup:
    """What `detector` holds of a subject, as the judge reads it."""

    def lookup(kind: Kind, subject: str) -> Evidence | None:
        track = (detector.hosts if kind is Kind.HOST else detector.relays).get(subject)
        if track is None:
            return None
        if isinstance(track, HostTrack):
            return Evidence(
                seen=track.last_seen, seq=track.seq, interval_s=track.interval_s, timeout_s=detector.timeout_s(track)
            )
        seq = None if track.seq < 0 else track.seq
        return Evidence(seen=track.last_seen, seq=seq, interval_s=track.flush_s, timeout_s=detector.timeout_s(track))

    return lookup


@dataclass(slots=True)
class _Watch:
    opening: Opening
    closed_key: str
    closed_at: float
    until: float


class Judge:
    """Follows outages from their decision to the evidence that ends them, and recognises the
    false alarms among them. Feed it every decision, with its key, as made (`decided`); call
    `look(now)` when news arrived without a decision (a late beat's successors may prove it yet)."""

    def __init__(self) -> None:
        self.open: dict[tuple[Kind, str], Opening] = {}
        self.watching: dict[tuple[Kind, str], _Watch] = {}
        self._relay_false: dict[str, FalseAlarm] = {}  # the latest false alarm of each relay
        self._restarted: set[tuple[Kind, str]] = set()  # open outages whose subject restarted meanwhile
        self.false_alarms = 0
        self.detections = 0

    def decided(
        self, decisions: Iterable[tuple[Transition, str]], lookup: Lookup, now: float
    ) -> tuple[list[Opening], list[FalseAlarm]]:
        """The outages these decisions opened, and the false alarms they proved."""
        opened: list[Opening] = []
        found: list[FalseAlarm] = []
        for t, key in decisions:
            subject = (t.kind, t.subject)
            if t.event is Event.RESTART:
                self.watching.pop(subject, None)
                if subject in self.open:  # a restart during the outage: it was a real death
                    self._restarted.add(subject)
                continue
            if t.event is not Event.TRANSITION or t.from_state == t.to_state:
                continue
            if t.to_state in BAD:
                self.watching.pop(subject, None)
                evidence = lookup(t.kind, t.subject)
                if evidence is None:
                    continue
                opening = Opening(
                    kind=t.kind,
                    subject=t.subject,
                    state=t.to_state,
                    key=key,
                    at=t.at,
                    decided=now,
                    evidence=evidence,
                    blamed=t.relay if t.to_state is State.UNREACHABLE else None,
                )
                self.open[subject] = opening
                self._restarted.discard(subject)
                opened.append(opening)
                self.detections += 1
            elif t.to_state in LIFE and subject in self.open:
                opening = self.open.pop(subject)
                if subject in self._restarted:
                    self._restarted.discard(subject)
                    continue
                watch = _Watch(opening, key, t.at, t.at + CONFIRM_INTERVALS * opening.evidence.interval_s)
                alarm = self._try(watch, lookup)
                if alarm is not None:
                    found.append(alarm)
                else:
                    self.watching[subject] = watch
            elif t.to_state is not State.UNKNOWN:  # unknown: the path is back, no news yet: still out
                self.open.pop(subject, None)
                self._restarted.discard(subject)
        found += self.look(now, lookup)
        return opened, found

    def resume(self, opening: Opening) -> None:
        """An outage already open when the monitor started (from SQL), judged when it ends."""
        self.open[opening.kind, opening.subject] = opening

    def look(self, now: float, lookup: Lookup) -> list[FalseAlarm]:
        """Judge the recently ended outages again on the newest evidence; forget those past their window."""
        if not self.watching:
            return []
        found = []
        for subject, watch in list(self.watching.items()):
            alarm = self._try(watch, lookup)
            if alarm is not None:
                found.append(alarm)
                del self.watching[subject]
            elif now > watch.until:
                del self.watching[subject]
        return found

    def _try(self, watch: _Watch, lookup: Lookup) -> FalseAlarm | None:
        opening = watch.opening
        back = lookup(opening.kind, opening.subject)
        if back is None:
            return None
        verdict: tuple[Proof, str] | None
        if opening.state is State.UNREACHABLE and opening.kind is Kind.HOST:
            relay = self._relay_false.get(opening.blamed or "")
            verdict = None
            if relay is not None and relay.opened_at <= opening.at <= relay.closed_at:
                verdict = Proof.RELAY_FALSE_ALARM, f"relay {relay.subject}'s outage was a false alarm: {relay.detail}"
        else:
            verdict = judge(opening, back, watch.closed_at, restarted=False)
        if verdict is None:
            return None
        alarm = FalseAlarm(
            kind=opening.kind,
            subject=opening.subject,
            opened_key=opening.key,
            closed_key=watch.closed_key,
            opened_at=opening.at,
            closed_at=watch.closed_at,
            proof=verdict[0],
            detail=verdict[1],
            seq_before=opening.evidence.seq,
            seq_after=back.seq,
            seen_before=opening.evidence.seen,
            seen_after=back.seen,
        )
        self.false_alarms += 1
        if opening.kind is Kind.RELAY:
            self._relay_false[opening.subject] = alarm
        return alarm


# ------------------------------------------------------------------------------- the figures


@dataclass(frozen=True, slots=True, kw_only=True)
class Outage:
    """One outage as history holds it: opened at `at`, closed at `closed_at` (None: still open),
    its detection time (None: not known), and whether it was proved a false alarm."""

    kind: Kind
    subject: str
    at: float
    closed_at: float | None
    detection_s: float | None
    false_alarm: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Figures:
    """The detector's quality over a window, for `subjects` subjects watched `window_s` each."""

    subjects: int
    window_s: float
    outages: int
    deaths: int  # outages not proved false
    false_alarms: int
    detection_s_mean: float | None  # T_D
    detection_s_max: float | None
    false_alarms_per_day: float | None  # λ_M, per subject
    mistake_duration_s: float | None  # T_M, mean
    mistake_recurrence_s: float | None  # E[T_MR] = 1/λ_M
    query_accuracy: float | None  # P_A
    false_alarm_s: float  # total time wrongly out

    @property
    def mistake_rate_per_s(self) -> float | None:
        return None if self.false_alarms_per_day is None else self.false_alarms_per_day / DAY_S


def figures(outages: Sequence[Outage], subjects: int, since: float, until: float) -> Figures:
    """The figures of the outages opened in `[since, until)`; open ones count up to `until`."""
    mine = [o for o in outages if since <= o.at < until]
    window = max(0.0, until - since)
    watched = subjects * window
    deaths = [o for o in mine if not o.false_alarm]
    wrong = [o for o in mine if o.false_alarm]
    detections = [o.detection_s for o in deaths if o.detection_s is not None]
    durations = [max(0.0, min(until, o.closed_at if o.closed_at is not None else until) - o.at) for o in wrong]
    wrong_s = sum(durations)
    rate = None if watched <= 0 else len(wrong) / watched
    mean_wrong = sum(durations) / len(durations) if durations else None
    return Figures(
        subjects=subjects,
        window_s=window,
        outages=len(mine),
        deaths=len(deaths),
        false_alarms=len(wrong),
        detection_s_mean=sum(detections) / len(detections) if detections else None,
        detection_s_max=max(detections) if detections else None,
        false_alarms_per_day=None if rate is None else rate * DAY_S,
        mistake_duration_s=mean_wrong,
        mistake_recurrence_s=None if not rate else 1 / rate,
        query_accuracy=None if watched <= 0 else max(0.0, 1.0 - wrong_s / watched),
        false_alarm_s=wrong_s,
    )


# ------------------------------------------------------------------------ targets, not knobs


@dataclass(frozen=True, slots=True)
class Targets:
    """What an operator asks of the detector (None: no target on that side)."""

    detection_s: float | None = None
    false_alarms_per_day: float | None = None

    def __post_init__(self) -> None:
        if self.detection_s is not None and self.detection_s <= 0:
            msg = "target_detection_s must be > 0"
            raise SettingsError(msg)
        if self.false_alarms_per_day is not None and self.false_alarms_per_day <= 0:
            msg = "target_false_alarms_per_day must be > 0"
            raise SettingsError(msg)

    @property
    def set(self) -> bool:
        return self.detection_s is not None or self.false_alarms_per_day is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutAdvice:
    """A derived timeout and why: what it promises, and whether the targets hold."""

    timeout_s: float
    basis: str
    promised_detection_s: float
    expected_false_alarms_per_day: float
    meets_detection: bool
    meets_false_alarms: bool


JITTER_Z = 4.0  # jitter margin in standard deviations of an ordinary arrival's lateness
MIN_BEATS = 2  # never page for one lost beat
MAX_BEATS = 1000
HEADROOM = 0.5  # intervals added beyond the shortest timeout the record supports
STEP = 0.1  # candidate timeouts are whole tenths of an interval
UNKNOWN_GAP_MAX = 100  # with no seq, a longer silence may be a reboot: not counted
TAIL_FROM = 1.5  # gaps longer than this many intervals are kept, by tenth of an interval, for the tail


def advise(
    interval_s: float,
    gaps: int,
    tail: dict[int, int],
    beats: int,
    lost: int,
    jitter_s: float,
    targets: Targets,
) -> TimeoutAdvice:
    """The timeout meeting `targets` for a subject beating every `interval_s`, from what was seen:
    `gaps` silences between arrivals, the long ones counted by length in tenths of an interval
    (`tail`), `lost` of `beats` beats missing from the seq, and `jitter_s` of ordinary lateness.

    A false alarm is a silence longer than the timeout while the subject lives: its rate is the
    share of silences longer than T times the arrivals per day. Within what was seen that share is
    counted; beyond the longest silence seen, a silence longer than T needs the k beats after an
    arrival to miss their slot (lost, or late) with (k + 1) intervals > T, which happens p^k of the
    time, p the larger of the share lost (from the seq) and the share of silences longer than 1.5
    intervals, each estimated conservatively as (count + 1) / (total + 2) so that a short clean
    record promises no perfection. The smallest T (at least two intervals and the jitter margin:
    one lost beat never pages) that meets the false-alarm target is taken, plus half an interval of
    headroom for silences a little longer than any seen yet; with only a detection target, the
    target itself. When both cannot hold, the false-alarm target wins and the detection time T can
    promise is said."""
    p_lost = (lost + 1) / (beats + 2)
    p_late = (sum(tail.values()) + 1) / (gaps + 2)  # a long silence: some beat missed its slot, lost or late
    p = min(0.999, max(p_lost, p_late))
    margin = max(0.05 * interval_s, JITTER_Z * jitter_s)
    per_day = DAY_S / interval_s * (1 - p)
    longer = list(tail.items())
    n = max(1, gaps)

    def rate(t: float) -> float:
        tenths = math.floor(t / interval_s / STEP + 1e-9)
        seen = sum(count for bucket, count in longer if bucket >= tenths)  # its own bucket too: conservative
        # Silent past t: the next k beats all missed their slot, k + 1 intervals (and jitter) > t.
        beyond: float = p ** max(1.0, (t - margin) / interval_s - 1)
        return per_day * max(seen / n, beyond)

    floor = MIN_BEATS * interval_s + margin
    if targets.false_alarms_per_day is not None:
        k = math.ceil(floor / interval_s / STEP - 1e-9)
        while rate(k * STEP * interval_s) > targets.false_alarms_per_day and k * STEP < MAX_BEATS:
            k += 1
        # Silences longer than any seen so far come once in a while (a record): keep some headroom.
        t = (k * STEP + HEADROOM) * interval_s
    elif targets.detection_s is not None:
        t = max(floor, targets.detection_s)
    else:
        t = 3 * interval_s
    meets_detection = targets.detection_s is None or t <= targets.detection_s * (1 + 1e-9)
    meets_false = targets.false_alarms_per_day is None or rate(t) <= targets.false_alarms_per_day
    basis = (
        f"{t / interval_s:.1f} intervals of {interval_s:g} s: {gaps} gaps seen, "
        f"loss ≈ {100 * p:.2g} %, jitter margin {margin:.2f} s"
    )
    if not meets_detection:
        basis += f"; cannot meet target_detection_s {targets.detection_s:g} with this jitter: promises {t:.1f} s"
    if not meets_false:
        basis += f"; cannot meet target_false_alarms_per_day {targets.false_alarms_per_day:g}"
    return TimeoutAdvice(
        timeout_s=t,
        basis=basis,
        promised_detection_s=t,
        expected_false_alarms_per_day=rate(t),
        meets_detection=meets_detection,
        meets_false_alarms=meets_false,
    )


@dataclass(slots=True)
class _Arrivals:
    beats: int = 0
    lost: int = 0
    gaps: int = 0
    tail: dict[int, int] = field(default_factory=dict)  # long gaps by length in tenths of an interval
    jitter: float = 0.0  # EWMA of ordinary lateness (|gap − interval|, gaps under TAIL_FROM intervals)
    interval_s: float = 0.0
    advice: TimeoutAdvice | None = None
    stale: int = 0  # gaps since the advice was derived


@dataclass(slots=True)
class TargetTimeouts:
    """The detector's per-host timeout policy from targets (`Detector(timeouts=...)`): it learns each
    host's silences and losses from the arrivals the detector reports, and answers with the timeout
    `advise` derives once a host has `min_samples` gaps (before that: None, the fixed rule)."""

    targets: Targets
    by_glob: tuple[tuple[str, Targets], ...] = ()  # first matching host-id glob wins
    min_samples: int = 8
    weight: float = 0.05
    memory: int = 1_000_000  # gaps; counts are halved beyond this, so the estimate follows change
    refresh: int = 64  # re-derive after this many ordinary gaps (at once after a long one)
    hosts: dict[str, _Arrivals] = field(default_factory=dict)

    def targets_for(self, host: str) -> Targets:
        for pattern, targets in self.by_glob:
            if fnmatch.fnmatchcase(host, pattern):
                return targets
        return self.targets

    def arrival(self, host: str, gap_s: float, beats: int, interval_s: float) -> None:
        """The detector heard `host` again after `gap_s`, `beats` seq steps on (0: no seq to tell).
        A gap across a restart (the seq went back) is a death, not a silence of the living: skipped."""
        if interval_s <= 0 or gap_s <= 0 or beats < 0 or (beats == 0 and gap_s > UNKNOWN_GAP_MAX * interval_s):
            return
        a = self.hosts.get(host)
        if a is None:
            a = self.hosts[host] = _Arrivals()
        if a.interval_s != interval_s:
            a.tail.clear()
            a.gaps = a.beats = a.lost = 0
            a.interval_s = interval_s
            a.advice = None
        if beats >= 1:  # seq steps: the beats sent meanwhile, all but one lost
            a.beats += beats
            a.lost += beats - 1
        a.gaps += 1
        a.stale += 1
        ratio = gap_s / interval_s
        if ratio > TAIL_FROM:
            bucket = math.floor(ratio / STEP)
            a.tail[bucket] = a.tail.get(bucket, 0) + 1
            a.advice = None
        else:
            a.jitter += self.weight * (abs(gap_s - interval_s) - a.jitter)
        if a.gaps > self.memory:
            a.gaps //= 2
            a.beats //= 2
            a.lost //= 2
            a.tail = {k: v // 2 for k, v in a.tail.items() if v > 1}
        if a.stale >= self.refresh:
            a.advice = None

    def advice(self, host: str) -> TimeoutAdvice | None:
        a = self.hosts.get(host)
        if a is None or a.gaps < self.min_samples:
            return None
        if a.advice is None:
            a.stale = 0
            a.advice = advise(a.interval_s, a.gaps, a.tail, a.beats, a.lost, a.jitter, self.targets_for(host))
        return a.advice

    def timeout_s(self, host: str) -> float | None:
        advice = self.advice(host)
        return None if advice is None else advice.timeout_s

    def forget(self, host: str) -> None:
        self.hosts.pop(host, None)
