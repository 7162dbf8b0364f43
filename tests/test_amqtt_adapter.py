"""Everything broker_config/amqtt_adapter.py takes from amqtt beyond its documented API
(`AMQTT_PRIVATE_API`) is still there, with the shape the adapter expects, on the installed amqtt.

An amqtt upgrade that renames, removes or reshapes one of them fails here with a message naming it,
instead of as a broker that quietly stops enforcing keepalives or leaks retained messages. Methods
are checked by signature, attributes on live objects of a started broker with a connected client,
and plugin hooks against the keyword arguments amqtt's own source fires them with.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import re
import tomllib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from relaybeat.broker_config import CONFIG_DIR
from relaybeat.broker_config.amqtt_adapter import (
    AMQTT_PRIVATE_API,
    AMQTT_VERSION,
    AnyoneAllowed,
    ClientIdMatchesUsername,
    KeepaliveEnforcer,
    PrivateUse,
    RelaybeatBroker,
    ThreadedFileAuth,
    TopicACL,
    Use,
    check_amqtt_version,
    listening_port,
    start_amqtt,
)
from relaybeat.broker_config.settings import BrokerSettings
from relaybeat.relay.wire import Topics

PLUGINS = (KeepaliveEnforcer, ThreadedFileAuth, ClientIdMatchesUsername, AnyoneAllowed, TopicACL)
# The amqtt modules that fire events on the broker side.
EVENT_SOURCES = ("amqtt.broker", "amqtt.mqtt.protocol.broker_handler", "amqtt.mqtt.protocol.handler")


def _resolve(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _uses(*kinds: Use) -> list[PrivateUse]:
    return [use for use in AMQTT_PRIVATE_API if use.use in kinds]


def _id(use: PrivateUse) -> str:
    return f"{use.owner.rpartition('.')[2]}.{use.name}"


def _parameters(function: Any) -> list[inspect.Parameter]:
    """The parameters after `self` (a classmethod read from its class is already bound)."""
    parameters = list(inspect.signature(function).parameters.values())
    return parameters[1:] if parameters and parameters[0].name == "self" else parameters


def test_the_installed_amqtt_is_the_pinned_one() -> None:
    check_amqtt_version()
    pyproject = tomllib.loads((CONFIG_DIR.parent / "pyproject.toml").read_text())
    assert f"amqtt=={AMQTT_VERSION}" in pyproject["project"]["dependencies"]


@pytest.mark.parametrize("use", _uses(Use.OVERRIDE, Use.CALL), ids=_id)
def test_every_amqtt_method_relied_on_keeps_its_parameters(use: PrivateUse) -> None:
    owner = _resolve(use.owner)
    method = getattr(owner, use.name, None)
    assert callable(method), f"amqtt changed: {use.owner}.{use.name} is gone"
    found = _parameters(method)
    names = tuple(parameter.name for parameter in found)
    if use.use is Use.OVERRIDE:  # amqtt calls our version as it calls its own
        assert names == use.parameters, f"amqtt changed: {use.owner}.{use.name}{names}, expected {use.parameters}"
        ours = getattr(RelaybeatBroker, use.name)
        assert ours is not method, f"RelaybeatBroker no longer overrides {use.name}: drop it from AMQTT_PRIVATE_API"
        assert len(_parameters(ours)) == len(found), f"RelaybeatBroker.{use.name} takes other arguments than amqtt's"
        assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(method), use.name
    else:  # we call it with these, by position; what amqtt adds after them must be optional
        assert names[: len(use.parameters)] == use.parameters, (
            f"amqtt changed: {use.owner}.{use.name}{names}, expected {use.parameters} first"
        )
        extra = [p.name for p in found[len(use.parameters) :] if p.default is inspect.Parameter.empty]
        assert not extra, f"amqtt changed: {use.owner}.{use.name} now also requires {extra}"


def test_every_method_the_broker_overrides_is_listed() -> None:
    base = _resolve("amqtt.broker.Broker")
    overridden = {name for name in vars(RelaybeatBroker) if hasattr(base, name) and not name.startswith("__")}
    listed = {use.name for use in _uses(Use.OVERRIDE)}
    assert overridden == listed


@pytest.fixture
async def live_objects() -> AsyncIterator[dict[str, Any]]:
    """One object of every class the attribute entries name, from a started broker with a client
    connected and a retained message held."""
    topics = Topics(f"t{uuid.uuid4().hex[:8]}/relaybeat/")
    broker = await start_amqtt(BrokerSettings(port=0, prefix=topics.prefix))
    try:
        port = listening_port(broker, 0)
        async with aiomqtt.Client("127.0.0.1", port, identifier="watcher", timeout=3) as client:
            await client.publish(topics.relay_status("r"), b"online", qos=1, retain=True)
            await client.subscribe(topics.all_relay_statuses, qos=1)
            async with asyncio.timeout(3):
                await anext(client.messages)  # the retained message is held by now
            session, handler = broker._sessions["watcher"]
            yield {
                "amqtt.broker.Broker": broker,
                "amqtt.plugins.manager.PluginManager": broker.plugins_manager,
                "amqtt.broker.BrokerContext": broker.plugins_manager.context,
                "amqtt.broker.Server": broker._servers["default"],
                "amqtt.broker.RetainedApplicationMessage": broker._retained_messages[topics.relay_status("r")],
                "amqtt.session.Session": session,
                "amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler": handler,
                "amqtt.adapters.StreamWriterAdapter": handler.writer,
            }
    finally:
        await broker.shutdown()


async def test_every_amqtt_attribute_relied_on_is_on_live_objects(live_objects: dict[str, Any]) -> None:
    missing = []
    for use in _uses(Use.ATTRIBUTE):
        assert use.owner in live_objects, f"no live object for {use.owner}: add one to the fixture"
        instance = live_objects[use.owner]
        assert isinstance(instance, _resolve(use.owner)), f"amqtt changed: the object for {use.owner} is a {instance!r}"
        if not hasattr(instance, use.name):
            missing.append(f"{use.owner}.{use.name}")
    assert not missing, f"amqtt changed: these attributes are gone: {missing}"
    assert listening_port(live_objects["amqtt.broker.Broker"], 0) > 0  # `_servers[...].instance.sockets`


def _fired_keywords(enum_name: str, member: str) -> list[set[str]]:
    """The keyword arguments of every `fire_event(<enum_name>.<member>, ...)` in amqtt's broker side."""
    sites = []
    for module_name in EVENT_SOURCES:
        tree = ast.parse(inspect.getsource(importlib.import_module(module_name)))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr != "fire_event" or not node.args:
                continue
            event = node.args[0]
            if (
                isinstance(event, ast.Attribute)
                and isinstance(event.value, ast.Name)
                and (event.value.id, event.attr) == (enum_name, member)
            ):
                sites.append({keyword.arg for keyword in node.keywords if keyword.arg not in (None, "wait")})
    return sites


@pytest.mark.parametrize("use", _uses(Use.EVENT), ids=_id)
def test_every_plugin_hook_matches_how_amqtt_fires_its_event(use: PrivateUse) -> None:
    events = _resolve(use.owner)
    members = [member for member in events if member.value == use.name]
    assert members, f"amqtt changed: {use.owner} has no event {use.name!r}"
    hooks = [getattr(plugin, f"on_{use.name}") for plugin in PLUGINS if hasattr(plugin, f"on_{use.name}")]
    assert hooks, f"no plugin has on_{use.name}: drop it from AMQTT_PRIVATE_API"
    sites = _fired_keywords(events.__name__, members[0].name)
    assert sites, f"amqtt changed: it no longer fires {use.owner}.{members[0].name}"
    for hook in hooks:
        parameters = _parameters(hook)
        assert tuple(p.name for p in parameters) == use.parameters, (hook, use.parameters)
        required = {p.name for p in parameters if p.default is inspect.Parameter.empty}
        for passed in sites:
            assert passed <= set(use.parameters), f"amqtt changed: it fires {use.name} with {sorted(passed)}"
            assert required <= passed, f"amqtt changed: it fires {use.name} without {sorted(required - passed)}"


def test_every_plugin_hook_is_listed() -> None:
    hooks = {name[3:] for plugin in PLUGINS for name in vars(plugin) if re.fullmatch(r"on_\w+", name)}
    assert hooks == {use.name for use in _uses(Use.EVENT)}


def test_nothing_else_imports_amqtt() -> None:
    root = CONFIG_DIR.parent
    importers = []
    for path in sorted(root.glob("*/**/*.py")):
        if ".venv" in path.parts or path.name == "test_amqtt_adapter.py":
            continue
        if re.search(r"^\s*(from|import) amqtt\b", path.read_text(encoding="utf-8"), re.MULTILINE):
            importers.append(str(path.relative_to(root)))
    assert importers == [str(Path("broker_config") / "amqtt_adapter.py")]
