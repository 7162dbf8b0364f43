"""Ingest ceiling: relayed bundles through a real broker as fast as the monitor process takes them,
beside a micro-benchmark of the raw ceiling on the same machine in the same run.

End to end: a fresh broker and `relaybeat monitor` (SQLite); R synthetic relays (one MQTT
connection each, QoS 1) publish bundles of `size` entries round-robin, keeping a bounded backlog
(checked through `GET /api/v1/relays/{id}`: the seq the monitor last took). Leaf entries per
second on one core = entries / monitor CPU seconds (psutil); the wall rate is reported too.

Raw ceiling, in this process on the same bundle bytes: `orjson.loads` + for each entry a dict
lookup of a slotted object, a sequence check, three attribute writes and a state check (the
"decode + update" of ../shared/LIMITS.md). Alongside, the project's own pieces in-process:
`decode_bundle`, `Detector.observe` on decoded bundles, and `Monitor.take` (both, with counters).

Profile: one more run with the monitor under pyinstrument (`--profile-s`), saved as HTML and text.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx
import orjson

from bench import synth
from bench.procs import Lab, Proc
from bench.report import Report, figure, med, num, render_profile, spread, table
from relaybeat.monitor.clock import HandClock
from relaybeat.monitor.detector import Detector, Policy
from relaybeat.monitor.service import Monitor, MonitorSettings
from relaybeat.monitor.store import Store
from relaybeat.relay.compact import BundleDecoder
from relaybeat.relay.mqtt import BrokerURL
from relaybeat.relay.wire import decode_bundle


def _payloads(relays: int, size: int, count: int, wire: int = 1) -> tuple[list[bytes], list[str]]:
    """`count` distinct bundles (seq rising), round-robin over `relays` relays of `size` hosts each,
    and the relay of each. Version 2 bundles are sent a flush (1 s) apart by their relays' clocks, as
    the in-process replay below takes them (one round of relays a second)."""
    synthetic = synth.Relays(0, "", relays, size, tag="m", wire=wire)
    ids = synthetic.ids
    blobs = {r: synth.hosts_blob(synth.host_ids(r, size)) for r in ids} if wire == 1 else {}
    seqs = dict.fromkeys(ids, 0)
    out, senders = [], []
    for k in range(count):
        r = ids[k % relays]
        seqs[r] += 1
        out.append(
            synth.bundle_bytes(r, "b00t", seqs[r], blobs[r]) if wire == 1 else synthetic._v2(r, seqs[r], seqs[r] * 1000)
        )
        senders.append(r)
    return out, senders


class _Host:
    __slots__ = ("interval_ms", "last_seen", "seq", "state")

    def __init__(self) -> None:
        self.seq = -1
        self.last_seen = 0.0
        self.interval_ms = 0
        self.state = 0


def _raw_ceiling(payloads: list[bytes]) -> Callable[[], int]:
    table: dict[str, _Host] = {}

    def work() -> int:
        n = 0
        get = table.get
        now = time.monotonic()
        for payload in payloads:
            body = orjson.loads(payload)
            for host, seq, age_ms, interval_ms, _status in body["hosts"]:
                h = get(host)
                if h is None:
                    h = table[host] = _Host()
                if seq != h.seq:
                    h.seq = seq
                h.last_seen = now - age_ms / 1000
                h.interval_ms = interval_ms
                if h.state != 1:
                    h.state = 1
            n += len(body["hosts"])
        return n

    return work


def _timed(work: Callable[[], int], reps: int) -> list[float]:
    rates = []
    for _ in range(reps):
        gc.collect()
        started = time.process_time()
        n = work()
        rates.append(n / max(1e-9, time.process_time() - started))
    return rates


def micro(size: int, reps: int, entries: int = 1_000_000, wire: int = 1) -> dict[str, dict[str, float]]:
    """Entries/s on one core (process CPU time) of the raw ceiling (on version 1 JSON, always) and of
    the project's pieces on bundles of `wire`."""
    relays = 10
    count = max(3 * relays, entries // size)
    results: dict[str, dict[str, float]] = {}

    raw = _raw_ceiling(_payloads(relays, size, count)[0])
    raw()  # warm: the table holds every host, as the monitor's does after the first round
    results["raw: orjson + dict update"] = spread(_timed(raw, reps))

    payloads, senders = _payloads(relays, size, count, wire)

    def decode() -> int:
        if wire == 1:
            return sum(len(decode_bundle(p).hosts) for p in payloads)
        decoder = BundleDecoder(columnar=True)  # as the monitor's, fresh per rep: streams start at keyframes
        return sum(decoder.decode(p, relay=relay).entry_count() for p, relay in zip(payloads, senders, strict=True))

    results["decode (decode_bundle; BundleDecoder(columnar=True) for version 2)"] = spread(_timed(decode, reps))

    decoder = BundleDecoder(columnar=True)
    decoded = [decoder.decode(p, relay=relay) for p, relay in zip(payloads, senders, strict=True)]

    def observe_rate() -> float:
        # A fresh detector per rep (bundle seqs must rise), warmed by one round so all hosts are known.
        detector = Detector(Policy(), 0.0)
        for b in decoded[:relays]:
            detector.observe(b, 1.0)
        gc.collect()
        started = time.process_time()
        n = 0
        for i, b in enumerate(decoded[relays:]):
            detector.observe(b, 2.0 + i / relays)  # a round of relays a second, as they send
            n += b.entry_count()
        return n / max(1e-9, time.process_time() - started)

    results["Detector.observe (decoded)"] = spread(observe_rate() for _ in range(reps))

    settings = MonitorSettings(BrokerURL("127.0.0.1", 1883))

    def take_rates() -> float:
        clock = HandClock()  # the replay moves it: one round of relays a second, as they send
        monitor = Monitor(settings, cast(Store, None), clock)
        topic = settings.prefix + "bundle/"
        topics = [topic + relay for relay in senders]
        step = 1.0 / relays
        warm = 2 * relays  # each relay's first bundle waits for its clock to be confirmed by the second
        for t, p in zip(topics[:warm], payloads[:warm], strict=True):
            clock.t += step
            monitor.take(t, p)
        gc.collect()
        started = time.process_time()
        n = 0
        take = monitor.take
        for t, p in zip(topics[warm:], payloads[warm:], strict=True):
            clock.t += step
            take(t, p)
            n += size
        rate = n / max(1e-9, time.process_time() - started)
        assert monitor.received["bundles"] == len(payloads), monitor.rejections.counts
        return rate

    results["Monitor.take (decode + observe)"] = spread(take_rates() for _ in range(reps))
    return results


async def _end_to_end(lab: Lab, broker_kind: str, size: int, relays_n: int, seconds: float,
                      wrap: list[str] | None = None, wire: int = 1) -> dict[str, Any]:  # fmt: skip
    prefix = f"bench{secrets.token_hex(3)}/"
    broker = lab.broker(broker_kind, f"broker-{size}")
    monitor = lab.monitor(broker, prefix, wrap=wrap, name=f"monitor-{size}" + ("-prof" if wrap else ""))
    relays = synth.Relays(broker.port, prefix, relays_n, size, wire=wire)
    await relays.connect()
    try:
        async with httpx.AsyncClient(base_url=monitor.api, timeout=30) as http:
            await synth.round_all(relays, http)
            # Let the first round's `up` transitions (one per host) reach SQL: wait for a quiet monitor.
            await quiet(monitor.proc)
            await synth.round_all(relays, http)
            cpu0, t0 = monitor.proc.cpu_s(), time.monotonic()
            broker0 = broker.proc.cpu_s()
            bundles, wall = await synth.flood(relays, http, seconds)
            cpu = monitor.proc.cpu_s() - cpu0
            broker_cpu = broker.proc.cpu_s() - broker0
            rss = monitor.proc.rss()
            wall = time.monotonic() - t0
            health = monitor.health()
    finally:
        relays.close()
    entries = bundles * size
    if wrap:
        monitor.proc.stop(60)
    return {
        "size": size,
        "relays": relays_n,
        "hosts": relays_n * size,
        "bundles": bundles,
        "entries": entries,
        "wall_s": wall,
        "monitor_cpu_s": cpu,
        "entries_per_s_wall": entries / wall,
        "entries_per_cpu_s": entries / max(1e-9, cpu),
        "monitor_cores": cpu / wall,
        "broker_cores": broker_cpu / wall,
        "monitor_rss_mb": rss / 2**20,
        "rejected": health["rejected"],
    }


async def quiet(proc: Proc, below_cores: float = 0.1, timeout_s: float = 120.0) -> None:
    """Until the process used less than `below_cores` over half a second."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = proc.cpu_s()
        await asyncio.sleep(0.5)
        if proc.cpu_s() - before < below_cores * 0.5:
            return


def profile(args: Any, out: Path, size: int) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    session = out / f"ingest_profile_{size}.pyisession"
    with Lab("ingest-profile") as lab:
        wrap = ["-m", "pyinstrument", "-r", "pyisession", "-o", str(session), "-i", "0.0005"]
        asyncio.run(_end_to_end(lab, args.broker, size, args.relays, args.profile_s, wrap, args.wire))
    files = render_profile(session)
    session.unlink(missing_ok=True)
    return files


def run(args: Any, out: Path) -> Report:
    report = Report("ingest", vars(args))
    e2e: dict[int, list[dict[str, Any]]] = {}
    micros: dict[int, dict[str, dict[str, float]]] = {}
    for size in args.sizes:
        e2e[size] = []
        for rep in range(args.reps):
            with Lab("ingest") as lab:
                result = asyncio.run(_end_to_end(lab, args.broker, size, args.relays, args.window, wire=args.wire))
            e2e[size].append(result)
            print(
                f"  {size} entries/bundle rep {rep + 1}: {result['entries_per_cpu_s']:,.0f} entries/CPU-s,"
                f" {result['entries_per_s_wall']:,.0f} entries/s wall, monitor {result['monitor_cores']:.2f} cores",
                flush=True,
            )
        micros[size] = micro(size, max(3, args.reps), 50_000 if args.smoke else 1_000_000, args.wire)
    summary = {
        size: {
            k: spread(r[k] for r in runs)
            for k in ("entries_per_cpu_s", "entries_per_s_wall", "monitor_cores", "broker_cores", "monitor_rss_mb")
        }
        for size, runs in e2e.items()
    }
    ratios = {
        size: summary[size]["entries_per_cpu_s"]["median"] / micros[size]["raw: orjson + dict update"]["median"]
        for size in e2e
    }
    report.data = {"end_to_end": e2e, "summary": summary, "micro": micros, "ratio_to_raw": ratios}
    report.say(
        f"\ningest: {args.relays} synthetic relays (wire version {args.wire}) through {args.broker}, QoS 1,"
        " into `relaybeat monitor` (SQLite);"
        f" {args.window:g} s per run, {args.reps} rep(s): median [min–max]\n"
    )
    rows = []
    for size in e2e:
        s, m = summary[size], micros[size]
        rows.append((
            f"{size:,}", f"{args.relays * size:,}", med(s["entries_per_cpu_s"]), med(s["entries_per_s_wall"]),
            med(s["monitor_cores"], 2), med(m["raw: orjson + dict update"]), num(ratios[size] * 100, 1) + " %",
        ))  # fmt: skip
    report.say(table(["entries/bundle", "hosts", "monitor entries/CPU-s", "entries/s wall", "monitor cores",
                      "raw ceiling entries/s (same run)", "monitor ÷ raw"], rows))  # fmt: skip
    report.say("\nin-process, one core (process CPU time), entries/s: median [min–max]\n")
    names = list(next(iter(micros.values())))
    report.say(
        table(["entries/bundle", *names], [(f"{size:,}", *(med(micros[size][n]) for n in names)) for size in micros])
    )

    fig, axes = figure(1, 1, width=9, height=4)
    ax = axes[0][0]
    sizes = list(e2e)
    xs = range(len(sizes))
    width = 0.8 / (len(names) + 1)
    bars = [("monitor process (end to end)", [summary[s]["entries_per_cpu_s"]["median"] for s in sizes])]
    bars += [(n, [micros[s][n]["median"] for s in sizes]) for n in names]
    for k, (label, values) in enumerate(bars):
        ax.bar([x + k * width for x in xs], values, width, label=label)
    ax.set_xticks([x + width * len(names) / 2 for x in xs], [f"{s:,} entries/bundle" for s in sizes])
    ax.set_ylabel("leaf entries per CPU-second")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(f"ingest on one core vs the raw ceiling ({args.broker})", fontsize=10)
    figures = {f"ingest_{args.broker}": fig}
    if args.profile_s > 0:
        size = 1000 if 1000 in args.sizes else args.sizes[0]
        report.data["profile"] = profile(args, out, size)
        report.say(f"\nprofile of the monitor under pyinstrument at {size} entries/bundle: {report.data['profile']}")
    report.save(out, figures)
    return report
