"""The relay's assembler, driven with a fake clock: what one flush says, and what it never says."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

from hypothesis import given, settings
from hypothesis import strategies as st

from relaybeat.relay.assembler import Assembler, advance
from relaybeat.relay.wire import Beat, Bundle, HostEntry, LeafStatus, decode_bundle, encode_bundle


def assembler(forget_after_s: float = 86_400.0) -> Assembler:
    return Assembler("r1", "boot-a", flush_s=1.0, default_interval_s=5.0, forget_after_s=forget_after_s)


def entries(bundle: Bundle) -> dict[str, HostEntry]:
    return {entry.id: entry for entry in bundle.hosts}


def test_flush_reports_each_leaf_with_its_age_since_its_last_beat() -> None:
    asm = assembler()
    asm.add_beat("web-1", Beat(seq=1, interval_s=2.0), now=10.0)
    asm.add_beat("web-2", Beat(seq=7), now=10.25)
    asm.add_beat("web-1", Beat(seq=2, interval_s=2.0), now=11.5)

    bundle = asm.flush(now=12.0)

    assert bundle.relay == "r1"
    assert bundle.boot == "boot-a"
    assert bundle.flush_ms == 1000
    assert bundle.age_ms == 0
    assert entries(bundle) == {
        "web-1": HostEntry("web-1", 2, 500, 2000, LeafStatus.OK),
        "web-2": HostEntry("web-2", 7, 1750, 5000, LeafStatus.OK),
    }


def test_ages_grow_between_flushes_without_new_beats() -> None:
    asm = assembler()
    asm.add_beat("web-1", Beat(seq=1), now=0.0)
    assert entries(asm.flush(now=1.0))["web-1"].age_ms == 1000
    assert entries(asm.flush(now=4.5))["web-1"].age_ms == 4500


def test_flush_never_reports_a_negative_age() -> None:
    asm = assembler()
    asm.add_beat("web-1", Beat(), now=5.0)
    assert entries(asm.flush(now=4.0))["web-1"].age_ms == 0


def test_seq_increments_by_one_per_flush_starting_at_one() -> None:
    asm = assembler()
    assert [asm.flush(now=float(t)).seq for t in range(1, 5)] == [1, 2, 3, 4]


def test_leaf_without_declared_interval_gets_the_default() -> None:
    asm = Assembler("r1", "b", flush_s=0.5, default_interval_s=7.5)
    asm.add_beat("web-1", Beat(seq=None, interval_s=None), now=0.0)
    entry = entries(asm.flush(now=0.0))["web-1"]
    assert entry.interval_ms == 7500
    assert entry.seq is None


def test_stopping_status_is_passed_on_until_the_leaf_beats_again() -> None:
    asm = assembler()
    asm.add_beat("web-1", Beat(seq=3, status=LeafStatus.STOPPING), now=0.0)
    assert entries(asm.flush(now=1.0))["web-1"].status == LeafStatus.STOPPING
    assert entries(asm.flush(now=2.0))["web-1"].status == LeafStatus.STOPPING
    asm.add_beat("web-1", Beat(seq=1), now=3.0)
    assert entries(asm.flush(now=4.0))["web-1"] == HostEntry("web-1", 1, 1000, 5000, LeafStatus.OK)


def test_leaf_silent_longer_than_forget_after_drops_out_and_returns_when_heard() -> None:
    asm = assembler(forget_after_s=60.0)
    asm.add_beat("old", Beat(), now=0.0)
    asm.add_beat("new", Beat(), now=30.0)
    assert set(entries(asm.flush(now=60.0))) == {"old", "new"}  # exactly at the horizon: kept
    assert set(entries(asm.flush(now=60.5))) == {"new"}
    assert asm.leaf_count == 1
    asm.add_beat("old", Beat(), now=61.0)
    assert set(entries(asm.flush(now=61.0))) == {"old", "new"}


def test_child_bundles_are_folded_in_with_their_age_and_keep_their_own_host_ages() -> None:
    asm = assembler()
    child = Bundle("r2", "boot-c", 4, 1000, (HostEntry("db-1", 9, 300, 5000, LeafStatus.OK),))
    assert asm.add_child(child, now=10.0)

    bundle = asm.flush(now=10.75)

    assert bundle.children == (
        Bundle("r2", "boot-c", 4, 1000, (HostEntry("db-1", 9, 300, 5000, LeafStatus.OK),), age_ms=750),
    )
    assert decode_bundle(encode_bundle(bundle)) == bundle


def test_grandchild_bundles_keep_their_age_relative_to_their_parent() -> None:
    middle = Assembler("r2", "boot-m", flush_s=1.0, default_interval_s=5.0)
    middle.add_child(Bundle("r3", "boot-g", 1, 1000), now=0.0)
    top = assembler()
    top.add_child(middle.flush(now=0.5), now=0.75)

    bundle = top.flush(now=1.0)

    (r2,) = bundle.children
    (r3,) = r2.children
    assert (r2.relay, r2.age_ms) == ("r2", 250)
    assert (r3.relay, r3.age_ms) == ("r3", 500)


def test_stale_child_bundle_is_rejected_and_never_replaces_a_newer_one() -> None:
    asm = assembler()
    newer = Bundle("r2", "boot-c", 5, 1000, (HostEntry("db-1", 9, 0, 5000, LeafStatus.OK),))
    older = Bundle("r2", "boot-c", 4, 1000, (HostEntry("db-1", 8, 0, 5000, LeafStatus.OK),))
    assert asm.add_child(newer, now=1.0)
    assert not asm.add_child(older, now=2.0)
    assert not asm.add_child(newer, now=3.0)  # a duplicate (QoS 1 redelivery) is no news either

    (child,) = asm.flush(now=4.0).children
    assert child.seq == 5
    assert child.age_ms == 3000  # still counted from when the newer bundle arrived


def test_child_bundle_from_a_new_boot_replaces_the_old_one_even_with_a_lower_seq() -> None:
    asm = assembler()
    assert asm.add_child(Bundle("r2", "boot-1", 50, 1000), now=1.0)
    assert asm.add_child(Bundle("r2", "boot-2", 1, 1000), now=2.0)
    (child,) = asm.flush(now=2.0).children
    assert (child.boot, child.seq) == ("boot-2", 1)


def test_silent_child_relay_drops_out_after_forget_after() -> None:
    asm = assembler(forget_after_s=10.0)
    asm.add_child(Bundle("r2", "b", 1, 1000), now=0.0)
    assert len(asm.flush(now=10.0).children) == 1
    assert asm.flush(now=10.5).children == ()


# ------------------------------------------------------------------------------------ property


@dataclass
class Reference:
    """What the assembler should report: each leaf's last beat and each child's newest bundle."""

    forget_after_s: float
    leaves: dict[str, tuple[float, Beat]] = field(default_factory=dict)
    children: dict[str, tuple[float, Bundle]] = field(default_factory=dict)


HOSTS = st.sampled_from(["a", "b", "c", "d"])
CHILDREN = st.sampled_from(["r2", "r3"])
STEP = st.one_of(
    st.tuples(st.just("beat"), HOSTS, st.integers(0, 20), st.sampled_from([None, 0.5, 5.0])),
    st.tuples(st.just("child"), CHILDREN, st.integers(0, 20), st.sampled_from(["x", "y"])),
    st.tuples(st.just("flush"), st.just(""), st.just(0), st.just(None)),
)


@settings(max_examples=200, deadline=None)
@given(
    forget_after_s=st.sampled_from([2.0, 5.0, 1000.0]),
    steps=st.lists(st.tuples(st.integers(0, 3000), STEP), max_size=60),
)
def test_flushes_match_a_reference_model(forget_after_s: float, steps: list[tuple[int, tuple[object, ...]]]) -> None:
    asm = Assembler("r1", "boot", flush_s=1.0, default_interval_s=5.0, forget_after_s=forget_after_s)
    ref = Reference(forget_after_s)
    now = 0.0
    last_seq = 0
    for gap_ms, (op, name, number, extra) in steps:
        now += gap_ms / 1000
        assert isinstance(name, str)
        assert isinstance(number, int)
        if op == "beat":
            beat = Beat(seq=number, interval_s=extra if isinstance(extra, float) else None)
            asm.add_beat(name, beat, now)
            ref.leaves[name] = (now, beat)
        elif op == "child":
            assert isinstance(extra, str)
            child = Bundle(name, extra, number, 1000)
            held = ref.children.get(name)
            newer = held is None or held[1].boot != child.boot or child.seq > held[1].seq
            assert asm.add_child(child, now) == newer
            if newer:
                ref.children[name] = (now, child)
        else:
            bundle = asm.flush(now)
            ref.leaves = {h: v for h, v in ref.leaves.items() if v[0] >= now - forget_after_s}
            ref.children = {r: v for r, v in ref.children.items() if v[0] >= now - forget_after_s}
            assert bundle.seq > last_seq
            last_seq = bundle.seq
            assert {e.id: e for e in bundle.hosts} == {
                host: HostEntry(
                    host,
                    beat.seq,
                    round((now - heard) * 1000),
                    5000 if beat.interval_s is None else round(beat.interval_s * 1000),
                    LeafStatus.OK,
                )
                for host, (heard, beat) in ref.leaves.items()
            }
            assert {c.relay: (c.boot, c.seq, c.age_ms) for c in bundle.children} == {
                relay: (child.boot, child.seq, round((now - heard) * 1000))
                for relay, (heard, child) in ref.children.items()
            }
            assert all(e.age_ms >= 0 for e in bundle.hosts)
            assert all(c.age_ms >= 0 for c in bundle.children)
            assert decode_bundle(encode_bundle(bundle)) == bundle


# ------------------------------------------------------------------------ deltas and keyframes


def delta_assembler(keyframe_s: float = 30.0, relay_id: str = "r1", boot: str = "boot-a") -> Assembler:
    return Assembler(relay_id, boot, flush_s=1.0, default_interval_s=5.0, keyframe_s=keyframe_s, version=2)


def test_first_flush_is_a_keyframe_then_deltas_carry_only_the_leaves_beaten_since() -> None:
    asm = delta_assembler()
    asm.add_beat("web-1", Beat(seq=1), now=0.5)
    asm.add_beat("web-2", Beat(seq=1), now=0.5)
    first = asm.flush(now=1.0)
    assert first.keyframe
    assert set(entries(first)) == {"web-1", "web-2"}
    asm.add_beat("web-2", Beat(seq=2), now=1.5)
    second = asm.flush(now=2.0)
    assert not second.keyframe
    assert entries(second) == {"web-2": HostEntry("web-2", 2, 500, 5000, LeafStatus.OK)}
    third = asm.flush(now=3.0)  # no news: still a bundle (the relay's own heartbeat), with nothing in it
    assert (third.seq, third.keyframe, third.hosts, third.sent_ms) == (3, False, (), 3000)


def test_keyframe_every_keyframe_s_and_at_the_next_flush_after_a_request() -> None:
    asm = delta_assembler(keyframe_s=10.0)
    kinds = [asm.flush(now=float(t)).keyframe for t in range(25)]
    assert [t for t, key in enumerate(kinds) if key] == [0, 10, 20]
    asm.request_keyframe()
    assert asm.flush(now=25.0).keyframe
    assert not asm.flush(now=26.0).keyframe


def test_a_delta_names_the_leaves_forgotten_since_the_last_bundle() -> None:
    asm = Assembler("r1", "b", 1.0, 5.0, forget_after_s=5.0, keyframe_s=100.0, version=2)
    asm.add_beat("old", Beat(), now=0.0)
    asm.flush(now=0.0)
    assert asm.flush(now=6.0).forgot == ("old",)
    assert asm.flush(now=7.0).forgot == ()


def test_version_1_assembler_sends_a_keyframe_every_flush_without_send_time() -> None:
    asm = assembler()
    asm.add_beat("web-1", Beat(), now=0.0)
    bundles = [asm.flush(now=float(t)) for t in range(1, 4)]
    assert all(b.keyframe and b.sent_ms is None and len(b.hosts) == 1 for b in bundles)


def test_child_deltas_are_forwarded_once_each_in_order_and_keyframes_carry_the_childs_full_picture() -> None:
    child = delta_assembler(relay_id="r2", boot="boot-c")
    parent = delta_assembler(keyframe_s=5.0)
    child.add_beat("db-1", Beat(seq=1), now=0.0)
    child.add_beat("db-2", Beat(seq=1), now=0.0)
    assert parent.add_child(child.flush(now=0.5), now=0.5)  # the child's keyframe
    assert parent.flush(now=1.0).keyframe  # our first: the child's picture
    child.add_beat("db-1", Beat(seq=2), now=1.0)
    parent.add_child(child.flush(now=1.5), now=1.5)
    parent.add_child(child.flush(now=2.5), now=2.5)
    delta = parent.flush(now=3.0)
    assert [(c.seq, c.keyframe, c.age_ms, [e.id for e in c.hosts]) for c in delta.children] == [
        (2, False, 1500, ["db-1"]),
        (3, False, 500, []),
    ]
    assert parent.flush(now=4.0).children == ()  # nothing new from the child: nothing forwarded
    keyframe = parent.flush(now=6.0)
    assert keyframe.keyframe
    (picture,) = keyframe.children
    assert (picture.seq, picture.keyframe, picture.age_ms) == (3, True, 3500)
    assert entries(picture) == {
        "db-1": HostEntry("db-1", 2, 1500, 5000, LeafStatus.OK),
        "db-2": HostEntry("db-2", 1, 2500, 5000, LeafStatus.OK),
    }


def test_a_child_whose_delta_we_missed_is_left_out_of_keyframes_and_asked_for_one() -> None:
    child = delta_assembler(relay_id="r2", boot="boot-c")
    parent = delta_assembler(keyframe_s=1.0)
    parent.add_child(child.flush(now=0.0), now=0.0)
    child.flush(now=1.0)  # lost on the way
    parent.add_child(child.flush(now=2.0), now=2.0)
    assert parent.wanted_keyframes == ["r2"]
    assert [c.seq for c in parent.flush(now=2.0).children] == []  # our keyframe: nothing we cannot vouch for
    child.request_keyframe()
    parent.add_child(child.flush(now=3.0), now=3.0)
    assert parent.wanted_keyframes == []
    assert [c.seq for c in parent.flush(now=3.0).children] == [4]


# Times in eighths of a second are exact in binary, so ages in ms add up exactly.
DELTA_STEP = st.one_of(
    st.tuples(st.just("beat"), HOSTS, st.integers(0, 5)),
    st.tuples(st.just("flush"), st.just(""), st.integers(0, 1)),  # 1: the bundle is lost
    st.tuples(st.just("grandchild"), st.just(""), st.integers(0, 1)),
    st.tuples(st.just("resync"), st.just(""), st.just(0)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 24), DELTA_STEP), max_size=60))
def test_advancing_a_childs_deltas_gives_the_keyframe_it_would_send(
    steps: list[tuple[int, tuple[object, ...]]],
) -> None:
    """`advance` over every delta a child sent equals the keyframe the child would send at that
    moment; after a lost delta it knows it cannot know, until the child's next keyframe."""
    child = Assembler("r2", "c", 1.0, 5.0, forget_after_s=2.0, keyframe_s=1000.0, version=2)
    grandchild = Assembler("r3", "g", 1.0, 5.0, keyframe_s=1000.0, version=2)
    picture: Bundle | None = None
    lost = False
    now = 0.0
    for gap, (op, host, number) in steps:
        now += gap / 8
        if op == "beat":
            child.add_beat(str(host), Beat(seq=int(str(number))), now)
        elif op == "grandchild":
            grandchild.add_beat("g-1", Beat(seq=int(str(number))), now)
            child.add_child(grandchild.flush(now), now)
        elif op == "resync":
            child.request_keyframe()
        else:
            bundle = child.flush(now)
            if number:
                lost = True
                continue
            picture = advance(picture, bundle)
            lost = lost and not bundle.keyframe
            if lost:
                assert picture is None
                continue
            assert picture is not None
            twin = copy.deepcopy(child)
            twin.request_keyframe()
            truth = twin.flush(now)
            assert replace(picture, children=()) == replace(truth, children=(), seq=picture.seq)
            assert {c.relay: (c.seq, c.age_ms, entries(c)) for c in picture.children} == {
                c.relay: (c.seq, c.age_ms, entries(c)) for c in truth.children
            }
