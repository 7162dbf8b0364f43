"""Fan-in, the patent's claim: the same leaves beating (a) straight to the monitor's broker and (b)
through relays, side by side in one run, with the real monitor process doing the work.

For each run, a fresh central broker (the monitor's) and a fresh monitor (`relaybeat monitor`,
SQLite in a temporary directory). Direct: every leaf holds a connection to the central broker and
publishes its beats there. Relayed: R site brokers (private mosquittos), R `relaybeat relay`
processes, each leaf beats to its site broker, the central broker sees R relay connections. The
leaves are raw-socket MQTT clients in worker processes (`bench.leaves`). Measured over a steady
window, after every host is `up`: connections on the central broker (kernel count, and $SYS on
mosquitto), messages per second into the monitor (its own counters), bytes into the monitor's own
MQTT socket (the kernel's tcp_info counter, as `ss -ti` shows it), monitor CPU and the relays' CPU
per leaf heartbeat sent (psutil on their pids), monitor RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bench import mqtt
from bench.leaves import Fleet, Leaf
from bench.procs import Broker, Lab, bytes_between
from bench.report import Report, figure, med, num, render_profile, spread, table
from tests.processes import wait_until

DIRECT_PER_BROKER = 18_000  # leaf connections one broker takes in the direct mode (under the fd cap)

MODES = ("direct", "relayed")


async def _sys_value(port: int, topic: str, timeout_s: float = 3.0) -> str | None:
    got: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    client = await mqtt.connect("127.0.0.1", port, f"bench-sys-{secrets.token_hex(3)}")

    def on_message(t: str, payload: bytes) -> None:
        if t == topic and not got.done():
            got.set_result(payload.decode())

    client.on_message = on_message
    client.subscribe(topic)
    try:
        return await asyncio.wait_for(got, timeout_s)
    except TimeoutError:
        return None
    finally:
        client.close()


def sys_connected(broker: Broker) -> int | None:
    """Mosquitto's own count of connected clients, as it last published it (before we asked)."""
    if broker.kind != "mosquitto":
        return None
    value = asyncio.run(_sys_value(broker.port, "$SYS/broker/clients/connected"))
    return None if value is None else int(value)


def direct_edges(lab: Lab, central: Broker, prefix: str, leaves: int) -> list[Broker]:
    """Direct, beyond what one broker can hold here (each connection an fd; the hard RLIMIT_NOFILE
    is 20,000): the leaves connect to edge mosquittos that bridge every beat, one PUBLISH each, into
    the central broker. The monitor still gets one message per leaf beat, as if each leaf were
    connected to its broker; only the central broker's connection count differs. None when one
    broker holds them all."""
    if leaves <= DIRECT_PER_BROKER:
        return []
    bridge = (
        "connection {name}\nremote_clientid {name}\naddress 127.0.0.1:{port}\ntopic {prefix}beat/# out 0\n"
        "cleansession true\nbridge_protocol_version mqttv311\nstart_type automatic\n"
    )
    names = [f"edge{i:02d}" for i in range(-(-leaves // DIRECT_PER_BROKER))]
    return [lab.broker("mosquitto", name, bridge.format(name=name, port=central.port, prefix=prefix)) for name in names]


def one_run(mode: str, args: Any, wrap: list[str] | None = None) -> dict[str, Any]:
    n, r = args.leaves, args.relays
    prefix = f"bench{secrets.token_hex(3)}/"
    with Lab("fanin") as lab:
        central = lab.broker(args.broker, "central")
        monitor = lab.monitor(central, prefix, wrap=wrap)
        relays = []
        edges: list[Broker] = []
        if mode == "relayed":
            sites = [lab.broker("mosquitto", f"site{i:02d}") for i in range(r)]
            relays = [lab.relay(f"r{i:02d}", sites[i], central, prefix, args.flush) for i in range(r)]
            leaves = [Leaf(f"h{j:06d}", sites[j % r].port) for j in range(n)]

            def relays_up() -> bool:
                for proc in relays:
                    proc.check()
                return bool(sum(x["state"] == "up" for x in monitor.get("/api/v1/relays")["items"]) == r)

            wait_until(relays_up, 60 + 3 * r, f"{r} relays up", 0.5)
        else:
            edges = direct_edges(lab, central, prefix, n)
            ports = [b.port for b in edges] or [central.port]
            leaves = [Leaf(f"h{j:06d}", ports[j % len(ports)]) for j in range(n)]
        idle_t, idle_cpu = time.monotonic(), monitor.proc.cpu_s()
        idle_relay_cpu = sum(p.cpu_s() for p in relays)
        fleet = Fleet(leaves, prefix, args.interval)
        try:
            connect = fleet.connect(timeout_s=120)
            if connect["failed"]:
                msg = f"{connect['failed']} of {n} leaves could not connect"
                raise RuntimeError(msg)
            idle_s = time.monotonic() - idle_t
            idle = (monitor.proc.cpu_s() - idle_cpu) / idle_s
            relays_idle = (sum(p.cpu_s() for p in relays) - idle_relay_cpu) / idle_s
            fleet.start()
            wait_until(lambda: monitor.count(state="up") >= n, 60 + n / 500, f"{n} hosts up", 0.5)
            time.sleep(args.settle)
            conns = central.connections()
            sys_conns = sys_connected(central)
            procs = [monitor.proc]
            h0 = monitor.health()["received"]
            bytes0 = monitor.proc.bytes_from(central.port)
            sent0, cpu0, t0 = fleet.sent(), monitor.proc.cpu_s(), time.monotonic()
            broker0 = central.proc.cpu_s()
            relay0 = sum(p.cpu_s() for p in relays)
            rss_max = 0
            while time.monotonic() - t0 < args.window:
                rss_max = max(rss_max, monitor.proc.rss())
                time.sleep(min(1.0, max(0.0, args.window - (time.monotonic() - t0))))
            cpu1, t1, sent1 = monitor.proc.cpu_s(), time.monotonic(), fleet.sent()
            bytes1 = monitor.proc.bytes_from(central.port)
            broker1 = central.proc.cpu_s()
            relay1 = sum(p.cpu_s() for p in relays)
            h1 = monitor.health()["received"]
            rss_max = max(rss_max, monitor.proc.rss())
            down = monitor.count(state="down") + monitor.count(state="unreachable")
            for p in procs:
                p.check()
        finally:
            fleet.close()
        if wrap:
            monitor.proc.stop(60)  # the profiler writes its report on a clean exit
    wall = t1 - t0
    beats = sent1 - sent0
    msgs = sum(h1.get(k, 0) - h0.get(k, 0) for k in ("beats", "bundles", "relay_offline"))
    entries = h1.get("bundle_entries", 0) - h0.get("bundle_entries", 0) + h1.get("beats", 0) - h0.get("beats", 0)
    bytes_in = bytes_between(bytes0, bytes1)
    per_beat = 1 / beats if beats else float("nan")
    return {
        "mode": mode,
        "leaves": n,
        "leaves_connected": connect["connected"],
        "connect_s": connect["connect_s"],
        "connections": conns,
        "connections_excluding_monitor": conns - 1,
        "edge_brokers": len(edges),  # direct beyond one broker's fd cap: leaves behind bridging edges
        "sys_connected": sys_conns,
        "window_s": wall,
        "leaf_beats_sent": beats,
        "leaf_beats_per_s": beats / wall,
        "monitor_msgs_per_s": msgs / wall,
        "monitor_entries_per_s": entries / wall,
        "monitor_cpu_s": cpu1 - cpu0,
        "monitor_cores": (cpu1 - cpu0) / wall,
        "monitor_idle_cores": idle,
        "monitor_cpu_s_per_1000_beats": (cpu1 - cpu0) / (beats / 1000) if beats else float("nan"),
        # The same per leaf beat that reached the monitor (differs when the broker drops or lags).
        "monitor_cpu_s_per_1000_received": (cpu1 - cpu0) / (entries / 1000) if entries else float("nan"),
        "monitor_cpu_us_per_beat": (cpu1 - cpu0) * 1e6 * per_beat,
        # TCP payload bytes into the monitor's MQTT connection(s) to its broker, from the kernel.
        "monitor_bytes_in": bytes_in,
        "monitor_bytes_per_beat": bytes_in * per_beat,
        "monitor_bytes_per_s": bytes_in / wall,
        "loadavg": os.getloadavg(),
        "monitor_rss_mb": rss_max / 2**20,
        "broker_cores": (broker1 - broker0) / wall,
        "relays_cores": (relay1 - relay0) / wall,
        "relays_idle_cores": relays_idle if relays else float("nan"),
        "relays_cpu_us_per_beat": (relay1 - relay0) * 1e6 * per_beat if relays else float("nan"),
        "not_up_at_end": down,
    }


def run(args: Any, out: Any) -> Report:
    report = Report("fanin", vars(args))
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    ratios: list[float] = []
    byte_ratios: list[float] = []
    for rep in range(args.reps):
        modes = [m for m in MODES if m in getattr(args, "modes", MODES)]
        order = modes if rep % 2 == 0 else modes[::-1]
        pair = {}
        for mode in order:
            result = one_run(mode, args)
            runs[mode].append(result)
            pair[mode] = result
            print(
                f"  rep {rep + 1} {mode:8s}: conns {result['connections']}, {result['monitor_msgs_per_s']:,.0f} msg/s,"
                f" monitor {result['monitor_cpu_us_per_beat']:.1f} µs and {result['monitor_bytes_per_beat']:.1f} B"
                f" per leaf beat, relays {result['relays_cpu_us_per_beat']:.1f} µs per leaf beat,"
                f" {result['monitor_rss_mb']:.0f} MB, load {' / '.join(f'{x:.2f}' for x in result['loadavg'])}",
                flush=True,
            )
        if len(pair) < len(MODES):  # --modes: one side only, no ratio
            continue
        with contextlib.suppress(ZeroDivisionError):
            ratios.append(
                pair["direct"]["monitor_cpu_s_per_1000_beats"] / pair["relayed"]["monitor_cpu_s_per_1000_beats"]
            )
        with contextlib.suppress(ZeroDivisionError):
            byte_ratios.append(pair["direct"]["monitor_bytes_per_beat"] / pair["relayed"]["monitor_bytes_per_beat"])
    keys = ["connections", "monitor_msgs_per_s", "monitor_cpu_s_per_1000_beats", "monitor_cpu_s_per_1000_received",
            "monitor_cpu_us_per_beat", "monitor_bytes_per_beat", "monitor_bytes_per_s",
            "monitor_entries_per_s", "monitor_cores", "monitor_rss_mb",
            "monitor_idle_cores", "broker_cores", "relays_cores", "relays_idle_cores", "relays_cpu_us_per_beat",
            "leaf_beats_per_s", "not_up_at_end"]  # fmt: skip
    summary = {mode: {k: spread(x[k] for x in runs[mode]) for k in keys} for mode in MODES}
    d, rl = summary["direct"], summary["relayed"]
    ratio = spread(ratios)
    report.data = {
        "runs": runs,
        "summary": summary,
        "ratio_cpu_per_beat": ratio,
        "ratio_bytes_per_beat": spread(byte_ratios),
        "ratio_msgs": d["monitor_msgs_per_s"]["median"] / max(1e-9, rl["monitor_msgs_per_s"]["median"]),
        "ratio_connections": d["connections"]["median"] / max(1, rl["connections"]["median"]),
        "relayed_upstream_connections": [x["connections_excluding_monitor"] for x in runs["relayed"]],
        "relayed_upstream_connections_sys": [x["sys_connected"] for x in runs["relayed"]],
    }
    report.say(
        f"\nfan-in: {args.leaves:,} leaves × 1 beat / {args.interval:g} s,"
        f" {args.relays} relays (flush {args.flush:g} s),"
        f" broker {args.broker}, window {args.window:g} s, {args.reps} rep(s): median [min–max];"
        f" load (1/5/15 min) at start {' / '.join(f'{x:.2f}' for x in report.before['loadavg'])}\n"
    )
    rows = [
        ("connections on the monitor's broker", med(d["connections"]), med(rl["connections"]),
         num(report.data["ratio_connections"], 1) + "×"),
        ("messages/s into the monitor", med(d["monitor_msgs_per_s"]), med(rl["monitor_msgs_per_s"]),
         num(report.data["ratio_msgs"], 1) + "×"),
        ("bytes into the monitor's socket per leaf beat", med(d["monitor_bytes_per_beat"], 1),
         med(rl["monitor_bytes_per_beat"], 1), med(report.data["ratio_bytes_per_beat"], 2) + "×"),
        ("bytes/s into the monitor's socket", med(d["monitor_bytes_per_s"]), med(rl["monitor_bytes_per_s"]), ""),
        ("monitor CPU µs per leaf beat", med(d["monitor_cpu_us_per_beat"], 1), med(rl["monitor_cpu_us_per_beat"], 1),
         med(ratio, 1) + "×"),
        ("relays' CPU µs per leaf beat (all relays)", "–", med(rl["relays_cpu_us_per_beat"], 1), ""),
        ("monitor CPU s per 1,000 leaf beats", med(d["monitor_cpu_s_per_1000_beats"], 4),
         med(rl["monitor_cpu_s_per_1000_beats"], 4), med(ratio, 1) + "×"),
        ("  … per 1,000 leaf beats received", med(d["monitor_cpu_s_per_1000_received"], 4),
         med(rl["monitor_cpu_s_per_1000_received"], 4), ""),
        ("leaf beats received/s (entries)", med(d["monitor_entries_per_s"]), med(rl["monitor_entries_per_s"]), ""),
        ("monitor CPU (cores)", med(d["monitor_cores"], 3), med(rl["monitor_cores"], 3), ""),
        ("monitor CPU idle before load (cores)", med(d["monitor_idle_cores"], 3), med(rl["monitor_idle_cores"], 3), ""),
        ("monitor RSS (MB)", med(d["monitor_rss_mb"]), med(rl["monitor_rss_mb"]),
         num(d["monitor_rss_mb"]["median"] / max(1e-9, rl["monitor_rss_mb"]["median"]), 2) + "×"),
        ("central broker CPU (cores)", med(d["broker_cores"], 3), med(rl["broker_cores"], 3), ""),
        ("all relays' CPU (cores)", "–", med(rl["relays_cores"], 3), ""),
        ("all relays' CPU idle before load (cores)", "–", med(rl["relays_idle_cores"], 3), ""),
        ("leaf beats sent/s", med(d["leaf_beats_per_s"]), med(rl["leaf_beats_per_s"]), ""),
        ("hosts not up at the end", med(d["not_up_at_end"]), med(rl["not_up_at_end"]), ""),
    ]  # fmt: skip
    report.say(table(["", "direct", f"relayed ({args.relays} relays)", "direct ÷ relayed"], rows))
    edges = max((run["edge_brokers"] for run in runs["direct"]), default=0)
    if edges:
        report.say(
            f"\ndirect: {args.leaves:,} leaf connections are more than one broker holds here (fd cap), so the"
            f" leaves connected to {edges} edge mosquittos bridging every beat into the monitor's broker:"
            " the monitor still got one message per leaf beat; its broker's connections are the bridges"
        )
    upstream = report.data["relayed_upstream_connections"]
    report.say(
        f"\nrelayed: upstream connections on the monitor's broker (kernel count minus the monitor): {upstream}"
        + (f"; $SYS clients/connected minus the monitor: "
           f"{[None if v is None else v - 1 for v in report.data['relayed_upstream_connections_sys']]}"
           if args.broker == "mosquitto" else "")
    )  # fmt: skip

    fig = plot(summary, ratio, args)
    if args.profile:
        report.data["profiles"] = {mode: profile(mode, args, out) for mode in MODES}
        report.say(f"\nmonitor profiles (pyinstrument, separate runs, not in the figures): {report.data['profiles']}")
    report.save(out, {f"fanin_{args.broker}": fig})
    return report


def profile(mode: str, args: Any, out: Path) -> dict[str, str]:
    """One more run of `mode` with the monitor under pyinstrument; HTML and text saved in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    session = out / f"fanin_profile_{mode}.pyisession"
    one_run(mode, args, wrap=["-m", "pyinstrument", "-r", "pyisession", "-o", str(session), "-i", "0.0005"])
    files = render_profile(session)
    session.unlink(missing_ok=True)
    return files


def plot(summary: dict[str, Any], ratio: dict[str, float], args: Any) -> Figure:
    panels = [
        ("connections", "connections on monitor's broker", True),
        ("monitor_msgs_per_s", "messages/s into monitor", True),
        ("monitor_bytes_per_beat", "bytes into monitor / leaf beat", False),
        ("monitor_cpu_us_per_beat", "monitor CPU µs / leaf beat", False),
        ("monitor_rss_mb", "monitor RSS (MB)", False),
    ]
    panels = [panel for panel in panels if panel[0] in summary["direct"]]  # older JSON lacks some figures
    fig, axes = figure(1, len(panels), width=3.5 * len(panels), height=3.6)
    for ax, (key, title, log) in zip(axes[0], panels, strict=True):
        meds = [summary[m][key]["median"] for m in MODES]
        lows = [summary[m][key]["median"] - summary[m][key]["min"] for m in MODES]
        highs = [summary[m][key]["max"] - summary[m][key]["median"] for m in MODES]
        ax.bar(MODES, meds, yerr=[lows, highs], color=["#c0504d", "#4f81bd"], capsize=4)
        ax.set_title(title, fontsize=9)
        if log and min(meds) > 0:
            ax.set_yscale("log")
        for i, v in enumerate(meds):
            ax.annotate(f"{v:,.4g}", (i, v), ha="center", va="bottom", fontsize=8)
    fig.suptitle(
        f"fan-in: {args.leaves:,} leaves at 1/{args.interval:g} s, direct vs {args.relays} relays ({args.broker});"
        f" CPU ratio {ratio['median']:.1f}×",
        fontsize=10,
    )
    return fig


def replot(path: Path) -> None:
    """Redraw the PNG of a saved fanin JSON (e.g. after a change to the plot)."""
    body = json.loads(path.read_text())
    args = argparse.Namespace(**body["args"])
    fig = plot(body["results"]["summary"], body["results"]["ratio_cpu_per_beat"], args)
    fig.savefig(path.with_name(f"fanin_{args.broker}.png"), dpi=110, bbox_inches="tight")
