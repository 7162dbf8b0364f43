"""`python -m bench <scenario> [--smoke] [--broker mosquitto|embedded] ...`: see BENCHMARKS.md."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

from bench.report import RESULTS

# Sizes per scenario: the default run, --large, and --smoke (seconds, for the test that keeps them working).
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "fanin": {
        "default": {"leaves": 2000, "relays": 20, "reps": 3, "window": 20.0, "settle": 3.0},
        "large": {"leaves": 20000, "relays": 20, "reps": 3, "window": 20.0, "settle": 5.0},
        "smoke": {"leaves": 40, "relays": 2, "reps": 1, "window": 1.5, "settle": 0.5},
    },
    "ingest": {
        "default": {"sizes": [100, 1000, 5000], "relays": 10, "reps": 3, "window": 8.0, "profile_s": 10.0},
        "large": {"sizes": [100, 1000, 5000], "relays": 20, "reps": 5, "window": 15.0, "profile_s": 15.0},
        "smoke": {"sizes": [100], "relays": 2, "reps": 1, "window": 1.0, "profile_s": 1.0},
    },
    "detector": {
        "default": {
            "hosts": [10_000, 100_000, 1_000_000],
            "bundle": 5000,
            "reps": 3,
            "holds_hosts": [5000, 100_000],
            "holds_bundle": 200_000,
        },
        "large": {
            "hosts": [10_000, 100_000, 1_000_000],
            "bundle": 5000,
            "reps": 5,
            "holds_hosts": [5000, 100_000],
            "holds_bundle": 200_000,
        },
        "smoke": {"hosts": [2000], "bundle": 500, "reps": 1, "holds_hosts": [500], "holds_bundle": 2000},
    },
    "lag": {
        "default": {"leaves": 2000, "relays": 4, "kills": 100, "window": 20.0, "interval": 1.0, "reps": 3},
        "large": {"leaves": 10000, "relays": 10, "kills": 300, "window": 30.0, "interval": 1.0, "reps": 3},
        "smoke": {"leaves": 40, "relays": 3, "kills": 6, "window": 1.0, "interval": 0.5, "reps": 1},
    },
    "api": {
        "default": {"hosts": 10_000, "relays": 10, "duration": 10.0, "reps": 3, "connections": 32},
        "large": {"hosts": 100_000, "relays": 20, "duration": 15.0, "reps": 3, "connections": 32},
        "smoke": {"hosts": 1000, "relays": 2, "duration": 1.0, "reps": 1, "connections": 4},
    },
    "auth": {
        "default": {"logins": [5, 20, 50], "reps": 5},
        "large": {"logins": [5, 20, 50, 100], "reps": 5},
        "smoke": {"logins": [5], "reps": 1},
    },
    "quality": {
        "default": {"hosts": 20, "duration": 6 * 3600.0, "drops": [0.0, 0.01, 0.03, 0.05], "reps": 1},
        "large": {"hosts": 100, "duration": 24 * 3600.0, "drops": [0.0, 0.01, 0.03, 0.05], "reps": 1},
        "smoke": {"hosts": 5, "duration": 1800.0, "drops": [0.05], "reps": 1},
    },
    "persist": {
        "default": {"hosts": 10_000, "reps": 3, "holds_hosts": [5000, 50_000]},
        "large": {"hosts": 50_000, "reps": 3, "holds_hosts": [5000, 50_000]},
        "smoke": {"hosts": 300, "reps": 1, "holds_hosts": [300]},
    },
    "wire": {
        "default": {"leaves": 1000, "intervals": [5.0, 1.0], "window": 60.0, "reps": 3, "decode_leaves": [1000, 5000]},
        "large": {"leaves": 10000, "intervals": [5.0, 1.0], "window": 60.0, "reps": 3, "decode_leaves": [1000, 5000]},
        "smoke": {"leaves": 100, "intervals": [5.0], "window": 5.0, "reps": 1, "decode_leaves": [100]},
    },
}
MODULES = {"fanin": "fanin", "ingest": "ingest", "detector": "detector", "lag": "lag", "api": "api_load",
           "persist": "persist", "auth": "auth", "quality": "quality", "wire": "wire"}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m bench", description="relaybeat benchmarks (see BENCHMARKS.md)")
    sub = top.add_subparsers(dest="scenario", required=True)
    for name in SIZES:
        p = sub.add_parser(name)
        p.add_argument("--smoke", action="store_true", help="tiny size, results to a temporary directory")
        p.add_argument("--large", action="store_true", help="the issue's large size")
        broker_help = "the monitor's broker: private mosquitto (default) or `relaybeat broker` (amqtt)"
        p.add_argument("--broker", choices=["mosquitto", "embedded"], default="mosquitto", help=broker_help)
        p.add_argument("--out", type=Path, help=f"where JSON and PNG go [{RESULTS}, a temp dir with --smoke]")
        p.add_argument("--reps", type=int, help="repetitions (medians are reported)")
        p.add_argument("--timeout", type=float, default=3600.0, help="give up (and clean up) after this many s")
        if name in ("fanin", "lag"):
            p.add_argument("--leaves", type=int, help="simulated leaves (real MQTT connections)")
            p.add_argument("--relays", type=int, help="relays (each with its own site mosquitto)")
            p.add_argument("--window", type=float, help="measuring window, s")
            p.add_argument("--flush", type=float, default=None, help="relay flush interval, s [1]")
        if name == "fanin":
            p.add_argument("--interval", type=float, default=1.0, help="seconds between a leaf's beats")
            p.add_argument("--settle", type=float, help="seconds to wait after every host is up")
            p.add_argument("--profile", action="store_true", help="one more run per mode under pyinstrument")
            p.add_argument("--modes", nargs="+", choices=["direct", "relayed"], default=["direct", "relayed"],
                           help="run only these sides (`relayed`: compare relay CPU across commits)")  # fmt: skip
        if name == "lag":
            p.add_argument("--kills", type=int, help="leaves stopped at random moments")
            p.add_argument("--interval", type=float, help="seconds between a leaf's beats")
            p.add_argument("--long", action="store_true", help="false-alarm run: 100k hosts, ±20%% jitter, 10 min")
            p.add_argument("--long-hosts", type=int, default=100_000)
            p.add_argument("--long-relays", type=int, default=None, help="synthetic relays in --long [hosts / 1,000]")
            p.add_argument("--long-duration", type=float, default=600.0)
            p.add_argument(
                "--long-wire", type=int, choices=(1, 2), default=2,
                help="--long: version 2 (hosts beat every --long-interval s, relays flush every 1 s)"
                " or 1 (JSON, ±20%% jitter)",
            )  # fmt: skip
            p.add_argument(
                "--long-interval", type=int, default=5,
                help="--long version 2: each host's beat interval, whole seconds"
                " [5, the default a leaf gets; 1: every flush]",
            )  # fmt: skip
        if name == "ingest":
            p.add_argument("--sizes", type=int, nargs="+", help="leaf entries per bundle")
            p.add_argument("--relays", type=int, help="synthetic relays (bundle topics)")
            p.add_argument("--window", type=float, help="measuring window per size, s")
            p.add_argument("--profile-s", type=float, help="seconds of pyinstrument profile (0: none)")
        if name in ("ingest", "api"):
            p.add_argument("--wire", type=int, choices=[1, 2], default=2,
                           help="the synthetic relays' wire version: 2 (indexed deltas, every leaf beating"
                           " once a flush, as relays send by default) or 1 (full JSON bundles) [2]")  # fmt: skip
        if name == "detector":
            p.add_argument("--hosts", type=int, nargs="+", help="tracked hosts for the memory figure")
            p.add_argument("--bundle", type=int, help="entries per bundle")
            p.add_argument("--holds-hosts", type=int, nargs="+", help="hosts behind the relay of each mass event")
            p.add_argument("--holds-bundle", type=int, help="entries of the large keyframe [200,000: the limit]")
            p.add_argument("--holds-only", action="store_true", help="only the loop holds")
        if name == "wire":
            p.add_argument("--leaves", type=int, help="leaves behind the one relay")
            p.add_argument("--intervals", type=float, nargs="+", help="seconds between a leaf's beats [5 1]")
            p.add_argument("--flush", type=float, default=1.0, help="relay flush interval, s [1]")
            p.add_argument("--window", type=float, help="measuring window, s (simulated time)")
            p.add_argument("--decode-leaves", type=int, nargs="+", help="leaves per delta, list vs columnar decode")
        if name == "api":
            p.add_argument("--hosts", type=int, help="hosts tracked by the monitor")
            p.add_argument("--relays", type=int, help="synthetic relays feeding them")
            p.add_argument("--duration", type=float, help="wrk duration per endpoint, s")
            p.add_argument("--connections", type=int, help="wrk connections")
            p.add_argument("--request-rate", type=float, default=None,
                           help="open loop: requests/s per endpoint, latency from when each was due "
                           "[closed loop with --connections]")  # fmt: skip
            p.add_argument("--ingest-rate", type=float, default=None,
                           help="leaf entries/s of background ingest [half the last ingest ceiling]")  # fmt: skip
        if name == "auth":
            p.add_argument("--logins", type=int, nargs="+", help="concurrent logins per storm")
        if name == "quality":
            p.add_argument("--hosts", type=int, help="simulated hosts")
            p.add_argument("--duration", type=float, help="simulated seconds")
            p.add_argument("--interval", type=float, default=1.0, help="seconds between a host's beats")
            p.add_argument("--drops", type=float, nargs="+", help="share of beats the path drops, one run each")
            p.add_argument("--delay-rate", type=float, default=0.02, help="share of beats delayed")
            p.add_argument("--delay-max", type=float, default=1.5, help="longest extra delay, in intervals")
            p.add_argument("--life", type=float, default=3600.0, help="mean seconds between a host's deaths")
            p.add_argument("--dead", type=float, default=30.0, help="seconds a dead host stays dead")
            p.add_argument("--target-detection", type=float, default=8.0, help="target_detection_s")
            p.add_argument("--target-false-alarms", type=float, default=2.0, help="target_false_alarms_per_day")
            p.add_argument("--seed", type=int, default=1)
        if name == "persist":
            p.add_argument("--hosts", type=int, help="hosts behind the relay that dies")
            p.add_argument("--databases", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
            p.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
            p.add_argument("--holds-hosts", type=int, nargs="+",
                           help="hosts of the dying relay in the writer-holds part [5000 50000]")  # fmt: skip
            p.add_argument("--holds-only", action="store_true",
                           help="only the writer's loop holds, in-process (no broker, no monitor process)")  # fmt: skip
    return top


def _alarm(signum: int, frame: FrameType | None) -> None:
    msg = "benchmark timed out (--timeout)"
    raise TimeoutError(msg)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    size = "smoke" if args.smoke else "large" if args.large else "default"
    for key, value in SIZES[args.scenario][size].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.scenario in ("fanin", "lag") and args.flush is None:
        args.flush = 1.0
    out: Path = args.out or (Path(tempfile.mkdtemp(prefix="relaybeat-bench-")) if args.smoke else RESULTS)
    args.out = out
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(args.timeout))
    module = importlib.import_module(f"bench.{MODULES[args.scenario]}")
    try:
        module.run(args, out)
    finally:
        signal.alarm(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
