"""Bytes per leaf beat on the wire between a relay and the monitor, in-process (no broker): version 1
JSON, version 2 as relay/wire.py writes it, and version 2 with indexed deltas (relay/compact.py).

One relay's assembler hears `--leaves` leaves beating every `--interval` s (each leaf's phase random,
each beat ±2 % jittered, so leaves drift against each other as real ones do), flushes every
`--flush` s with a keyframe every 30 s, and every bundle is encoded in each format. Counted over
`--window` s after a 30 s warm-up (so the window holds the keyframes a steady relay sends, amortised):
payload bytes plus the MQTT PUBLISH around it (fixed header, topic, packet id: QoS 1), per leaf beat
the relay heard in that window. A direct beat is counted the same way for the ratio (topic
`relaybeat/beat/<host>`, a leaf's usual `{"seq":…,"interval":…}`); TCP/IP headers are left out on
both sides. Encode and decode times are per host entry, process CPU time, median of `--reps`.

Decode by mode: a relay of `--decode-leaves` leaves, every one heard in each delta (all ordinary:
a bitmap bit and an age byte each), read by the list decoder (a `HostEntry` per leaf) and by the
monitor's columnar one (`BundleDecoder(columnar=True)`: numpy columns); µs of CPU per entry over
deltas, and over keyframes by table of the same leaves (enough of each for 50,000 entries, at least
20; each after one more read untimed).
"""

from __future__ import annotations

import gc
import random
import time
from typing import Any

from bench.report import Report, figure, med, spread, table
from relaybeat.relay.assembler import Assembler
from relaybeat.relay.compact import BundleDecoder, BundleEncoder
from relaybeat.relay.wire import (
    BINARY_VERSION,
    FORMAT_VERSION,
    Beat,
    Bundle,
    HostEntry,
    LeafStatus,
    Topics,
    decode_bundle,
    encode_beat,
    encode_bundle,
)

WARM_UP_S = 30.0
KEYFRAME_S = 30.0
FORMATS = ("v1 json", "v2", "v2 indexed")
MODES = ("list", "columnar")
DECODE_ENTRIES = 50_000  # per mode and node kind: small nodes are timed over many


def mqtt_publish_bytes(topic: str, payload: int) -> int:
    """An MQTT 3.1.1 PUBLISH at QoS 1: fixed header byte, remaining length, topic, packet id, payload."""
    remaining = 2 + len(topic.encode()) + 2 + payload
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16_384 else 3 if remaining < 2_097_152 else 4
    return 1 + length_bytes + remaining


def _stream(
    leaves: int, interval_s: float, flush_s: float, window_s: float, version: int, seed: int
) -> tuple[list[Bundle], int, list[bytes]]:
    """The bundles one relay flushes during the window, the leaf beats it heard in it, and a sample
    of the leaves' beat payloads."""
    rnd = random.Random(seed)
    asm = Assembler(
        "relay-1", "3f9c2a71b0d4", flush_s, interval_s, keyframe_s=0.0 if version == 1 else KEYFRAME_S, version=version
    )
    hosts = [f"host-{i:05d}" for i in range(leaves)]
    nxt = [rnd.uniform(0, interval_s) for _ in hosts]
    seqs = [0] * leaves
    end = WARM_UP_S + window_s
    bundles: list[Bundle] = []
    beats, samples = 0, []
    flush_at = flush_s
    order = sorted(range(leaves), key=lambda i: nxt[i])
    while flush_at <= end + 1e-9:
        due = [i for i in order if nxt[i] < flush_at]
        due.sort(key=lambda i: nxt[i])
        for i in due:
            while nxt[i] < flush_at:
                seqs[i] += 1
                beat = Beat(seqs[i], interval_s)
                asm.add_beat(hosts[i], beat, nxt[i])
                if nxt[i] > WARM_UP_S:
                    beats += 1
                if len(samples) < 100:
                    samples.append(encode_beat(beat))
                nxt[i] += interval_s * rnd.uniform(0.98, 1.02)
        bundle = asm.flush(flush_at)
        if flush_at > WARM_UP_S:
            bundles.append(bundle)
        flush_at += flush_s
    return bundles, beats, samples


def _cpu(fn: Any) -> float:
    gc.collect()
    started = time.process_time()
    fn()
    return time.process_time() - started


def measure(leaves: int, interval_s: float, flush_s: float, window_s: float, seed: int) -> dict[str, Any]:
    topics = Topics()
    bundle_topic = topics.bundle("relay-1")
    v1, beats, samples = _stream(leaves, interval_s, flush_s, window_s, FORMAT_VERSION, seed)
    v2, _, _ = _stream(leaves, interval_s, flush_s, window_s, BINARY_VERSION, seed)
    # Warm-up bundles were encoded too (the indexed encoder needs the keyframe before the window).
    warm, _, _ = _stream(leaves, interval_s, flush_s, 0.0, BINARY_VERSION, seed)
    entries_v1 = sum(b.entry_count() for b in v1)
    entries_v2 = sum(b.entry_count() for b in v2)
    out: dict[str, Any] = {"beats": beats, "bundles": len(v2), "entries": {"v1 json": entries_v1, "v2": entries_v2}}

    def encoded(fmt: str) -> list[bytes]:
        if fmt == "v1 json":
            return [encode_bundle(b) for b in v1]
        if fmt == "v2":
            return [encode_bundle(b) for b in v2]
        encoder = BundleEncoder()
        for b in warm:
            encoder.encode(b)
        last_warm = warm[-1].seq if warm else 0
        return [encoder.encode(b) for b in v2 if b.seq > last_warm]

    sizes: dict[str, Any] = {}
    for fmt in FORMATS:
        payloads = encoded(fmt)
        wire = sum(mqtt_publish_bytes(bundle_topic, len(p)) for p in payloads)
        sizes[fmt] = {
            "payload_bytes": sum(len(p) for p in payloads),
            "wire_bytes": wire,
            "bytes_per_beat": wire / beats,
            "mean_bundle_bytes": wire / len(payloads),
        }
    direct = sum(mqtt_publish_bytes(topics.beat("host-00000"), len(p)) for p in samples) / len(samples)
    out["sizes"] = sizes
    out["direct_bytes_per_beat"] = direct
    return out


def timings(leaves: int, interval_s: float, flush_s: float, window_s: float, seed: int) -> dict[str, float]:
    """µs per host entry to encode and to decode each format's bundles of the window."""
    v1, _, _ = _stream(leaves, interval_s, flush_s, window_s, FORMAT_VERSION, seed)
    v2, _, _ = _stream(leaves, interval_s, flush_s, window_s, BINARY_VERSION, seed)
    n1 = sum(len(b.hosts) for b in v1)
    first_keyframe = next(i for i, b in enumerate(v2) if b.keyframe)
    v2 = v2[first_keyframe:]  # the indexed stream starts at a keyframe
    n2 = sum(len(b.hosts) for b in v2)
    out: dict[str, float] = {}
    p1: list[bytes] = []
    p2: list[bytes] = []
    p3: list[bytes] = []
    out["v1 json encode"] = _cpu(lambda: p1.extend(encode_bundle(b) for b in v1)) / n1 * 1e6
    out["v1 json decode"] = _cpu(lambda: [decode_bundle(p) for p in p1]) / n1 * 1e6
    out["v2 encode"] = _cpu(lambda: p2.extend(encode_bundle(b) for b in v2)) / n2 * 1e6
    out["v2 decode"] = _cpu(lambda: [decode_bundle(p) for p in p2]) / n2 * 1e6
    encoder, decoder = BundleEncoder(), BundleDecoder()
    out["v2 indexed encode"] = _cpu(lambda: p3.extend(encoder.encode(b) for b in v2)) / n2 * 1e6
    out["v2 indexed decode"] = _cpu(lambda: [decoder.decode(p) for p in p3]) / n2 * 1e6
    columnar = BundleDecoder(columnar=True)
    out["v2 indexed decode, columnar"] = _cpu(lambda: [columnar.decode(p) for p in p3]) / n2 * 1e6
    return out


def decode_modes(leaves: int, seed: int) -> dict[str, dict[str, float]]:
    """µs of CPU per entry to read deltas in which each of `leaves` leaves beats once (ordinary
    news), and keyframes by table of them, by the list decoder and by the columnar one."""
    rnd = random.Random(seed)
    phase_ms = [rnd.uniform(0, 1000) for _ in range(leaves)]
    hosts = [f"host-{i:05d}" for i in range(leaves)]

    def bundle(seq: int, keyframe: bool) -> Bundle:
        heard = tuple(
            HostEntry(host, seq, min(999, int(phase_ms[i] + rnd.uniform(0, 20))), 1000, LeafStatus.OK)
            for i, host in enumerate(hosts)
        )
        return Bundle("relay-1", "3f9c2a71b0d4", seq, 1000, heard, version=2, keyframe=keyframe, sent_ms=1000 * seq)

    count = max(20, DECODE_ENTRIES // leaves)
    encoder = BundleEncoder(full_every=1 << 30)  # keyframes by table after the first: never ids again
    first = encoder.encode(bundle(1, keyframe=True))
    deltas = [encoder.encode(bundle(seq, keyframe=False)) for seq in range(2, 3 + count)]
    after = 3 + count
    keyframes = [encoder.encode(bundle(seq, keyframe=True)) for seq in range(after, after + 1 + count)]
    out: dict[str, dict[str, float]] = {"delta": {}, "keyframe by table": {}}
    for mode in MODES:
        decoder = BundleDecoder(columnar=mode == "columnar")
        decoder.decode(first)
        for node, payloads in (("delta", deltas), ("keyframe by table", keyframes)):
            decoder.decode(payloads[0])  # untimed: the first of its kind
            out[node][mode] = _decoding(decoder, payloads[1:]) / (leaves * (len(payloads) - 1)) * 1e6
    return out


def _decoding(decoder: BundleDecoder, payloads: list[bytes]) -> float:
    return _cpu(lambda: [decoder.decode(p) for p in payloads])


def run(args: Any, out_dir: Any) -> None:
    report = Report("wire", vars(args))
    cases = [(args.leaves, interval, args.flush) for interval in args.intervals]
    results: list[dict[str, Any]] = []
    for leaves, interval, flush in cases:
        reps = [measure(leaves, interval, flush, args.window, seed) for seed in range(args.reps)]
        times = [timings(leaves, interval, flush, args.window, seed) for seed in range(args.reps)]
        row: dict[str, Any] = {"leaves": leaves, "interval_s": interval, "flush_s": flush, "beats": reps[0]["beats"]}
        row["direct_bytes_per_beat"] = spread(r["direct_bytes_per_beat"] for r in reps)
        for fmt in FORMATS:
            row[fmt] = {
                "bytes_per_beat": spread(r["sizes"][fmt]["bytes_per_beat"] for r in reps),
                "mean_bundle_bytes": spread(r["sizes"][fmt]["mean_bundle_bytes"] for r in reps),
            }
        row["us_per_entry"] = {key: spread(t[key] for t in times) for key in times[0]}
        results.append(row)
    decoding: list[dict[str, Any]] = []
    for leaves in args.decode_leaves:
        runs = [decode_modes(leaves, seed) for seed in range(args.reps)]
        for node in runs[0]:
            us = {mode: spread(r[node][mode] for r in runs) for mode in MODES}
            decoding.append({"leaves": leaves, "node": node, "us_per_entry": us})
    report.data = {"cases": results, "decode_modes": decoding}
    report.say(
        f"\nbytes into the monitor per leaf beat, one relay with {args.leaves} leaves, in-process (payload + MQTT"
        f" PUBLISH at QoS 1; keyframes every {KEYFRAME_S:.0f} s amortised; {args.window:.0f} s window after a"
        f" {WARM_UP_S:.0f} s warm-up); median [min–max] of {args.reps} rep(s)\n"
    )
    report.say(
        table(
            ["interval / flush", "direct", *FORMATS, "direct ÷ v2 indexed"],
            [
                (
                    f"{r['interval_s']:g} s / {r['flush_s']:g} s",
                    med(r["direct_bytes_per_beat"], 1),
                    *(med(r[fmt]["bytes_per_beat"], 2) for fmt in FORMATS),
                    f"{r['direct_bytes_per_beat']['median'] / r['v2 indexed']['bytes_per_beat']['median']:.1f}×",
                )
                for r in results
            ],
        )
    )
    report.say("\nµs of CPU per host entry (process time, one core)\n")
    keys = list(results[0]["us_per_entry"])
    report.say(
        table(
            ["interval / flush", *keys],
            [
                (f"{r['interval_s']:g} s / {r['flush_s']:g} s", *(med(r["us_per_entry"][k], 2) for k in keys))
                for r in results
            ],
        )
    )
    report.say(
        f"\nµs of CPU per entry to decode an indexed node in which every leaf is ordinary news: list decoder"
        f" (a HostEntry each) vs columnar (the monitor's, numpy columns); over {DECODE_ENTRIES:,} entries"
        f" (at least 20 nodes) of each kind; median [min–max] of {args.reps} rep(s)\n"
    )
    report.say(
        table(
            ["leaves", "node", *MODES, "list ÷ columnar"],
            [
                (
                    d["leaves"],
                    d["node"],
                    *(med(d["us_per_entry"][mode], 3) for mode in MODES),
                    f"{d['us_per_entry']['list']['median'] / d['us_per_entry']['columnar']['median']:.1f}×",
                )
                for d in decoding
            ],
        )
    )
    fig, axes = figure()
    ax = axes[0][0]
    width = 0.25
    for k, fmt in enumerate(FORMATS):
        ax.bar(
            [i + k * width for i in range(len(results))],
            [r[fmt]["bytes_per_beat"]["median"] for r in results],
            width,
            label=fmt,
        )
    ax.set_xticks([i + width for i in range(len(results))])
    ax.set_xticklabels([f"{r['interval_s']:g} s / {r['flush_s']:g} s" for r in results])
    ax.set_yscale("log")
    ax.set_ylabel("bytes per leaf beat")
    ax.legend()
    report.save(out_dir, {"wire_bytes": fig})
