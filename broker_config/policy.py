"""Who may publish and subscribe where on the embedded broker, and which client ids a user may take.

Pure: no amqtt, no asyncio, no I/O. The policy is mosquitto-style: patterns for everyone (`*`) and
per user, with `%u` for the username. `broker_config/acl` says the same thing to Mosquitto, and
tests/test_topic_policy.py checks that the two agree, so both brokers enforce one policy.

A client id belongs to one user: the username itself or `username/<anything>` (`client_id_allowed`;
Mosquitto's `use_username_as_clientid` is the stricter half of that rule).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from relaybeat.relay.wire import Topics, is_valid_id


def _levels_cover(pattern: Sequence[str], candidate: Sequence[str]) -> bool:
    """Whether every topic matched by `candidate` (a topic or a filter) is matched by `pattern`."""
    for index, level in enumerate(pattern):
        if level == "#":
            return True  # also covers the parent level itself, as MQTT's `a/#` matches `a`
        if index >= len(candidate) or candidate[index] == "#":
            return False
        if level != "+" and level != candidate[index]:
            return False
    return len(candidate) == len(pattern)


@dataclass(frozen=True, slots=True)
class TopicPolicy:
    """Mosquitto-style ACL. Patterns under `*` apply to every user; `%u` is replaced by the username.

    `publish` patterns are what a user may write; `subscribe` patterns are what a user may read: a
    subscription must lie inside one of them, and a delivered topic must match one of them.
    """

    publish: Mapping[str, tuple[str, ...]]
    subscribe: Mapping[str, tuple[str, ...]]

    def _patterns(self, table: Mapping[str, tuple[str, ...]], username: str | None) -> list[list[str]]:
        if not is_valid_id(username):  # %u must stay one plain level: no '/', '+' or '#'
            return []
        raw = (*table.get("*", ()), *table.get(username, ()))
        return [pattern.replace("%u", username).split("/") for pattern in raw]

    @staticmethod
    def _allowed(patterns: list[list[str]], topic: str) -> bool:
        levels = topic.split("/")
        if topic.startswith("$"):  # [MQTT-4.7.2-1]: wildcards never reach $-topics
            return any(pattern[0] == levels[0] and _levels_cover(pattern, levels) for pattern in patterns)
        return any(_levels_cover(pattern, levels) for pattern in patterns)

    def may_publish(self, username: str | None, topic: str) -> bool:
        if not topic or "+" in topic or "#" in topic:
            return False
        return self._allowed(self._patterns(self.publish, username), topic)

    def may_subscribe(self, username: str | None, topic_filter: str) -> bool:
        return bool(topic_filter) and self._allowed(self._patterns(self.subscribe, username), topic_filter)

    def may_receive(self, username: str | None, topic: str) -> bool:
        return self._allowed(self._patterns(self.subscribe, username), topic)


def topic_policy(prefix: str, relays: Sequence[str] = (), monitors: Sequence[str] = ()) -> TopicPolicy:
    """relaybeat's policy. Every user is a leaf and may publish its own beat (`pattern write
    <prefix>beat/%u`, as in Mosquitto, where pattern lines bind every user). Relays also read beats,
    bundles and relay statuses and write their own bundle and status; they hear requests for their own
    keyframe and may ask relays below them for one. Monitors read `<prefix>#` and may ask any relay for
    a keyframe (`<prefix>relay/<id>/resync`)."""
    topics = Topics(prefix)
    any_resync = topics.relay_resync("+")
    relay_publish = (topics.bundle("%u"), topics.relay_status("%u"), any_resync)
    relay_subscribe = (topics.all_beats, topics.all_bundles, topics.all_relay_statuses, topics.relay_resync("%u"))
    monitor_subscribe = (f"{prefix}#",)
    monitor_publish = (any_resync,)
    publish: dict[str, tuple[str, ...]] = {"*": (topics.beat("%u"),)}
    subscribe: dict[str, tuple[str, ...]] = {}
    for relay in relays:
        publish[relay] = (*publish.get(relay, ()), *relay_publish)
        subscribe[relay] = (*subscribe.get(relay, ()), *relay_subscribe)
    for monitor in monitors:
        subscribe[monitor] = (*subscribe.get(monitor, ()), *monitor_subscribe)
        publish[monitor] = (*publish.get(monitor, ()), *monitor_publish)
    return TopicPolicy(publish=publish, subscribe=subscribe)


CLIENT_ID_SEPARATOR: Final = "/"  # cannot appear in a username ([A-Za-z0-9._-]), so the rule is unambiguous


def client_id_allowed(username: str | None, client_id: str) -> bool:
    """Whether `username` may use `client_id`: the username itself, or `username/<anything>`.

    A username cannot contain `/`, so every client id belongs to at most one user: `web` can never
    take `web-01` (user `web-01`'s), nor `web-01/agent`. (`username-*` was ambiguous: ids contain `-`.)
    """
    if not is_valid_id(username):
        return False
    if client_id == username:
        return True
    namespace = username + CLIENT_ID_SEPARATOR
    return client_id.startswith(namespace) and len(client_id) > len(namespace)
