"""The relay's assembler: everything heard since start, folded into one bundle per flush.

Rules of this module:
- Pure and synchronous: callers pass `now` (monotonic seconds); nothing here reads a clock.
- A leaf's age at flush time is `now - when its last beat arrived`, so the monitor never needs the
  leaf's or the relay's wall clock.
- Child relays' bundles (a relay tree) are kept as received and folded in with their own age; a
  duplicate or older child bundle (same boot, seq not newer) never replaces a newer one.
- Leaves and children silent for longer than `forget_after_s` drop out of the bundle.
- Devices vouched for from watched sources (relay/watch.py) are passed to `flush` as they stand.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from relaybeat.relay.wire import Beat, Bundle, HostEntry, LeafStatus, WatchedEntry


@dataclass(slots=True)
class _Leaf:
    heard_at: float
    seq: int | None
    interval_ms: int
    status: LeafStatus


@dataclass(slots=True)
class _Child:
    heard_at: float
    bundle: Bundle


class Assembler:
    def __init__(
        self,
        relay_id: str,
        boot: str,
        flush_s: float,
        default_interval_s: float,
        forget_after_s: float = 86_400.0,
    ) -> None:
        self.relay_id = relay_id
        self.boot = boot
        self.flush_ms = max(10, round(flush_s * 1000))
        self.default_interval_ms = max(10, round(default_interval_s * 1000))
        self.forget_after_s = forget_after_s
        self.seq = 0
        self._leaves: dict[str, _Leaf] = {}
        self._children: dict[str, _Child] = {}

    def add_beat(self, host: str, beat: Beat, now: float) -> None:
        interval_ms = self.default_interval_ms if beat.interval_s is None else round(beat.interval_s * 1000)
        self._leaves[host] = _Leaf(now, beat.seq, interval_ms, beat.status)

    def add_child(self, bundle: Bundle, now: float) -> bool:
        """Keep a child relay's bundle; False when it is a duplicate or older than what we hold."""
        held = self._children.get(bundle.relay)
        if held is not None and held.bundle.boot == bundle.boot and bundle.seq <= held.bundle.seq:
            return False
        self._children[bundle.relay] = _Child(now, bundle)
        return True

    def flush(self, now: float, watched: tuple[WatchedEntry, ...] = ()) -> Bundle:
        horizon = now - self.forget_after_s
        for table in (self._leaves, self._children):
            for key in [key for key, item in table.items() if item.heard_at < horizon]:
                del table[key]
        self.seq += 1
        hosts = tuple(
            HostEntry(host, leaf.seq, _ms(now - leaf.heard_at), leaf.interval_ms, leaf.status)
            for host, leaf in self._leaves.items()
        )
        children = tuple(replace(child.bundle, age_ms=_ms(now - child.heard_at)) for child in self._children.values())
        return Bundle(self.relay_id, self.boot, self.seq, self.flush_ms, hosts, children, watched=watched)

    def awaited(self, paused_at: float, resumed_at: float) -> int:
        """Leaves that were beating when the relay paused (heard within two of their intervals before
        `paused_at`, not stopping) and not heard since `resumed_at`: their beats are probably still
        on the way to us."""
        return sum(
            1
            for leaf in self._leaves.values()
            if paused_at - 2 * leaf.interval_ms / 1000 <= leaf.heard_at < resumed_at and leaf.status is LeafStatus.OK
        )

    @property
    def leaf_count(self) -> int:
        return len(self._leaves)


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))
