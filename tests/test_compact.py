"""Indexed deltas (relay/compact.py): golden cases both ways, round trips through the assembler and
through arbitrary bundle streams, what a receiver does without the keyframe, limits, and a fuzz.

Every decoder here is `_Both`: the list decoder and the columnar one (the monitor's) fed the same
bytes, which must read the same news or refuse with the same error."""

from __future__ import annotations

import contextlib
import random
import zlib
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaybeat.monitor.detector import Detector, Policy
from relaybeat.monitor.states import State, Transition
from relaybeat.relay.assembler import Assembler
from relaybeat.relay.compact import AGE_STEPS, FULL_EVERY, BundleDecoder, BundleEncoder, KeyframeMissing
from relaybeat.relay.wire import (
    DEFAULT_MAX_BUNDLE_BYTES,
    DEFAULT_MAX_BUNDLE_ENTRIES,
    Beat,
    Bundle,
    HostEntry,
    LeafStatus,
    WireError,
    decode_bundle,
    encode_bundle,
)
from tests.wire_inputs import (
    ID_GRAMMAR,
    INDEXED_KEYFRAME_HOSTS,
    hostile_indexed_deltas,
    hostile_table_keyframes,
    indexed_fields,
    indexed_keyframe,
    table_keyframe_fields,
)

OK, STOPPING = LeafStatus.OK, LeafStatus.STOPPING


def as_entries(bundle: Bundle) -> Bundle:
    """A columnar decoder's bundle as the list decoder reads it: the beats' entries, then the rest."""
    if bundle.beats is None:
        return bundle
    return replace(bundle, hosts=(*bundle.beats.entries(), *bundle.hosts), beats=None)


class _Both:
    """A list decoder and a columnar one fed the same bytes. `decode` returns (or raises) what the
    list one does, once it has checked that the columnar one read the same news (its beats' entries
    then its hosts are the list one's hosts, in order; all else equal), or raised the same error."""

    def __init__(self) -> None:
        self.list, self.columnar = BundleDecoder(), BundleDecoder(columnar=True)

    def decode(
        self,
        payload: bytes,
        max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
        max_entries: int = DEFAULT_MAX_BUNDLE_ENTRIES,
        relay: str | None = None,
    ) -> Bundle:
        expected, read = (_outcome(d, payload, max_bytes, max_entries, relay) for d in (self.list, self.columnar))
        if isinstance(expected, WireError):
            assert isinstance(read, WireError)
            assert (type(read), read.reason, str(read)) == (type(expected), expected.reason, str(expected))
            if isinstance(expected, KeyframeMissing):
                assert isinstance(read, KeyframeMissing)
                assert read.header == expected.header
            raise expected
        assert isinstance(read, Bundle)
        assert expected.beats is None
        assert as_entries(read) == expected
        if read.beats is not None:
            assert read.entry_count() == expected.entry_count()
            beats = read.beats
            assert [column.dtype.name for column in (beats.index, beats.seq, beats.age_ms, beats.interval_ms)] == [
                "int64"
            ] * 4
            assert beats.status.dtype.name == "uint8"
            assert all(len(column) == len(beats) for column in (beats.seq, beats.age_ms, beats.interval_ms))
        return expected


def _outcome(
    decoder: BundleDecoder, payload: bytes, max_bytes: int, max_entries: int, relay: str | None
) -> Bundle | WireError:
    try:
        return decoder.decode(payload, max_bytes, max_entries, relay)
    except WireError as err:
        return err


KEYFRAME = Bundle(
    "evil",
    "b1",
    3,
    1000,
    tuple(HostEntry(host, seq, age, interval, OK) for host, seq, age, interval, _ in INDEXED_KEYFRAME_HOSTS),
    version=2,
    sent_ms=5000,
)
CHILD = Bundle("c1", "b1", 3, 1000, (HostEntry("ch", 1, 5, 1000, OK),), age_ms=9, version=2, sent_ms=5000)
# What the relay assembled (in the order its beats arrived), and what the monitor reads back: the
# same entries in table order, h1's age rounded up to the next 1000/255 ms step (500 → 501).
DELTA_SENT = Bundle(
    "evil",
    "b1",
    4,
    1000,
    (
        HostEntry("n1", None, 7, 2000, STOPPING),
        HostEntry("h3", 2, 0, 1000, OK),
        HostEntry("h5", 7, 20, 1000, OK),
        HostEntry("h1", 2, 500, 1000, OK),
    ),
    (CHILD,),
    version=2,
    keyframe=False,
    forgot=("old", "h9"),
    sent_ms=6000,
)
DELTA_READ = replace(
    DELTA_SENT,
    hosts=(
        HostEntry("h1", 2, 501, 1000, OK),
        HostEntry("h3", 2, 0, 1000, OK),
        HostEntry("h5", 7, 20, 1000, OK),
        HostEntry("n1", None, 7, 2000, STOPPING),
    ),
    forgot=("h9", "old"),
)


def _primed() -> _Both:
    decoder = _Both()
    assert decoder.decode(indexed_keyframe()) == KEYFRAME
    return decoder


def test_golden_indexed_delta_both_ways() -> None:
    """tests/wire_inputs.py writes the delta by the README's layout, with a writer of its own."""
    payload = b"".join(raw for _, raw in indexed_fields())
    encoder = BundleEncoder()
    assert encoder.encode(KEYFRAME) == indexed_keyframe() == encode_bundle(KEYFRAME)
    assert encoder.encode(DELTA_SENT) == payload
    assert _primed().decode(payload) == DELTA_READ


def test_golden_indexed_delta_of_a_relay_before_growing_tables_reads_the_same_and_leaves_the_table() -> None:
    """Kind 2 (relays before kind 6): the same delta, but n1 does not join the table, so the next
    delta refers to a table of ten ids, and one that counts eleven is not ours."""
    legacy = b"".join(raw for _, raw in indexed_fields(kind=2))
    decoder = _primed()
    assert decoder.decode(legacy) == DELTA_READ
    after = {"seq": b"\x05", "sent_ms": b"\xf0\x3a", "heard": b"\x00\x00", "ages": b"", "changed": b"\x00",
             "changes": b"", "new": b"\x00", "news": b"", "forgot": b"\x00", "forgotten": b"", "forgot_new": b"\x00",
             "forgotten_new": b"", "children": b"\x00"}  # fmt: skip
    fields = [(name, after.get(name, raw)) for name, raw in indexed_fields(kind=2) if not name.startswith("child.")]
    quiet = b"".join(raw for _, raw in fields)
    assert decoder.decode(quiet).hosts == ()
    grown = _primed()
    grown.decode(b"".join(raw for _, raw in indexed_fields()))
    with pytest.raises(KeyframeMissing):  # this decoder's table has n1 at index 10: eleven ids
        grown.decode(quiet)


def test_a_leaf_sent_by_id_joins_the_table_and_beats_by_index_after() -> None:
    encoder, decoder = BundleEncoder(), _Both()
    decoder.decode(encoder.encode(KEYFRAME))
    decoder.decode(encoder.encode(DELTA_SENT))
    beat = Bundle("evil", "b1", 5, 1000, (HostEntry("n1", None, 3, 2000, STOPPING),), version=2, keyframe=False,
                  sent_ms=7000)  # fmt: skip
    payload = encoder.encode(beat)
    assert b"n1" not in payload  # ordinary now: a bit of index 10 and an age byte
    assert decoder.decode(payload).hosts == (HostEntry("n1", None, 3, 2000, STOPPING),)
    again = replace(beat, seq=6, hosts=(HostEntry("n1", None, 4, 2000, STOPPING),), forgot=("n1",), sent_ms=8000)
    _same_news(decoder.decode(encoder.encode(again)), again)
    back = replace(beat, seq=7, hosts=(HostEntry("n1", 1, 0, 2000, OK),), sent_ms=9000)  # forgotten, then back
    assert decoder.decode(encoder.encode(back)).hosts == back.hosts


def test_a_leaf_sent_by_id_that_the_table_holds_is_refused_before_the_table_moves() -> None:
    decoder = _primed()
    with pytest.raises(WireError) as err:
        decoder.decode(_fields(news=b"\x02h2" + b"\x00\x07\xd0\x0f\x01"))
    assert err.value.reason == "bad_entry"
    assert decoder.decode(_fields()) == DELTA_READ


def test_leaves_that_appear_after_the_keyframe_cost_their_id_once() -> None:
    """A relay's keyframe before its leaves connect (it starts first): each leaf's first beat goes
    by id, its next ones cost a bit and an age byte, as if the keyframe had listed it."""
    encoder, decoder = BundleEncoder(), _Both()
    decoder.decode(encoder.encode(Bundle("relay-1", "3f9c2a71b0d4", 1, 1000, (), version=2, sent_ms=0)))
    sizes = []
    for seq in range(2, 12):
        heard = tuple(HostEntry(f"h{i:06d}", seq // 5, (i * 37) % 1000, 5000, OK) for i in range(seq % 5, 1000, 5))
        delta = Bundle("relay-1", "3f9c2a71b0d4", seq, 1000, heard, version=2, keyframe=False, sent_ms=1000 * seq)
        payload = encoder.encode(delta)
        _same_news(decoder.decode(payload), delta)
        sizes.append(len(payload))
    assert max(sizes[5:]) < 125 + 200 + 60  # by index: a bitmap of 1,000 (or runs), an age byte each
    assert min(sizes[:5]) > 2 * max(sizes[5:])  # the first beat of each: its id and fields (compressed)


# A keyframe by table after KEYFRAME (tests/wire_inputs.py writes it by the README's layout).
TABLE_KEYFRAME_SENT = replace(
    KEYFRAME,
    seq=4,
    sent_ms=6000,
    hosts=(
        HostEntry("n2", None, 5, 1000, OK),
        HostEntry("h5", 1, 0, 2000, OK),
        HostEntry("h2", 1, 3000, 1000, OK),
        HostEntry("h1", 2, 20, 1000, OK),
        HostEntry("h0", 1, 1000, 1000, OK),
    ),
)
TABLE_KEYFRAME_READ = replace(
    TABLE_KEYFRAME_SENT,
    hosts=(
        HostEntry("h0", 1, 1000, 1000, OK),
        HostEntry("h1", 2, 23, 1000, OK),  # 20 ms: code 6, read as 23 ms
        HostEntry("h2", 1, 3000, 1000, OK),
        HostEntry("h5", 1, 0, 2000, OK),
        HostEntry("n2", None, 5, 1000, OK),
    ),
)


def test_golden_keyframe_by_table_both_ways() -> None:
    payload = b"".join(raw for _, raw in table_keyframe_fields())
    encoder = BundleEncoder()
    encoder.encode(KEYFRAME)
    assert encoder.encode(TABLE_KEYFRAME_SENT) == payload
    decoder = _primed()
    assert decoder.decode(payload) == TABLE_KEYFRAME_READ
    # After it the table is its picture: h3 is gone (a beat of it is a change), n2 has index 10.
    delta = Bundle("evil", "b1", 5, 1000, (HostEntry("h3", 2, 0, 1000, OK), HostEntry("n2", None, 4, 1000, OK)),
                   version=2, keyframe=False, sent_ms=7000)  # fmt: skip
    sent = encoder.encode(delta)
    assert b"n2" not in sent
    assert b"h3" not in sent
    assert decoder.decode(sent).hosts == (HostEntry("n2", None, 7, 1000, OK), HostEntry("h3", 2, 0, 1000, OK))


def test_a_keyframe_by_table_without_the_table_is_keyframe_missing_and_the_answer_carries_ids() -> None:
    """A receiver that lacks the table (it restarted, or missed a bundle) cannot read a keyframe by
    table: it keeps the relay alive on the header (a delta's: no picture) and asks; the relay's
    answer (`send_ids`, on the request) is a keyframe with every id, which it can read."""
    encoder = BundleEncoder()
    encoder.encode(KEYFRAME)
    by_table = encoder.encode(TABLE_KEYFRAME_SENT)
    with pytest.raises(KeyframeMissing) as lost:
        _Both().decode(by_table)
    assert lost.value.header == Bundle("evil", "b1", 4, 1000, version=2, keyframe=False, sent_ms=6000)
    encoder.send_ids()
    full = encoder.encode(replace(TABLE_KEYFRAME_SENT, seq=5, sent_ms=7000))
    assert decode_bundle(full).keyframe  # version 2's own keyframe node: relay/wire.py refuses indexed ones
    _same_news(_Both().decode(full), replace(TABLE_KEYFRAME_SENT, seq=5, sent_ms=7000))


def test_every_tenth_keyframe_carries_ids_and_a_gap_in_seqs_makes_the_next_one_carry_them() -> None:
    hosts = tuple(HostEntry(f"h{i}", 1, 0, 1000, OK) for i in range(50))
    encoder, decoder = BundleEncoder(), _Both()
    kinds = []
    for seq in range(1, 2 * FULL_EVERY + 2):
        payload = encoder.encode(Bundle("r", "b", seq, 1000, hosts, version=2, sent_ms=1000 * seq))
        _same_news(decoder.decode(payload), Bundle("r", "b", seq, 1000, hosts, version=2, sent_ms=1000 * seq))
        kinds.append(_kind(payload))
    assert kinds == ([1] + [7] * (FULL_EVERY - 1)) * 2 + [1]
    gap = encoder.encode(Bundle("r", "b", 30, 1000, hosts, version=2, sent_ms=30_000))  # seq 22 to 29 unsent
    assert decode_bundle(gap).keyframe  # its own ids: nobody could hold the table it would refer to


def _kind(payload: bytes) -> int:
    return (zlib.decompress(payload[2:]) if payload[1] else payload[2:])[0]


def test_a_keyframe_carries_ids_again_once_the_deltas_cost_more_than_the_ids_would() -> None:
    """Leaves that drift out of phase order make the deltas' age bytes noisy: once the deltas since
    the last keyframe cost more than those after the last keyframe with ids, by more than the ids
    cost, the next keyframe carries the ids again (in fresh phase order)."""
    rnd = random.Random(7)
    encoder, decoder = BundleEncoder(), _Both()

    def send(seq: int, ages: list[int], keyframe: bool) -> int:
        hosts = tuple(HostEntry(f"h{i:04d}", seq, age, 1000, OK) for i, age in enumerate(ages))
        bundle = Bundle("r", "b", seq, 1000, hosts, version=2, keyframe=keyframe, sent_ms=1000 * seq)
        payload = encoder.encode(bundle)
        _same_news(decoder.decode(payload), bundle)
        return _kind(payload)

    in_phase = [999 - i * 2 for i in range(500)]  # leaf i beat 2i ms after leaf 0: ages fall in index order
    kinds = [send(1, in_phase, keyframe=True)]
    kinds += [send(seq, in_phase, keyframe=False) for seq in range(2, 11)]
    kinds.append(send(11, in_phase, keyframe=True))
    kinds += [send(seq, [rnd.randrange(1000) for _ in range(500)], keyframe=False) for seq in range(12, 21)]
    kinds.append(send(21, in_phase, keyframe=True))
    assert kinds[0::10] == [1, 7, 1]  # with ids, by table, with ids again


def test_a_keyframe_by_table_costs_a_fraction_of_one_with_ids() -> None:
    """1,000 leaves, ids as the benchmarks name them, heard in phase order at 5 s: the keyframe by
    table lists them as one run, a step bit and about a byte of age difference each."""
    phase = {i: (i * 7919) % 5000 for i in range(1000)}

    def picture(seq: int) -> Bundle:
        hosts = tuple(
            HostEntry(f"h{i * 5:06d}", seq // 5, (1000 * seq - phase[i]) % 5000, 5000, OK) for i in range(1000)
        )
        return Bundle("r00", "3f9c2a71b0d4", seq, 1000, hosts, version=2, sent_ms=1000 * seq)

    encoder, decoder = BundleEncoder(), _Both()
    full = encoder.encode(picture(30))
    by_table = encoder.encode(picture(31))
    _same_news(decoder.decode(full), picture(30))
    _same_news(decoder.decode(by_table), picture(31))
    assert len(by_table) * 3 < len(full)


def test_the_smallest_of_bitmap_index_list_and_runs_is_chosen_per_bundle() -> None:
    hosts = tuple(HostEntry(f"h{i}", 1, 0, 1000, OK) for i in range(800))
    keyframe = Bundle("r", "b", 1, 1000, hosts, version=2, sent_ms=0)
    one = Bundle("r", "b", 2, 1000, (HostEntry("h700", 2, 3, 1000, OK),), version=2, keyframe=False, sent_ms=1000)
    many = replace(one, seq=3, hosts=tuple(HostEntry(f"h{i}", 2, 3, 1000, OK) for i in range(0, 800, 2)))
    encoder, decoder = BundleEncoder(), _Both()
    decoder.decode(encoder.encode(keyframe))
    sparse, dense = encoder.encode(one), encoder.encode(many)
    assert len(sparse) < 40  # a list of one index
    assert len(dense) < 100 + 400 + 40  # a bitmap of 800 bits and one age byte each
    assert decoder.decode(sparse).hosts == (HostEntry("h700", 2, 3, 1000, OK),)
    read = decoder.decode(dense).hosts  # h700 repeats its seq: an exception, after the ordinary ones
    assert [entry.id for entry in read] == [f"h{i}" for i in range(0, 800, 2) if i != 700] + ["h700"]
    following = tuple(HostEntry(f"h{i}", 3 - i % 2, 3, 1000, OK) for i in range(300, 500))
    run = replace(one, seq=4, hosts=following)
    runs = encoder.encode(run)
    body = zlib.decompress(runs[2:]) if runs[1] else runs[2:]
    assert body[13] == 2  # the heard form, after kind, relay, boot, seq, flush_ms, sent_ms, keyframe, table: runs
    assert len(runs) < 40  # one run of 200 indices, and 200 age differences of 0, compressed
    assert decoder.decode(runs) == run


def test_an_ordinary_beat_costs_about_two_bytes() -> None:
    """1,000 leaves, one in five heard per flush (interval 5 s, flush 1 s): a bitmap bit and an age byte."""
    hosts = tuple(HostEntry(f"host-{i:05d}", 1, 0, 5000, OK) for i in range(1000))
    encoder = BundleEncoder()
    encoder.encode(Bundle("relay-1", "3f9c2a71b0d4", 1, 1000, hosts, version=2, sent_ms=0))
    heard = tuple(HostEntry(f"host-{i:05d}", 2, (i * 37) % 1000, 5000, OK) for i in range(0, 1000, 5))
    delta = encoder.encode(Bundle("relay-1", "3f9c2a71b0d4", 2, 1000, heard, version=2, keyframe=False, sent_ms=1000))
    assert len(delta) <= 125 + 200 + 45


# ------------------------------------------------------------------------------- round trips


def _same_news(read: Bundle, sent: Bundle) -> None:
    """`read` says what `sent` said: the same entries (in table order, not arrival order), ages never
    younger than sent and less than one step (flush_ms / 255) older."""
    assert replace(read, hosts=(), forgot=()) == replace(sent, hosts=(), forgot=())
    assert sorted(read.forgot) == sorted(sent.forgot)
    sent_by_id = {entry.id: entry for entry in sent.hosts}
    assert sorted(sent_by_id) == sorted(entry.id for entry in read.hosts)
    for entry in read.hosts:
        original = sent_by_id[entry.id]
        assert entry._replace(age_ms=0) == original._replace(age_ms=0)
        assert 0 <= (entry.age_ms - original.age_ms) * AGE_STEPS < sent.flush_ms


hosts_pool = st.sampled_from([f"h{i}" for i in range(12)])
steps = st.lists(
    st.one_of(
        st.tuples(st.just("beat"), hosts_pool, st.sampled_from([None, 0, 1, 1, 1, 5]), st.sampled_from([1.0, 2.0])),
        st.tuples(st.just("stop"), hosts_pool),
        st.tuples(st.just("wait"), st.floats(0.01, 3.0)),
        st.tuples(st.just("flush")),
        st.tuples(st.just("keyframe")),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(steps)
def test_what_the_assembler_makes_is_what_the_monitor_reads(script: list[tuple[object, ...]]) -> None:
    """Random beats (seq + 1, jumps, none, new intervals, stopping), silences long enough to be
    forgotten, flushes and keyframes on request: every bundle reads back as assembled."""
    asm = Assembler("r1", "b", 0.5, 1.0, forget_after_s=2.0, keyframe_s=5.0, version=2)
    encoder, decoder = BundleEncoder(), _Both()
    now, seqs = 0.0, dict.fromkeys([f"h{i}" for i in range(12)], 0)
    for step in script:
        if step[0] == "beat":
            _, host, jump, interval = step
            assert isinstance(host, str)
            assert isinstance(interval, float)
            seqs[host] += 0 if jump is None else int(jump)  # type: ignore[call-overload]
            asm.add_beat(host, Beat(None if jump is None else seqs[host], interval), now)
        elif step[0] == "stop":
            asm.add_beat(str(step[1]), Beat(seqs[str(step[1])] + 1, status=STOPPING), now)
        elif step[0] == "wait":
            now += float(step[1])  # type: ignore[arg-type]
        else:
            if step[0] == "keyframe":
                asm.request_keyframe()
            bundle = asm.flush(now)
            _same_news(decoder.decode(encoder.encode(bundle), relay="r1"), bundle)


entries = st.builds(
    HostEntry,
    hosts_pool,
    st.none() | st.integers(0, 2**63 - 1) | st.integers(0, 4),
    st.integers(0, 366 * 86_400_000) | st.integers(0, 2000),
    st.sampled_from([10, 1000, 86_400_000]),
    st.sampled_from(LeafStatus),
)
news = st.tuples(
    st.booleans(),
    st.lists(entries, max_size=8, unique_by=lambda entry: entry.id),
    st.lists(hosts_pool | st.sampled_from(["x1", "x2"]), max_size=3, unique=True),
    st.sampled_from([10, 1000, 3600_000]),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(news, max_size=8), st.integers(0, 2**63 - 100), st.integers(1, 4))
def test_any_stream_of_keyframes_and_deltas_reads_back(
    stream: list[tuple[object, ...]], first_seq: int, full_every: int
) -> None:
    """Beyond what an assembler makes: any entries (huge seqs, ages above the flush, a host both
    heard and forgotten), flush changes mid-stream, deltas before any keyframe, keyframes by table
    and with ids in any mix."""
    encoder, decoder = BundleEncoder(full_every), _Both()
    for n, (keyframe, hosts, forgot, flush_ms) in enumerate(stream):
        bundle = Bundle(
            "r1",
            "b",
            first_seq + n,
            flush_ms,  # type: ignore[arg-type]
            tuple(hosts),  # type: ignore[arg-type]
            version=2,
            keyframe=bool(keyframe),
            forgot=() if keyframe else tuple(forgot),  # type: ignore[arg-type]
            sent_ms=1000 * n,
        )
        _same_news(decoder.decode(encoder.encode(bundle)), bundle)


# --------------------------------------------------------------------- without the keyframe


def _stream() -> tuple[BundleEncoder, list[bytes]]:
    """A relay's keyframe (seq 1) and four deltas in which h1 beats, h2 stays quiet."""
    encoder = BundleEncoder()
    hosts = (HostEntry("h1", 1, 0, 1000, OK), HostEntry("h2", 1, 0, 1000, OK))
    payloads = [encoder.encode(Bundle("r1", "b", 1, 1000, hosts, version=2, sent_ms=0))]
    for seq in range(2, 6):
        beat = HostEntry("h1", seq, 100, 1000, OK)
        payloads.append(
            encoder.encode(Bundle("r1", "b", seq, 1000, (beat,), version=2, keyframe=False, sent_ms=1000 * seq))
        )
    return encoder, payloads


def test_a_delta_without_its_keyframe_raises_keyframe_missing_with_the_bundle_header() -> None:
    _, payloads = _stream()
    with pytest.raises(KeyframeMissing) as lost:  # a restarted receiver: no table at all
        _Both().decode(payloads[2])
    assert lost.value.reason == "need_keyframe"
    assert lost.value.header == Bundle("r1", "b", 3, 1000, version=2, keyframe=False, sent_ms=3000)
    decoder = _Both()
    decoder.decode(payloads[0])
    decoder.decode(payloads[1])
    with pytest.raises(KeyframeMissing):  # a missed delta: a seq gap
        decoder.decode(payloads[3])
    with pytest.raises(KeyframeMissing):  # and every delta after it, until a keyframe
        decoder.decode(payloads[4])
    with pytest.raises(WireError) as stale:  # a repeat: not news, and the table stays
        decoder.decode(payloads[1])
    assert stale.value.reason == "stale_bundle"
    decoder.decode(payloads[0])  # a repeated keyframe does not reset the table either
    with pytest.raises(KeyframeMissing):
        decoder.decode(payloads[3])


def test_a_new_boot_needs_its_own_keyframe() -> None:
    _, payloads = _stream()
    decoder = _Both()
    decoder.decode(payloads[0])
    other = BundleEncoder()
    other.encode(Bundle("r1", "b2", 1, 1000, (HostEntry("h1", 1, 0, 1000, OK),), version=2, sent_ms=0))
    delta = other.encode(Bundle("r1", "b2", 2, 1000, version=2, keyframe=False, sent_ms=1000))
    with pytest.raises(KeyframeMissing):
        decoder.decode(delta)


def test_a_bundle_of_another_relay_than_its_topic_moves_no_state() -> None:
    _, payloads = _stream()
    decoder = _Both()
    for payload in payloads[:2]:
        with pytest.raises(WireError) as err:
            decoder.decode(payload, relay="r2")
        assert err.value.reason == "relay_mismatch"
    with pytest.raises(KeyframeMissing):
        decoder.decode(payloads[1], relay="r1")


def test_the_monitor_keeps_an_unreadable_relay_alive_waits_for_its_keyframe_and_asks_for_one() -> None:
    """A monitor that missed a delta (or restarted) reads the relay's next deltas as headers only:
    the relay stays up, h2 (silent since the keyframe, timeout 3 s) is not judged while we cannot
    know, a keyframe is asked for; the keyframe resyncs, and h2 is down from its own evidence."""
    encoder, payloads = _stream()
    detector, decoder = Detector(Policy(misses=3), 0.0), _Both()
    detector.observe(decoder.decode(payloads[0]), 1.0)
    detector.observe(decoder.decode(payloads[1]), 2.0)
    for n, payload in enumerate(payloads[3:], start=4):  # payloads[2] was lost
        with pytest.raises(KeyframeMissing) as lost:
            decoder.decode(payload)
        assert detector.expire(float(n)) + detector.lost_track(lost.value.header, float(n)) == []
        assert detector.relays["r1"].desynced
        assert detector.relays["r1"].state == State.UP
    assert detector.take_resync_requests() == ["r1"]
    hosts = (HostEntry("h1", 6, 0, 1000, OK), HostEntry("h2", 1, 5000, 1000, OK))
    encoder.send_ids()  # the relay's answer to the request: a keyframe with its ids, not one by table
    keyframe = encoder.encode(Bundle("r1", "b", 6, 1000, hosts, version=2, sent_ms=6000))
    out = detector.observe(decoder.decode(keyframe), 6.0)
    assert [(t.subject, t.to_state, t.at) for t in out] == [("h2", State.DOWN, 4.0)]
    assert not detector.relays["r1"].desynced


def test_a_parent_that_cannot_read_its_childs_delta_asks_it_for_a_keyframe() -> None:
    _, payloads = _stream()
    parent = Assembler("p", "pb", 1.0, 5.0, keyframe_s=30.0, version=2)
    with pytest.raises(KeyframeMissing) as lost:
        _Both().decode(payloads[1])
    parent.lose_child(lost.value.header, 1.0)
    assert parent.wanted_keyframes == ["r1"]
    assert parent.flush(1.0).children == ()  # nothing of it in our keyframe until its own arrives
    assert parent.add_child(decode_bundle(payloads[0]), 1.5) is False  # older than what it said
    keyframe = BundleEncoder().encode(Bundle("r1", "b", 9, 1000, (), version=2, sent_ms=9000))
    assert parent.add_child(_Both().decode(keyframe), 2.0)
    assert parent.wanted_keyframes == []


# ---------------------------------------------------------------------------------- limits


def _fields(**replaced: bytes) -> bytes:
    fields = dict(indexed_fields())
    fields.update(replaced)
    return b"".join(fields.values())


@pytest.mark.parametrize(
    ("field", "raw", "reason"),
    [
        ("kind", b"\x03", "bad_bundle"),  # an indexed keyframe does not exist
        ("kind", b"\x0e", "bad_bundle"),
        ("kind", b"\x07", "bad_bundle"),
        ("relay", b"\x03e/l", "bad_id"),
        ("boot", b"\x00", "bad_boot"),
        ("seq", b"\xff" * 9 + b"\x7f", "bad_seq"),
        ("seq", b"\x80" * 12, "bad_bundle"),  # over-long varint
        ("flush_ms", b"\x05", "bad_interval"),
        ("table", b"\x0b", "need_keyframe"),  # not the table this decoder holds
        ("table", b"\xc1\x9a\x0c", "too_many_entries"),
        ("heard_form", b"\x02", "bad_bundle"),
        ("heard", bytes([0b1010, 0b100]), "bad_bundle"),  # a bit past the table's ten
        ("changes", b"\x0a\x08\x14\xe8\x07\x00", "bad_entry"),  # index 10 of ten
        ("changes", b"\x05\x08\x14\x05\x00", "bad_interval"),
        ("changes", b"\x05\x08\x14\xe8\x07\x02", "bad_status"),
        ("changes", b"\x01\x08\x14\xe8\x07\x00", "bad_entry"),  # h1 twice
        ("news", b"\x02n/" + b"\x00\x07\xd0\x0f\x01", "bad_id"),
        ("new", b"\x7f", "bad_bundle"),  # more than the bytes left could hold
        ("forgotten", b"\x0a", "bad_entry"),
        ("forgot_new", b"\x7f", "bad_bundle"),
        ("children", b"\x02", "bad_bundle"),
        ("child.kind", b"\x02", "bad_bundle"),  # only the top node is indexed
    ],
)
def test_bad_indexed_deltas_are_rejected_with_a_reason_and_leave_the_table_as_it_was(
    field: str, raw: bytes, reason: str
) -> None:
    decoder = _primed()
    with pytest.raises(WireError) as err:
        decoder.decode(_fields(**{field: raw}))
    assert err.value.reason == reason, str(err.value)
    assert decoder.decode(_fields()) == DELTA_READ


def test_of_two_beats_that_cannot_follow_their_table_the_first_is_named() -> None:
    """h3 and h7 hold the largest seq: a delta hearing both is refused for h3, in either mode."""
    top = 2**63 - 1
    hosts = tuple(entry._replace(seq=top) if entry.id in ("h3", "h7") else entry for entry in KEYFRAME.hosts)
    decoder = _Both()
    decoder.decode(encode_bundle(replace(KEYFRAME, hosts=hosts)))
    with pytest.raises(WireError) as err:
        decoder.decode(_fields(heard=bytes([0b10001010, 0]), ages=b"\x01\x01\x01"))
    assert (err.value.reason, str(err.value)) == ("bad_seq", f"bad_seq: index 3 cannot follow seq {top}")


@pytest.mark.parametrize(
    ("form", "heard", "reason"),
    [
        (b"\x01", b"\x02\x01\x01", None),  # an index list: h1, h3
        (b"\x01", b"\x02\x81\x80\x80\x80\x80\x80\x80\x80\x00\x01", None),  # the same, h1's gap in 9 bytes
        (b"\x02", b"\x02\x01\x00\x01\x00", None),  # runs: h1, h3
        (b"\x01", b"\x02\x01\x08", "bad_entry"),  # index 11 of ten
        (b"\x01", b"\x02\x01\x0b", "bad_bundle"),  # a gap above the table's size
        (b"\x02", b"\x01\x08\x03", "bad_entry"),  # a run of 8 to 11
        (b"\x02", b"\x01\x01\x0a", "bad_bundle"),  # a run longer than the table
        (b"\x02", b"\x02\x01\x00\x01", "bad_bundle"),  # cut off
    ],
)
def test_the_heard_forms_read_the_same_in_both_modes(form: bytes, heard: bytes, reason: str | None) -> None:
    decoder = _primed()
    if reason is None:
        assert decoder.decode(_fields(heard_form=form, heard=heard)) == DELTA_READ
        return
    with pytest.raises(WireError) as err:
        decoder.decode(_fields(heard_form=form, heard=heard))
    assert err.value.reason == reason


def test_indexed_limits_on_size_and_entries() -> None:
    decoder = _primed()
    payload = _fields()
    for max_bytes, max_entries, reason in ((len(payload) - 1, 1000, "too_large"), (1 << 20, 6, "too_many_entries")):
        with pytest.raises(WireError) as err:
            decoder.decode(payload, max_bytes=max_bytes, max_entries=max_entries)
        assert err.value.reason == reason
    assert decoder.decode(payload, max_entries=10) == DELTA_READ


def test_a_compressed_indexed_delta_reads_back() -> None:
    hosts = tuple(HostEntry(f"h{i}", 1, 0, 1000, OK) for i in range(4000))
    encoder, decoder = BundleEncoder(), _Both()
    decoder.decode(encoder.encode(Bundle("r", "b", 1, 1000, hosts, version=2, sent_ms=0)))
    heard = tuple(HostEntry(f"h{i}", 2, 0, 1000, OK) for i in range(4000))  # ages all 0: compresses
    delta = Bundle("r", "b", 2, 1000, heard, version=2, keyframe=False, sent_ms=1000)
    payload = encoder.encode(delta)
    assert payload[1] == 1
    assert decoder.decode(payload) == delta


# ------------------------------------------------------------------------------------ fuzz


def _assert_sound(bundle: Bundle) -> None:
    for subject in (bundle.relay, bundle.boot, *(entry.id for entry in bundle.hosts), *bundle.forgot):
        assert ID_GRAMMAR.fullmatch(subject)
    assert 0 <= bundle.seq < 2**63
    for entry in bundle.hosts:
        assert entry.seq is None or 0 <= entry.seq < 2**63
        assert 0 <= entry.age_ms <= 366 * 86_400_000
        assert 10 <= entry.interval_ms <= 86_400_000
        assert entry.status in (OK, STOPPING)
    assert len({entry.id for entry in bundle.hosts}) == len(bundle.hosts)


@settings(max_examples=1000, deadline=None)
@given(hostile_indexed_deltas | hostile_table_keyframes)
def test_hostile_indexed_nodes_decode_to_a_sound_bundle_or_raise_wire_error(payload: bytes) -> None:
    """Deltas and keyframes by table, one to three fields hostile, truncated or (claiming to be)
    compressed."""
    decoder = _primed()
    try:
        _assert_sound(decoder.decode(payload))
    except WireError as err:
        shown = str(err)
    else:
        return
    assert len(shown) < 300
    assert decoder.decode(_fields()) == DELTA_READ  # the table held is as it was


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_indexed_decoder_returns_or_raises_wire_error_for_any_bytes(tail: bytes) -> None:
    decoder = _primed()
    for head in (
        b"\x02\x00\x02",
        b"\x02\x00\x06\x04evil\x02b1\x04\xe8\x07",
        b"\x02\x00\x07\x04evil\x02b1\x04\xe8\x07\xf0\x2e\x03\x0a",
        b"\x02\x01",
    ):
        with contextlib.suppress(WireError):
            _assert_sound(decoder.decode(head + tail))


def test_a_relay_tree_on_indexed_deltas_keeps_the_childs_hosts_up_across_a_parent_that_lost_its_tables() -> None:
    """child relay → (indexed) → parent relay → (indexed) → monitor, all on one fake clock. The parent
    loses its decoder's tables (it restarted its receive side): it asks the child for a keyframe,
    and the child's host, beating all along, never goes down."""
    child = Assembler("r2", "c", 1.0, 1.0, keyframe_s=30.0, version=2)
    parent = Assembler("r1", "p", 1.0, 1.0, keyframe_s=30.0, version=2)
    to_parent, to_monitor = BundleEncoder(), BundleEncoder()
    at_parent, at_monitor = _Both(), _Both()
    detector = Detector(Policy(misses=3), 0.0)
    out: list[Transition] = []
    unreadable: list[int] = []
    for tick in range(1, 40):
        now = float(tick)
        child.add_beat("h1", Beat(seq=tick, interval_s=1.0), now - 0.5)
        if tick == 10:
            at_parent = _Both()
        try:
            parent.add_child(at_parent.decode(to_parent.encode(child.flush(now)), relay="r2"), now)
        except KeyframeMissing as lost:
            parent.lose_child(lost.header, now)
            unreadable.append(tick)
        if parent.wanted_keyframes == ["r2"]:
            child.request_keyframe()  # the parent's request on its local broker, as the child's service answers it
            to_parent.send_ids()
        out += detector.expire(now) + detector.observe(at_monitor.decode(to_monitor.encode(parent.flush(now))), now)
        for relay in detector.take_resync_requests():
            assert relay == "r1"
            parent.request_keyframe()
    assert [(t.subject, t.to_state) for t in out] == [("r1", State.UP), ("r2", State.UP), ("h1", State.UP)]
    assert detector.hosts["h1"].seq == 39
    assert unreadable == [10]  # and the child's keyframe at 11 resynced the parent


# ----------------------------------------------------------------------------- columnar mode


def test_a_columnar_decoder_hands_out_one_ids_tuple_per_table_until_it_changes() -> None:
    """`Beats.ids` is the table: the same tuple object across the deltas of one table (a receiver
    keys its caches on it), a new one once the table grows or a keyframe with ids replaces it."""
    hosts = tuple(HostEntry(f"h{i}", 1, 0, 1000, OK) for i in range(10))
    encoder, decoder = BundleEncoder(), BundleDecoder(columnar=True)

    def send(seq: int, heard: tuple[HostEntry, ...], keyframe: bool = False) -> Bundle:
        bundle = Bundle("r", "b", seq, 1000, heard, version=2, keyframe=keyframe, sent_ms=1000 * seq)
        return decoder.decode(encoder.encode(bundle))

    assert send(1, hosts, keyframe=True).beats is None  # a keyframe with ids: entries, as ever
    first = send(2, tuple(entry._replace(seq=2) for entry in hosts[:5])).beats
    second = send(3, tuple(entry._replace(seq=2) for entry in hosts[5:])).beats
    assert first is not None
    assert second is not None
    assert first.ids == tuple(f"h{i}" for i in range(10))
    assert second.ids is first.ids
    assert first.index.tolist() == [0, 1, 2, 3, 4]
    assert second.index.tolist() == [5, 6, 7, 8, 9]
    assert second.seq.tolist() == [2] * 5
    grows = send(4, (HostEntry("h0", 3, 0, 1000, OK), HostEntry("n1", None, 0, 1000, OK)))
    assert grows.beats is not None
    assert grows.beats.ids is first.ids  # the delta that grows the table still refers to the old one
    assert [entry.id for entry in grows.hosts] == ["n1"]  # by id: an exception
    grown = send(5, (HostEntry("n1", None, 0, 1000, OK),)).beats
    assert grown is not None
    assert grown.ids is not first.ids
    assert grown.ids == (*first.ids, "n1")
    assert grown.index.tolist() == [10]
    assert grown.seq.tolist() == [-1]  # none, then and now
    by_table = send(6, (*(entry._replace(seq=3) for entry in hosts), HostEntry("n1", None, 0, 1000, OK)), True)
    assert by_table.keyframe
    assert by_table.beats is not None
    assert by_table.beats.ids is grown.ids  # a keyframe by table leaves the ids as they were
    encoder.send_ids()
    assert send(7, tuple(entry._replace(seq=4) for entry in hosts), keyframe=True).beats is None
    fresh = send(8, (HostEntry("h1", 5, 0, 1000, OK),)).beats
    assert fresh is not None
    assert fresh.ids is not grown.ids


def test_a_columnar_decoder_reads_version_1_and_plain_version_2_as_entries() -> None:
    decoder = BundleDecoder(columnar=True)
    v1 = Bundle("r", "b", 1, 1000, (HostEntry("h1", 1, 0, 1000, OK),))
    assert decoder.decode(encode_bundle(v1)) == v1
    plain = replace(v1, seq=2, version=2, keyframe=False, sent_ms=None)  # no send time: no indexed delta
    assert decoder.decode(BundleEncoder().encode(plain)) == plain


LEAVES = [f"leaf-{i:03d}" for i in range(1000)]


@st.composite
def _mutated_streams(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
    """A relay of 1,000 leaves (a keyframe with ids, sometimes one id twice), one to three deltas or
    keyframes by table with a run, stripes (many runs), scattered beats, changes, new and forgotten
    leaves, and the last of them with a few bytes set, inserted or cut out of its node."""
    rnd = random.Random(draw(st.integers(0, 2**32)))  # the many small choices (Hypothesis draws the shape)
    ids = list(LEAVES)
    if draw(st.booleans()):
        ids[draw(st.integers(0, 999))] = ids[draw(st.integers(0, 999))]
    seqs: dict[str, int | None] = {host: rnd.choice([None, 1, 1, 2**63 - 2]) for host in ids}
    encoder = BundleEncoder()
    keyframe = tuple(HostEntry(host, seqs[host], 0, 1000, OK) for host in ids)
    payloads = [encoder.encode(Bundle("r", "b", 1, 1000, keyframe, version=2, sent_ms=0))]
    for seq in range(2, 2 + draw(st.integers(1, 3))):
        start, length = draw(st.integers(0, 999)), draw(st.integers(0, 1000))
        picked = set(draw(st.sets(st.integers(0, 999), max_size=40))) | set(range(start, min(1000, start + length)))
        period, width = draw(st.integers(0, 40)), draw(st.integers(1, 4))
        picked |= (
            {i for i in range(0, 1000, period) for i in range(i, min(1000, i + width))} if period > width else set()
        )
        heard: dict[str, HostEntry] = {}
        for i in sorted(picked):
            host, last = ids[i], seqs[ids[i]]
            step = None if last is None else last + 1 if last < 2**63 - 1 else 3  # the largest seq has no next
            seqs[host] = nxt = rnd.choice([step] * 8 + [5, None])
            heard[host] = HostEntry(host, nxt, rnd.choice([rnd.randrange(1001), rnd.randrange(5000)]), 1000, OK)
        for host in draw(st.lists(st.sampled_from(["n1", "n2", "n3"]), max_size=2, unique=True)):
            heard[host] = HostEntry(host, None, 5, 2000, STOPPING)
        forgot = tuple(draw(st.lists(st.sampled_from([*LEAVES[:20], "gone"]), max_size=3, unique=True)))
        keyframe_now = draw(st.integers(0, 3)) == 0
        bundle = Bundle("r", "b", seq, 1000, tuple(heard.values()), version=2, keyframe=keyframe_now,
                        forgot=() if keyframe_now else forgot, sent_ms=1000 * seq)  # fmt: skip
        payloads.append(encoder.encode(bundle))
    spoilt = payloads[-1]
    body = bytearray(zlib.decompress(spoilt[2:]) if spoilt[1] else spoilt[2:])
    for op, at, raw in draw(st.lists(st.tuples(st.sampled_from(["set", "insert", "cut"]), st.integers(0, 10**6),
                                               st.binary(min_size=1, max_size=3)), max_size=3)):  # fmt: skip
        at %= len(body) + 1
        if op == "set":
            body[at : at + len(raw)] = raw
        elif op == "insert":
            body[at:at] = raw
        else:
            del body[at : at + len(raw)]
    return payloads, b"\x02\x00" + bytes(body)


@settings(max_examples=400, deadline=None)
@given(_mutated_streams())
def test_the_columnar_decoder_reads_or_refuses_any_node_as_the_list_decoder_does(
    stream: tuple[list[bytes], bytes],
) -> None:
    """Deltas and keyframes by table of a larger table (every heard form, multi-byte gaps, seqs at
    the largest), with hostile bytes: both decoders read the same news or raise the same error, and
    keep the same table (the unspoilt node reads the same after it)."""
    payloads, mutated = stream
    decoder = _Both()
    for payload in payloads[:-1]:
        decoder.decode(payload)
    for payload in (mutated, payloads[-1]):
        with contextlib.suppress(WireError):
            decoder.decode(payload)
