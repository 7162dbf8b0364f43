"""The detector alone, in-process (no MQTT, no SQL): observe throughput, expire cost, bytes per host.

- observe: entries/s of `Detector.observe` with decoded bundles of `--bundle` entries, hosts known
  and up (steady state), on one core (process CPU time).
- expire: the cost of `expire(now)` when nothing is due (the common call), when every host's heap
  entry is early (all were heard since: each is pushed back), and a mass event: a relay with all
  its hosts falls silent -> relay down + every host unreachable; and direct hosts all going down.
- pipeline: decode + observe + expire per leaf beat of one relay's realistic bundles (2,500 leaves
  beating every 5 s, a flush a second, moving ages, a new seq each beat) in steady state: wire
  version 1 (every bundle full) against version 2 (deltas, a keyframe every 30 s); bytes per beat.
- holds: how long each mass event holds the event loop, call by call as the shell makes them
  (`--holds-hosts` behind one relay or direct; a keyframe of `--holds-bundle` entries);
  `--holds-only` runs only this part.
- memory: bytes per tracked host at each `--hosts`, as the RSS growth of a fresh process that
  builds the detector through `observe` (what the monitor holds), and tracemalloc up to 100k.
"""

from __future__ import annotations

import gc
import multiprocessing
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import psutil

from bench.report import Report, figure, med, num, spread, table
from relaybeat.monitor.detector import Detector, Policy
from relaybeat.monitor.expiry import EXPIRE_STEP
from relaybeat.monitor.service import keep_collector_off_the_hot_path
from relaybeat.monitor.states import Transition
from relaybeat.relay.assembler import Assembler
from relaybeat.relay.compact import BundleDecoder
from relaybeat.relay.wire import Beat, Bundle, HostEntry, LeafStatus, decode_bundle, encode_bundle


def iter_bundles(hosts: int, size: int, seq: int = 1) -> Iterator[Bundle]:
    """Bundles of `size` entries covering `hosts` hosts, made one at a time."""
    for r in range(max(1, -(-hosts // size))):
        relay = f"r{r:05d}"
        entries = tuple(
            HostEntry(f"{relay}-h{i:06d}", 7, 100 + (i * 37) % 400, 1000, LeafStatus.OK)
            for i in range(min(size, hosts - r * size))
        )
        yield Bundle(relay, "boot", seq, 1000, entries)


def bundles_for(hosts: int, size: int, seq: int = 1) -> list[Bundle]:
    return list(iter_bundles(hosts, size, seq))


def _with_seq(bundles: list[Bundle], seq: int) -> list[Bundle]:
    return [Bundle(b.relay, b.boot, seq, b.flush_ms, b.hosts) for b in bundles]


def observe_rate(hosts: int, size: int, rounds: int) -> float:
    first = bundles_for(hosts, size)
    detector = Detector(Policy(), 0.0)
    for b in first:
        detector.observe(b, 1.0)
    later = [_with_seq(first, seq) for seq in range(2, rounds + 2)]
    gc.collect()
    started = time.process_time()
    n = 0
    for k, batch in enumerate(later):
        now = 1.0 + 0.5 * (k + 1) / rounds
        for b in batch:
            detector.observe(b, now)
            n += len(b.hosts)
    return n / max(1e-9, time.process_time() - started)


def expire_costs(hosts: int, size: int) -> dict[str, float]:
    out: dict[str, float] = {}
    first = bundles_for(hosts, size)
    detector = Detector(Policy(), 0.0)
    for b in first:
        detector.observe(b, 1.0)
    calls = 100_000
    started = time.perf_counter()
    for _ in range(calls):
        detector.expire(1.5)
    out["expire_nothing_due_us"] = (time.perf_counter() - started) / calls * 1e6

    # Everyone heard again at t=3: at t=4.2 the first-round heap entries (due ~3.6-4.0) are early.
    for b in _with_seq(first, 2):
        detector.observe(b, 3.0)
    started = time.perf_counter()
    moved = detector.expire(4.2)
    spent = time.perf_counter() - started
    out["expire_push_back_us_per_host"] = spent / hosts * 1e6
    out["expire_push_back_transitions"] = len(moved)

    # A mass event: every relay silent; the first relay's deadline passes and the will arrives.
    started = time.perf_counter()
    dead = detector.relay_offline(first[0].relay, 5.0)
    spent = time.perf_counter() - started
    out["relay_death_hosts"] = len(first[0].hosts)
    out["relay_death_transitions"] = len(dead)
    out["relay_death_ms"] = spent * 1e3
    out["relay_death_transitions_per_s"] = len(dead) / max(1e-9, spent)

    direct = Detector(Policy(), 0.0)
    for i in range(hosts):
        direct.observe_beat(f"d{i:07d}", Beat(1, 1.0), 1.0)
    started = time.perf_counter()
    down = direct.expire(10.0)
    spent = time.perf_counter() - started
    out["mass_down_transitions"] = len(down)
    out["mass_down_ms"] = spent * 1e3
    out["mass_down_transitions_per_s"] = len(down) / max(1e-9, spent)
    return out


def _rss_child(hosts: int, size: int, pipe: Any) -> None:
    gc.collect()
    me = psutil.Process()
    before = me.memory_info().rss
    detector = Detector(Policy(), 0.0)
    for b in iter_bundles(hosts, size):
        detector.observe(b, 1.0)
    gc.collect()
    after = me.memory_info().rss
    pipe.send({"hosts": len(detector.hosts), "rss_delta": after - before})


def rss_per_host(hosts: int, size: int) -> float:
    """RSS growth of a fresh process building a detector of `hosts` hosts (bundles freed as it goes)."""
    context = multiprocessing.get_context("spawn")
    mine, theirs = context.Pipe()
    child = context.Process(target=_rss_child, args=(hosts, size, theirs), daemon=True)
    child.start()
    try:
        if not mine.poll(600):
            msg = "memory child did not answer within 600 s"
            raise TimeoutError(msg)
        got = mine.recv()
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    return float(got["rss_delta"]) / float(got["hosts"])


def traced_per_host(hosts: int, size: int) -> float:
    bundles = bundles_for(hosts, size)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        detector = Detector(Policy(), 0.0)
        for b in bundles:
            detector.observe(b, 1.0)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / len(detector.hosts)


def run(args: Any, out: Any) -> Report:
    report = Report("detector", vars(args))
    holds = run_holds(args.holds_hosts, args.holds_bundle, args.reps)
    if args.holds_only:
        report.data = {"holds": holds}
        report.say(f"\nloop holds: each mass event's calls as the shell makes them; median of {args.reps} rep(s)\n")
        report.say(holds_table(holds))
        report.save(out, {})
        return report
    size = args.bundle
    observe_hosts = min(max(args.hosts), 100_000)
    rounds = max(2, 1_000_000 // observe_hosts) if not args.smoke else 2
    rates = spread(observe_rate(observe_hosts, size, rounds) for _ in range(args.reps))
    costs = [expire_costs(observe_hosts, min(size, observe_hosts)) for _ in range(args.reps)]
    expire = {k: spread(c[k] for c in costs) for k in costs[0]}
    memory: dict[int, dict[str, float]] = {}
    for hosts in args.hosts:
        memory[hosts] = {"rss_bytes_per_host": rss_per_host(hosts, size)}
        if hosts <= 100_000:
            memory[hosts]["traced_bytes_per_host"] = traced_per_host(hosts, size)
        print(f"  {hosts:,} hosts: {memory[hosts]}", flush=True)
    seconds = 70 if not args.smoke else 15
    pipeline = {version: pipeline_costs(version, seconds=seconds) for version in (1, 2)}
    report.data = {
        "observe_entries_per_s": rates,
        "observe_hosts": observe_hosts,
        "expire": expire,
        "memory": memory,
        "pipeline": pipeline,
        "holds": holds,
    }
    report.say(f"\ndetector, in-process, one core: median [min–max] of {args.reps} rep(s)\n")
    report.say(
        table(
            ["measure", "value"],
            [
                (f"observe, {size:,}-entry bundles, {observe_hosts:,} hosts up (entries/s)", med(rates)),
                ("expire(now) with nothing due (µs per call)", med(expire["expire_nothing_due_us"], 2)),
                (
                    f"expire pushing back {observe_hosts:,} early heap entries (µs per host)",
                    med(expire["expire_push_back_us_per_host"], 3),
                ),
                (
                    f"relay death: relay down + {num(expire['relay_death_hosts']['median'])} hosts unreachable (ms)",
                    med(expire["relay_death_ms"], 1),
                ),
                ("  … transitions/s", med(expire["relay_death_transitions_per_s"])),
                (f"{observe_hosts:,} direct hosts all down in one expire (ms)", med(expire["mass_down_ms"], 1)),
                ("  … transitions/s", med(expire["mass_down_transitions_per_s"])),
            ],
        )
    )
    report.say("\none relay's bundles, 2,500 leaves every 5 s, flush 1 s: µs of CPU per leaf beat (steady state)\n")
    report.say(
        table(
            ["wire", "decode", "observe", "expire", "total", "entries/beat", "bytes/beat"],
            [
                (f"version {v}", *(num(p[f"{part}_us_per_beat"], 2) for part in ("decode", "observe", "expire")),
                 num(p["total_us_per_beat"], 2), num(p["entries_per_beat"], 2), num(p["bytes_per_beat"], 1))
                for v, p in pipeline.items()
            ],
        )
    )  # fmt: skip
    report.say(f"\nloop holds: each mass event's calls as the shell makes them; median of {args.reps} rep(s)\n")
    report.say(holds_table(holds))
    report.say("\nmemory per tracked host (bytes): RSS growth of a fresh process; tracemalloc where run\n")
    report.say(
        table(
            ["hosts", "RSS bytes/host", "tracemalloc bytes/host"],
            [(f"{h:,}", num(m["rss_bytes_per_host"]), num(m.get("traced_bytes_per_host"))) for h, m in memory.items()],
        )
    )
    fig, axes = figure(1, 1, width=6, height=3.6)
    ax = axes[0][0]
    hs = list(memory)
    ax.plot(hs, [memory[h]["rss_bytes_per_host"] for h in hs], "o-", label="RSS growth / host")
    traced = [h for h in hs if "traced_bytes_per_host" in memory[h]]
    if traced:
        ax.plot(traced, [memory[h]["traced_bytes_per_host"] for h in traced], "s--", label="tracemalloc / host")
    ax.axhline(512, color="red", linestyle=":", label="target 512 B")
    ax.axhline(260, color="grey", linestyle=":", label="bare slotted object in a dict (LIMITS)")
    ax.set_xscale("log")
    ax.set_xlabel("tracked hosts")
    ax.set_ylabel("bytes per host")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.set_title("detector memory per tracked host", fontsize=10)
    report.save(out, {"detector_memory": fig})
    return report


def relayed_payloads(version: int, leaves: int, seconds: int, interval_s: float = 5.0) -> tuple[list[bytes], int]:
    """What one relay sends in `seconds` of flushes (1 s) for `leaves` leaves beating every
    `interval_s` at staggered times (a new seq each beat): version 1 (every bundle full) or version 2
    (deltas, a keyframe every 30 s). Returns the payloads and the number of leaf beats they carry."""
    asm = Assembler("r00000", "boot", 1.0, interval_s, keyframe_s=0.0 if version == 1 else 30.0, version=version)
    ids = [f"r00000-h{i:06d}" for i in range(leaves)]
    payloads, beats, seqs = [], 0, [0] * leaves
    per_ms = 1000 * interval_s / leaves
    for second in range(seconds):
        for i in range(leaves):
            offset_ms = round(i * per_ms) % round(1000 * interval_s)
            if (second * 1000 - offset_ms) % round(1000 * interval_s) < 1000:
                seqs[i] += 1
                beats += 1
                asm.add_beat(ids[i], Beat(seqs[i], interval_s), second + (offset_ms % 1000) / 1000)
        payloads.append(encode_bundle(asm.flush(second + 1.0)))
    return payloads, beats


def pipeline_costs(version: int, leaves: int = 2500, seconds: int = 70, warm_up: int = 10) -> dict[str, float]:
    """decode + observe + expire of one relay's bundles, in-process (process CPU time), µs per leaf
    beat and per entry, in steady state: the first `warm_up` bundles (every leaf seen once) untimed."""
    payloads, _ = relayed_payloads(version, leaves, seconds)
    detector = Detector(Policy(), 0.0)
    for k, payload in enumerate(payloads[:warm_up]):
        detector.observe(decode_bundle(payload), k + 1.0)
    payloads = payloads[warm_up:]
    beats = round(leaves * len(payloads) / 5.0)  # every leaf beats every 5 s
    spent = {"decode": 0.0, "observe": 0.0, "expire": 0.0}
    entries = 0
    clock = time.process_time
    gc.collect()
    for k, payload in enumerate(payloads, start=warm_up):
        now = k + 1.0
        t0 = clock()
        bundle = decode_bundle(payload)
        t1 = clock()
        detector.observe(bundle, now)
        t2 = clock()
        detector.expire(now)
        t3 = clock()
        spent["decode"] += t1 - t0
        spent["observe"] += t2 - t1
        spent["expire"] += t3 - t2
        entries += len(bundle.hosts)
    assert all(h.state == "up" for h in detector.hosts.values()), "every leaf stays up"
    out = {f"{part}_us_per_beat": s / beats * 1e6 for part, s in spent.items()}
    out["total_us_per_beat"] = sum(spent.values()) / beats * 1e6
    out["total_us_per_entry"] = sum(spent.values()) / entries * 1e6
    out["entries_per_beat"] = entries / beats
    out["bytes_per_beat"] = sum(len(p) for p in payloads) / beats
    return out


# ------------------------------------------------------------------------------------ loop holds
# Each mass event as the monitor's shell drives it: the one call that brings the news (with the
# shell's step limit where that call takes one), then `expire(now, EXPIRE_STEP)` steps while the
# detector says work is left. Every call is one uninterrupted hold of the event loop: the longest
# is what the API and the input wait behind; the sum is the event's whole cost.


def hold_steps(detector: Detector, now: float, first: Callable[[], list[Transition]]) -> dict[str, float]:
    """The event's calls, timed one by one. What the detector held before it is frozen out of the
    garbage collector's view, as the monitor's restored state is (`gc.freeze` after `restore`): a
    full collection over 100,000 hosts alone takes ~100 ms, whatever the detector does), with the
    monitor's collector thresholds (`keep_collector_off_the_hot_path`)."""
    keep_collector_off_the_hot_path()
    try:
        started = time.perf_counter()
        out = first()
        holds, transitions = [time.perf_counter() - started], len(out)
        while detector.due(now):
            started = time.perf_counter()
            out = detector.expire(now, EXPIRE_STEP)
            holds.append(time.perf_counter() - started)
            transitions += len(out)
    finally:
        gc.unfreeze()
    return {"max_ms": max(holds) * 1e3, "total_ms": sum(holds) * 1e3, "calls": len(holds), "transitions": transitions}


def _relay_with(hosts: int, relay: str = "r0", boot: str = "boot", now: float = 1.0) -> Detector:
    """A detector hearing `hosts` hosts (interval 1 s, timeout 3 s) through one relay, all up."""
    detector = Detector(Policy(), 0.0)
    entries = tuple(HostEntry(f"{relay}-h{i:06d}", 7, 100 + (i * 37) % 400, 1000, LeafStatus.OK) for i in range(hosts))
    detector.observe(Bundle(relay, boot, 1, 1000, entries), now)
    return detector


def _direct(hosts: int) -> Detector:
    detector = Detector(Policy(), 0.0)
    for i in range(hosts):
        detector.observe_beat(f"d{i:07d}", Beat(1, 1.0), 1.0 + i / hosts)
    return detector


def _keyframe(leaves: int, relay: str = "big") -> bytes:
    asm = Assembler(relay, "boot", 1.0, 5.0, keyframe_s=30.0, version=2)
    for i in range(leaves):
        asm.add_beat(f"{relay}-h{i:06d}", Beat(1, 5.0), 0.5 + i / leaves / 2)
    return encode_bundle(asm.flush(1.0))


def holds_for(hosts: int) -> dict[str, dict[str, float]]:
    """The mass events of `hosts` hosts behind one relay (or direct): each hold, as the shell drives it."""
    out: dict[str, dict[str, float]] = {}
    d = _relay_with(hosts)
    out["relay last will: relay down, hosts unreachable"] = hold_steps(
        d, 2.0, lambda: d.relay_offline("r0", 2.0, limit=EXPIRE_STEP)
    )
    back = Bundle("r0", "boot2", 1, 1000, ())
    out["relay back (new boot, no entries): hosts resume"] = hold_steps(
        d, 10.0, lambda: d.observe(back, 10.0, limit=EXPIRE_STEP)
    )
    d = _relay_with(hosts)
    d.relay_offline("r0", 2.0)
    entries = tuple(HostEntry(f"r0-h{i:06d}", 8, 100, 1000, LeafStatus.OK) for i in range(hosts))
    full = Bundle("r0", "boot2", 1, 1000, entries)
    out["relay back (keyframe of all): hosts up"] = hold_steps(
        d, 10.0, lambda: d.observe(full, 10.0, limit=EXPIRE_STEP)
    )
    d = _relay_with(hosts)
    silent = "relay silent (deadline): relay down, hosts unreachable"
    out[silent] = hold_steps(d, 5.0, lambda: d.expire(5.0, EXPIRE_STEP))
    d = _relay_with(hosts)
    out["relay stopped: hosts wait for their own timeouts"] = hold_steps(
        d, 2.0, lambda: d.relay_stopped("r0", 2.0, limit=EXPIRE_STEP)
    )
    d = _direct(hosts)
    d.regain_sight(3.0)  # a stall: everyone's deadline moves 2 s later, every heap entry is early
    out["after regain_sight: every heap entry pushed back"] = hold_steps(d, 4.5, lambda: d.expire(4.5, EXPIRE_STEP))
    d = _direct(hosts)
    out["direct hosts all silent: down"] = hold_steps(d, 10.0, lambda: d.expire(10.0, EXPIRE_STEP))
    return out


def bundle_holds(leaves: int) -> dict[str, dict[str, float]]:
    """A relay's keyframe of `leaves` leaves (the limit is DEFAULT_MAX_BUNDLE_ENTRIES): decode, then
    observe while every leaf is new, then a second one when all are known."""
    payload = _keyframe(leaves)
    out: dict[str, dict[str, float]] = {}
    gc.collect()
    gc.freeze()
    started = time.perf_counter()
    first = BundleDecoder().decode(payload)
    gc.unfreeze()
    spent = time.perf_counter() - started
    out["decode (version 2 keyframe)"] = {"max_ms": spent * 1e3, "total_ms": spent * 1e3, "calls": 1, "transitions": 0}
    d = Detector(Policy(), 0.0)
    out["observe, every entry new"] = hold_steps(d, 1.0, lambda: d.observe(first, 1.0, limit=EXPIRE_STEP))
    known = tuple(e._replace(seq=2) for e in first.hosts)
    again = Bundle(first.relay, first.boot, 2, first.flush_ms, known, keyframe=True)
    out["observe, every entry known (new seq)"] = hold_steps(d, 2.0, lambda: d.observe(again, 2.0, limit=EXPIRE_STEP))
    return out


def run_holds(hosts: list[int], bundle: int, reps: int) -> dict[str, Any]:
    per: dict[str, dict[str, dict[str, Any]]] = {}
    for n in hosts:
        runs = [holds_for(n) for _ in range(reps)]
        per[f"{n:,} hosts"] = {k: {m: spread(r[k][m] for r in runs) for m in runs[0][k]} for k in runs[0]}
    runs = [bundle_holds(bundle) for _ in range(reps)]
    per[f"{bundle:,}-entry bundle"] = {k: {m: spread(r[k][m] for r in runs) for m in runs[0][k]} for k in runs[0]}
    return per


def holds_table(holds: dict[str, Any]) -> str:
    rows = []
    for size, events in holds.items():
        for event, m in events.items():
            rows.append(
                (size, event, med(m["max_ms"], 2), med(m["total_ms"], 1), num(m["calls"]["median"]),
                 num(m["transitions"]["median"]))
            )  # fmt: skip
    return table(["size", "event", "longest hold (ms)", "all calls (ms)", "calls", "transitions"], rows)
