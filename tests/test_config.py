"""The deployment file and the command line: bad values stop start-up with a message naming the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
import typer.core
import typer.main
from typer.testing import CliRunner

from relaybeat import cli
from relaybeat.config import ConfigError, load_config
from relaybeat.monitor.clock import HandClock
from relaybeat.monitor.ingest import BEHIND_GRACE_S
from relaybeat.monitor.service import Monitor
from relaybeat.monitor.store import Store
from relaybeat.relay.mqtt import Brokers, BrokerURL
from relaybeat.relay.wire import DEFAULT_MAX_BUNDLE_BYTES, DEFAULT_MAX_BUNDLE_ENTRIES
from relaybeat.settings import LeafFlags, MonitorFlags, RelayFlags, leaf_start, monitor_start, relay_start

EXAMPLE = Path(__file__).parent.parent / "relaybeat.example.toml"


def test_example_file_loads_and_builds_the_policy() -> None:
    config = load_config(EXAMPLE)
    policy = config.detector.policy()
    assert policy.misses_for("wan-7") == 6
    assert policy.misses_for("web-1") == 3
    assert config.monitor.db == "sqlite:///relaybeat.db"


def test_example_file_shows_every_key_with_its_default() -> None:
    """The example documents the whole deployment file: each section, each key, each default value."""
    example, defaults = load_config(EXAMPLE), load_config(None)
    text = EXAMPLE.read_text()
    for section in ("monitor", "detector", "api", "relay", "leaf"):
        assert f"[{section}]" in text
        for key, value in getattr(defaults, section).model_dump().items():
            if (
                key in ("misses_override", "targets_override") or value is None
            ):  # overrides are examples; ids/brokers per process
                continue
            assert f"{key} = " in text, f"{section}.{key} missing from the example"
            assert getattr(getattr(example, section), key) == getattr(getattr(defaults, section), key) or (
                section == "api" and key == "read"
            ), f"{section}.{key}"
    settings = example.monitor.settings(policy=example.detector.policy())
    assert (settings.max_bundle_bytes, settings.max_bundle_entries) == (
        DEFAULT_MAX_BUNDLE_BYTES,
        DEFAULT_MAX_BUNDLE_ENTRIES,
    )
    api = example.api.settings()
    assert api.read_open
    assert not api.write_tokens
    assert not api.cors_origins
    relay = example.relay.settings("relay-a", BrokerURL.parse("mqtt://127.0.0.1:1884"))
    assert relay.max_bundle_bytes == DEFAULT_MAX_BUNDLE_BYTES
    assert relay.accept_children is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[detector]\nmises = 3\n", "detector.mises: Extra inputs are not permitted"),
        ("[detector]\nmisses = 0\n", "detector.misses: Input should be greater than or equal to 1"),
        ("[detector]\nmisses = '3'\n", "detector.misses: Input should be a valid integer"),
        ("[detector]\nflap_start = 3\nflap_stop = 3\n", "flap_stop (3) must be below flap_start (3)"),
        ("[monitor]\nprefix = 'no-slash'\n", "monitor.prefix"),
        ("[[detector.misses_override]]\nhosts = 'db-*'\n", "detector.misses_override.0.misses: Field required"),
        (
            "[monitr]\n",
            "monitr: Extra inputs are not permitted; known keys: api, detector, leaf, monitor, notify, relay",
        ),
        ("not toml = = 1", "not valid TOML"),
        (
            "[detector]\nmisses = 1001\n",
            "detector.misses: Input should be less than or equal to 1000 (allowed: an integer",
        ),
        (
            "[detector]\nadaptive = 'yes'\n",
            "detector.adaptive: Input should be a valid boolean (allowed: true or false)",
        ),
        ("[api]\nread = 'closed'\n", "api.read: Input should be 'open' or 'token'"),
        ("[api]\nread = 'token'\n", "read = 'token' needs at least one token"),
        ("[api]\nwrite_tokens = ['short']\n", "api.write_tokens: each token must be at least 16"),
        ("[api]\ncors_origins = ['ops.example.com']\n", "api.cors_origins: 'ops.example.com' is not '*' or an origin"),
        (
            "[monitor]\nmax_bundle_bytes = 10\n",
            "monitor.max_bundle_bytes: Input should be greater than or equal to 1024",
        ),
        ("[monitor]\nmax_bundle_entries = 0\n", "monitor.max_bundle_entries: Input should be greater than or equal"),
        ("[monitor]\nbroker = 'http://x'\n", "monitor.broker: broker URL 'http://x' must start with mqtt://"),
        ("[monitor]\nlisten = 'nowhere'\n", "monitor.listen: 'nowhere' is not HOST:PORT"),
        ("[monitor]\ndb = 'not a url'\n", "monitor.db: must be a SQLAlchemy URL"),
        ("[relay]\nchildren = 'sometimes'\n", "relay.children: must be true, false or 'auto'"),
        ("[relay]\nflush_s = 0\n", "relay.flush_s: Input should be greater than or equal to 0.01"),
        ("[relay]\nid = 'relay a'\n", "relay.id: must match [A-Za-z0-9._-]{1,128}"),
        ("[relay]\nlocal = 'site-broker'\n", "relay.local: broker URL 'site-broker' must start with mqtt://"),
        ("[relay]\nmax_bundle_bytes = 'big'\n", "relay.max_bundle_bytes: Input should be a valid integer"),
        ("[leaf]\ninterval_s = 0.001\n", "leaf.interval_s: Input should be greater than or equal to 0.05"),
        ("[leaf]\nhost = 'web-1'\n", "leaf.host: Extra inputs are not permitted; known keys: broker, id, interval_s"),
        ("monitor = 3\n", "monitor: must be a table"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "relaybeat.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_monitor_refuses_to_start_on_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "relaybeat.toml"
    path.write_text("[detector]\nmisses = -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "relaybeat", "monitor", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "detector.misses" in result.stderr
    assert "greater than or equal to 1" in result.stderr


def test_taken_port_is_a_clear_error(free_port: int) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", free_port))
        holder.listen()
        result = subprocess.run(
            [sys.executable, "-m", "relaybeat", "up", "--api-port", str(free_port), "--duration", "1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert f"127.0.0.1:{free_port} is already in use" in result.stderr


def test_db_upgrade_command_creates_the_schema(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    for command in (["db", "upgrade"], ["db", "check"], ["db", "downgrade"], ["db", "upgrade"]):
        result = subprocess.run(
            [sys.executable, "-m", "relaybeat", *command, "--db", f"sqlite:///{db}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
    import sqlite3

    with sqlite3.connect(db) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"transitions", "hosts", "relays"} <= tables


def test_precedence_is_flag_then_environment_then_file_then_default(tmp_path: Path) -> None:
    path = tmp_path / "relaybeat.toml"
    path.write_text("[detector]\nmisses = 4\nflap_start = 8\n[monitor]\ndb = 'sqlite:///file.db'\n")
    env = {"RELAYBEAT_DETECTOR__MISSES": "5", "RELAYBEAT_MONITOR__DB": "sqlite:///env.db", "RELAYBEAT_TEST_X": "1"}
    assert load_config(None).detector.misses == 3
    assert load_config(path).detector.misses == 4
    from_env = load_config(path, env)
    assert (from_env.detector.misses, from_env.monitor.db, from_env.detector.flap_start) == (5, "sqlite:///env.db", 8)
    flags = {"detector.misses": ("--misses", 6), "monitor.db": ("--db", None)}  # None: flag not given
    from_flags = load_config(path, env, flags)
    assert (from_flags.detector.misses, from_flags.monitor.db) == (6, "sqlite:///env.db")


def test_environment_values_are_toml_values_and_errors_name_the_variable(tmp_path: Path) -> None:
    config = load_config(
        None,
        {
            "RELAYBEAT_API__CORS_ORIGINS": '["https://ops.example.com"]',
            "RELAYBEAT_DETECTOR__ADAPTIVE": "true",
            "RELAYBEAT_MONITOR__CLIENT_ID": "inf",  # a string field stays a string
            "RELAYBEAT_API_TOKENS": "aaaaaaaaaaaaaaaa1, bbbbbbbbbbbbbbbb2",
            "RELAYBEAT_API_WRITE_TOKENS": "cccccccccccccccc3",
        },
    )
    assert config.api.cors_origins == ["https://ops.example.com"]
    assert config.detector.adaptive is True
    assert config.monitor.client_id == "inf"
    api = config.api.settings()
    assert not api.read_open  # read tokens given, `read` unset: reads are protected
    assert api.read_tokens == ("aaaaaaaaaaaaaaaa1", "bbbbbbbbbbbbbbbb2")
    assert api.write_tokens == ("cccccccccccccccc3",)
    explicit = load_config(None, {"RELAYBEAT_API__READ": "open", "RELAYBEAT_API_TOKENS": "a" * 16})
    assert explicit.api.settings().read_open  # `read = "open"` said outright wins over the inference
    for name, value, message in (
        ("RELAYBEAT_DETECTOR__MISSES", "zero", "RELAYBEAT_DETECTOR__MISSES (detector.misses): Input should be a valid"),
        (
            "RELAYBEAT_DETECTOR__MISES",
            "3",
            "RELAYBEAT_DETECTOR__MISES (detector.mises): Extra inputs are not permitted",
        ),
        ("RELAYBEAT_DETECTR__MISSES", "3", "RELAYBEAT_DETECTR__MISSES (detectr): Extra inputs are not permitted"),
    ):
        with pytest.raises(ConfigError) as err:
            load_config(None, {name: value})
        assert message in str(err.value)


def test_monitor_flags_and_their_variables_still_work_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "relaybeat.toml"
    path.write_text(
        "[monitor]\nbroker = 'mqtt://file:1883'\ndb = 'sqlite:///file.db'\nmax_bundle_bytes = 65536\n"
        "[detector]\nmisses = 4\n[api]\nwrite_tokens = ['write-token-0123456789']\n"
    )
    start = monitor_start(MonitorFlags(), {}, path)
    settings = start.settings
    assert (Brokers.of(settings.broker).first.host, settings.policy.misses, settings.max_bundle_bytes) == (
        "file",
        4,
        65536,
    )
    assert start.db == "sqlite:///file.db"
    assert start.listen == ("127.0.0.1", 8000)
    assert start.api.write_tokens == ("write-token-0123456789",)
    assert start.api.read_open

    # RELAYBEAT_BROKER, _DB, _LISTEN, _PREFIX and _MISSES are the flags' own variables: typer reads them
    # as the flags (test_each_flag_reads_its_own_variable); RELAYBEAT_MONITOR__* come through `environ`
    env = {"RELAYBEAT_MONITOR__MAX_BUNDLE_ENTRIES": "1000"}
    from_env = MonitorFlags(broker="mqtt://env:1883", db="sqlite:///env.db", listen="127.0.0.1:9001", prefix="site/")
    flags = dataclasses.replace(from_env, misses=5, max_bundle_bytes=2048, phi=9, adaptive=True)
    start = monitor_start(flags, env, path)
    settings = start.settings
    assert (Brokers.of(settings.broker).first.host, settings.prefix, settings.policy.misses) == ("env", "site/", 5)
    assert (settings.max_bundle_bytes, settings.max_bundle_entries) == (2048, 1000)
    assert settings.policy.adaptive
    assert settings.policy.phi_threshold == 9
    assert start.db == "sqlite:///env.db"
    assert start.listen == ("127.0.0.1", 9001)

    flags = dataclasses.replace(from_env, broker="mqtt://flag:1", misses=6, client_id="m2")
    settings = monitor_start(flags, env, path).settings
    assert (Brokers.of(settings.broker).first.host, settings.policy.misses) == ("flag", 6)
    assert settings.client_id == "m2"


def test_the_grace_for_being_behind_comes_from_the_file_or_the_flag_and_reaches_the_ingest(tmp_path: Path) -> None:
    path = tmp_path / "relaybeat.toml"
    assert monitor_start(MonitorFlags(), {}, None).settings.behind_grace_s == BEHIND_GRACE_S
    path.write_text("[monitor]\nbehind_grace_s = 900\n")
    assert monitor_start(MonitorFlags(), {}, path).settings.behind_grace_s == 900
    settings = monitor_start(MonitorFlags(behind_grace=42.5), {}, path).settings
    assert settings.behind_grace_s == 42.5
    assert Monitor(settings, cast(Store, None), HandClock()).ingest.lag.grace_s == 42.5


def test_relay_and_leaf_read_the_deployment_file(tmp_path: Path) -> None:
    path = tmp_path / "relaybeat.toml"
    path.write_text(
        "[relay]\nlocal = 'mqtt://site:1884'\nupstream = 'mqtt://central:1883'\nflush_s = 2.0\n"
        "max_bundle_bytes = 100000\nchildren = false\nkeyframe_s = 10.0\nformat = 'json'\nbundle_qos = 1\n"
        "[leaf]\nbroker = 'mqtt://site:1884'\ninterval_s = 2.5\nprefix = 'site/'\n"
    )
    start = relay_start(RelayFlags(id="relay-a"), {}, path)
    relay = start.settings
    assert (
        relay.relay_id,
        Brokers.of(relay.local).first.host,
        Brokers.of(relay.upstream).first.host,
        relay.flush_s,
    ) == ("relay-a", "site", "central", 2.0)
    assert relay.max_bundle_bytes == 100_000
    assert relay.accept_children is False
    assert (relay.keyframe_s, relay.format, relay.bundle_qos) == (10.0, "json", 1)
    assert start.embedded is None
    flags = RelayFlags(  # --id and --upstream as RELAYBEAT_ID and RELAYBEAT_UPSTREAM
        id="relay-b", upstream="mqtt://up:1", local="mqtt://other:1", flush=0.5, max_bundle_bytes=4096, children=True
    )
    relay = relay_start(flags, {}, path).settings
    assert (
        relay.relay_id,
        Brokers.of(relay.local).first.host,
        Brokers.of(relay.upstream).first.host,
        relay.flush_s,
    ) == ("relay-b", "other", "up", 0.5)
    assert relay.max_bundle_bytes == 4096
    assert relay.accept_children is True
    relay = relay_start(RelayFlags(id="relay-d", keyframe_s=5.0, format="binary", bundle_qos=0), {}, path).settings
    assert (relay.keyframe_s, relay.format, relay.bundle_qos) == (5.0, "binary", 0)
    embedded = relay_start(RelayFlags(id="relay-c"), {}, None)
    assert (embedded.settings.keyframe_s, embedded.settings.format, embedded.settings.bundle_qos) == (30.0, "binary", 0)
    assert embedded.embedded == ("127.0.0.1", 1884)
    assert embedded.settings.local == BrokerURL("127.0.0.1", 1884)
    assert embedded.settings.hold_first_s == 5.0  # the default leaf interval: leaves beat before the first keyframe
    held = relay_start(RelayFlags(id="relay-e", default_interval=2.0), {}, None).settings
    assert held.hold_first_s == 2.0
    assert relay_start(RelayFlags(id="relay-f", hold_first_s=0.0), {}, None).settings.hold_first_s == 0.0

    leaf = leaf_start(LeafFlags(id="web-1"), {}, path)
    assert (leaf.host_id, leaf.broker.first.host, leaf.interval_s, leaf.topics.prefix) == (
        "web-1",
        "site",
        2.5,
        "site/",
    )
    leaf = leaf_start(LeafFlags(id="web-2", broker="mqtt://b:1", interval=1), {}, None)
    assert (leaf.host_id, leaf.broker.first.host, leaf.interval_s) == ("web-2", "b", 1.0)


@pytest.mark.parametrize(
    ("start", "message"),
    [
        (lambda: leaf_start(LeafFlags(broker="mqtt://b:1"), {}, None), "leaf id: give --id, RELAYBEAT_ID"),
        (lambda: leaf_start(LeafFlags(id="web-1"), {}, None), "leaf broker: give --broker"),
        (
            lambda: leaf_start(LeafFlags(id="web 1", broker="mqtt://b:1"), {}, None),
            "--id (RELAYBEAT_ID) (leaf.id): must match",
        ),
        (lambda: relay_start(RelayFlags(), {}, None), "relay id: give --id, RELAYBEAT_ID"),
        (
            lambda: relay_start(RelayFlags(id="r", upstream="http://x"), {}, None),
            "--upstream (RELAYBEAT_UPSTREAM) (relay.upstream)",
        ),
        (lambda: relay_start(RelayFlags(id="r", format="xml"), {}, None), "--format (relay.format)"),
        (lambda: relay_start(RelayFlags(id="r", keyframe_s=-1), {}, None), "--keyframe-s (relay.keyframe_s)"),
        (lambda: relay_start(RelayFlags(id="r", bundle_qos=2), {}, None), "--bundle-qos (relay.bundle_qos)"),
        (
            lambda: monitor_start(MonitorFlags(max_bundle_bytes=10), {}, None),
            "--max-bundle-bytes (monitor.max_bundle_bytes)",
        ),
    ],
)
def test_bad_values_name_the_flag(start: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        start()
    assert message in str(err.value)


def test_each_flag_reads_its_own_variable_and_reaches_the_builder() -> None:
    """The typer side of the contract: each command's flags and their variables, as the README has them,
    and every flag (but --config and --log-level) a field of the builder's flags."""
    common = {"--config": "RELAYBEAT_CONFIG", "--prefix": "RELAYBEAT_PREFIX", "--log-level": "RELAYBEAT_LOG_LEVEL"}
    expected = {
        "monitor": common | {
            "--broker": "RELAYBEAT_BROKER", "--db": "RELAYBEAT_DB", "--listen": "RELAYBEAT_LISTEN",
            "--misses": "RELAYBEAT_MISSES", "--default-interval": None, "--adaptive/--fixed": None, "--phi": None,
            "--client-id": None, "--max-bundle-bytes": None, "--max-bundle-entries": None, "--journal": None,
            "--node-id": "RELAYBEAT_NODE_ID", "--failover": None, "--behind-grace": None,
        },
        "relay": common | {
            "--id": "RELAYBEAT_ID", "--local": None, "--upstream": "RELAYBEAT_UPSTREAM", "--flush": None,
            "--serve": None, "--default-interval": None, "--children/--no-children": None, "--max-bundle-bytes": None,
            "--keyframe-s": None, "--format": None, "--bundle-qos": None, "--hold-first-s": None,
            "--watch": None,
        },
        "leaf": common | {"--id": "RELAYBEAT_ID", "--broker": "RELAYBEAT_BROKER", "--interval": None},
    }  # fmt: skip
    group = typer.main.get_command(cli.app)
    assert isinstance(group, typer.core.TyperGroup)
    for name, flags in (("monitor", MonitorFlags), ("relay", RelayFlags), ("leaf", LeafFlags)):
        params = group.commands[name].params
        assert {"/".join([*p.opts, *p.secondary_opts]): p.envvar for p in params} == expected[name], name
        assert {p.name for p in params} - {"config", "log_level"} == {f.name for f in dataclasses.fields(flags)}


def test_watched_sources_come_from_watch_flags_and_relay_watch_tables(tmp_path: Path) -> None:
    path = tmp_path / "relaybeat.toml"
    path.write_text(
        '[relay]\nid = "r1"\nlocal = "mqtt://127.0.0.1:1884"\n[[relay.watch]]\npreset = "sparkplug"\n'
        '[[relay.watch]]\nname = "site"\ntopic = "site/+/avail"\nonline = "up"\noffline = "down"\n'
        'field = "avail"\nexpire_after_s = 60\n'
    )
    watch = relay_start(RelayFlags(watch=("tasmota", "zigbee2mqtt")), {}, path).settings.watch
    assert [s.name for s in watch] == ["tasmota", "zigbee2mqtt", "sparkplug", "site"]
    assert (watch[3].topic, watch[3].online, watch[3].field, watch[3].expire_after_s) == (
        "site/+/avail",
        "up",
        "avail",
        60,
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('preset = "hue"', "relay.watch.0.preset: Input should be 'tasmota', 'esphome', 'zigbee2mqtt' or 'sparkplug'"),
        ('preset = "tasmota"\ntopic = "a/+"', "give either preset"),
        ('topic = "site/avail"', "must be an MQTT filter whose + or # levels name the device"),
        ('topic = "a/+"\nonline = "x"\noffline = "x"', "online and offline must differ"),
        ('topic = "a/+"\nexpire_after_s = 0', "relay.watch.0.expire_after_s"),
        ('topic = "a/+"\ncolour = 1', "colour"),
    ],
)
def test_bad_watch_tables_name_the_key(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "relaybeat.toml"
    path.write_text('[relay]\nid = "r1"\n[[relay.watch]]\n' + table + "\n")
    with pytest.raises(ConfigError) as err:
        relay_start(RelayFlags(), {}, path)
    assert message in str(err.value)


def test_an_unknown_watch_preset_stops_start_up_naming_the_presets() -> None:
    result = CliRunner().invoke(cli.app, ["relay", "--id", "r1", "--watch", "hue"])
    assert result.exit_code == 2
    assert "--watch hue: unknown preset; presets are tasmota, esphome, zigbee2mqtt, sparkplug" in result.output


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["leaf", "--broker", "mqtt://b:1"], {}, "leaf id: give --id, RELAYBEAT_ID"),
        (["leaf", "--broker", "mqtt://b:1"], {"RELAYBEAT_ID": "web 1"}, "--id (RELAYBEAT_ID) (leaf.id): must match"),
        (["relay"], {"RELAYBEAT_UPSTREAM": "mqtt://up:1"}, "relay id: give --id, RELAYBEAT_ID"),
        (["monitor", "--max-bundle-bytes", "10"], {}, "--max-bundle-bytes (monitor.max_bundle_bytes)"),
        (["monitor", "--log-level", "loud"], {}, "'loud' is not one of debug, info, warning, error"),
        (["monitor"], {"RELAYBEAT_MISSES": "0"}, "Invalid value for '--misses'"),
    ],
)
def test_commands_refuse_bad_values_naming_the_flag(args: list[str], env: dict[str, str], message: str) -> None:
    result = CliRunner().invoke(cli.app, args, env=env)
    assert result.exit_code == 2
    assert message in result.output


def test_each_command_explains_itself() -> None:
    for command in ("monitor", "relay", "leaf", "broker"):
        result = CliRunner().invoke(cli.app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, command
        assert "--config" in result.output, command
        assert "--log-level" in result.output, command


def test_notify_config_builds_webhooks_and_its_errors_never_repeat_url_or_secret(tmp_path: Path) -> None:
    from relaybeat.monitor.detector import Policy
    from relaybeat.monitor.notify import Target
    from relaybeat.monitor.states import Kind, State

    path = tmp_path / "relaybeat.toml"
    path.write_text(
        "[notify]\nretry_max_s = 60.0\n"
        '[[notify.webhooks]]\nname = "ops"\nurl = "https://hooks.example.com/T0/token-in-path"\n'
        'secret = "s3cret-s3cret"\n'
        'states = ["down"]\nhosts = ["db-*"]\nrelays = ["r2"]\nkinds = ["host"]\nremind_every_s = 3600.0\n'
    )
    notify = load_config(path).notify.settings()
    [webhook] = notify.webhooks
    assert (webhook.url, webhook.secret, webhook.timeout_s) == (
        "https://hooks.example.com/T0/token-in-path",
        "s3cret-s3cret",
        10.0,
    )
    assert webhook.target == Target("ops", frozenset({State.DOWN}), ("db-*",), ("r2",), frozenset({Kind.HOST}), 3600.0)
    assert notify.retry_max_s == 60.0
    assert "token-in-path" not in repr(notify)
    assert "s3cret" not in repr(notify)
    assert load_config(None).notify.settings().webhooks == ()
    settings = load_config(path).monitor.settings(Policy(), notify)
    assert settings.notify is notify

    bad = [
        ('url = "ftp://hooks.example.com/token-in-path"', "notify.webhooks.0.url: must be an http:// or https:// URL"),
        ('url = "https://h/x"\nstates = ["up"]', "notify.webhooks.0.states.0"),
        ('url = "https://h/x"\nhosts = []', "notify.webhooks.0.hosts"),
        ('url = "https://h/x"\nsecret = 5', "notify.webhooks.0.secret"),
        ('url = "https://h/x"\nurls = 1', "notify.webhooks.0.urls: Extra inputs are not permitted"),
    ]
    for line, message in bad:
        path.write_text(f'[[notify.webhooks]]\nname = "ops"\n{line}\n')
        with pytest.raises(ConfigError) as error:
            load_config(path)
        assert message in str(error.value)
        assert "token-in-path" not in str(error.value)
    path.write_text(
        '[[notify.webhooks]]\nname = "a"\nurl = "https://h/1"\n[[notify.webhooks]]\nname = "a"\nurl = "https://h/2"\n'
    )
    with pytest.raises(ConfigError, match="webhook names must be unique; repeated: a"):
        load_config(path)
    environ = {"RELAYBEAT_NOTIFY__WEBHOOKS": '[{name = "ops", url = "http://127.0.0.1:9/x", secret = "s3cret-s3cret"}]'}
    [from_env] = load_config(None, environ).notify.settings().webhooks
    assert from_env.secret == "s3cret-s3cret"
