"""`python -m bench auth`: how long the embedded broker's event loop stalls while logins are checked.

N clients log in at once with a good password (argon2, as in the shipped password file) to an
embedded broker running in this process, each as a user not seen before (a repeated login is
answered from the broker's memory of recent logins, without argon2); a probe sleeping 10 ms at a
time records how late it wakes.
The checks run in the broker's auth threads (tests/test_broker.py asserts that), so the stall is
what the event loop itself costs, plus whatever else the box is doing: quote it with the load.
The test suite used to assert a bound on this figure; on a busy 2-core box it failed (issue 14).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tempfile
import time
from pathlib import Path

import aiomqtt

from bench.report import Report, figure, med, spread, table
from relaybeat.broker_config.embedded import EmbeddedBroker
from relaybeat.broker_config.passwords import add_user
from relaybeat.broker_config.settings import BrokerSettings

PASSWORD = "bench-password-0123456789"  # noqa: S105 - a throwaway broker's throwaway user


async def _one_storm(broker: EmbeddedBroker, users: list[str]) -> tuple[float, float]:
    """(worst event-loop lag, seconds for every login) for one concurrent good login per user."""
    worst = 0.0
    probing = True

    async def probe() -> None:
        nonlocal worst
        while probing:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            worst = max(worst, time.monotonic() - before - 0.01)

    async def login(user: str) -> None:
        async with aiomqtt.Client(broker.host, broker.port, username=user, password=PASSWORD, identifier=user):
            pass

    gc.collect()
    gc.freeze()  # a full collection over this process's imports would stall the loop by itself
    try:
        prober = asyncio.create_task(probe())
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await asyncio.gather(*(login(user) for user in users))
        took = time.monotonic() - started
        probing = False
        await prober
    finally:
        gc.unfreeze()
    return worst, took


async def _measure(logins: list[int], reps: int, folder: Path) -> dict[int, dict[str, list[float]]]:
    passwords = folder / "passwd"
    storms = {(count, rep): [f"c{count}r{rep}u{n}" for n in range(count)] for count in logins for rep in range(reps)}
    for users in storms.values():
        for user in users:
            add_user(passwords, user, PASSWORD)
    results: dict[int, dict[str, list[float]]] = {}
    async with EmbeddedBroker(BrokerSettings(port=0, password_file=passwords)) as broker:
        for count in logins:
            runs = [await _one_storm(broker, storms[count, rep]) for rep in range(reps)]
            results[count] = {"stall_s": [r[0] for r in runs], "all_logins_s": [r[1] for r in runs]}
    return results


def run(args: argparse.Namespace, out: Path) -> None:
    report = Report("auth", {k: v for k, v in vars(args).items() if k != "out"})
    with tempfile.TemporaryDirectory(prefix="relaybeat-bench-auth-") as folder:
        measured = asyncio.run(_measure(args.logins, args.reps, Path(folder)))
    rows = []
    for count, runs in measured.items():
        stall, took = spread(runs["stall_s"]), spread(runs["all_logins_s"])
        report.data[str(count)] = {"stall_s": stall, "all_logins_s": took}
        stall_ms = {k: v if k == "n" else v * 1000 for k, v in stall.items()}
        rows.append([count, med(stall_ms), med(took, 2)])
    report.say(table(["concurrent logins", "worst loop stall, ms (median [range])", "all logged in, s"], rows))
    fig, axes = figure()
    axis = axes[0][0]
    counts = list(measured)
    axis.plot(counts, [report.data[str(c)]["stall_s"]["median"] * 1000 for c in counts], marker="o")
    axis.set_xlabel("concurrent logins with a password")
    axis.set_ylabel("worst event-loop stall, ms")
    report.save(out, {"auth_stall": fig})
