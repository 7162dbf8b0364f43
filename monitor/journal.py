"""The monitor's write-ahead journal of decisions: what was decided survives kill -9 until SQL has it.

Rules: it decides nothing and knows no SQL; it only keeps lines. Each batch of decisions is one JSON
line; each decision in it carries all its row needs (its key, wall-clock `at`, the relay path for
maintenance and notifications) and the subject's state row at that moment. The line goes out in
one `os.write`: once that returns, the bytes are the kernel's (its page cache), so killing the
monitor loses none of them. There is no fsync: a power cut or a kernel crash may lose the last
few seconds' lines (what the kernel had not yet written back), as it would without a journal.

One monitor per journal: the file is locked (flock) while open, and a second opener is refused.
At start the monitor reads every line back (`open`), writes those SQL lacks, then `clear`s it; it
clears it again whenever SQL holds everything decided, and `rewrite`s it to the pending lines
when it grows past `REWRITE_BYTES` under load that never lets it drain.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from monitor.detector import HostTrack, RelayTrack
from monitor.states import Event, Kind, State, Transition
from monitor.store import HostRow, NewTransition, RelayRow

__all__ = ["REWRITE_BYTES", "Decision", "Journal", "JournalError", "JournalUnavailable", "decode", "encode"]

REWRITE_BYTES = 64 * 1024 * 1024  # past this with decisions still pending, keep only the pending lines


class JournalError(ValueError):
    """A line that is not a journaled batch of decisions (e.g. torn by a crash mid-write)."""


class JournalUnavailable(OSError):
    """The journal cannot be opened, or another monitor holds it; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Decision:
    """A journaled transition: its history row (with its key), the subject's state row when it was
    decided (None if the detector no longer held the subject), and the relays on its path then."""

    transition: NewTransition
    state: HostRow | RelayRow | None
    path: tuple[str, ...]


def _wall(t: float | None, offset: float) -> float | None:
    return None if t is None else t + offset


def _state(track: HostTrack | RelayTrack | None, offset: float) -> list[Any] | None:
    """A subject's state row as journaled: the fields of HostRow or RelayRow after `id`, epoch seconds."""
    if track is None:
        return None
    if isinstance(track, HostTrack):
        return [track.state, track.since + offset, _wall(track.last_seen, offset), track.via, track.interval_s,
                track.seq, track.flapping]  # fmt: skip
    seq = None if track.seq < 0 else track.seq
    return [track.state, track.since + offset, _wall(track.last_seen, offset), track.parent, track.boot, seq,
            track.flush_s, track.flapping]  # fmt: skip


def encode(
    key_prefix: str,
    first: int,
    transitions: Sequence[Transition],
    offset: float,
    tracks: Sequence[HostTrack | RelayTrack | None],
    paths: Sequence[Sequence[str]],
) -> bytes:
    """One line for a batch of decisions: the i-th has key `key_prefix + str(first + i)`, the state
    row of `tracks[i]` and the relay path `paths[i]`; `offset` turns the detector's clock into epoch
    seconds. Each decision is `[kind, subject, from_state, to_state, at, reason, relay, event, path,
    state]`, so a batch of a thousand costs one encoder call, not a thousand."""
    decisions = [
        [t.kind, t.subject, t.from_state, t.to_state, t.at + offset, t.reason, t.relay, t.event, path,
         _state(track, offset)]
        for t, track, path in zip(transitions, tracks, paths, strict=True)
    ]  # fmt: skip
    return orjson.dumps([key_prefix, first, decisions], option=orjson.OPT_APPEND_NEWLINE)


def _moment(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


def _since(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def decode(line: bytes) -> list[Decision]:
    """The decisions on one line, in the order they were made; JournalError if it is not a batch."""
    try:
        key_prefix, first, decisions = orjson.loads(line)
        return [_decision(f"{key_prefix}{first + i}", d) for i, d in enumerate(decisions)]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError) as exc:
        raise JournalError(f"not a journaled batch ({type(exc).__name__}: {exc})") from None


def _decision(key: str, fields: list[Any]) -> Decision:
    kind_, subject, from_state, to_state, at, reason, relay, event, path, row = fields
    kind = Kind(kind_)
    transition = NewTransition(
        kind, str(subject), State(from_state), State(to_state), _since(at), str(reason), relay, Event(event), key=key
    )
    state: HostRow | RelayRow | None = None
    if row is not None and kind is Kind.HOST:
        st, since, seen, via, interval_s, seq, flapping = row
        state = HostRow(subject, State(st), _since(since), _moment(seen), via, float(interval_s), seq, flapping)
    elif row is not None:
        st, since, seen, parent, boot, seq, flush_s, flapping = row
        state = RelayRow(subject, State(st), _since(since), _moment(seen), parent, boot, seq, float(flush_s), flapping)
    return Decision(transition, state, tuple(str(relay) for relay in path))


class Journal:
    """An open, locked journal file. `open` it, `append` batches, `clear` it, `close` it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self.size = os.fstat(fd).st_size

    @classmethod
    def open(cls, path: Path) -> tuple[Journal, list[Decision], int]:
        """Lock the journal (creating it) and read it back: its decisions, in the order they were
        made, and how many lines were not batches of them (a line torn mid-write is skipped).

        JournalUnavailable if it cannot be opened or another process holds it."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise JournalUnavailable(
                exc.errno, f"cannot open the journal {path} ({exc.strerror}): set --journal or [monitor] journal"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise JournalUnavailable(
                exc.errno, f"the journal {path} is held by another monitor: give each monitor its own --journal"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        journal = cls(path, fd)
        decisions: list[Decision] = []
        skipped = 0
        with open(fd, "rb", closefd=False) as file:
            for line in file:
                if not line.strip():
                    continue
                try:
                    decisions.extend(decode(line))
                except JournalError:
                    skipped += 1
        return journal, decisions, skipped

    def append(self, data: bytes) -> None:
        """Add lines (already encoded, each ending in a newline), in as few writes as the kernel allows.
        On an error, what part of them got in is cut off again, so the next line starts clean."""
        try:
            _write_all(self._fd, data)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.size)
            raise
        self.size += len(data)

    def clear(self) -> None:
        """Empty the journal: SQL holds everything it recorded."""
        if self.size:
            os.ftruncate(self._fd, 0)
            self.size = 0

    def rewrite(self, data: bytes) -> None:
        """Replace the journal's contents with `data` (the pending lines) in one atomic rename, so a
        crash at any point leaves either the old lines or the new ones, never a mix."""
        spare = self.path.with_name(self.path.name + ".new")
        fd = os.open(spare, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(fd, data)
            os.replace(spare, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                spare.unlink()
            raise
        os.close(self._fd)
        self._fd, self.size = fd, len(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
