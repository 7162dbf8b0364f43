"""Detection lag under load: leaves stop beating at random moments; relays stop or die.

Setup: a fresh central broker and `relaybeat monitor` (misses 3); half the leaves beat straight to
the central broker, half through R relays (each with its own site mosquitto); every leaf beats
every `--interval` s. Once everyone is up, `--kills` leaves (half direct, half relayed) go quiet at
uniformly random moments over `--window` s. A poller reads `GET /api/v1/hosts?state=down` every
10 ms and notes when each host first shows `down`.

For each killed host:
- lag = (time `down` is visible in the API) − (its deadline as the monitor computed it, the
  transition's `at`, shown as `since`) — the issue's definition;
- end-to-end lag = visible − (its last beat's send time + interval × misses), an independent check.

Then relays: one is frozen with SIGSTOP (socket open, silent: the deadline path) and one killed
with SIGKILL (the broker sends its Last Will at once): time until every host behind it shows
`unreachable`, from the relay's deadline (SIGSTOP) or from the kill (SIGKILL).

`--long`: the false-alarm run (issue item 4), synthetic relays with ±20 % jitter on beat timing,
counting false `down` transitions over `--long-duration` s. Described in BENCHMARKS.md; not run in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import signal
import sqlite3
import time
from datetime import datetime
from typing import Any

import httpx
import orjson

from bench import mqtt, synth
from bench.leaves import Fleet, Leaf
from bench.procs import Lab, Proc
from bench.report import Report, figure, num, percentiles, table
from tests.processes import wait_until


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class Poller:
    """Notes when each host first shows a state in the API (live detector view)."""

    def __init__(self, api: str, every_s: float = 0.01) -> None:
        self.api = api
        self.every_s = every_s
        self.seen: dict[tuple[str, str], tuple[float, float]] = {}  # (state, host) -> (visible, since)
        self.watch: list[dict[str, Any]] = [{"state": "down"}]
        self.requests = 0

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=self.api, timeout=10) as http:
            while not stop.is_set():
                for params in list(self.watch):
                    response = await http.get("/api/v1/hosts", params={**params, "limit": 10_000})
                    visible = time.time()
                    self.requests += 1
                    for item in orjson.loads(response.content)["items"]:
                        key = (item["state"], item["id"])
                        if key not in self.seen:
                            self.seen[key] = (visible, _epoch(item["since"]))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.every_s)


def _setup(lab: Lab, args: Any, prefix: str) -> tuple[Any, list[Proc], Fleet, list[Leaf]]:
    central = lab.broker(args.broker, "central")
    monitor = lab.monitor(central, prefix, misses=3)
    sites = [lab.broker("mosquitto", f"site{i:02d}") for i in range(args.relays)]
    relays = [lab.relay(f"r{i:02d}", sites[i], central, prefix, args.flush) for i in range(args.relays)]
    half = args.leaves // 2
    leaves = [Leaf(f"d{j:05d}", central.port) for j in range(half)]
    leaves += [Leaf(f"r{j % args.relays:02d}-h{j:05d}", sites[j % args.relays].port) for j in range(args.leaves - half)]
    fleet = Fleet(leaves, prefix, args.interval)
    return monitor, relays, fleet, leaves


async def _one(args: Any, rng: random.Random) -> dict[str, Any]:
    prefix = f"bench{secrets.token_hex(3)}/"
    misses = 3
    timeout = args.interval * misses
    with Lab("lag") as lab:
        monitor, relays, fleet, leaves = _setup(lab, args, prefix)
        try:
            connect = fleet.connect()
            if connect["failed"]:
                msg = f"{connect['failed']} leaves could not connect"
                raise RuntimeError(msg)
            fleet.start()
            await asyncio.to_thread(
                wait_until, lambda: monitor.count(state="up") >= len(leaves), 60 + len(leaves) / 500, "all up", 0.3
            )
            await asyncio.sleep(max(2.0, 2 * args.flush))
            direct = [leaf.host for leaf in leaves if leaf.host.startswith("d")]
            behind = [leaf.host for leaf in leaves if not leaf.host.startswith("d") and not leaf.host.startswith("r00")
                      and not leaf.host.startswith("r01")]  # fmt: skip
            victims = rng.sample(direct, args.kills // 2) + rng.sample(behind, args.kills - args.kills // 2)
            moments = sorted(rng.uniform(0, args.window) for _ in victims)
            poller = Poller(monitor.api)
            stop = asyncio.Event()
            polling = asyncio.create_task(poller.run(stop))
            last_beat: dict[str, float] = {}
            started = time.monotonic()
            for host, at in zip(victims, moments, strict=True):
                await asyncio.sleep(max(0.0, started + at - time.monotonic()))
                last_beat.update(await asyncio.to_thread(fleet.kill, [host]))
            await asyncio.sleep(timeout + args.flush + 1.5)

            # Relays: r00 frozen (silent, connection open), then r01 killed (Last Will).
            relay_results = {}
            for relay_id, how in (("r00", "SIGSTOP"), ("r01", "SIGKILL")):
                proc = relays[int(relay_id[1:])]
                hosts_up = monitor.count(relay=relay_id, state="up")
                poller.watch.append({"state": "unreachable", "relay": relay_id})
                await asyncio.sleep(0.05)
                signalled = time.time()
                proc.signal(signal.SIGSTOP if how == "SIGSTOP" else signal.SIGKILL)
                wait_s = args.flush * misses + 5
                deadline = time.monotonic() + wait_s
                while time.monotonic() < deadline:
                    got = [k for k in poller.seen if k[0] == "unreachable" and k[1].startswith(relay_id + "-")]
                    if len(got) >= hosts_up:
                        break
                    await asyncio.sleep(0.05)
                relay_body = monitor.relay(relay_id) or {}
                times = [v[0] for k, v in poller.seen.items() if k[0] == "unreachable" and k[1].startswith(relay_id)]
                relay_deadline = _epoch(relay_body["since"]) if relay_body.get("state") == "down" else float("nan")
                relay_results[how] = {
                    "relay": relay_id,
                    "hosts_up_before": hosts_up,
                    "hosts_unreachable_seen": len(times),
                    "relay_state": relay_body.get("state"),
                    "relay_deadline_or_death": relay_deadline,
                    "signalled": signalled,
                    "all_visible_after_deadline_s": (max(times) - relay_deadline) if times else float("nan"),
                    "first_visible_after_deadline_s": (min(times) - relay_deadline) if times else float("nan"),
                    "all_visible_after_signal_s": (max(times) - signalled) if times else float("nan"),
                }
            stop.set()
            await polling
            for proc in relays:
                proc.signal(signal.SIGCONT)
        finally:
            await asyncio.to_thread(fleet.close)
    kills = []
    for host in victims:
        seen = poller.seen.get(("down", host))
        kills.append({
            "host": host,
            "group": "direct" if host.startswith("d") else "relayed",
            "last_beat": last_beat.get(host),
            "visible": None if seen is None else seen[0],
            "monitor_deadline": None if seen is None else seen[1],
            "lag_s": None if seen is None else seen[0] - seen[1],
            "e2e_lag_s": None if seen is None else seen[0] - (last_beat[host] + timeout),
        })  # fmt: skip
    return {"kills": kills, "relays": relay_results, "poll_requests": poller.requests}


def _hosts_up(monitor: Any) -> int:
    """Hosts `up` as written to SQL (read beside the monitor: asking its API to count walks every
    host on its event loop, a second's hold at 1M, which would disturb what is measured)."""
    with contextlib.closing(sqlite3.connect(monitor.db_url.removeprefix("sqlite:///"), timeout=30)) as db:
        return int(db.execute("select count(*) from hosts where state = 'up'").fetchone()[0])


async def _long_v2(args: Any) -> dict[str, Any]:
    """Synthetic relays sending version 2 (a keyframe, then indexed deltas) as `relaybeat relay` does,
    flushing every 1 s, each host beating every `--long-interval` s (a fifth of them each flush at the
    default 5 s) with a new seq, each relay's bundle at its own moment of the second, for a long
    window: count false `down`/`unreachable` (in SQL, and what the monitor had not written yet),
    hosts not `up`, memory per host."""
    prefix = f"bench{secrets.token_hex(3)}/"
    relays_n = args.long_relays or max(2, args.long_hosts // 1000)
    size = args.long_hosts // relays_n
    with Lab("long") as lab:
        central = lab.broker(args.broker, "central")
        monitor = lab.monitor(central, prefix, misses=3)
        base_rss = monitor.proc.rss()
        relays = synth.Relays(
            central.port, prefix, relays_n, size, interval_ms=1000, tag="j", wire=2, beat_every=args.long_interval
        )
        await relays.connect()
        started = time.monotonic()
        rss: list[int] = []
        not_up: list[int] = []  # hosts not `up`, sampled every 10 s once everyone was
        tick = 0
        all_up_s: float | None = None
        while time.monotonic() - started < args.long_duration:
            for k, r in enumerate(relays.ids):
                await asyncio.sleep(max(0.0, started + tick + k / relays_n - time.monotonic()))
                relays.publish(r)
            tick += 1
            if tick % 10 == 0:
                monitor.proc.check()
                rss.append(monitor.proc.rss())
                up = _hosts_up(monitor)
                if all_up_s is None and up == relays_n * size:
                    all_up_s = time.monotonic() - started
                elif all_up_s is not None:
                    not_up.append(relays_n * size - up)
        await asyncio.sleep(2.0)
        try:
            health = monitor.http.get("/healthz", timeout=60).json()
        except httpx.HTTPError as exc:  # a monitor too far behind to answer: say so in the report
            health = {"received": None, "rejected": None, "unwritten": None, "error": f"/healthz: {type(exc).__name__}"}
        relays.close()
        with contextlib.closing(sqlite3.connect(monitor.db_url.removeprefix("sqlite:///"))) as db:
            query = "select count(*) from transitions where to_state in ('down', 'unreachable')"
            false_down = int(db.execute(query).fetchone()[0])  # every one is false: nobody stopped
    hosts = relays_n * size
    return {
        "wire": 2,
        "interval_s": args.long_interval,
        "hosts": hosts,
        "relays": relays_n,
        "duration_s": args.long_duration,
        "all_up_after_s": all_up_s,
        "most_not_up_after": max(not_up, default=None),
        "false_down": false_down,  # in SQL; `unwritten` decisions were not there yet
        "unwritten": health.get("unwritten"),
        "bundles_published": relays.published,
        "received": health["received"],
        "rejected": health["rejected"],
        "health_error": health.get("error"),
        "rss_mb_base_first_last": [base_rss / 2**20, *(x / 2**20 for x in rss[:1] + rss[-1:])],
        "rss_bytes_per_host_last": (rss[-1] - base_rss) / hosts if rss else None,
    }


async def _long(args: Any) -> dict[str, Any]:
    """Synthetic relays, jittered beats, a long window: count false `down`."""
    prefix = f"bench{secrets.token_hex(3)}/"
    relays_n = args.long_relays or max(2, args.long_hosts // 1000)
    size = args.long_hosts // relays_n
    rng = random.Random(7)
    with Lab("long") as lab:
        central = lab.broker(args.broker, "central")
        monitor = lab.monitor(central, prefix, misses=3)
        clients = {}
        boot = secrets.token_hex(4)
        ids = {f"j{r:03d}": [f"j{r:03d}-h{i:06d}" for i in range(size)] for r in range(relays_n)}
        for r in ids:
            clients[r] = await mqtt.connect("127.0.0.1", central.port, f"bench-{r}-{boot}")
        heard = {r: [time.monotonic() - rng.uniform(0, 1) for _ in ids[r]] for r in ids}
        nxt = {r: [h + rng.uniform(0.8, 1.2) for h in heard[r]] for r in ids}
        seq = dict.fromkeys(ids, 0)
        started = time.monotonic()
        flush = 1.0
        tick = 0
        rss = []
        while time.monotonic() - started < args.long_duration:
            tick += 1
            await asyncio.sleep(max(0.0, started + tick * flush - time.monotonic()))
            now = time.monotonic()
            for r, hosts in ids.items():
                hr, nr = heard[r], nxt[r]
                for i in range(len(hosts)):
                    while nr[i] <= now:  # beats that arrived at the relay since the last flush
                        hr[i] = nr[i]
                        nr[i] += rng.uniform(0.8, 1.2)
                seq[r] += 1
                entries = [[h, None, round((now - hr[i]) * 1000), 1000, "ok"] for i, h in enumerate(hosts)]
                body = {"v": 1, "relay": r, "boot": boot, "seq": seq[r], "flush_ms": 1000, "hosts": entries}
                clients[r].publish(f"{prefix}bundle/{r}".encode(), orjson.dumps(body), qos=1)
            if tick % 10 == 0:
                rss.append(monitor.proc.rss())
        await asyncio.sleep(2.0)
        transitions = monitor.get("/api/v1/transitions", limit=10_000)["items"]
        for c in clients.values():
            c.close()
    false_down = [t for t in transitions if t["to"] in ("down", "unreachable") and t["event"] == "transition"]
    return {
        "hosts": relays_n * size,
        "duration_s": args.long_duration,
        "false_down": len(false_down),
        "examples": false_down[:5],
        "rss_mb_start_end": [rss[0] / 2**20, rss[-1] / 2**20] if rss else [],
    }


def _lags(kills: list[dict[str, Any]], group: str, key: str) -> dict[str, float]:
    return percentiles([k[key] * 1000 for k in kills if k["group"] == group and k[key] is not None])


def run(args: Any, out: Any) -> Report:
    report = Report("lag_long" if args.long else "lag", vars(args))  # the long run keeps its own file
    if args.long and args.long_wire == 2:
        result = asyncio.run(_long_v2(args))
        report.data = {"long": result}
        report.say(
            f"\nfalse alarms: {result['hosts']:,} hosts behind {result['relays']} relays (version 2, flush 1 s, hosts"
            f" beating every {result['interval_s']} s), {result['duration_s']:g} s: all up after"
            f" {result['all_up_after_s']} s, then at most {result['most_not_up_after']} not up;"
            f" {result['false_down']} down/unreachable in SQL at the end ({result['unwritten']} decisions unwritten);"
            f" monitor RSS MB base/first/last {[round(x) for x in result['rss_mb_base_first_last']]},"
            f" {result['rss_bytes_per_host_last']} B per host"
        )
        report.save(out)
        return report
    if args.long:
        result = asyncio.run(_long(args))
        report.data = {"long": result}
        report.say(
            f"\nfalse alarms: {result['hosts']:,} hosts, ±20 % jitter, {result['duration_s']:g} s:"
            f" {result['false_down']} false down/unreachable; monitor RSS MB start/end {result['rss_mb_start_end']}"
        )
        report.save(out)
        return report
    rng = random.Random(42)
    runs = [asyncio.run(_one(args, rng)) for _ in range(args.reps)]
    kills = [k for r in runs for k in r["kills"]]
    missed = [k["host"] for k in kills if k["visible"] is None]
    summary = {
        group: {"lag_ms": _lags(kills, group, "lag_s"), "e2e_lag_ms": _lags(kills, group, "e2e_lag_s")}
        for group in ("direct", "relayed")
    }
    relays = {how: [r["relays"][how] for r in runs] for how in ("SIGSTOP", "SIGKILL")}
    report.data = {"summary": summary, "missed": missed, "relays": relays, "runs": runs}
    report.say(
        f"\ndetection lag: {args.leaves:,} leaves beating every {args.interval:g} s (misses 3), half direct, half"
        f" through {args.relays} relays (flush {args.flush:g} s), broker {args.broker}; {args.kills} kills per run,"
        f" {args.reps} run(s); API polled every 10 ms. Milliseconds.\n"
    )
    rows = []
    for group in ("direct", "relayed"):
        for key, label in (
            ("lag_ms", "visible − monitor's deadline"),
            ("e2e_lag_ms", "visible − (last beat + timeout)"),
        ):
            s = summary[group][key]
            rows.append((group, label, int(s.get("n", 0)), num(s.get("p50"), 1), num(s.get("p90"), 1),
                         num(s.get("p99"), 1), num(s.get("max"), 1), num(s.get("min"), 1)))  # fmt: skip
    report.say(table(["hosts", "lag", "n", "p50", "p90", "p99", "max", "min"], rows))
    if missed:
        report.say(f"\nnever seen down: {missed}")
    rrows = []
    for how, label in (
        ("SIGSTOP", "relay frozen (silent), after its deadline"),
        ("SIGKILL", "relay killed, after the kill"),
    ):
        key = "all_visible_after_deadline_s" if how == "SIGSTOP" else "all_visible_after_signal_s"
        values = [r[key] * 1000 for r in relays[how]]
        counts = [f"{r['hosts_unreachable_seen']}/{r['hosts_up_before']}" for r in relays[how]]
        rrows.append((label, ", ".join(num(v, 0) for v in values), ", ".join(counts)))
    report.say("\n" + table(["relay death", "all its hosts unreachable in the API (ms), per run", "hosts seen"], rrows))

    fig, axes = figure(1, 2, width=11, height=3.6)
    for ax, key, title in ((axes[0][0], "lag_s", "visible − monitor's deadline"),
                           (axes[0][1], "e2e_lag_s", "visible − (last beat + timeout)")):  # fmt: skip
        for group, color in (("direct", "#c0504d"), ("relayed", "#4f81bd")):
            values = sorted(k[key] * 1000 for k in kills if k["group"] == group and k[key] is not None)
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], color=color, label=group)
        ax.axvline(50, color="grey", linestyle=":", label="50 ms target")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of killed hosts")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"detection lag (CDF), {args.leaves:,} leaves, relay flush {args.flush:g} s", fontsize=10)
    report.save(out, {f"lag_{args.broker}": fig})
    return report
