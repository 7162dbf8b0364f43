"""The wire contract, checked both ways: golden cases, round trips, and a decoder fuzz."""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Callable
from dataclasses import replace

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaybeat.errors import SettingsError
from relaybeat.relay.wire import (
    Beat,
    Bundle,
    HostEntry,
    LeafStatus,
    Presence,
    RelayStatus,
    TopicKind,
    Topics,
    WireError,
    decode_beat,
    decode_bundle,
    decode_relay_status,
    encode_beat,
    encode_bundle,
)
from tests.wire_inputs import (
    DEEP_LIST,
    DEEP_META,
    ID_GRAMMAR,
    bundle_json,
    hostile_beats,
    hostile_bundles,
    hostile_ids,
    hostile_v2_bundles,
    v2_fields,
    valid_ids,
)

# (value, bytes): each must encode to exactly these bytes and decode back to exactly this value.
BEAT_CASES = [
    (Beat(), b""),
    (Beat(seq=7), b'{"seq":7}'),
    (Beat(seq=1, interval_s=2.5), b'{"seq":1,"interval":2.5}'),
    (Beat(status=LeafStatus.STOPPING), b'{"status":"stopping"}'),
    (Beat(seq=3, meta={"role": "db"}), b'{"seq":3,"meta":{"role":"db"}}'),
]

BUNDLE_CASES = [
    (
        Bundle("r1", "b00t", 12, 1000, (HostEntry("web-1", 41, 230, 5000, LeafStatus.OK),)),
        b'{"v":1,"relay":"r1","boot":"b00t","seq":12,"flush_ms":1000,"hosts":[["web-1",41,230,5000,"ok"]]}',
    ),
    (
        Bundle(
            "r2",
            "x",
            1,
            500,
            (HostEntry("db.2", None, 0, 1000, LeafStatus.STOPPING),),
            (Bundle("r3", "y", 9, 1000, (), (), age_ms=340),),
        ),
        b'{"v":1,"relay":"r2","boot":"x","seq":1,"flush_ms":500,"hosts":[["db.2",null,0,1000,"stopping"]],'
        b'"children":[{"relay":"r3","boot":"y","seq":9,"flush_ms":1000,"hosts":[],"age_ms":340}]}',
    ),
]


@pytest.mark.parametrize(("beat", "payload"), BEAT_CASES)
def test_beat_golden_cases_both_ways(beat: Beat, payload: bytes) -> None:
    assert encode_beat(beat) == payload
    assert decode_beat(payload) == beat


@pytest.mark.parametrize(("bundle", "payload"), BUNDLE_CASES)
def test_bundle_golden_cases_both_ways(bundle: Bundle, payload: bytes) -> None:
    assert encode_bundle(bundle) == payload
    assert decode_bundle(payload) == bundle


def test_empty_and_whitespace_payloads_are_default_beats() -> None:
    assert decode_beat(b"") == Beat()
    assert decode_beat(b"  \n") == Beat()


def test_beat_ignores_fields_that_claim_another_identity() -> None:
    assert decode_beat(b'{"seq":2,"host":"other","id":"x"}') == Beat(seq=2)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{", "bad_json"),
        (b"[1,2]", "bad_beat"),
        (b'"ok"', "bad_beat"),
        (b'{"seq":-1}', "bad_seq"),
        (b'{"seq":true}', "bad_seq"),
        (b'{"seq":1.5}', "bad_seq"),
        (b'{"interval":0}', "bad_interval"),
        (b'{"interval":-5}', "bad_interval"),
        (b'{"interval":1e308}', "bad_interval"),
        (b'{"interval":"5"}', "bad_interval"),
        (b'{"status":"dead"}', "bad_status"),
        (b'{"meta":[1]}', "bad_meta"),
        (b'{"meta":{"x":"' + b"a" * 2000 + b'"}}', "bad_meta"),
        (b"x" * 5000, "too_large"),
        (b"NaN", "bad_json"),
    ],
)
def test_bad_beats_are_rejected_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(WireError) as err:
        decode_beat(payload)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (bundle_json(v=2), "unknown_version"),
        (bundle_json(v=None), "unknown_version"),
        (b"[]", "bad_bundle"),
        (b"{]", "bad_json"),
        (bundle_json(relay="no spaces"), "bad_id"),
        (bundle_json(relay="x" * 129), "bad_id"),
        (bundle_json(boot=""), "bad_boot"),
        (bundle_json(seq=-1), "bad_seq"),
        (bundle_json(flush_ms=0), "bad_interval"),
        (bundle_json(hosts={}), "bad_bundle"),
        (bundle_json(hosts=[["h", 1, -5, 1000, "ok"]]), "bad_age"),
        (bundle_json(hosts=[["h", 1, 10**15, 1000, "ok"]]), "bad_age"),
        (bundle_json(hosts=[["h", 1, 1.5, 1000, "ok"]]), "bad_age"),
        (bundle_json(hosts=[["h", 1, 5, 1000]]), "bad_entry"),
        (bundle_json(hosts=[["h/x", 1, 5, 1000, "ok"]]), "bad_id"),
        (bundle_json(hosts=[["h", 1, 5, 1000, "up"]]), "bad_status"),
        (bundle_json(hosts=[["h", 1, 5, 1000, ["ok"]]]), "bad_status"),
        (bundle_json(hosts=[["h", 1, 5, 10**12, "ok"]]), "bad_interval"),
        (bundle_json(age_ms=3), "bad_bundle"),
        (bundle_json(children=[{"relay": "c", "boot": "b", "seq": 1, "flush_ms": 1000, "hosts": []}]), "bad_bundle"),
        (bundle_json(seq=None), "bad_seq"),
        (b'{"v":1}', "bad_bundle"),
    ],
)
def test_bad_bundles_are_rejected_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(WireError) as err:
        decode_bundle(payload)
    assert err.value.reason == reason


def test_bundle_limits_on_size_entries_and_depth() -> None:
    many = bundle_json(hosts=[[f"h{i}", i, 0, 1000, "ok"] for i in range(100_001)])
    with pytest.raises(WireError) as err:
        decode_bundle(many, max_entries=100_000)
    assert err.value.reason == "too_many_entries"
    assert decode_bundle(many, max_entries=100_001).entry_count() == 100_001
    with pytest.raises(WireError) as err:
        decode_bundle(many, max_bytes=1000)
    assert err.value.reason == "too_large"
    child: dict[str, object] = {"relay": "c", "boot": "b", "seq": 1, "flush_ms": 1000, "hosts": [], "age_ms": 0}
    for _ in range(20):
        child = child | {"children": [dict(child)]}
    with pytest.raises(WireError) as err:
        decode_bundle(bundle_json(children=[child]))
    assert err.value.reason == "too_deep"


def test_topics_parse_and_build() -> None:
    topics = Topics()
    assert topics.beat("web-1") == "relaybeat/beat/web-1"
    assert topics.bundle("r1") == "relaybeat/bundle/r1"
    assert topics.relay_status("r1") == "relaybeat/relay/r1/status"
    assert topics.parse("relaybeat/beat/web-1") == (TopicKind.BEAT, "web-1")
    assert topics.parse("relaybeat/bundle/r1") == (TopicKind.BUNDLE, "r1")
    assert topics.parse("relaybeat/relay/r1/status") == (TopicKind.RELAY_STATUS, "r1")
    for bad in ["relaybeat/beat/a b", "relaybeat/beat/", "relaybeat/beat/a/b", "other/beat/a", "relaybeat/x/a"]:
        with pytest.raises(WireError) as err:
            topics.parse(bad)
        assert err.value.reason == "bad_topic"
    assert Topics("site-a/rb/").beat("h") == "site-a/rb/beat/h"
    with pytest.raises(SettingsError, match="must be path segments"):
        Topics("no-trailing-slash")


def test_relay_status_payloads() -> None:
    assert decode_relay_status(b"online") == Presence(RelayStatus.ONLINE)
    assert decode_relay_status(b"offline") == Presence(RelayStatus.OFFLINE)
    assert decode_relay_status(b"stopped") == Presence(RelayStatus.STOPPED)
    assert decode_relay_status(b"offline 3f2a9c01d4e5 7") == Presence(RelayStatus.OFFLINE, "3f2a9c01d4e5", 7)
    for bad in (b"maybe", b"offline b", b"offline b 0", b"offline b -1", b"offline b +1", b"online b 1 x",
                b"offline  1", b"offline b/c 1", b"offline b 9007199254740992", b"Offline"):  # fmt: skip
        with pytest.raises(WireError) as refused:
            decode_relay_status(bad)
        assert refused.value.reason == "bad_status", bad


@given(st.sampled_from(list(RelayStatus)), st.from_regex(r"[A-Za-z0-9._-]{1,128}", fullmatch=True),
       st.integers(1, 2**53 - 1))  # fmt: skip
def test_a_presence_naming_its_session_reads_back_as_written(status: RelayStatus, boot: str, session: int) -> None:
    presence = Presence(status, boot, session)
    assert decode_relay_status(presence.encode()) == presence
    assert decode_relay_status(Presence(status).encode()) == Presence(status)


ids = st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True)
entries = st.builds(
    HostEntry,
    ids,
    st.none() | st.integers(0, 2**63 - 1),
    st.integers(0, 366 * 86_400_000),
    st.integers(10, 86_400_000),
    st.sampled_from(LeafStatus),
)
leaf_bundles = st.builds(
    Bundle,
    ids,
    ids,
    st.integers(0, 2**63 - 1),
    st.integers(10, 86_400_000),
    st.lists(entries, max_size=5).map(tuple),
)
child_bundles = st.builds(
    lambda b, age: Bundle(b.relay, b.boot, b.seq, b.flush_ms, b.hosts, b.children, age_ms=age),
    leaf_bundles,
    st.integers(0, 366 * 86_400_000),
)
bundles = st.builds(
    lambda b, children: Bundle(b.relay, b.boot, b.seq, b.flush_ms, b.hosts, tuple(children)),
    leaf_bundles,
    st.lists(child_bundles, max_size=3),
)


@given(bundles)
def test_any_bundle_round_trips(bundle: Bundle) -> None:
    assert decode_bundle(encode_bundle(bundle)) == bundle


@given(
    st.builds(
        Beat,
        st.none() | st.integers(0, 2**63 - 1),
        st.none() | st.floats(0.01, 86_400, allow_nan=False),
        st.sampled_from(LeafStatus),
        st.none()
        | st.dictionaries(
            st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]), max_size=5),
            st.integers(-(2**63), 2**63 - 1),
            max_size=3,
        ),
    )
)
def test_any_beat_round_trips(beat: Beat) -> None:
    decoded = decode_beat(encode_beat(beat))
    assert decoded == beat


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _mutated_bundle(value: object, key: str) -> bytes:
    body = orjson.loads(bundle_json(hosts=[["h", 1, 5, 1000, "ok"]]))
    body[key] = value
    return json.dumps(body).encode()  # stdlib: writes NaN and huge integers, which the decoder must refuse


@settings(max_examples=300)
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_decoders_return_or_raise_wire_error_never_anything_else(payload: bytes) -> None:
    for decode in (decode_beat, decode_bundle, decode_relay_status):
        with contextlib.suppress(WireError):
            decode(payload)


@settings(max_examples=300)
@given(json_values, st.sampled_from(["relay", "boot", "seq", "flush_ms", "hosts", "children", "v"]))
def test_bundle_decoder_survives_any_field_value(value: object, key: str) -> None:
    with contextlib.suppress(WireError):
        decode_bundle(_mutated_bundle(value, key))


# ------------------------------------------------------------------------------------ hostile input
# (the strategies are in tests/wire_inputs.py)


def _assert_sound_beat(beat: Beat) -> None:
    assert beat.seq is None or (type(beat.seq) is int and 0 <= beat.seq < 2**63)
    assert beat.interval_s is None or (type(beat.interval_s) is float and 0.01 <= beat.interval_s <= 86_400)
    assert beat.status in (LeafStatus.OK, LeafStatus.STOPPING)
    if beat.meta is not None:
        assert type(beat.meta) is dict
        assert "\0" not in orjson.dumps(beat.meta).decode("unicode_escape")


def _assert_sound_bundle(bundle: Bundle, depth: int = 0) -> None:
    assert depth <= 16
    assert bundle.version == 1
    assert type(bundle.version) is int
    for subject in (bundle.relay, bundle.boot, *(entry.id for entry in bundle.hosts)):
        assert type(subject) is str
        assert ID_GRAMMAR.fullmatch(subject)
        assert "\0" not in subject
    for entry in bundle.hosts:
        assert entry.seq is None or (type(entry.seq) is int and 0 <= entry.seq < 2**63)
        assert type(entry.age_ms) is int
        assert type(entry.interval_ms) is int
        assert entry.status in ("ok", "stopping")
    for child in bundle.children:
        _assert_sound_bundle(child, depth + 1)


@settings(max_examples=400)
@given(hostile_beats)
def test_hostile_beats_decode_to_a_sound_beat_or_raise_wire_error(payload: bytes) -> None:
    try:
        beat = decode_beat(payload)
    except WireError:
        return
    _assert_sound_beat(beat)


@settings(max_examples=400)
@given(hostile_bundles)
def test_hostile_bundles_decode_to_a_sound_bundle_or_raise_wire_error(payload: bytes) -> None:
    try:
        bundle = decode_bundle(payload)
    except WireError:
        return
    _assert_sound_bundle(bundle)


@settings(max_examples=200)
@given(st.lists(valid_ids | hostile_ids, min_size=1, max_size=30), st.booleans())
def test_a_bundle_is_accepted_only_if_every_host_id_is_an_id(hosts: list[str], in_child: bool) -> None:
    entries = [[host, 1, 5, 1000, "ok"] for host in hosts]
    child = {"relay": "c", "boot": "b", "seq": 1, "flush_ms": 1000, "hosts": entries, "age_ms": 0}
    payload = bundle_json(children=[child]) if in_child else bundle_json(hosts=entries)
    if all(ID_GRAMMAR.fullmatch(host) for host in hosts):
        bundle = decode_bundle(payload)
        assert [entry.id for entry in (bundle.children[0] if in_child else bundle).hosts] == hosts
    else:
        with pytest.raises(WireError) as err:
            decode_bundle(payload)
        assert err.value.reason == "bad_id"


@given(valid_ids | hostile_ids, st.sampled_from(["beat/{}", "bundle/{}", "relay/{}/status"]))
def test_a_topic_names_an_id_or_is_refused(subject: str, shape: str) -> None:
    try:
        _, parsed = Topics().parse("relaybeat/" + shape.format(subject))
    except WireError as err:
        refused: str | None = err.reason
    else:
        refused = None
    if refused is not None:
        assert refused == "bad_topic"
        return
    assert parsed == subject
    assert ID_GRAMMAR.fullmatch(parsed)


@pytest.mark.parametrize(
    ("decode", "payload", "reason"),
    [
        (decode_beat, DEEP_META, "too_deep"),
        (decode_beat, b'{"seq":' + DEEP_LIST + b"}", "too_deep"),
        (decode_beat, b'{"status":' + DEEP_LIST + b"}", "too_deep"),
        (decode_beat, b'{"interval":' + DEEP_LIST + b"}", "too_deep"),
        (decode_beat, b'{"x":' + b"[" * 1100 + b"]" * 1100 + b"}", "bad_json"),  # orjson's own limit
        (decode_beat, b'{"meta":{"k":"a\\u0000b"}}', "bad_meta"),
        (decode_beat, b'{"meta":{"a\\u0000b":1}}', "bad_meta"),
        (decode_beat, b'{"seq":18446744073709551616}', "bad_seq"),
        (decode_bundle, bundle_json(relay=None).replace(b"null", DEEP_LIST), "bad_id"),
        (decode_bundle, bundle_json(boot=None).replace(b"null", DEEP_LIST), "bad_boot"),
        (decode_bundle, bundle_json(seq=None).replace(b"null", DEEP_LIST), "bad_seq"),
        (decode_bundle, bundle_json(v=None).replace(b"null", DEEP_LIST), "unknown_version"),
        (decode_bundle, bundle_json(hosts=[["h", 1, 5, 1000, None]]).replace(b"null", DEEP_LIST), "bad_status"),
        (decode_bundle, bundle_json(hosts=[None]).replace(b"null", DEEP_LIST), "bad_entry"),
        (decode_bundle, bundle_json(children=[None]).replace(b"null", DEEP_LIST), "bad_bundle"),
        (decode_bundle, bundle_json(relay=None).replace(b"null", b"[" * 1100 + b"]" * 1100), "bad_json"),
        (decode_bundle, bundle_json(hosts=[["a\0b", 1, 5, 1000, "ok"]]), "bad_id"),
        (
            decode_bundle,
            bundle_json(hosts=[["ok", 1, 5, 1000, "ok"], ["x" * 128 + "\0y", 1, 5, 1000, "ok"]]),
            "bad_id",
        ),
        (decode_bundle, bundle_json(hosts=[["h\0", 1, 5, 1000, "ok"]]), "bad_id"),
        (decode_bundle, bundle_json(relay="r1\0"), "bad_id"),
        (decode_bundle, bundle_json(v=True), "unknown_version"),
        (decode_bundle, bundle_json(v=1.0), "unknown_version"),
    ],
)
def test_hostile_messages_from_the_fuzz_run_are_refused_with_a_reason(
    decode: Callable[[bytes], object], payload: bytes, reason: str
) -> None:
    with pytest.raises(WireError) as err:
        decode(payload)
    assert err.value.reason == reason
    assert len(str(err.value)) < 300


# -------------------------------------------------------------------------------- version 2 (binary)

V2_BUNDLE_CASES = [
    (
        Bundle("r1", "b0", 12, 1000, (HostEntry("web-1", 41, 230, 5000, LeafStatus.OK),), version=2, sent_ms=7),
        bytes.fromhex(
            "0200"  # version 2, not compressed
            "01"
            "027231"
            "026230"  # a keyframe; relay "r1"; boot "b0"
            "0c00000000000000"
            "e8030000"
            "0700000000000000"
            "0000000000000000"  # seq, flush_ms, sent_ms, age_ms
            "01000000"
            "00000000"
            "00000000"
            "05000000"
            "7765622d31"  # 1 host, 0 forgot, 0 children; ids "web-1"
            "00"  # no attributes
            "2900000000000000"
            "e600000000000000"
            "88130000"
            "00"  # seq 41, age 230, interval 5000, ok
        ),
    ),
    (
        Bundle(
            "r2",
            "x",
            1,
            500,
            (HostEntry("db.2", None, 0, 1000, LeafStatus.STOPPING),),
            (Bundle("r3", "y", 9, 1000, age_ms=340, version=2, keyframe=False, forgot=("gone",), sent_ms=None),),
            version=2,
            keyframe=False,
            sent_ms=2**40,
        ),
        bytes.fromhex(
            "0200"
            "00"
            "027232"
            "0178"  # a delta
            "0100000000000000"
            "f4010000"
            "0000000000010000"
            "0000000000000000"
            "01000000"
            "00000000"
            "01000000"
            "04000000"
            "64622e32"
            "00"
            "ffffffffffffffff"
            "0000000000000000"
            "e8030000"
            "01"  # seq none, stopping
            "00"
            "027233"
            "0179"  # the child: a delta
            "0900000000000000"
            "e8030000"
            "ffffffffffffffff"
            "5401000000000000"  # sent_ms unknown, age 340
            "00000000"
            "01000000"
            "00000000"
            "04000000"
            "676f6e65"  # forgot "gone"
            "00"
        ),
    ),
]


@pytest.mark.parametrize(("bundle", "payload"), V2_BUNDLE_CASES)
def test_v2_bundle_golden_cases_both_ways(bundle: Bundle, payload: bytes) -> None:
    assert encode_bundle(bundle) == payload
    assert decode_bundle(payload) == bundle


def test_v2_readme_layout_is_what_the_code_writes() -> None:
    """tests/wire_inputs.py writes a bundle by the README's layout, with a writer of its own."""
    bundle = decode_bundle(b"".join(raw for _, raw in v2_fields()))
    assert (bundle.relay, bundle.seq, bundle.sent_ms, bundle.keyframe) == ("evil", 3, 5000, True)
    assert bundle.hosts == (
        HostEntry("h", 1, 5, 1000, LeafStatus.OK),
        HostEntry("h2", 2, 6, 1000, LeafStatus.STOPPING),
    )
    assert [(c.relay, c.age_ms, [e.id for e in c.hosts]) for c in bundle.children] == [("c1", 9, ["ch"])]


def test_v2_compresses_only_where_it_pays() -> None:
    small = Bundle("r1", "b", 1, 1000, (HostEntry("h", 1, 5, 1000, LeafStatus.OK),), version=2)
    assert encode_bundle(small)[1] == 0
    hosts = tuple(HostEntry(f"leaf-{i:05d}", i, i % 1000, 5000, LeafStatus.OK) for i in range(2000))
    big = Bundle("r1", "b", 1, 1000, hosts, version=2, sent_ms=123)
    payload = encode_bundle(big)
    assert payload[1] == 1
    assert len(payload) < len(encode_bundle(replace(big, version=1))) / 3
    assert decode_bundle(payload) == big


def test_v1_carries_keyframes_only() -> None:
    with pytest.raises(ValueError, match="keyframes only"):
        encode_bundle(Bundle("r1", "b", 1, 1000, keyframe=False))


v2_nodes = st.builds(
    Bundle,
    ids,
    ids,
    st.integers(0, 2**63 - 1),
    st.integers(10, 86_400_000),
    st.lists(entries, max_size=5).map(tuple),
    version=st.just(2),
    keyframe=st.booleans(),
    forgot=st.lists(ids, max_size=3).map(tuple),
    sent_ms=st.none() | st.integers(0, 2**63 - 1),
)
v2_bundles = st.recursive(
    v2_nodes,
    lambda inner: st.builds(
        lambda top, children: replace(top, children=tuple(children)),
        v2_nodes,
        st.lists(st.builds(lambda b, age: replace(b, age_ms=age), inner, st.integers(0, 366 * 86_400_000)), max_size=3),
    ),
    max_leaves=6,
)


@given(v2_bundles)
def test_any_v2_bundle_round_trips(bundle: Bundle) -> None:
    assert decode_bundle(encode_bundle(bundle)) == bundle


@pytest.mark.parametrize(
    ("field", "raw", "reason"),
    [
        ("flags", b"\x02", "bad_bundle"),
        ("kind", b"\x03", "bad_bundle"),
        ("relay", b"\x03a/b", "bad_id"),
        ("boot", b"\x00", "bad_boot"),
        ("seq", (2**63).to_bytes(8, "little"), "bad_seq"),
        ("flush_ms", (0).to_bytes(4, "little"), "bad_interval"),
        ("age_ms", (1).to_bytes(8, "little"), "bad_bundle"),  # at the top
        ("child.age_ms", (10**15).to_bytes(8, "little"), "bad_age"),
        ("hosts", (3).to_bytes(4, "little"), "bad_entry"),  # two ids for three entries
        ("hosts", (2**32 - 1).to_bytes(4, "little"), "too_many_entries"),
        ("ids_bytes", (2**32 - 1).to_bytes(4, "little"), "bad_bundle"),
        ("ids", b"h\x00h/2", "bad_id"),
        ("ids", b"h\x00\xffh", "bad_id"),
        ("ages", (1).to_bytes(8, "little") + (10**15).to_bytes(8, "little"), "bad_age"),
        ("intervals", (1000).to_bytes(4, "little") + (5).to_bytes(4, "little"), "bad_interval"),
        ("statuses", b"\x00\x02", "bad_status"),  # 2 and up: reserved
        ("seqs", (1).to_bytes(8, "little") + (2**63).to_bytes(8, "little"), "bad_seq"),
        ("child.statuses", b"", "bad_bundle"),  # truncated
        ("child.children", (1).to_bytes(4, "little"), "bad_bundle"),
    ],
)
def test_bad_v2_bundles_are_rejected_with_a_reason(field: str, raw: bytes, reason: str) -> None:
    fields = dict(v2_fields())
    fields[field] = raw
    with pytest.raises(WireError) as err:
        decode_bundle(b"".join(fields.values()))
    assert err.value.reason == reason


def test_v2_limits_on_size_entries_depth_and_decompression() -> None:
    hosts = tuple(HostEntry(f"h{i}", i, 0, 1000, LeafStatus.OK) for i in range(1001))
    many = encode_bundle(Bundle("r1", "b", 1, 1000, hosts, version=2))
    with pytest.raises(WireError) as err:
        decode_bundle(many, max_entries=1000)
    assert err.value.reason == "too_many_entries"
    assert decode_bundle(many, max_entries=1001).entry_count() == 1001
    with pytest.raises(WireError) as err:
        decode_bundle(many, max_bytes=100)
    assert err.value.reason == "too_large"
    bomb = b"\x02\x01" + zlib.compress(b"\x00" * 10_000_000, 9)  # 10 MB of zeros in ~10 kB
    with pytest.raises(WireError) as err:
        decode_bundle(bomb, max_bytes=1_000_000)
    assert err.value.reason == "too_large"
    for payload in (b"\x02\x01" + b"not zlib", b"\x02\x01" + zlib.compress(b"x")[:-2], b"\x02", b"\x02\x00"):
        with pytest.raises(WireError) as err:
            decode_bundle(payload)
        assert err.value.reason == "bad_bundle"
    child = Bundle("c", "b", 1, 1000, version=2)
    for _ in range(20):
        child = Bundle("c", "b", 1, 1000, (), (child,), version=2)
    with pytest.raises(WireError) as err:
        decode_bundle(encode_bundle(child))
    assert err.value.reason == "too_deep"


def _assert_sound_v2_bundle(bundle: Bundle, depth: int = 0) -> None:
    assert depth <= 16
    assert bundle.version == 2
    for subject in (bundle.relay, bundle.boot, *(entry.id for entry in bundle.hosts), *bundle.forgot):
        assert type(subject) is str
        assert ID_GRAMMAR.fullmatch(subject)
    assert type(bundle.seq) is int
    assert 0 <= bundle.seq < 2**63
    assert bundle.sent_ms is None or 0 <= bundle.sent_ms < 2**63
    assert 0 <= bundle.age_ms <= 366 * 86_400_000
    for entry in bundle.hosts:
        assert entry.seq is None or (type(entry.seq) is int and 0 <= entry.seq < 2**63)
        assert 0 <= entry.age_ms <= 366 * 86_400_000
        assert 10 <= entry.interval_ms <= 86_400_000
        assert entry.status in (LeafStatus.OK, LeafStatus.STOPPING)
    for child in bundle.children:
        _assert_sound_v2_bundle(child, depth + 1)


@settings(max_examples=500)
@given(hostile_v2_bundles)
def test_hostile_v2_bundles_decode_to_a_sound_bundle_or_raise_wire_error(payload: bytes) -> None:
    try:
        bundle = decode_bundle(payload)
    except WireError as err:
        shown = str(err)
    else:
        _assert_sound_v2_bundle(bundle)
        return
    assert len(shown) < 300


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_v2_decoder_returns_or_raises_wire_error_for_any_bytes(tail: bytes) -> None:
    for head in (b"\x02\x00", b"\x02\x01", b"\x02"):
        with contextlib.suppress(WireError):
            _assert_sound_v2_bundle(decode_bundle(head + tail))
