"""The monitor's writer part: decisions out, into the journal as they are made and into SQL in batches.

Each decision is stamped into wall time once (`Change`: its row, key and relay path) when it is
made; with a journal it is appended there at once, so a monitor killed before its batch commits
writes it at the next start (`replay`), dated when it was decided. The write loop batches what is
pending into one transaction with the subjects' state rows and their webhook messages, retrying
with backoff until the database takes it: nothing accepted is lost. A batch is built, planned,
written and freed WRITE_STEP rows at a time, the event loop free between steps (a relay's death of
50,000 hosts is one transaction, not one hold). The checkpoint saves last-seen times for a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from relaybeat.monitor import journal as journals
from relaybeat.monitor.clock import Clock
from relaybeat.monitor.detector import Detector, HostTrack
from relaybeat.monitor.journal import Decision, Journal, encode
from relaybeat.monitor.maintenance import MaintenanceBook
from relaybeat.monitor.notifier import Notifier
from relaybeat.monitor.quality import FalseAlarm, Judge, Opening, TargetTimeouts, lookup_in
from relaybeat.monitor.records import Change, DetectionRow, FalseAlarmRow, HostRow, RelayRow, TransitionRow
from relaybeat.monitor.states import Event, Kind, State, Transition
from relaybeat.monitor.store import WRITE_STEP, Batch, NotActive, Store

__all__ = ["MonitorObserver", "Writer"]

log = logging.getLogger("relaybeat.monitor")

BATCH_GATHER_S = 0.02  # let a burst (a relay's whole subtree) gather into one transaction

FOLLOW_BATCH = 1000  # history rows a standby reads per query
FOLLOW_KEEP_S = 120.0  # a standby forgets decisions (and the active's rows) it could not match after this

RelayPath = Callable[[Kind, str, str | None], list[str]]
Signature = tuple[Kind, str, State, State, Event]  # what two monitors' rows of one decision share


def signature(row: TransitionRow) -> Signature:
    return (row.kind, row.subject, row.from_state, row.to_state, row.event)


async def _release(items: list[Any]) -> None:
    """Empty a list a step at a time, the event loop free between steps: freeing a relay death's
    50,000 rows at once (when the last reference goes) would hold it for milliseconds."""
    while items:
        del items[-WRITE_STEP:]
        await asyncio.sleep(0)


class MonitorObserver(Protocol):
    """Watches the monitor without steering it (the metrics do): decisions as made, writes as done."""

    def decided(self, transitions: Sequence[Transition], now: float) -> None:
        """`transitions` were just decided at `now` (the monitor's clock, like `Transition.at`)."""

    def wrote(self, rows: int, seconds: float) -> None:
        """A batch of `rows` transitions reached SQL; the transaction took `seconds`."""

    def judged(self, opened: Sequence[Opening], false_alarms: Sequence[FalseAlarm]) -> None:
        """Outages were just opened (with what the detector held), or proved false alarms."""


class Writer:
    def __init__(
        self,
        store: Store,
        detector: Detector,
        clock: Clock,
        maintenance: MaintenanceBook,
        notifier: Notifier,
        relay_path: RelayPath,
        journal_path: Path | None,
    ) -> None:
        self.store = store
        self.detector = detector
        self.clock = clock
        self.maintenance = maintenance
        self.notifier = notifier
        self.relay_path = relay_path
        self.journal_path = journal_path
        self.db_ok = True  # the last SQL write went through
        self.write_failures = 0
        self.written = asyncio.Condition()  # notified after each batch reaches SQL
        self.last_written_id = 0
        self.recent: deque[Transition] = deque(maxlen=200)  # the latest decisions, for live views
        self.observers: list[MonitorObserver] = []
        self._unwritten: list[Change] = []
        self._in_flight: list[Change] = []  # the batch being written right now
        # Each decision's key is this monitor's prefix and its number in decision order; `_unwritten`
        # always holds numbers `_unwritten_from` up to `_decided` (a failed batch goes back in front).
        self._key_prefix = uuid.uuid4().hex[:16] + "-"
        self._decided = 0
        self._unwritten_from = 0
        self.journal: Journal | None = None  # opened by `replay` when there is a journal path
        self._lines: deque[tuple[int, int]] = deque()  # each journal line's first decision number and offset
        self.journal_failures = 0
        self._journal_warned_at = -10.0
        self._wanted = asyncio.Event()
        # The detector's own quality (monitor/quality.py): outages followed to the evidence that ends
        # them; their rows wait here, by batch, until written with (or after) their transitions.
        self.judge = Judge()
        self._lookup = lookup_in(detector)
        self._detections: list[DetectionRow] = []
        self._false_alarms: list[FalseAlarmRow] = []
        # Hot standby (monitor/cluster.py): decisions are kept, not written, until the active's rows
        # confirm them (`follow`); rows of the active not decided here yet wait in `_ahead`.
        self.standby = False
        self.lost_lease: Callable[[str], None] = lambda why: None  # told when a write finds the lease gone
        self._ahead: defaultdict[Signature, deque[float]] = defaultdict(deque)
        self._held: list[Decision] = []  # a standby's journal, read at start, written or dropped on takeover

    # ---------------------------------------------------------------------------- decisions in

    def emit(self, transitions: list[Transition]) -> None:
        """Take the detector's decisions: stamp, journal and queue them for the next batch."""
        if not transitions:
            if self.judge.watching:  # news without a decision may still prove a recent outage wrong
                self._judged([], self.judge.look(self.clock.now(), self._lookup))
            return
        self.recent.extend(transitions)
        first = self._decided
        self._decided += len(transitions)
        changes = self._stamp(transitions, first)
        self._judged(
            *self.judge.decided(
                zip(transitions, (c.key or "" for c in changes), strict=True), self._lookup, self.clock.now()
            )
        )
        if self.standby:
            changes = [c for c in changes if not self._seen_ahead(signature(c))]
        else:
            self._journal(changes, first)
        self._unwritten.extend(changes)
        self._wanted.set()
        now = self.clock.now()
        for observer in self.observers:
            observer.decided(transitions, now)

    def _stamp(self, transitions: Sequence[Transition], first: int) -> list[Change]:
        """Each decision in wall time, with its key (numbered from `first`), its relay path as it is now
        and whether a maintenance window covers it."""
        hosts, relays, wall = self.detector.hosts, self.detector.relays, self.clock.wall
        walked: dict[str | None, tuple[str, ...]] = {}  # by the relay a path starts at: a subtree shares a few
        changes = []
        for number, t in enumerate(transitions, first):
            track = (hosts if t.kind is Kind.HOST else relays).get(t.subject)
            start = t.relay if track is None else track.via if isinstance(track, HostTrack) else track.parent
            path = walked.get(start)
            if path is None:
                path = walked[start] = tuple(self.relay_path(t.kind, t.subject, t.relay))
            at = wall(t.at)
            covered = self.maintenance.covers(t.kind, t.subject, path, at)
            changes.append(Change.decided(t, at, path, covered, f"{self._key_prefix}{number}"))
        return changes

    def _judged(self, opened: Sequence[Opening], found: Sequence[FalseAlarm]) -> None:
        """Queue the quality rows of what the judge just saw, for the next batch (a standby keeps only
        the judge's state: the active writes these rows)."""
        if self.standby or not (opened or found):
            return
        wall = self.clock.wall
        timeouts = self.detector.timeouts
        for o in opened:
            if o.kind is Kind.HOST and o.state is State.UNREACHABLE:
                # The relay's outage, not the host's: its detection time is the relay's (and a relay
                # death would double the size of its batch). The judge still follows it in memory.
                continue
            advice = (
                timeouts.advice(o.subject) if isinstance(timeouts, TargetTimeouts) and o.kind is Kind.HOST else None
            )
            self._detections.append(
                DetectionRow(
                    kind=o.kind,
                    subject=o.subject,
                    state=o.state,
                    last_seen=None if o.evidence.seen is None else wall(o.evidence.seen),
                    decided_at=wall(o.decided),
                    seq=o.evidence.seq,
                    interval_s=o.evidence.interval_s,
                    timeout_s=o.evidence.timeout_s,
                    timeout_basis=None if advice is None else advice.basis,
                    key=o.key,
                )
            )
        now = wall(self.clock.now())
        for f in found:
            self._false_alarms.append(
                FalseAlarmRow(
                    kind=f.kind,
                    subject=f.subject,
                    opened_at=wall(f.opened_at),
                    closed_at=wall(f.closed_at),
                    proof=f.proof.value,
                    detail=f.detail,
                    seq_before=f.seq_before,
                    seq_after=f.seq_after,
                    seen_before=None if f.seen_before is None else wall(f.seen_before),
                    seen_after=None if f.seen_after is None else wall(f.seen_after),
                    recognised_at=now,
                    opened_key=f.opened_key,
                    closed_key=f.closed_key,
                )
            )
            log.info("false alarm: %s %s was alive (%s)", f.kind.value, f.subject, f.detail)
        self._wanted.set()
        for observer in self.observers:
            observer.judged(opened, found)

    @property
    def unwritten(self) -> int:
        """How many decisions are not yet known to be in SQL (the batch being written, and those waiting)."""
        return len(self._in_flight) + len(self._unwritten)

    def pending(self) -> list[Change]:
        """Decisions not yet known to be in SQL, in the order they were made (the batch being written,
        then those waiting)."""
        return [*self._in_flight, *self._unwritten]

    # ------------------------------------------------------------------------------- journal

    def _journal(self, changes: Sequence[Change], first: int) -> None:
        """Append the line of decisions numbered from `first` (and note where it starts)."""
        if self.journal is None:
            return
        offset = self.journal.size
        try:
            self.journal.append(self._journal_line(changes, first))
        except OSError as exc:  # the decisions still go to SQL; only a crash before that loses them
            self._journal_failed(exc)
            return
        self._lines.append((first, offset))

    def _clear_journal(self) -> None:
        if self.journal is not None:
            self.journal.clear()
        self._lines.clear()

    def _journal_line(self, changes: Sequence[Change], first: int) -> bytes:
        """The journal line of decisions numbered from `first`, with their subjects' rows as they are now."""
        hosts, relays, wall = self.detector.hosts, self.detector.relays, self.clock.wall
        states: list[HostRow | RelayRow | None] = []
        for c in changes:
            if c.kind is Kind.HOST:
                host = hosts.get(c.subject)
                states.append(None if host is None else HostRow.of(host, wall))
            else:
                relay = relays.get(c.subject)
                states.append(None if relay is None else RelayRow.of(relay, wall))
        return encode(self._key_prefix, first, changes, states)

    async def replay(self) -> None:
        """At start: open the journal and write the decisions in it that SQL does not hold yet (a
        batch the last run never committed), with their state rows and webhook messages, in one
        transaction; then empty it."""
        if self.journal_path is None or self.journal is not None:
            return
        journal, decisions, torn = Journal.open(self.journal_path)
        try:
            if torn:
                log.warning("journal %s: skipped %d lines that are not decisions (torn?)", journal.path, torn)
            await self._replay(decisions)
            journal.clear()
            self._lines.clear()
        except BaseException:
            journal.close()
            raise
        self.journal = journal

    def hold_journal(self) -> None:
        """At a standby's start: lock the journal and keep what it holds for the takeover (`promote`),
        which writes it only if no other monitor was active since (else that one wrote what it saw)."""
        self.standby = True
        if self.journal_path is None or self.journal is not None:
            return
        journal, self._held, torn = Journal.open(self.journal_path)
        if torn:
            log.warning("journal %s: skipped %d lines that are not decisions (torn?)", journal.path, torn)
        self.journal = journal

    async def _replay(self, decisions: Sequence[Decision]) -> None:
        if not decisions:
            return
        stored = await self.store.stored_keys(d.change.key for d in decisions if d.change.key is not None)
        missing = [d for d in decisions if d.change.key not in stored]
        if missing:
            changes = [
                dataclasses.replace(c, maintenance=self.maintenance.covers(c.kind, c.subject, c.path, c.at))
                for c in (d.change for d in missing)
            ]
            hosts = [d.state for d in missing if isinstance(d.state, HostRow)]
            relays = [d.state for d in missing if isinstance(d.state, RelayRow)]
            await self.notifier.write(Batch(transitions=changes, hosts=hosts, relays=relays))
        log.log(
            logging.WARNING if missing else logging.INFO,
            "journal %s: wrote %d decisions the last run had not written (%d it had)",
            self.journal_path,
            len(missing),
            len(decisions) - len(missing),
        )

    def close(self) -> None:
        """Release the journal (its lines stay for the next start if SQL does not hold them yet)."""
        if self.journal is not None:
            self.journal.close()
            self.journal = None

    def _compact_journal(self) -> None:
        """After a commit: empty the journal if SQL now holds every decision, or, if it grew large
        under a load that never let it drain, keep only the lines from the first one still pending
        once most of it is written (its bytes copied, not encoded again: at a fleet's onboarding it
        holds a million decisions)."""
        journal, lines = self.journal, self._lines
        if journal is None:
            return
        try:
            if not self._unwritten:
                self._clear_journal()
                return
            if journal.size <= journals.REWRITE_BYTES or not lines:
                return  # small, or its pending decisions are not in it (journaling them failed)
            while len(lines) > 1 and lines[1][0] <= self._unwritten_from:
                lines.popleft()  # every decision of that line is in SQL
            offset = lines[0][1]
            if offset and offset >= journal.size * journals.REWRITE_SHARE:
                journal.keep_from(offset)
                self._lines = deque((first, at - offset) for first, at in lines)
        except OSError as exc:
            self._journal_failed(exc)

    def _journal_failed(self, exc: OSError) -> None:
        self.journal_failures += 1
        now = time.monotonic()
        if now - self._journal_warned_at >= 10.0:  # a full disk fails every batch: say so every 10 s
            self._journal_warned_at = now
            log.warning(
                "journal %s: %s (%d failures so far); decisions still go to SQL, but a crash before that loses them",
                self.journal_path,
                exc,
                self.journal_failures,
            )

    # -------------------------------------------------------------------------------- SQL out

    # ------------------------------------------------------------------------- hot standby

    def _seen_ahead(self, sig: Signature) -> bool:
        """A standby's decision that the active already wrote: consume its row."""
        rows = self._ahead.get(sig)
        if not rows:
            return False
        rows.popleft()
        if not rows:
            del self._ahead[sig]
        return True

    def confirm(self, rows: Iterable[TransitionRow], now: float) -> None:
        """The active wrote `rows`: each confirms (and removes) this standby's first pending decision
        of the same subject and change; one not decided here yet waits in `_ahead`."""
        pending: defaultdict[Signature, deque[int]] = defaultdict(deque)
        for index, change in enumerate(self._unwritten):
            pending[signature(change)].append(index)
        matched: set[int] = set()
        for row in rows:
            sig = signature(row)
            waiting = pending.get(sig)
            if waiting:
                matched.add(waiting.popleft())
            else:
                self._ahead[sig].append(now)
        if matched:
            self._unwritten = [c for i, c in enumerate(self._unwritten) if i not in matched]
        self._forget(now)

    def _forget(self, now: float) -> None:
        """Drop what could not be matched for FOLLOW_KEEP_S: the two monitors saw it differently."""
        oldest = self.clock.wall(now - FOLLOW_KEEP_S)
        self._unwritten = [c for c in self._unwritten if c.at >= oldest]
        for sig in list(self._ahead):
            rows = self._ahead[sig]
            while rows and rows[0] < now - FOLLOW_KEEP_S:
                rows.popleft()
            if not rows:
                del self._ahead[sig]

    async def follow(self) -> int:
        """A standby reads the rows the active wrote since it last looked and confirms its own
        decisions with them; readers waiting for writes are woken. How many rows it read."""
        total = 0
        while True:
            rows = await self.store.history(after_id=self.last_written_id, limit=FOLLOW_BATCH, newest_first=False)
            if not rows:
                break
            total += len(rows)
            self.confirm(rows, self.clock.now())
            self.last_written_id = rows[-1].id
            if len(rows) < FOLLOW_BATCH:
                break
        if total:
            async with self.written:
                self.written.notify_all()
        else:
            self._forget(self.clock.now())
        return total

    async def run_follow(self, every_s: float) -> None:
        """While standby: `follow` every `every_s` (errors only wait for the next time)."""
        while True:
            await asyncio.sleep(every_s)
            if self.standby:
                try:
                    await self.follow()
                except Exception as exc:
                    log.debug("standby: could not read the active's rows (%s)", exc)

    async def promote(self, replay_own_journal: bool) -> None:
        """Take over (the lease is ours, the old active is fenced off): write the journal if this node
        was the last active, read every row the old active wrote, then write what is left: the
        decisions made here that it never wrote, under fresh keys, journaled first."""
        held, self._held = self._held, []
        if held and replay_own_journal:
            await self._replay(held)
        elif held:
            log.warning(
                "journal %s: dropped %d decisions of an earlier run: another monitor was active since",
                self.journal_path,
                len(held),
            )
        self._clear_journal()
        await self.follow()
        self._ahead.clear()
        self._key_prefix = uuid.uuid4().hex[:16] + "-"
        self._unwritten = [
            dataclasses.replace(c, key=f"{self._key_prefix}{number}") for number, c in enumerate(self._unwritten)
        ]
        self._decided = len(self._unwritten)
        self._unwritten_from = 0
        if self._unwritten:
            self._journal(self._unwritten, 0)
        log.info(
            "takeover: %d decisions made here were not in SQL; writing them%s",
            len(self._unwritten),
            "".join(f"; {c.kind} {c.subject} {c.from_state}->{c.to_state} ({c.reason})" for c in self._unwritten[:3]),
        )
        self.standby = False
        self._wanted.set()

    def demote(self) -> None:
        """No more writes; what is pending stays, to be confirmed by the new active's rows."""
        self.standby = True

    # -------------------------------------------------------------------------------- SQL out

    async def run(self) -> None:
        while True:
            await self._wanted.wait()
            await asyncio.sleep(BATCH_GATHER_S)
            await self.flush()

    async def flush(self) -> None:
        """Write everything decided so far; on a database error keep it and retry with backoff.

        A batch is retried only if it did not reach SQL; what follows a commit (ids, observers,
        waking readers) never sends it again. Cancelled mid-write, the batch is kept for the final
        flush in `Monitor.run`."""
        attempt = 0
        while (self._unwritten or self._detections or self._false_alarms) and not self.standby:
            batch, self._unwritten = self._unwritten, []
            detections, self._detections = self._detections, []
            false_alarms, self._false_alarms = self._false_alarms, []
            first = self._unwritten_from
            self._unwritten_from += len(batch)
            self._in_flight = batch
            self._wanted.clear()
            try:
                elapsed = await self._write(batch, detections, false_alarms)
            except BaseException as exc:
                self._unwritten[:0] = batch
                self._detections[:0] = detections
                self._false_alarms[:0] = false_alarms
                self._unwritten_from = first
                if not isinstance(exc, Exception):
                    raise
                if isinstance(exc, NotActive):  # a takeover: the new active writes what it decided
                    self.lost_lease(str(exc))
                    self.standby = True
                    self._wanted.clear()
                    return
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
                await self._after_write(len(batch), elapsed)
            except Exception as exc:  # the rows are in SQL: only the bookkeeping failed
                log.warning("after writing %d transitions: %s", len(batch), exc)
            await _release(batch)

    async def _write(
        self, changes: Sequence[Change], detections: Sequence[DetectionRow], false_alarms: Sequence[FalseAlarmRow]
    ) -> float:
        """One transaction: the changes, their subjects' current-state rows, webhook messages and
        alerts, and the quality rows (detections, false alarms) decided with them."""
        hosts, relays, wall = self.detector.hosts, self.detector.relays, self.clock.wall
        host_rows: dict[str, HostRow] = {}
        relay_rows: dict[str, RelayRow] = {}
        for start in range(0, len(changes), WRITE_STEP):  # the rows as they are now, a step at a time
            if start:
                await asyncio.sleep(0)
            for c in changes[start : start + WRITE_STEP]:
                if c.kind is Kind.HOST:
                    if c.subject not in host_rows and (host := hosts.get(c.subject)) is not None:
                        host_rows[c.subject] = HostRow.of(host, wall)
                elif c.subject not in relay_rows and (relay := relays.get(c.subject)) is not None:
                    relay_rows[c.subject] = RelayRow.of(relay, wall)
        rows = list(host_rows.values())
        host_rows.clear()
        batch = Batch(
            transitions=changes,
            hosts=rows,
            relays=list(relay_rows.values()),
            detections=detections,
            false_alarms=false_alarms,
        )
        elapsed = await self.notifier.write(batch)
        del batch
        await _release(rows)
        return elapsed

    async def _after_write(self, rows: int, elapsed: float) -> None:
        for observer in self.observers:
            observer.wrote(rows, elapsed)
        self.last_written_id = await self.store.last_transition_id()
        async with self.written:
            self.written.notify_all()

    # ---------------------------------------------------------------------------- checkpoint

    async def run_checkpoints(self, every_s: float) -> None:
        previous = self.clock.now()
        while True:
            await asyncio.sleep(every_s)
            now = self.clock.now()
            try:
                await self.checkpoint(since=previous - 1)
                previous = now
            except Exception as exc:
                log.warning("checkpoint failed (%s); will retry next time", exc)

    async def checkpoint(self, since: float) -> None:
        """Save last-seen times of hosts heard since `since`, and the relays' rows, for a restart.

        A subject whose transition is not in SQL yet keeps its stored row until that transition is
        written with it (same transaction): a crash in between must not lose the history. A standby
        saves nothing.
        """
        if self.standby:
            return
        decided = self._decided
        pending = {c.subject for c in self.pending()}
        wall = self.clock.wall
        tracks = list(self.detector.hosts.values())
        hosts = []
        for start in range(0, len(tracks), WRITE_STEP):  # 100,000 hosts: 1,000 short steps
            if start:
                await asyncio.sleep(0)
            hosts += [
                (h.id, wall(h.last_seen), h.seq)
                for h in tracks[start : start + WRITE_STEP]
                if h.last_seen is not None and h.last_seen >= since and h.id not in pending
            ]
        del tracks
        if (late := self._decided - decided) > 0:  # decided meanwhile: the newest pending decisions
            fresh = {c.subject for c in self.pending()[-late:]}
            hosts = [h for h in hosts if h[0] not in fresh]
        await self.store.save_last_seen(hosts)
        # Built only now, with no await before the write: a relay transition written meanwhile is
        # either pending (skipped) or already in SQL, and then these rows carry its state.
        pending = {c.subject for c in self.pending()}
        relays = [RelayRow.of(r, wall) for r in self.detector.relays.values() if r.id not in pending]
        await self.store.write(Batch(relays=relays))
