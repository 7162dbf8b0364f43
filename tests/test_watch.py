"""Watched sources (issue 13), pure parts: topic matching, ids, payloads, Sparkplug, the wire entry,
and the detector's decisions, on a fake clock. The brokers' side is tests/test_watch_e2e.py."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from relaybeat.errors import SettingsError
from relaybeat.monitor.detector import Detector, Policy
from relaybeat.monitor.states import Kind, State, Transition
from relaybeat.monitor.store import Store
from relaybeat.relay import sparkplug
from relaybeat.relay.assembler import Assembler
from relaybeat.relay.compact import BundleDecoder, BundleEncoder, KeyframeMissing
from relaybeat.relay.mqtt import BrokerURL
from relaybeat.relay.service import RelayService, RelaySettings
from relaybeat.relay.watch import PRESETS, Source, Watch, check_filter, device_id, match, sources
from relaybeat.relay.wire import (
    Bundle,
    HostEntry,
    LeafStatus,
    Vouch,
    WatchedEntry,
    WireError,
    decode_bundle,
    encode_bundle,
)
from tests.fakes import FakeClock
from tests.monitors import AUTH, api, call, new_monitor

# ---------------------------------------------------------------------------------- topic matching

levels = st.sampled_from(["a", "b", "", "$x", "tele", "LWT"])
filter_levels = st.sampled_from(["a", "b", "", "+", "tele", "LWT"])


@given(st.lists(levels, min_size=1, max_size=5), st.lists(filter_levels, min_size=1, max_size=5), st.booleans())
def test_match_agrees_with_paho_on_every_topic_and_filter(topic: list[str], wanted: list[str], hash_end: bool) -> None:
    topic_filter = "/".join([*wanted, "#"] if hash_end else wanted)
    text = "/".join(topic)
    assert (match(topic_filter, text) is not None) == topic_matches_sub(topic_filter, text)


def test_match_captures_the_wildcard_levels() -> None:
    assert match("tele/+/LWT", "tele/plug-2/LWT") == ("plug-2",)
    assert match("site/+/+/avail", "site/a/b/avail") == ("a", "b")
    assert match("site/#", "site/a/b") == ("a/b",)
    assert match("tele/+/LWT", "tele/plug-2/STATE") is None
    assert match("+/status", "$SYS/status") is None


@pytest.mark.parametrize("bad", ["", "site/avail", "site/a+/x", "site/#/x", "a/b#", "a\0/+"])
def test_a_watch_topic_must_be_a_filter_naming_the_device(bad: str) -> None:
    with pytest.raises(SettingsError, match="watch topic"):
        check_filter(bad)


# ------------------------------------------------------------------------------------------- ids


@given(st.text(max_size=140))
def test_a_device_name_maps_to_an_id_or_is_rejected(name: str) -> None:
    if not 1 <= len(name) <= 128:
        with pytest.raises(WireError, match="watch_bad_id"):
            device_id(name)
    else:
        host = device_id(name)
        assert len(host) == len(name)
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in host)


def test_names_outside_the_grammar_are_mapped_and_collisions_rejected() -> None:
    watch = Watch([PRESETS["tasmota"]])
    assert watch.take("tele/living room/LWT", b"Online", 0.0) == ["living_room"]
    with pytest.raises(WireError) as err:
        watch.take("tele/living_room/LWT", b"Online", 0.0)
    assert err.value.reason == "watch_id_collision"
    with pytest.raises(WireError) as err:
        watch.take(f"tele/{'x' * 129}/LWT", b"Online", 0.0)
    assert err.value.reason == "watch_bad_id"


# ---------------------------------------------------------------------------------- availability


def entry(watch: Watch, host: str, now: float = 0.0) -> WatchedEntry:
    return {e.id: e for e in watch.entries(now)}[host]


def test_tasmota_online_is_vouched_and_its_will_is_down_with_a_reason_naming_the_topic() -> None:
    watch = Watch(sources(["tasmota"]))
    watch.take("tele/plug-2/LWT", b"Online", 1.0)
    assert entry(watch, "plug-2", 5.0) == WatchedEntry("plug-2", Vouch.UP, 0, "tasmota", "tele/plug-2/LWT said Online")
    watch.take("tele/plug-2/LWT", b"Offline", 6.0)
    assert entry(watch, "plug-2", 7.5) == WatchedEntry(
        "plug-2", Vouch.DOWN, 1500, "tasmota", "tele/plug-2/LWT said Offline"
    )


def test_a_repeated_state_keeps_its_time_as_a_retained_replay_does() -> None:
    watch = Watch(sources(["esphome"]))
    watch.take("node-1/status", b"offline", 1.0)
    assert watch.take("node-1/status", b"offline", 9.0) == []
    assert entry(watch, "node-1", 10.0).age_ms == 9000


@pytest.mark.parametrize("payload", [b"maybe", b"\xff", b"x" * 5000, b'{"state": "online"}'])
def test_other_payloads_are_rejected_and_change_nothing(payload: bytes) -> None:
    watch = Watch(sources(["esphome"]))
    watch.take("node-1/status", b"online", 0.0)
    with pytest.raises(WireError) as err:
        watch.take("node-1/status", payload, 1.0)
    assert err.value.reason in ("watch_bad_payload", "too_large")
    assert entry(watch, "node-1").state is Vouch.UP


def test_zigbee2mqtt_reads_plain_and_json_and_its_bridge_offline_makes_devices_unreachable() -> None:
    watch = Watch(sources(["zigbee2mqtt"]))
    watch.take("zigbee2mqtt/bridge/state", b'{"state":"online"}', 0.0)
    watch.take("zigbee2mqtt/lamp/availability", b'{"state":"online"}', 0.0)
    watch.take("zigbee2mqtt/door/availability", b"online", 0.0)
    watch.take("zigbee2mqtt/old/availability", b"offline", 0.0)
    assert {e.id: e.state for e in watch.entries(1.0)} == {
        "zigbee2mqtt-bridge": Vouch.UP,
        "lamp": Vouch.UP,
        "door": Vouch.UP,
        "old": Vouch.DOWN,
    }
    assert sorted(watch.take("zigbee2mqtt/bridge/state", b"offline", 2.0)) == ["door", "lamp", "zigbee2mqtt-bridge"]
    states = {e.id: (e.state, e.reason) for e in watch.entries(3.0)}
    assert states["lamp"] == (Vouch.UNREACHABLE, "bridge zigbee2mqtt/bridge/state said offline")
    assert states["old"][0] is Vouch.DOWN
    assert states["zigbee2mqtt-bridge"][0] is Vouch.DOWN
    # A stale retained `online` of a device behind an offline bridge is not believed.
    watch.take("zigbee2mqtt/door/availability", b"online", 4.0)
    assert entry(watch, "door").state is Vouch.UNREACHABLE


def test_a_custom_source_with_a_field_and_expire_after() -> None:
    source = Source(name="site", topic="site/+/avail", online="up", offline="down", field="avail", expire_after_s=10)
    watch = Watch(sources([], [source]))
    watch.take("site/pump-1/avail", b'{"avail": "up", "temp": 3}', 0.0)
    watch.take("site/pump-1/avail", b'{"temp": 4}', 8.0)  # telemetry refreshes it
    assert watch.expire(17.0) == []
    assert watch.expire(18.0) == ["pump-1"]
    assert entry(watch, "pump-1", 18.0) == WatchedEntry(
        "pump-1", Vouch.DOWN, 0, "site", "site/pump-1/avail silent for 10 s"
    )


def test_unknown_presets_and_bad_sources_stop_start_up() -> None:
    with pytest.raises(SettingsError, match="unknown watch preset 'hue'"):
        sources(["hue"])
    with pytest.raises(SettingsError, match="must differ"):
        Source(name="x", topic="a/+", online="a", offline="a")
    with pytest.raises(SettingsError, match="name"):
        Source(name="a b", topic="a/+")


# -------------------------------------------------------------------------------------- Sparkplug


def birth(bd_seq: int) -> bytes:
    return sparkplug.encode({"bdSeq": bd_seq}, seq=0, timestamp_ms=1)


def test_sparkplug_node_death_with_its_births_bdseq_makes_its_devices_unreachable() -> None:
    watch = Watch(sources(["sparkplug"]))
    watch.take("spBv1.0/plant/NBIRTH/edge-1", birth(3), 0.0)
    watch.take("spBv1.0/plant/DBIRTH/edge-1/press", sparkplug.encode({}, seq=1), 0.0)
    watch.take("spBv1.0/plant/DBIRTH/edge-1/oven", sparkplug.encode({}, seq=2), 0.0)
    watch.take("spBv1.0/plant/DDEATH/edge-1/oven", sparkplug.encode({}, seq=3), 1.0)
    with pytest.raises(WireError) as err:
        watch.take("spBv1.0/plant/NDEATH/edge-1", birth(2), 2.0)  # an older session's will: stale
    assert err.value.reason == "watch_stale_death"
    assert entry(watch, "plant.edge-1").state is Vouch.UP
    watch.take("spBv1.0/plant/NDEATH/edge-1", birth(3), 3.0)
    states = {e.id: (e.state, e.reason) for e in watch.entries(3.0)}
    assert states == {
        "plant.edge-1": (Vouch.DOWN, "spBv1.0/plant/NDEATH/edge-1 said the node died (bdSeq 3)"),
        "plant.edge-1.press": (Vouch.UNREACHABLE, "node plant/edge-1 died (spBv1.0/plant/NDEATH/edge-1)"),
        "plant.edge-1.oven": (Vouch.DOWN, "spBv1.0/plant/DDEATH/edge-1/oven said the device died"),
    }
    watch.take("spBv1.0/plant/NBIRTH/edge-1", birth(4), 4.0)
    watch.take("spBv1.0/plant/DBIRTH/edge-1/press", sparkplug.encode({}), 4.0)
    assert entry(watch, "plant.edge-1.press").state is Vouch.UP


@given(st.binary(max_size=200))
def test_any_sparkplug_payload_is_read_or_rejected_with_a_wire_error(data: bytes) -> None:
    watch = Watch(sources(["sparkplug"]))
    for topic in ("spBv1.0/g/NBIRTH/n", "spBv1.0/g/NDEATH/n", "spBv1.0/g/DBIRTH/n/d"):
        try:
            watch.take(topic, data, 0.0)
        except WireError as err:
            reasons = {err.reason}
        else:
            reasons = set()
        assert reasons <= {"watch_bad_payload", "watch_stale_death"}


def test_sparkplug_payloads_round_trip_through_the_schema() -> None:
    payload = sparkplug.decode(sparkplug.encode({"bdSeq": 2**40, "other": 1}, seq=7, timestamp_ms=123))
    assert (payload.seq, payload.timestamp, [m.name for m in payload.metrics]) == (7, 123, ["bdSeq", "other"])
    assert sparkplug.bd_seq(sparkplug.encode({"bdSeq": 2**40})) == 2**40


# ------------------------------------------------------------------------------------------ wire


watched_entries = st.builds(
    WatchedEntry,
    st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True),
    st.sampled_from(Vouch),
    st.integers(0, 10**9),
    st.sampled_from(["tasmota", "custom-1"]),
    st.text(st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), min_size=1, max_size=200),
)


@given(st.lists(watched_entries, max_size=5))
def test_watched_entries_round_trip(entries: list[WatchedEntry]) -> None:
    bundle = Bundle("r1", "b", 1, 1000, watched=tuple(entries))
    assert decode_bundle(encode_bundle(bundle)) == bundle


@given(st.lists(watched_entries, max_size=5), st.booleans())
def test_watched_entries_round_trip_in_version_2(entries: list[WatchedEntry], keyframe: bool) -> None:
    bundle = Bundle("r1", "b", 1, 1000, watched=tuple(entries), version=2, keyframe=keyframe, sent_ms=5)
    assert decode_bundle(encode_bundle(bundle)) == bundle


@given(st.lists(watched_entries, min_size=1, max_size=5))
def test_watched_entries_round_trip_in_indexed_deltas(entries: list[WatchedEntry]) -> None:
    """The relay's default: a keyframe, then deltas indexed against it, each carrying the devices."""
    encoder, decoder = BundleEncoder(), BundleDecoder()
    leaf = (HostEntry("web-1", 1, 10, 1000, LeafStatus.OK),)
    keyframe = Bundle("r1", "b", 1, 1000, leaf, version=2, keyframe=True, sent_ms=1000)
    assert decoder.decode(encoder.encode(keyframe)) == keyframe
    delta = Bundle("r1", "b", 2, 1000, watched=tuple(entries), version=2, keyframe=False, sent_ms=2000)
    payload = encoder.encode(delta)
    with pytest.raises(KeyframeMissing):  # indexed against the keyframe: a receiver without it cannot read it
        BundleDecoder().decode(payload)
    assert decoder.decode(payload).watched == delta.watched


def test_bad_watched_attributes_in_version_2_are_rejected_with_a_reason() -> None:
    good = encode_bundle(
        Bundle("r1", "b", 1, 1000, watched=(WatchedEntry("h", Vouch.UP, 0, "tasmota", "x"),), version=2)
    )
    attribute = good.index(b'[["h"')
    for raw, reason in [(b'[["h","up",0,"tasmota"]]', "bad_entry"), (b"[", "bad_json"), (b"[]", "bad_bundle")]:
        size = len(raw).to_bytes(4, "little")
        payload = good[: attribute - 4] + size + raw + good[good.index(b"]]", attribute) + 2 :]
        with pytest.raises(WireError) as err:
            decode_bundle(payload)
        assert err.value.reason == reason, raw


def test_a_bundle_without_watched_entries_is_what_it_was() -> None:
    assert b"watched" not in encode_bundle(Bundle("r1", "b", 1, 1000))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ('[["h", "up", 0, "tasmota"]]', "bad_entry"),
        ('[["h", "sideways", 0, "tasmota", "x"]]', "bad_status"),
        ('[["h", "down", -1, "tasmota", "x"]]', "bad_age"),
        ('[["h/x", "down", 0, "tasmota", "x"]]', "bad_id"),
        ('[["h", "down", 0, "a b", "x"]]', "bad_id"),
        ('[["h", "down", 0, "tasmota", ""]]', "bad_reason"),
        ('[["h", "down", 0, "tasmota", "a\\u0000b"]]', "bad_reason"),
        ('[["h", "down", 0, "tasmota", "' + "x" * 201 + '"]]', "bad_reason"),
        ('{"h": 1}', "bad_bundle"),
    ],
)
def test_bad_watched_entries_are_rejected_with_a_reason(raw: str, reason: str) -> None:
    payload = b'{"v":1,"relay":"r","boot":"b","seq":1,"flush_ms":1000,"hosts":[],"watched":' + raw.encode() + b"}"
    with pytest.raises(WireError) as err:
        decode_bundle(payload)
    assert err.value.reason == reason


# -------------------------------------------------------------------------------------- detector


class Site:
    """One relay watching some sources, its bundles carried through the wire to a detector."""

    def __init__(self, *presets: str) -> None:
        self.now = 0.0
        self.watch = Watch(sources(presets))
        self.asm = Assembler("r1", "b1", 1.0, 5.0)
        self.detector = Detector(Policy(), 0.0)
        self.out: list[Transition] = []

    def say(self, topic: str, payload: bytes) -> None:
        self.watch.take(topic, payload, self.now)

    def run(self, until: float) -> None:
        while self.now < until:
            self.now += 0.25
            self.out += self.detector.expire(self.now)
            if self.now % 1.0 == 0:
                bundle = self.asm.flush(self.now, self.watch.entries(self.now))
                self.out += self.detector.observe(decode_bundle(encode_bundle(bundle)), self.now + 0.125)

    def state(self, host: str) -> State:
        return self.detector.hosts[host].state

    def moves(self, host: str) -> list[tuple[State, State, float, str]]:
        return [(t.from_state, t.to_state, t.at, t.reason) for t in self.out if t.subject == host]


def test_a_watched_device_is_up_without_beats_stays_up_and_is_down_at_its_will() -> None:
    site = Site("tasmota")
    site.say("tele/plug-2/LWT", b"Online")
    site.run(60.0)
    assert site.moves("plug-2") == [(State.UNKNOWN, State.UP, 1.125, "tasmota: tele/plug-2/LWT said Online")]
    assert site.detector.hosts["plug-2"].source == "tasmota"
    site.now = 60.5
    site.say("tele/plug-2/LWT", b"Offline")
    site.run(62.0)
    # Down at the time the will arrived (carried as the entry's age), decided at the next bundle.
    assert site.moves("plug-2")[1:] == [(State.UP, State.DOWN, 60.625, "tasmota: tele/plug-2/LWT said Offline")]
    site.run(70.0)
    site.say("tele/plug-2/LWT", b"Online")
    site.run(72.0)
    assert site.moves("plug-2")[2][:2] == (State.DOWN, State.UP)


def test_a_bridge_going_offline_makes_its_devices_unreachable_not_down_and_they_stay_so_when_the_relay_returns() -> (
    None
):
    site = Site("zigbee2mqtt")
    site.say("zigbee2mqtt/bridge/state", b"online")
    site.say("zigbee2mqtt/lamp/availability", b'{"state":"online"}')
    site.run(5.0)
    site.say("zigbee2mqtt/bridge/state", b"offline")
    site.run(7.0)
    assert site.state("zigbee2mqtt-bridge") == State.DOWN
    assert site.moves("lamp")[-1][1:] == (
        State.UNREACHABLE,
        5.125,
        "zigbee2mqtt: bridge zigbee2mqtt/bridge/state said offline",
    )
    out = site.detector.relay_offline("r1", site.now)  # the relay dies and comes back: still unreachable
    site.run(10.0)
    assert site.state("lamp") == State.UNREACHABLE
    assert not [t for t in out if t.subject == "lamp"]
    site.say("zigbee2mqtt/bridge/state", b"online")
    site.say("zigbee2mqtt/lamp/availability", b"online")
    site.run(12.0)
    assert site.state("lamp") == State.UP
    assert site.detector.ignored == {}  # no unlisted transition on the way


def test_a_dead_relay_makes_its_watched_devices_unreachable_as_its_hosts() -> None:
    site = Site("esphome")
    site.say("node-1/status", b"online")
    site.run(5.0)
    out = site.detector.relay_offline("r1", site.now)
    assert [(t.kind, t.subject, t.to_state, t.reason) for t in out] == [
        (Kind.RELAY, "r1", State.DOWN, "relay r1 said offline (status topic / last will)"),
        (Kind.HOST, "node-1", State.UNREACHABLE, "relay r1 down"),
    ]
    site.run(8.0)
    assert site.state("node-1") == State.UP
    assert site.detector.ignored == {}


def test_sparkplug_node_death_makes_its_devices_unreachable_in_the_detector() -> None:
    site = Site("sparkplug")
    site.say("spBv1.0/plant/NBIRTH/edge-1", birth(1))
    site.say("spBv1.0/plant/DBIRTH/edge-1/press", sparkplug.encode({}))
    site.run(3.0)
    site.say("spBv1.0/plant/NDEATH/edge-1", birth(1))
    site.run(5.0)
    assert site.state("plant.edge-1") == State.DOWN
    assert site.state("plant.edge-1.press") == State.UNREACHABLE
    assert site.detector.ignored == {}


# ------------------------------------------------------------------------------ any message sequence

any_topic = st.one_of(
    st.builds("tele/{}/LWT".format, st.sampled_from(["a", "b", "a b", "", "x" * 130])),
    st.builds("zigbee2mqtt/{}/availability".format, st.sampled_from(["lamp", "door", "bridge"])),
    st.just("zigbee2mqtt/bridge/state"),
    st.builds("spBv1.0/g/{}/n".format, st.sampled_from(["NBIRTH", "NDEATH"])),
    st.builds("spBv1.0/g/{}/n/{}".format, st.sampled_from(["DBIRTH", "DDEATH"]), st.sampled_from(["d1", "d2"])),
    st.builds("site/{}/avail".format, st.sampled_from(["p1", "p2"])),
)
any_payload = st.one_of(
    st.sampled_from([b"Online", b"Offline", b"online", b"offline", b'{"state":"offline"}', b'{"s": 1}', b"", b"\xff"]),
    st.builds(lambda n: sparkplug.encode({"bdSeq": n}), st.integers(0, 3)),
    st.binary(max_size=20),
)


@given(st.lists(st.tuples(any_topic, any_payload, st.floats(0, 5)), max_size=40))
def test_any_sequence_of_messages_leaves_entries_the_wire_carries_and_raises_only_wire_errors(
    messages: list[tuple[str, bytes, float]],
) -> None:
    site = Source(name="site", topic="site/+/avail", field="state", expire_after_s=2.0)
    watch = Watch(sources(["tasmota", "zigbee2mqtt", "sparkplug"], [site]), forget_after_s=10.0)
    now = 0.0
    for topic, payload, wait in messages:
        now += wait
        watch.expire(now)
        with contextlib.suppress(WireError):
            watch.take(topic, payload, now)
        entries = watch.entries(now)
        bundle = Bundle("r1", "b", 1, 1000, watched=entries)
        assert decode_bundle(encode_bundle(bundle)) == bundle
        assert len({e.id for e in entries}) == len(entries)
        assert all(e.state is Vouch.UP or e.age_ms >= 0 for e in entries)


# ------------------------------------------------------------------------ the relay and the monitor


def test_the_relay_takes_retained_availability_as_current_state_but_still_refuses_retained_beats() -> None:
    now = [10.0]
    settings = RelaySettings(
        "r1", BrokerURL.parse("mqtt://127.0.0.1:1"), BrokerURL.parse("mqtt://127.0.0.1:2"), watch=sources(["tasmota"])
    )
    relay = RelayService(settings, clock=lambda: now[0])
    assert relay.watch.filters == ("tele/+/LWT",)
    relay.take("tele/plug-2/LWT", b"Offline", retained=True)
    relay.take("tele/plug-3/LWT", b"Dunno")
    relay.take("relaybeat/beat/web-1", b"", retained=True)
    assert relay.rejections.counts == {"watch_bad_payload": 1, "retained": 1}
    now[0] = 12.0
    bundle = relay.assembler.flush(now[0], relay.watch.entries(now[0]))
    assert bundle.watched == (WatchedEntry("plug-2", Vouch.DOWN, 2000, "tasmota", "tele/plug-2/LWT said Offline"),)
    assert bundle.hosts == ()


async def test_the_api_shows_a_watched_hosts_source_and_its_reason(store: Store) -> None:
    clock = FakeClock()
    monitor = new_monitor(store, clock)
    up = WatchedEntry("plug-2", Vouch.UP, 0, "tasmota", "tele/plug-2/LWT said Online")
    monitor.take("relaybeat/bundle/r1", encode_bundle(Bundle("r1", "b", 1, 1000, watched=(up,))))
    clock.t += 1.0
    down = WatchedEntry("plug-2", Vouch.DOWN, 250, "tasmota", "tele/plug-2/LWT said Offline")
    monitor.take("relaybeat/bundle/r1", encode_bundle(Bundle("r1", "b", 2, 1000, watched=(down,))))
    await monitor.flush()
    async with api(monitor) as client:
        body = await call(client, "GET", "/api/v1/hosts/plug-2", 200, headers=AUTH)
        beats = await call(client, "GET", "/api/v1/hosts", 200, headers=AUTH)
    assert (body["state"], body["source"], body["relay"]) == ("down", "tasmota", "r1")
    assert [h["source"] for h in beats["items"]] == ["tasmota"]
    [_, row] = await store.history(subject="plug-2", newest_first=False)
    assert (row.to_state, row.reason) == (State.DOWN, "tasmota: tele/plug-2/LWT said Offline")
    assert row.at == clock.wall(clock.t - 0.25)  # when the will arrived, not when the bundle did
