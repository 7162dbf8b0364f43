"""The HTTP API under ingest load: `GET /api/v1/hosts/{id}` and a 1,000-host page of `GET /api/v1/hosts`.

Setup: a fresh broker and `relaybeat monitor` (SQLite) tracking `--hosts` hosts fed by synthetic
relays; in the background those relays keep publishing at `--ingest-rate` leaf entries/s (default:
half the wall-clock ceiling of the last `ingest` run at 1,000 entries/bundle, read from
bench/results/ingest.json). Load: `wrk -t1 -c<connections> -d<duration> --latency` when wrk is
installed, else an asyncio httpx client with the same number of connections. Everything shares the
same 2 cores: wrk, the publisher, the broker and the monitor.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import httpx

from bench import synth
from bench.procs import Lab
from bench.report import RESULTS, Report, figure, med, num, spread, table

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def ceiling_from_results() -> float | None:
    path = RESULTS / "ingest.json"
    try:
        body = json.loads(path.read_text())
        return float(body["results"]["summary"]["1000"]["entries_per_s_wall"]["median"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def parse_wrk(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if rps:
        out["req_per_s"] = float(rps.group(1))
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if m:
            out[f"p{pct}_ms"] = float(m.group(1)) * UNITS[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    out["non_2xx"] = float(errors.group(1)) if errors else 0.0
    sock = re.search(r"Socket errors:.*?timeout (\d+)", text)
    out["timeouts"] = float(sock.group(1)) if sock else 0.0
    return out


async def wrk(url: str, connections: int, duration: float) -> dict[str, float]:
    process = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "--timeout", "5s", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    stdout, _ = await asyncio.wait_for(process.communicate(), duration + 30)
    result = parse_wrk(stdout.decode())
    if "req_per_s" not in result:
        msg = f"could not read wrk's output:\n{stdout.decode()}"
        raise RuntimeError(msg)
    return result


async def python_load(url: str, connections: int, duration: float) -> dict[str, float]:
    """The fallback without wrk: `connections` clients in a loop, latencies of every request."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + duration
    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=5) as http:

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                response = await http.get(url)
                latencies.append((time.perf_counter() - started) * 1000)
                errors += response.status_code != 200

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(connections)))
        wall = time.monotonic() - started
    return _latency_figures(latencies, wall, errors)


async def paced_load(url: str, per_s: float, duration: float) -> dict[str, float]:
    """Open loop: one request every 1/`per_s` s, each on its own task, as a dashboard or a script
    asks; a latency counts from when the request was due (no coordinated omission), so a blocked
    event loop shows in full."""
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64), timeout=5) as http:

        async def one(due: float) -> None:
            nonlocal errors
            response = await http.get(url)
            latencies.append((time.perf_counter() - due) * 1000)
            errors += response.status_code != 200

        await http.get(url)  # the connection is open before the clock starts
        started = time.perf_counter()
        tasks = []
        for n in range(max(1, round(per_s * duration))):
            due = started + n / per_s
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(due)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - started
    return _latency_figures(latencies, wall, errors)


def _latency_figures(latencies: list[float], wall: float, errors: int) -> dict[str, float]:
    latencies.sort()

    def pick(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))]

    return {"req_per_s": len(latencies) / wall, "p50_ms": pick(50), "p90_ms": pick(90), "p99_ms": pick(99),
            "non_2xx": float(errors), "timeouts": 0.0}  # fmt: skip


async def _run(args: Any, rate: float) -> dict[str, Any]:
    prefix = f"bench{secrets.token_hex(3)}/"
    closed_tool = "wrk" if shutil.which("wrk") else "python"
    closed_loop = wrk if closed_tool == "wrk" else python_load

    async def load(url: str, connections: int, duration: float) -> dict[str, float]:
        if args.request_rate:
            return await paced_load(url, args.request_rate, duration)
        return await closed_loop(url, connections, duration)

    tool = f"open loop at {args.request_rate:g} req/s" if args.request_rate else closed_tool
    results: dict[str, list[dict[str, float]]] = {"host": [], "page": []}
    with Lab("api") as lab:
        broker = lab.broker(args.broker)
        monitor = lab.monitor(broker, prefix)
        size = max(1, args.hosts // args.relays)
        relays = synth.Relays(broker.port, prefix, args.relays, size, interval_ms=2000, wire=args.wire)
        await relays.connect()
        try:
            async with httpx.AsyncClient(base_url=monitor.api, timeout=30) as http:
                await synth.round_all(relays, http)
                await asyncio.sleep(1.5)
                stop = asyncio.Event()
                rate = max(rate, args.relays * size * 1.0)  # every host at least once a second
                background = asyncio.create_task(synth.paced(relays, rate, stop))
                await asyncio.sleep(1.0)
                host = synth.host_ids(relays.ids[0], size)[size // 2]
                urls = {"host": f"{monitor.api}/api/v1/hosts/{host}", "page": f"{monitor.api}/api/v1/hosts?limit=1000"}
                page_bytes = len((await http.get(urls["page"])).content)
                taken0 = {r: await synth.processed(http, r) for r in relays.ids}
                published0, t0, cpu0 = relays.published, time.monotonic(), monitor.proc.cpu_s()
                for _ in range(args.reps):
                    for name, url in urls.items():
                        results[name].append(await load(url, args.connections, args.duration))
                        print(f"  {name}: {results[name][-1]}", flush=True)
                wall, cpu = time.monotonic() - t0, monitor.proc.cpu_s() - cpu0
                published = relays.published - published0
                stop.set()
                await background
                taken = {r: await synth.processed(http, r) for r in relays.ids}
                not_up = monitor.count(state="down") + monitor.count(state="unreachable")
        finally:
            relays.close()
    taken_bundles = sum(taken[r] - taken0[r] for r in relays.ids)
    return {
        "tool": tool,
        "hosts": args.relays * size,
        "page_bytes": page_bytes,
        "ingest_rate_target": rate,
        "ingest_published_entries_per_s": published * size / wall,
        "ingest_taken_entries_per_s": taken_bundles * size / wall,
        "monitor_cores": cpu / wall,
        "hosts_not_up": not_up,
        "results": results,
    }


def run(args: Any, out: Path) -> Report:
    report = Report("api", vars(args))
    ceiling = ceiling_from_results()
    rate = args.ingest_rate if args.ingest_rate is not None else (ceiling / 2 if ceiling else 100_000.0)
    if args.smoke:
        rate = min(rate, 20_000.0)
    got = asyncio.run(_run(args, rate))
    summary = {
        name: {k: spread(r[k] for r in runs if k in r) for k in ("req_per_s", "p50_ms", "p99_ms", "non_2xx")}
        for name, runs in got["results"].items()
    }
    report.data = {**got, "ingest_ceiling_from_results": ceiling, "summary": summary}
    report.say(
        f"\nAPI under ingest: {got['hosts']:,} hosts; background ingest (wire version {args.wire})"
        f" {got['ingest_taken_entries_per_s']:,.0f}"
        f" entries/s taken (target {got['ingest_rate_target']:,.0f}); {got['tool']}"
        f"{'' if args.request_rate else f' with {args.connections} connections'}, {args.duration:g} s × {args.reps};"
        f" monitor at {got['monitor_cores']:.2f} cores\n"
    )
    rows = [
        ("GET /api/v1/hosts/{id}", med(summary["host"]["req_per_s"]), med(summary["host"]["p50_ms"], 2),
         med(summary["host"]["p99_ms"], 2), med(summary["host"]["non_2xx"])),
        (f"GET /api/v1/hosts?limit=1000 ({got['page_bytes']:,} B)", med(summary["page"]["req_per_s"]),
         med(summary["page"]["p50_ms"], 2), med(summary["page"]["p99_ms"], 2), med(summary["page"]["non_2xx"])),
    ]  # fmt: skip
    report.say(table(["endpoint", "req/s", "p50 ms", "p99 ms", "non-2xx"], rows))
    fig, axes = figure(1, 2, width=10, height=3.6)
    names = ["host", "page"]
    labels = ["/hosts/{id}", "/hosts?limit=1000"]
    axes[0][0].bar(labels, [summary[n]["req_per_s"]["median"] for n in names], color=["#4f81bd", "#9bbb59"])
    axes[0][0].axhline(1000, color="red", linestyle=":", label="1,000 req/s target (page)")
    axes[0][0].set_title("requests/s", fontsize=10)
    axes[0][0].legend(fontsize=7)
    for i, n in enumerate(names):
        axes[0][1].bar([i - 0.2, i + 0.2], [summary[n]["p50_ms"]["median"], summary[n]["p99_ms"]["median"]], 0.4,
                       color=["#4f81bd", "#c0504d"])  # fmt: skip
    axes[0][1].set_xticks(range(len(names)), labels)
    axes[0][1].axhline(10, color="grey", linestyle=":", label="10 ms (single host p99 target)")
    axes[0][1].axhline(50, color="red", linestyle=":", label="50 ms (page p99 target)")
    axes[0][1].set_title("latency p50 (blue) / p99 (red), ms", fontsize=10)
    axes[0][1].legend(fontsize=7)
    fig.suptitle(f"API under {num(got['ingest_taken_entries_per_s'])} entries/s of ingest, {got['hosts']:,} hosts",
                 fontsize=10)  # fmt: skip
    report.save(out, {f"api_{args.broker}": fig})
    return report
