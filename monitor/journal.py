"""The monitor's write-ahead journal of decisions: what was decided survives kill -9 until SQL has it.

Rules: it decides nothing and knows no SQL; it only keeps lines. Each batch of decisions is one JSON
line; each decision in it carries all its row needs (its key, wall-clock `at`, the relay path for
maintenance and notifications) and the subject's state row at that moment. The line goes out in
one `os.write`: once that returns, the bytes are the kernel's (its page cache), so killing the
monitor loses none of them. There is no fsync: a power cut or a kernel crash may lose the last
few seconds' lines (what the kernel had not yet written back), as it would without a journal.

One monitor per journal: the file is locked (flock) while open, and a second opener is refused.
At start the monitor reads every line back (`open`), writes those SQL lacks, then `clear`s it; it
clears it again whenever SQL holds everything decided, and cuts it down to the lines still pending
(`keep_from`: the bytes from that line on, copied by the kernel, not encoded again) when it grows
past `REWRITE_BYTES` under load that never lets it drain, once most of it is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from relaybeat.errors import RelaybeatError, Unavailable
from relaybeat.monitor.records import Change, HostRow, RelayRow
from relaybeat.monitor.states import Event, Kind, State

__all__ = [
    "REWRITE_BYTES", "REWRITE_SHARE", "Decision", "Journal", "JournalError", "JournalUnavailable", "decode", "encode",
]  # fmt: skip

REWRITE_BYTES = 64 * 1024 * 1024  # past this with decisions still pending, keep only the pending lines...
REWRITE_SHARE = 0.5  # ...once this share of it is written: each byte is copied a bounded number of times


class JournalError(RelaybeatError, ValueError):
    """A line that is not a journaled batch of decisions (e.g. torn by a crash mid-write)."""


class JournalUnavailable(Unavailable):
    """The journal cannot be opened, or another monitor holds it; the message says what to do."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """A journaled transition: its change (row, key and relay path), and the subject's state row
    when it was decided (None if the detector no longer held the subject)."""

    change: Change
    state: HostRow | RelayRow | None


_STATE_ROWS: dict[Kind, type[HostRow] | type[RelayRow]] = {Kind.HOST: HostRow, Kind.RELAY: RelayRow}
# A state row is journaled as its fields after `id`, in this order; its moments as epoch seconds.
_STATE_FIELDS = {kind: tuple(f.name for f in fields(row))[1:] for kind, row in _STATE_ROWS.items()}
_MOMENTS = frozenset({"since", "last_seen"})


def _epoch(value: Any) -> Any:
    return value.timestamp() if isinstance(value, datetime) else value


def _moment(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


def encode(
    key_prefix: str, first: int, changes: Sequence[Change], states: Sequence[HostRow | RelayRow | None]
) -> bytes:
    """One line for a batch of decisions: the i-th has key `key_prefix + str(first + i)` and the
    state row `states[i]`. Each decision is `[kind, subject, from_state, to_state, at, reason,
    relay, event, path, state]`, so a batch of a thousand costs one encoder call, not a thousand."""
    decisions = [
        [
            c.kind,
            c.subject,
            c.from_state,
            c.to_state,
            c.at.timestamp(),
            c.reason,
            c.relay,
            c.event,
            c.path,
            None if row is None else [_epoch(getattr(row, name)) for name in _STATE_FIELDS[c.kind]],
        ]
        for c, row in zip(changes, states, strict=True)
    ]
    return orjson.dumps([key_prefix, first, decisions], option=orjson.OPT_APPEND_NEWLINE)


def decode(line: bytes) -> list[Decision]:
    """The decisions on one line, in the order they were made; JournalError if it is not a batch."""
    try:
        key_prefix, first, decisions = orjson.loads(line)
        return [_decision(f"{key_prefix}{first + i}", d) for i, d in enumerate(decisions)]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError) as exc:
        msg = f"not a journaled batch ({type(exc).__name__}: {exc})"
        raise JournalError(msg) from None


def _decision(key: str, values: list[Any]) -> Decision:
    kind_, subject, from_state, to_state, at, reason, relay, event, path, row = values
    kind = Kind(kind_)
    change = Change(
        kind=kind,
        subject=str(subject),
        from_state=State(from_state),
        to_state=State(to_state),
        at=datetime.fromtimestamp(at, UTC),
        reason=str(reason),
        relay=relay,
        event=Event(event),
        key=key,
        path=tuple(str(relay) for relay in path),
    )
    state: HostRow | RelayRow | None = None
    if row is not None:
        names = _STATE_FIELDS[kind]
        if kind is Kind.HOST and len(row) == len(names) - 1:
            row = [*row, None]  # journaled before hosts had a `source` (revision 0006)
        if len(row) != len(names):
            msg = f"a {kind.value} row of {len(row)} fields, not {len(names)}"
            raise ValueError(msg)
        given = dict(zip(names, row, strict=True))
        given |= {name: _moment(given[name]) for name in _MOMENTS}
        given["state"] = State(given["state"])
        state = _STATE_ROWS[kind](id=subject, **given)
    return Decision(change=change, state=state)


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

    def keep_from(self, offset: int) -> None:
        """Keep only the journal's bytes from `offset` on (where a line starts), in one atomic rename,
        so a crash at any point leaves either the old lines or the new ones, never a mix."""
        spare = self.path.with_name(self.path.name + ".new")
        # Not O_APPEND while copying: copy_file_range refuses it.
        fd = os.open(spare, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        kept = self.size - offset
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _copy(self._fd, offset, kept, fd)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)  # then appends, as `open`'s
            os.replace(spare, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                spare.unlink()
            raise
        os.close(self._fd)
        self._fd, self.size = fd, kept

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _copy(source: int, offset: int, count: int, target: int) -> None:
    """`count` bytes of `source` from `offset` on, appended to `target`, in the kernel."""
    while count > 0:
        copied = os.copy_file_range(source, target, count, offset)
        if copied == 0:
            msg = "the journal is shorter than it should be"
            raise OSError(msg)
        offset += copied
        count -= copied


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
