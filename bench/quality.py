"""The detector's quality of service on a simulated lossy, jittery path, in-process (no MQTT, no SQL).

Hosts beat every `--interval` s straight to the pure detector, driven by a simulated clock; the path
drops each beat with probability `--drops` and delays some (`--delay-rate` of them by up to
`--delay-max` intervals, first in first out, as MQTT over TCP delivers). Hosts die at random
(exponential lifetimes, mean `--life` s), stay dead `--dead` s and come back with seq 0 (a restart).

The simulation knows the truth (was the host alive when it was declared down? when did a dead host
send its last beat?); relaybeat only knows what reached it and reports about itself through
`monitor.quality` (the judge that recognises false alarms, and the figures). Side by side for fixed
timeouts (`interval × 3`), adaptive (phi accrual) and target-driven timeouts, at each drop rate:
measured (true) and reported λ_M (false alarms per host-day) and T_D (last beat → decision).
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
import time
from dataclasses import dataclass
from typing import Any

from bench.report import Report, figure, num, table
from relaybeat.monitor.detector import Detector, Policy
from relaybeat.monitor.quality import Judge, Outage, Targets, TargetTimeouts, figures, lookup_in
from relaybeat.monitor.states import Kind, State
from relaybeat.relay.wire import Beat

MODES = ("fixed", "adaptive", "target")


@dataclass(frozen=True, slots=True)
class Path:
    drops: float
    delay_rate: float
    delay_max: float  # in intervals
    base_delay_s: float = 0.01
    base_jitter_s: float = 0.005


def arrivals(
    host: str, rng: random.Random, args: Any, path: Path
) -> tuple[list[tuple[float, str, int]], list[tuple[float, float]], list[float]]:
    """One host's deliveries (arrival time, host, seq) over the run, its deaths (died at, last beat
    sent before), and every moment it was alive at (as alive intervals' ends, see `alive_at`)."""
    interval = args.interval
    t = rng.uniform(0, interval)
    out: list[tuple[float, str, int]] = []
    deaths: list[tuple[float, float]] = []
    lives: list[float] = []  # alternating: alive from lives[0] to lives[1], dead to lives[2], ...
    last_arrival = 0.0
    lives.append(t)
    while t < args.duration:
        dies = t + rng.expovariate(1 / args.life)
        seq = 0
        last_sent = t
        while t < min(dies, args.duration):
            if rng.random() >= path.drops:
                delay = path.base_delay_s + abs(rng.gauss(0, path.base_jitter_s))
                if rng.random() < path.delay_rate:
                    delay += rng.uniform(0, path.delay_max * interval)
                last_arrival = max(last_arrival, t + delay)  # first in, first out
                out.append((last_arrival, host, seq))
            last_sent = t
            seq += 1
            t += interval
        if dies < args.duration:
            deaths.append((dies, last_sent))
            lives.append(dies)
            t = dies + args.dead
            lives.append(t)
    return out, deaths, lives


def alive_at(lives: list[float], t: float) -> bool:
    return bisect.bisect_right(lives, t) % 2 == 1


def simulate(mode: str, path: Path, args: Any, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    hosts = [f"h{i:04d}" for i in range(args.hosts)]
    streams, deaths, lives = [], {}, {}
    for host in hosts:
        out, died, life = arrivals(host, rng, args, path)
        streams.append(out)
        deaths[host] = died
        lives[host] = life
    timeouts = None
    if mode == "target":
        timeouts = TargetTimeouts(Targets(args.target_detection, args.target_false_alarms))
    policy = Policy(misses=3, default_interval_s=args.interval, adaptive=mode == "adaptive")
    detector = Detector(policy, 0.0, timeouts=timeouts)
    detector.grace_from = -1e9  # no start-up grace: the run starts in steady state
    judge = Judge()
    lookup = lookup_in(detector)
    opened: dict[str, Any] = {}
    outages: list[dict[str, Any]] = []
    alarms: set[str] = set()
    counter = 0
    true_mistakes = 0
    true_detections: list[float] = []
    started = time.process_time()

    def decide(transitions: list[Any], now: float) -> None:
        nonlocal counter, true_mistakes
        items = []
        for t in transitions:
            counter += 1
            key = str(counter)
            items.append((t, key))
            if t.to_state in (State.DOWN, State.UNREACHABLE) and t.from_state != t.to_state:
                alive = alive_at(lives[t.subject], now)
                if alive:
                    true_mistakes += 1
                else:
                    before = [last for died, last in deaths[t.subject] if died <= now]
                    if before:
                        true_detections.append(now - before[-1])
                opened[key] = {"at": t.at, "subject": t.subject, "alive": alive, "closed": None}
                outages.append(opened[key])
        new, found = judge.decided(items, lookup, now)
        for o in new:
            opened[o.key]["detection_s"] = o.detection_s
        for alarm in found:
            alarms.add(alarm.opened_key)
            opened[alarm.opened_key]["closed"] = alarm.closed_at

    for at, host, seq in heapq.merge(*streams):
        deadline = detector.next_deadline()
        while deadline is not None and deadline <= at:
            decide(detector.expire(deadline), deadline)
            deadline = detector.next_deadline()
        transitions = detector.observe_beat(host, Beat(seq=seq, interval_s=args.interval), at)
        if transitions:
            decide(transitions, at)
        elif judge.watching:
            for alarm in judge.look(at, lookup):
                alarms.add(alarm.opened_key)
                opened[alarm.opened_key]["closed"] = alarm.closed_at
    cpu = time.process_time() - started

    rows = [
        Outage(
            kind=Kind.HOST,
            subject=o["subject"],
            at=o["at"],
            closed_at=o["closed"],
            detection_s=o.get("detection_s"),
            false_alarm=key in alarms,
        )
        for key, o in opened.items()
    ]
    reported = figures(rows, args.hosts, 0.0, args.duration + 1.0)
    host_days = args.hosts * (args.duration + 1.0) / 86400
    true_rate = true_mistakes / host_days
    true_td = sum(true_detections) / len(true_detections) if true_detections else None
    timeouts_used = [detector.timeout_s(h) for h in detector.hosts.values()]
    advice = [timeouts.advice(h) for h in hosts] if timeouts is not None else []
    met = [a.meets_detection and a.meets_false_alarms for a in advice if a is not None]
    return {
        "mode": mode,
        "drops": path.drops,
        "true_false_alarms_per_day": true_rate,
        "reported_false_alarms_per_day": reported.false_alarms_per_day,
        "true_mistakes": true_mistakes,
        "reported_mistakes": reported.false_alarms,
        "true_detection_s": true_td,
        "reported_detection_s": reported.detection_s_mean,
        "deaths": len(true_detections),
        "reported_deaths": reported.deaths,
        "query_accuracy": reported.query_accuracy,
        "mistake_duration_s": reported.mistake_duration_s,
        "timeout_s_mean": sum(timeouts_used) / len(timeouts_used) if timeouts_used else None,
        "timeout_s_max": max(timeouts_used, default=None),
        "targets_claimed_met": (sum(met), len(met)),
        "cpu_s": cpu,
    }


def _agree(true: float | None, reported: float | None) -> float | None:
    """Relative difference of reported against true (None when true is 0 or unknown)."""
    if true is None or reported is None:
        return None
    if true == 0:
        return 0.0 if reported == 0 else math.inf
    return abs(reported - true) / true


def run(args: Any, out: Any) -> Report:
    report = Report("quality", vars(args))
    results = []
    for drops in args.drops:
        path = Path(drops=drops, delay_rate=args.delay_rate, delay_max=args.delay_max)
        for mode in MODES:
            result = simulate(mode, path, args, seed=args.seed)
            result["lambda_error"] = _agree(
                result["true_false_alarms_per_day"], result["reported_false_alarms_per_day"] or 0.0
            )
            result["td_error"] = _agree(result["true_detection_s"], result["reported_detection_s"])
            if mode == "target":
                result["meets_false_alarm_target"] = result["true_false_alarms_per_day"] <= args.target_false_alarms
                td = result["true_detection_s"]
                result["meets_detection_target"] = td is None or td <= args.target_detection
            results.append(result)
            print(f"  {mode} drops {drops:.0%}: {result}", flush=True)
    report.data = {"runs": results}
    report.say(
        f"\ndetector quality on a simulated path: {args.hosts} hosts × {args.duration / 3600:g} h simulated, "
        f"beat every {args.interval:g} s, {args.delay_rate:.0%} of beats delayed up to {args.delay_max:g} intervals "
        f"(FIFO), deaths every {args.life / 60:g} min on average; targets: detection {args.target_detection:g} s, "
        f"{args.target_false_alarms:g} false alarms/day\n"
    )
    rows = []
    for r in results:
        lam_err, td_err = r["lambda_error"], r["td_error"]
        target = ""
        if r["mode"] == "target":
            target = "yes" if r["meets_false_alarm_target"] and r["meets_detection_target"] else "NO"
        rows.append(
            (
                r["mode"],
                f"{r['drops']:.0%}",
                num(r["timeout_s_mean"], 2),
                f"{num(r['true_false_alarms_per_day'], 2)} ({r['true_mistakes']})",
                f"{num(r['reported_false_alarms_per_day'], 2)} ({r['reported_mistakes']})",
                "–" if lam_err is None else f"{100 * lam_err:.1f} %",
                num(r["true_detection_s"], 2),
                num(r["reported_detection_s"], 2),
                "–" if td_err is None else f"{100 * td_err:.1f} %",
                target,
            )
        )
    report.say(
        table(
            [
                "timeout",
                "drops",
                "mean timeout s",
                "true λ_M /host-day (n)",
                "reported λ_M (n)",
                "λ_M diff",
                "true T_D s",
                "reported T_D s",
                "T_D diff",
                "targets met",
            ],
            rows,
        )
    )
    fig, axes = figure(1, 2, width=10, height=3.6)
    for mode in MODES:
        mine = [r for r in results if r["mode"] == mode]
        xs = [100 * r["drops"] for r in mine]
        axes[0][0].plot(xs, [r["true_false_alarms_per_day"] for r in mine], "o-", label=f"{mode} true")
        axes[0][0].plot(xs, [r["reported_false_alarms_per_day"] or 0 for r in mine], "x--", label=f"{mode} reported")
        axes[0][1].plot(xs, [r["true_detection_s"] or 0 for r in mine], "o-", label=f"{mode} true")
        axes[0][1].plot(xs, [r["reported_detection_s"] or 0 for r in mine], "x--", label=f"{mode} reported")
    axes[0][0].axhline(args.target_false_alarms, color="red", linestyle=":", label="target")
    axes[0][1].axhline(args.target_detection, color="red", linestyle=":", label="target")
    axes[0][0].set_xlabel("beats dropped (%)")
    axes[0][0].set_ylabel("false alarms per host-day")
    axes[0][1].set_xlabel("beats dropped (%)")
    axes[0][1].set_ylabel("mean detection time (s)")
    axes[0][0].legend(fontsize=6)
    axes[0][1].legend(fontsize=6)
    report.save(out, {"quality": fig})
    return report
