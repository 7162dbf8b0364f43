"""The relay's assembler: everything heard since start, folded into one bundle per flush.

Rules of this module:
- Pure and synchronous: callers pass `now` (monotonic seconds); nothing here reads a clock.
- A leaf's age at flush time is `now - when its last beat arrived`, so the monitor never needs the
  leaf's or the relay's wall clock.
- Child relays' bundles (a relay tree) are kept as received and folded in with their own age; a
  duplicate or older child bundle (same boot, seq not newer) never replaces a newer one.
- Leaves and children silent for longer than `forget_after_s` drop out of the bundle.
- A keyframe lists every leaf; a delta only the leaves beaten since the previous bundle and the ids
  (of leaves and child relays) forgotten since. Keyframes go out at the first flush, every
  `keyframe_s` (0: every flush, as version 1 requires) and at the next flush after
  `request_keyframe()`.
- A child's deltas are forwarded once each, in order, in our next bundle; our keyframes carry each
  child's full picture instead (`advance` folds its deltas into its last keyframe). A child whose
  picture we cannot know (we missed one of its deltas) is left out of our keyframes and asked for a
  keyframe (`wanted_keyframes`) until one arrives.
- Devices vouched for from watched sources (relay/watch.py) are passed to `flush` as they stand.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from relaybeat.relay.wire import FORMAT_VERSION, MAX_AGE_MS, Beat, Bundle, HostEntry, LeafStatus, WatchedEntry


@dataclass(slots=True)
class _Leaf:
    heard_at: float
    seq: int | None
    interval_ms: int
    status: LeafStatus


@dataclass(slots=True)
class _Child:
    heard_at: float
    latest: Bundle  # the last bundle heard, for ordering (boot, seq)
    picture: Bundle | None  # its full picture as of `latest` (a keyframe); None: unknown until one comes
    news: list[tuple[float, Bundle]] = field(default_factory=list)  # heard since our last flush


def advance(held: Bundle | None, news: Bundle) -> Bundle | None:
    """A relay's full picture (a keyframe) after `news`, given its picture `held` as of its previous
    bundle; None when it cannot be known (a delta that does not follow `held`). Ages in `held` grow
    by the time between the two bundles' `sent_ms`. Pure: property-tested against the keyframes the
    relay itself would send."""
    if news.keyframe:
        pictures = ((advance(None, child), child.age_ms) for child in news.children)
        kept = tuple(replace(picture, age_ms=age) for picture, age in pictures if picture is not None)
        return replace(news, children=kept, forgot=(), age_ms=0)
    if held is None or held.boot != news.boot or held.sent_ms is None or news.sent_ms is None:
        return None
    if news.seq <= held.seq:
        return held  # a repeat or an older one: nothing moves
    if news.seq != held.seq + 1 or news.sent_ms < held.sent_ms:
        return None
    dt = news.sent_ms - held.sent_ms
    hosts = {entry[0]: entry._replace(age_ms=min(MAX_AGE_MS, entry[2] + dt)) for entry in held.hosts}
    forgot = set(news.forgot)  # leaves and child relays
    for gone in forgot:
        hosts.pop(gone, None)
    for entry in news.hosts:
        hosts[entry[0]] = entry
    children = {
        child.relay: replace(child, age_ms=min(MAX_AGE_MS, child.age_ms + dt))
        for child in held.children
        if child.relay not in forgot
    }
    for child in news.children:
        picture = advance(children.get(child.relay), child)
        if picture is None:
            children.pop(child.relay, None)
        else:
            children[child.relay] = replace(picture, age_ms=child.age_ms)
    return replace(
        news, hosts=tuple(hosts.values()), children=tuple(children.values()), keyframe=True, forgot=(), age_ms=0
    )


class Assembler:
    def __init__(
        self,
        relay_id: str,
        boot: str,
        flush_s: float,
        default_interval_s: float,
        forget_after_s: float = 86_400.0,
        *,
        keyframe_s: float = 0.0,
        version: int = FORMAT_VERSION,
        booted_at: float = 0.0,
    ) -> None:
        self.relay_id = relay_id
        self.boot = boot
        self.flush_ms = max(10, round(flush_s * 1000))
        self.default_interval_ms = max(10, round(default_interval_s * 1000))
        self.forget_after_s = forget_after_s
        self.keyframe_s = keyframe_s
        self.version = version
        self.booted_at = booted_at
        self.seq = 0
        self._leaves: dict[str, _Leaf] = {}
        self._children: dict[str, _Child] = {}
        self._news: dict[str, None] = {}  # leaves beaten since the last flush, in order
        self._forgotten: list[str] = []  # leaves forgotten since the last flush
        self._keyframe_due: float | None = None  # None: the next flush is a keyframe
        self.keyframes = 0

    def add_beat(self, host: str, beat: Beat, now: float) -> None:
        interval_ms = self.default_interval_ms if beat.interval_s is None else round(beat.interval_s * 1000)
        self._leaves[host] = _Leaf(now, beat.seq, interval_ms, beat.status)
        self._news[host] = None

    def add_child(self, bundle: Bundle, now: float) -> bool:
        """Keep a child relay's bundle; False when it is a duplicate or older than what we hold."""
        held = self._children.get(bundle.relay)
        if held is not None and held.latest.boot == bundle.boot and bundle.seq <= held.latest.seq:
            return False
        picture = advance(None if held is None else held.picture, bundle)
        child = _Child(now, bundle, picture)
        if held is not None and held.latest.boot == bundle.boot:
            child.news = held.news
        child.news.append((now, bundle))
        self._children[bundle.relay] = child
        return True

    def lose_child(self, header: Bundle, now: float) -> None:
        """A child's delta we could not read (we lack the keyframe it refers to): its picture is
        unknown, and `wanted_keyframes` asks for one, until a keyframe arrives."""
        held = self._children.get(header.relay)
        news = held.news if held is not None and held.latest.boot == header.boot else []
        self._children[header.relay] = _Child(now, header, None, news)

    def request_keyframe(self) -> None:
        """Someone upstream missed a bundle of ours: the next flush is a keyframe."""
        self._keyframe_due = None

    @property
    def wanted_keyframes(self) -> list[str]:
        """Child relays whose picture we lost (we missed one of their deltas): ask them for a keyframe."""
        return [relay for relay, child in self._children.items() if child.picture is None]

    def flush(self, now: float, watched: tuple[WatchedEntry, ...] = ()) -> Bundle:
        horizon = now - self.forget_after_s
        for host in [host for host, leaf in self._leaves.items() if leaf.heard_at < horizon]:
            del self._leaves[host]
            self._forgotten.append(host)
        for relay in [relay for relay, child in self._children.items() if child.heard_at < horizon]:
            del self._children[relay]
            self._forgotten.append(relay)  # so that whoever holds our picture drops it too
        self.seq += 1
        keyframe = self.keyframe_s <= 0 or self._keyframe_due is None or now >= self._keyframe_due
        if keyframe:
            self.keyframes += 1
            self._keyframe_due = now + self.keyframe_s
        leaves = self._leaves
        beaten = leaves if keyframe else [host for host in self._news if host in leaves]
        hosts = tuple(
            HostEntry(host, leaf.seq, _ms(now - leaf.heard_at), leaf.interval_ms, leaf.status)
            for host, leaf in ((host, leaves[host]) for host in beaten)
        )
        if keyframe:
            children = tuple(
                replace(child.picture, age_ms=_ms(now - child.heard_at))
                for child in self._children.values()
                if child.picture is not None
            )
        else:
            children = tuple(
                replace(bundle, age_ms=_ms(now - heard_at))
                for child in self._children.values()
                for heard_at, bundle in child.news
            )
        for child in self._children.values():
            child.news = []
        forgot = () if keyframe else tuple(self._forgotten)
        self._news.clear()
        self._forgotten.clear()
        return Bundle(
            self.relay_id,
            self.boot,
            self.seq,
            self.flush_ms,
            hosts,
            children,
            version=self.version,
            keyframe=keyframe,
            forgot=forgot,
            sent_ms=None if self.version == FORMAT_VERSION else _ms(now - self.booted_at),  # v1 has no send time
            watched=watched,  # in every bundle, keyframe or delta: the devices as they stand
        )

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
