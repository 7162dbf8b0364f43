"""The pure topic policy and client-id rule (broker_config/policy.py), and the proof that the shipped
Mosquitto ACL (broker_config/acl) grants exactly what the embedded broker grants: one policy, two brokers.

`MosquittoACL` reads an ACL file as Mosquitto 2.0 does (mosquitto.conf(5), "acl_file"), for the parts
relaybeat's file may use; anything else in the file fails the test instead of being misread.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

import relaybeat.broker_config.policy
from relaybeat.broker_config import CONFIG_DIR
from relaybeat.broker_config.policy import TopicPolicy, client_id_allowed, topic_policy
from relaybeat.broker_config.settings import load_broker_settings
from relaybeat.relay.wire import Topics

POLICY_CASES = [
    # user, action, topic or filter, allowed
    ("h1", "publish", "beat/h1", True),
    ("h1", "publish", "beat/h2", False),
    ("h1", "publish", "beat/h1/x", False),
    ("h1", "publish", "bundle/h1", False),
    ("h1", "subscribe", "beat/+", False),
    ("relay-a", "publish", "beat/relay-a", True),
    ("relay-a", "publish", "bundle/relay-a", True),
    ("relay-a", "publish", "relay/relay-a/status", True),
    ("relay-a", "publish", "bundle/relay-b", False),
    ("relay-a", "publish", "relay/relay-b/status", False),
    ("relay-a", "subscribe", "beat/+", True),
    ("relay-a", "subscribe", "beat/h7", True),
    ("relay-a", "subscribe", "bundle/+", True),
    ("relay-a", "subscribe", "relay/+/status", True),
    ("relay-a", "subscribe", "relay/#", False),
    ("relay-a", "subscribe", "#", False),
    ("relay-a", "receive", "beat/h7", True),
    ("relay-a", "receive", "other/x", False),
    ("monitor", "subscribe", "#", True),  # `#` here means <prefix>#
    ("monitor", "subscribe", "beat/+", True),
    ("monitor", "receive", "relay/relay-a/status", True),
    ("monitor", "publish", "bundle/monitor", False),
    ("monitor", "publish", "relay/relay-a/resync", True),
    ("relay-a", "subscribe", "relay/relay-a/resync", True),
    ("relay-a", "subscribe", "relay/relay-b/resync", False),
    ("relay-a", "publish", "relay/relay-b/resync", True),  # a parent asks its children for keyframes
    ("h1", "publish", "relay/relay-a/resync", False),
    ("h+", "publish", "beat/h+", False),  # a username is never a wildcard
    ("h#", "publish", "beat/h#", False),
    (None, "publish", "beat/None", False),
]


@pytest.mark.parametrize(("user", "action", "topic", "allowed"), POLICY_CASES)
def test_topic_policy_table(user: str | None, action: str, topic: str, allowed: bool) -> None:
    prefix = "relaybeat/"
    policy = topic_policy(prefix, relays=("relay-a",), monitors=("monitor",))
    check = {"publish": policy.may_publish, "subscribe": policy.may_subscribe, "receive": policy.may_receive}
    assert check[action](user, prefix + topic) is allowed
    assert not policy.may_subscribe(user, "$SYS/#")
    assert not policy.may_receive(user, "$SYS/broker/uptime")


def test_policy_patterns_cover_sub_filters_but_not_wider_ones() -> None:
    policy = TopicPolicy(publish={}, subscribe={"*": ("a/+/c", "d/#")})
    assert policy.may_subscribe("u", "a/b/c")
    assert policy.may_subscribe("u", "a/+/c")
    assert policy.may_subscribe("u", "d")
    assert policy.may_subscribe("u", "d/e/#")
    assert not policy.may_subscribe("u", "a/#")
    assert not policy.may_subscribe("u", "a/+/+")
    assert not policy.may_subscribe("u", "+/b/c")
    assert not policy.may_subscribe("u", "a/b/c/d")


# -------------------------------------------------------------------------- the Mosquitto ACL file


def _filter_matches(acl_topic: str, topic: str) -> bool:
    """Mosquitto's `mosquitto_topic_matches_sub`: `+` is one level, `#` the rest (and the parent
    level itself), and a wildcard in the first level never matches a `$` topic."""
    pattern, levels = acl_topic.split("/"), topic.split("/")
    if topic.startswith("$") and pattern[0] in ("+", "#"):
        return False
    for index, level in enumerate(pattern):
        if level == "#":
            return True
        if index >= len(levels) or level not in ("+", levels[index]):
            return False
    return len(pattern) == len(levels)


@dataclass(frozen=True, slots=True)
class _Rule:
    kind: str  # "topic" (for `user`, None = anonymous clients) or "pattern" (every client)
    user: str | None
    access: str  # "read", "write" or "readwrite"
    topic: str


class MosquittoACL:
    """A Mosquitto 2.0 ACL file. `topic` lines before any `user` line are for anonymous clients,
    later ones for the `user` block they are in; `pattern` lines are for every client, with `%u` the
    username and `%c` the client id, and are skipped when that value is missing or holds `+` or `#`
    (CVE-2017-7650). Anything not granted is denied. `read` covers receiving, `write` publishing."""

    def __init__(self, text: str) -> None:
        self.rules: list[_Rule] = []
        user: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            words = [] if line.lstrip().startswith("#") else line.split()  # only whole-line comments
            if not words:
                continue
            where = f"acl line {number}: {line!r}"
            if words[0] == "user":
                assert len(words) == 2, where
                user = words[1]
                continue
            assert words[0] in ("topic", "pattern"), where
            assert len(words) in (2, 3), where
            access, topic = (words[1], words[2]) if len(words) == 3 else ("readwrite", words[1])
            assert access in ("read", "write", "readwrite"), f"{where}: this parser knows no {access!r}"
            self.rules.append(_Rule(words[0], user if words[0] == "topic" else None, access, topic))

    def _topics(self, username: str | None, client_id: str) -> Iterator[tuple[str, str]]:
        for rule in self.rules:
            if rule.kind == "topic":
                if rule.user == username:
                    yield rule.access, rule.topic
                continue
            topic = rule.topic
            for marker, value in (("%u", username), ("%c", client_id)):
                if marker in topic:
                    if not value or "+" in value or "#" in value:
                        break
                    topic = topic.replace(marker, value)
            else:
                yield rule.access, topic

    def rights(self, username: str | None, client_id: str, topic: str) -> tuple[bool, bool]:
        """(may read, may write) `topic`."""
        read = write = False
        for access, acl_topic in self._topics(username, client_id):
            if _filter_matches(acl_topic, topic):
                read |= access in ("read", "readwrite")
                write |= access in ("write", "readwrite")
        return read, write


def test_the_acl_reader_follows_mosquittos_rules() -> None:
    acl = MosquittoACL(
        "# a comment\ntopic read open/#\npattern write out/%u/%c\npattern dev/%c\n"
        "user alice\ntopic secret/+\n  # indented comment\nuser bob\ntopic write bob/x\n"
    )
    assert acl.rights(None, "anon", "open/a/b") == (True, False)  # before any `user`: anonymous only
    assert acl.rights("alice", "alice", "open/a") == (False, False)
    assert acl.rights("alice", "alice", "secret/k") == (True, True)  # no access word: readwrite
    assert acl.rights("bob", "bob", "secret/k") == (False, False)
    assert acl.rights("bob", "b2", "out/bob/b3") == (False, False)  # `%c` is this client's id
    assert acl.rights("bob", "b2", "out/bob/b2") == (False, True)
    assert acl.rights("bob", "b2", "dev/b2") == (True, True)
    assert acl.rights(None, "anon", "out/None/anon") == (False, False)  # no username: `%u` lines skipped
    assert acl.rights("e+", "e+", "dev/e+") == (False, False)  # a wildcard in the client id: skipped
    assert acl.rights("x", "x", "$SYS/open") == (False, False)
    with pytest.raises(AssertionError, match="knows no 'deny'"):
        MosquittoACL("topic deny a/b\n")


def test_shipped_mosquitto_acl_grants_exactly_what_the_embedded_broker_grants() -> None:
    """For every kind of user (a leaf, an unlisted user, each relay and monitor amqtt.toml names, an
    anonymous client, a username that is a wildcard) and every kind of topic, reading and writing:
    the ACL file and `topic_policy` agree. Mosquitto uses the username as client id
    (`use_username_as_clientid`, checked below), so `%c` is the username."""
    assert "use_username_as_clientid true" in (CONFIG_DIR / "mosquitto.conf").read_text()
    settings = load_broker_settings(CONFIG_DIR / "amqtt.toml")
    assert settings.relays, "amqtt.toml should name example relays"
    assert settings.monitors, "amqtt.toml should name example monitors"
    policy = topic_policy(settings.prefix, settings.relays, settings.monitors)
    acl = MosquittoACL((CONFIG_DIR / "acl").read_text())
    t, prefix = Topics(settings.prefix), settings.prefix
    users: list[str | None] = ["h1", "stranger", *settings.relays, *settings.monitors, None, "h+", "#"]
    named = [user for user in users if user is not None and "+" not in user and "#" not in user]
    samples = {
        *(t.beat(user) for user in named), *(t.bundle(user) for user in named),
        *(t.relay_status(user) for user in named), *(t.relay_resync(user) for user in named),
        t.beat("h1") + "/x", t.bundle("h1") + "/x",
        t.relay_status("h1") + "/x", f"{prefix}beat", f"{prefix}relay/h1", f"{prefix}elsewhere", prefix.rstrip("/"),
        "elsewhere/beat/h1", "$SYS/broker/uptime", f"${prefix}beat/h1",
    }  # fmt: skip
    disagreements = []
    for user in users:
        for topic in sorted(samples):
            embedded = (policy.may_receive(user, topic), policy.may_publish(user, topic))
            mosquitto = acl.rights(user, user or "", topic)
            if embedded != mosquitto:
                disagreements.append(f"{user!r} on {topic!r}: embedded (read, write) {embedded}, acl {mosquitto}")
    assert not disagreements, "\n".join(disagreements)
    # the table is not vacuous: every kind of right appears
    rights = {(policy.may_receive(u, x), policy.may_publish(u, x)) for u in users for x in samples}
    assert rights == {(False, False), (True, False), (False, True), (True, True)}, rights


# --------------------------------------------------------------------------------- client ids


@pytest.mark.parametrize(
    ("username", "client_id", "allowed"),
    [("h1", "h1", True), ("h1", "h1/agent", True), ("h1", "h1/a/b", True), ("h1", "h1/", False),
     ("h1", "h1-agent", False), ("h1", "h1-b", False), ("h1", "h1x", False), ("h1", "h2", False),
     ("h1", "x-h1", False), ("h1", "h2/h1", False), ("h1", "", False), (None, "h1", False),
     ("h+", "h+", False), ("a/b", "a/b", False)],
)  # fmt: skip
def test_client_id_must_be_the_username_or_username_slash_anything(
    username: str | None, client_id: str, allowed: bool
) -> None:
    assert client_id_allowed(username, client_id) is allowed


def test_the_policy_module_is_pure() -> None:
    """No amqtt, no asyncio, no I/O: it imports only values and the (pure) wire contract."""
    tree = ast.parse(inspect.getsource(relaybeat.broker_config.policy))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert imported <= {"__future__", "collections.abc", "dataclasses", "typing", "relaybeat.relay.wire"}, imported
