"""Watched sources: devices that already announce their own liveness on MQTT, vouched for by the relay.

Rules of this module:
- Pure and synchronous: callers pass `now` (monotonic seconds) and the messages of the topics in
  `Watch.filters`; nothing here reads a clock or does I/O.
- A retained availability message is the device's current state (unlike a retained beat): the
  relay feeds it like any other, on every (re)subscribe.
- A device that said online is vouched for in every bundle while it stays online (`entries`);
  offline (usually its Last Will) makes it `down` at once, with what it said as the reason. A
  Zigbee2MQTT bridge that goes offline, or a Sparkplug node whose NDEATH matches its birth's
  `bdSeq`, makes its devices `unreachable`, not `down`. A stale NDEATH (an older `bdSeq`) is ignored.
- A device's id is its name taken from the topic (the levels its filter's wildcards match, joined
  by `/`), mapped into the id grammar: every character outside `[A-Za-z0-9._-]` becomes `_`. A name
  that maps to nothing or to more than 128 characters, or onto an id another device already holds,
  is rejected. Input that cannot be used raises `WireError(reason)` (a `watch_*` label counted by
  the shell) and changes nothing held.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson

import relaybeat.relay.sparkplug as sparkplug
from relaybeat.errors import SettingsError
from relaybeat.relay.sparkplug import Message
from relaybeat.relay.wire import MAX_REASON_CHARS, Vouch, WatchedEntry, WireError, check_id

MAX_PAYLOAD_BYTES = 4096  # availability payloads are a word or a small JSON object
_NOT_ID = re.compile(r"[^A-Za-z0-9._-]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True, slots=True, kw_only=True)
class Source:
    """One watched source: a topic filter and how its payloads read.

    `field`: a JSON object's field holds the word (any other payload is read whole). `expire_after_s`:
    a device also publishes telemetry there; silence for that long makes it `down`, and payloads
    other than `online`/`offline` refresh it instead of being rejected. `bridge`: a topic whose
    `offline` makes every device of this source `unreachable` (the bridge is a host of its own,
    `bridge_id`). `sparkplug`: read Sparkplug B births and deaths instead (`topic` is unused)."""

    name: str
    topic: str = ""
    online: str = "online"
    offline: str = "offline"
    field: str | None = None
    expire_after_s: float | None = None
    bridge: str | None = None
    bridge_id: str | None = None
    sparkplug: bool = False

    def __post_init__(self) -> None:
        if not self.sparkplug:
            check_filter(self.topic)
        try:
            check_id(self.name)
        except WireError:
            msg = f"watch source name {self.name!r} is not [A-Za-z0-9._-]{{1,128}}"
            raise SettingsError(msg) from None
        if self.online == self.offline:
            msg = f"watch source {self.name!r}: online and offline must differ"
            raise SettingsError(msg)
        if self.expire_after_s is not None and not (math.isfinite(self.expire_after_s) and self.expire_after_s > 0):
            msg = f"watch source {self.name!r}: expire_after_s must be > 0"
            raise SettingsError(msg)

    @property
    def filters(self) -> tuple[str, ...]:
        if self.sparkplug:
            return sparkplug.FILTERS
        return (self.topic,) if self.bridge is None else (self.bridge, self.topic)


def check_filter(topic: str) -> None:
    """A topic filter with at least one wildcard (the device name): `+` a whole level, `#` the last."""
    levels = topic.split("/")
    bad = (
        not topic
        or "\0" in topic
        or any(("+" in level or "#" in level) and len(level) > 1 for level in levels)
        or "#" in levels[:-1]
        or not any(level in ("+", "#") for level in levels)
    )
    if bad:
        msg = f"watch topic {topic!r} must be an MQTT filter whose + or # levels name the device (e.g. 'site/+/avail')"
        raise SettingsError(msg)


def match(topic_filter: str, topic: str) -> tuple[str, ...] | None:
    """The levels of `topic` that the filter's wildcards match (`#`: the rest, joined by `/`), or
    None if it does not match. As MQTT: a wildcard first level never matches a `$` topic."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return None
    levels, wanted = topic.split("/"), topic_filter.split("/")
    captured: list[str] = []
    for i, want in enumerate(wanted):
        if want == "#":
            captured.append("/".join(levels[i:]))
            return tuple(captured)
        if i >= len(levels):
            return None
        if want == "+":
            captured.append(levels[i])
        elif want != levels[i]:
            return None
    return tuple(captured) if len(levels) == len(wanted) else None


PRESETS: dict[str, Source] = {
    "tasmota": Source(name="tasmota", topic="tele/+/LWT", online="Online", offline="Offline"),
    "esphome": Source(name="esphome", topic="+/status"),
    "zigbee2mqtt": Source(
        name="zigbee2mqtt",
        topic="zigbee2mqtt/+/availability",
        field="state",
        bridge="zigbee2mqtt/bridge/state",
        bridge_id="zigbee2mqtt-bridge",
    ),
    "sparkplug": Source(name="sparkplug", sparkplug=True),
}


def device_id(name: str) -> str:
    """A device's name as a host id: every character outside the id grammar becomes `_`."""
    mapped = _NOT_ID.sub("_", name)
    if not 1 <= len(mapped) <= 128:
        msg = "watch_bad_id"
        raise WireError(msg, f"device name of {len(name)} characters maps to no id of 1 to 128")
    return mapped


def _printable(text: str) -> str:
    """A reason as the wire takes it: printable, at most MAX_REASON_CHARS."""
    return _CONTROL.sub("?", text)[:MAX_REASON_CHARS] or "?"


@dataclass(slots=True)
class _Device:
    source: Source
    state: Vouch
    reason: str
    since: float  # when its source last changed its state
    heard_at: float  # its last message (for expire_after_s)
    topic: str
    group: str | None = None  # the bridge or Sparkplug node it is heard through


class Watch:
    """The devices of some watched sources, as their messages say."""

    def __init__(self, sources: Sequence[Source], forget_after_s: float = 86_400.0) -> None:
        self.sources = tuple(sources)
        self.forget_after_s = forget_after_s
        self.devices: dict[str, _Device] = {}
        self._names: dict[str, tuple[str, str]] = {}  # id -> the (source, name) that holds it
        self._bridges: dict[str, bool] = {}  # bridge id -> online
        self._nodes: dict[str, int] = {}  # Sparkplug node id -> the bdSeq of its birth
        self.filters = tuple(dict.fromkeys(f for source in self.sources for f in source.filters))

    def wants(self, topic: str) -> bool:
        return any(match(f, topic) is not None for f in self.filters)

    def take(self, topic: str, payload: bytes, now: float) -> list[str]:
        """One message from a watched topic (retained ones too); the ids whose state changed."""
        for source in self.sources:
            if source.sparkplug:
                parsed = sparkplug.parse_topic(topic)
                if parsed is not None:
                    return self._sparkplug(source, topic, parsed, payload, now)
            elif source.bridge == topic:
                return self._bridge(source, topic, payload, now)
            else:
                captured = match(source.topic, topic)
                if captured is not None:
                    return self._availability(source, topic, "/".join(captured), payload, now)
        msg = "bad_topic"
        raise WireError(msg, f"{topic[:80]} is not a watched topic")

    def expire(self, now: float) -> list[str]:
        """Devices of `expire_after_s` sources silent for that long turn `down`; down ones silent
        for `forget_after_s` are forgotten. The ids whose state changed."""
        changed = []
        for host, device in list(self.devices.items()):
            limit = device.source.expire_after_s
            if device.state is Vouch.UP and limit is not None and now - device.heard_at >= limit:
                self._set(host, device.source, device.topic, Vouch.DOWN, f"{device.topic} silent for {limit:g} s", now)
                changed.append(host)
            elif device.state is not Vouch.UP and now - device.since > self.forget_after_s:
                del self.devices[host]
                self._names.pop(host, None)
        return changed

    def entries(self, now: float) -> tuple[WatchedEntry, ...]:
        """What the relay vouches for in its next bundle."""
        return tuple(
            WatchedEntry(
                host,
                device.state,
                0 if device.state is Vouch.UP else max(0, round((now - device.since) * 1000)),
                device.source.name,
                device.reason,
            )
            for host, device in self.devices.items()
        )

    # ---------------------------------------------------------------------------------- internals

    def _id(self, source: Source, name: str) -> str:
        host = device_id(name)
        held = self._names.setdefault(host, (source.name, name))
        if held != (source.name, name):
            msg = "watch_id_collision"
            raise WireError(msg, f"{source.name} {name[:40]!r} maps to {host!r}, already {held[0]} {held[1][:40]!r}")
        return host

    def _word(self, source: Source, payload: bytes) -> str:
        if len(payload) > MAX_PAYLOAD_BYTES:
            msg = "too_large"
            raise WireError(msg, f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            msg = "watch_bad_payload"
            raise WireError(msg, "not UTF-8") from None
        if source.field is not None and text.lstrip().startswith("{"):
            try:
                body = orjson.loads(payload)
            except orjson.JSONDecodeError:
                msg = "watch_bad_payload"
                raise WireError(msg, "not JSON") from None
            value = body.get(source.field) if isinstance(body, dict) else None
            return value if type(value) is str else ""
        return text.strip()

    def _availability(self, source: Source, topic: str, name: str, payload: bytes, now: float) -> list[str]:
        word = self._word(source, payload)
        host = self._id(source, name)
        if word not in (source.online, source.offline):
            device = self.devices.get(host)
            if source.expire_after_s is None:
                msg = "watch_bad_payload"
                raise WireError(msg, f"{word[:40]!r} is neither {source.online!r} nor {source.offline!r}")
            if device is not None and device.state is Vouch.UP:
                device.heard_at = now  # telemetry: the device is still there
            return []
        state = Vouch.UP if word == source.online else Vouch.DOWN
        reason = f"{topic} said {word}"
        bridge = source.bridge_id
        if state is Vouch.UP and bridge is not None and self._bridges.get(bridge) is False:
            state, reason = Vouch.UNREACHABLE, f"bridge {source.bridge} is offline"
        return self._set(host, source, topic, state, reason, now, group=bridge)

    def _bridge(self, source: Source, topic: str, payload: bytes, now: float) -> list[str]:
        word = self._word(source, payload)
        if word not in (source.online, source.offline):
            msg = "watch_bad_payload"
            raise WireError(msg, f"{word[:40]!r} is neither {source.online!r} nor {source.offline!r}")
        bridge = source.bridge_id or f"{source.name}-bridge"
        online = word == source.online
        self._bridges[bridge] = online
        changed = self._set(bridge, source, topic, Vouch.UP if online else Vouch.DOWN, f"{topic} said {word}", now)
        if not online:
            changed += self._cut_off(bridge, f"bridge {topic} said {word}", now)
        return changed

    def _sparkplug(
        self, source: Source, topic: str, parsed: sparkplug.SparkplugTopic, payload: bytes, now: float
    ) -> list[str]:
        node = self._id(source, f"{parsed.group}.{parsed.node}")
        if parsed.message is Message.NBIRTH:
            bd_seq = sparkplug.bd_seq(payload)
            self._nodes[node] = bd_seq
            return self._set(node, source, topic, Vouch.UP, f"{topic} (bdSeq {bd_seq})", now)
        if parsed.message is Message.NDEATH:
            bd_seq = sparkplug.bd_seq(payload)
            birth = self._nodes.get(node)
            if birth is not None and birth != bd_seq:
                msg = "watch_stale_death"
                raise WireError(msg, f"{topic} bdSeq {bd_seq}, but the node's birth had {birth}")
            changed = self._set(node, source, topic, Vouch.DOWN, f"{topic} said the node died (bdSeq {bd_seq})", now)
            return changed + self._cut_off(node, f"node {parsed.group}/{parsed.node} died ({topic})", now)
        sparkplug.decode(payload)  # a device birth or death must at least be a payload
        device = self._id(source, f"{parsed.group}.{parsed.node}.{parsed.device}")
        if parsed.message is Message.DBIRTH:
            return self._set(device, source, topic, Vouch.UP, f"{topic}", now, group=node)
        return self._set(device, source, topic, Vouch.DOWN, f"{topic} said the device died", now, group=node)

    def _cut_off(self, group: str, reason: str, now: float) -> list[str]:
        """Every device heard through `group` that is up becomes unreachable."""
        cut = [host for host, d in self.devices.items() if d.group == group and d.state is Vouch.UP]
        for host in cut:
            device = self.devices[host]
            self._set(host, device.source, device.topic, Vouch.UNREACHABLE, reason, now, group=group)
        return cut

    def _set(
        self, host: str, source: Source, topic: str, state: Vouch, reason: str, now: float, group: str | None = None
    ) -> list[str]:
        device = self.devices.get(host)
        if device is not None and device.state is state:
            device.heard_at = now
            device.topic = topic
            return []  # a repeat (a retained message on resubscribe): the state and its time stand
        self.devices[host] = _Device(source, state, _printable(reason), now, now, topic, group)
        return [host]


def sources(presets: Iterable[str], custom: Iterable[Source] = ()) -> tuple[Source, ...]:
    """The sources of these preset names and custom sources; SettingsError names an unknown preset."""
    chosen = []
    for name in presets:
        if name not in PRESETS:
            msg = f"unknown watch preset {name!r}; presets are {', '.join(PRESETS)}"
            raise SettingsError(msg)
        chosen.append(PRESETS[name])
    return tuple(dict.fromkeys([*chosen, *custom]))
