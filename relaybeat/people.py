"""Commands for people at a terminal: `relaybeat status`, `relaybeat history`, `relaybeat watch`.

They only read the monitor's HTTP API (never the database or the broker), so they work from any
machine that reaches it: `--api URL` or RELAYBEAT_API, and `--token` or RELAYBEAT_API_TOKEN when
reads are protected. Every error says what to do next: they raise `ApiError`, which relaybeat/cli.py prints as one
line (exit 2), like the other commands' errors.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from types import FrameType
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from relaybeat.errors import RelaybeatError

DEFAULT_API = "http://127.0.0.1:8000"
STATES = ("down", "unreachable", "unknown", "stopped", "up")  # worst first
STYLE = {"up": "green", "down": "bold red", "unreachable": "yellow", "stopped": "dim", "unknown": "dim"}
HOST_PAGE = 10_000

ApiOption = Annotated[
    str, typer.Option("--api", envvar="RELAYBEAT_API", help="Base URL of the monitor's HTTP API.", show_default=True)
]
TokenOption = Annotated[
    str | None,
    typer.Option("--token", envvar="RELAYBEAT_API_TOKEN", help="Bearer token, if the API protects reads."),
]


class ApiError(RelaybeatError):
    """Something a person can act on; the message says what (relaybeat/cli.py prints it, exit 2)."""


def check_state(state: str | None) -> None:
    if state is not None and state not in STATES:
        msg = f"--state {state[:40]!r}: use one of {', '.join(STATES)}"
        raise ApiError(msg)


def check_since(since: str | None) -> None:
    """`--since`: ISO 8601 with a zone, checked here so a typo never reaches the API."""
    if since is None:
        return
    try:
        moment = datetime.fromisoformat(since.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        msg = f"--since {since[:40]!r}: use an ISO 8601 time with a zone, e.g. 2026-11-29T00:00:00Z"
        raise ApiError(msg)


def _detail(response: httpx.Response) -> str:
    """The `detail` of an error body (`{"error", "detail"}`), in one short line whatever its shape."""
    try:
        body = response.json()
    except ValueError:
        return " ".join(response.text.split())[:200]
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # validation errors: [{"loc": [...], "msg": ...}, ...]
        detail = "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', ())[1:])}: {d.get('msg', '')}" if isinstance(d, dict) else str(d)
            for d in detail
        )
    return " ".join(str(detail).split())[:300]


class Api:
    """The monitor's HTTP API, with errors turned into advice."""

    def __init__(self, base: str, token: str | None, timeout_s: float = 10.0) -> None:
        self.base = base.rstrip("/")
        if not self.base.startswith(("http://", "https://")):
            msg = f"--api {base!r} is not a URL: use e.g. --api {DEFAULT_API}"
            raise ApiError(msg)
        self.token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.base, headers=headers, timeout=timeout_s)

    def unreachable(self, exc: Exception) -> ApiError:
        return ApiError(
            f"cannot reach {self.base} ({type(exc).__name__}): is `relaybeat monitor` running? "
            f"use --api URL or set RELAYBEAT_API"
        )

    def not_relaybeat(self, what: str) -> ApiError:
        return ApiError(
            f"{self.base} does not look like a relaybeat monitor ({what}): "
            f"point --api (or RELAYBEAT_API) at the monitor's API, e.g. {DEFAULT_API}"
        )

    def check(self, response: httpx.Response) -> None:
        if response.status_code == 401:
            if self.token:
                msg = f"{self.base} did not accept the token (HTTP 401): check --token or RELAYBEAT_API_TOKEN"
            else:
                msg = f"{self.base} needs a token for reads: use --token or set RELAYBEAT_API_TOKEN"
            raise ApiError(msg)
        if response.status_code == 403:
            request = response.request
            msg = (
                f"the token is not allowed to {request.method} {request.url.path} on {self.base} "
                f"(HTTP 403: {_detail(response)})"
            )
            raise ApiError(msg)
        if response.status_code >= 400:
            msg = f"{response.request.url}: HTTP {response.status_code}: {_detail(response)}"
            raise ApiError(msg)

    def health(self) -> dict[str, Any]:
        """`/healthz`, which every relaybeat monitor serves without a token: also proves `--api` is one."""
        try:
            response = self.http.get("/healthz")
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from None
        if response.status_code != 200:
            msg = f"GET /healthz answered HTTP {response.status_code}"
            raise self.not_relaybeat(msg)
        try:
            body = response.json()
        except ValueError:
            msg = "GET /healthz is not JSON"
            raise self.not_relaybeat(msg) from None
        if not (isinstance(body, dict) and isinstance(body.get("status"), str) and "database_ok" in body):
            msg = "GET /healthz holds no relaybeat health"
            raise self.not_relaybeat(msg)
        return body

    def get(self, path: str, **params: Any) -> Any:
        """The JSON body, or None for 404."""
        try:
            response = self.http.get(path, params={k: v for k, v in params.items() if v is not None})
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from None
        if response.status_code == 404:
            return None
        self.check(response)
        try:
            return response.json()
        except ValueError:
            msg = f"GET {path} is not JSON"
            raise self.not_relaybeat(msg) from None

    def items(self, path: str, **params: Any) -> dict[str, Any]:
        """A list endpoint's body (`{"items": [...], ...}`); anything else is not relaybeat's API."""
        body = self.get(path, **params)
        if not (isinstance(body, dict) and isinstance(body.get("items"), list)):
            msg = f"GET {path} holds no items"
            raise self.not_relaybeat(msg)
        return body

    def hosts(self, state: str | None, relay: str | None, console: Console) -> list[dict[str, Any]]:
        first = self.items("/api/v1/hosts", state=state, relay=relay, limit=HOST_PAGE, offset=0)
        items: list[dict[str, Any]] = list(first["items"])
        total = int(first["total"])
        if len(items) < total:
            with console.status(f"fetching {total:,} hosts…"):
                while len(items) < total:
                    page = self.items("/api/v1/hosts", state=state, relay=relay, limit=HOST_PAGE, offset=len(items))
                    if not page["items"]:
                        break
                    items.extend(page["items"])
        return items


def styled(state: str) -> str:
    return f"[{STYLE.get(state, '')}]{escape(state)}[/]"


def local_time(iso: str | None, with_date: bool = True) -> str:
    if not iso:
        return "—"
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S")


def ago(iso: str | None) -> str:
    """How long ago, roughly: 42s, 3m 5s, 2h 10m, 4d 1h."""
    if not iso:
        return "—"
    s = int(max(0.0, time.time() - datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def change(item: dict[str, Any]) -> str:
    if item["event"] != "transition":
        return f"[magenta]{escape(item['event'].replace('_', ' '))}[/]"
    return f"{styled(item['from'])} → {styled(item['to'])}"


# ------------------------------------------------------------------------------------ status


def _cluster_line(health: dict[str, object]) -> str:
    """With hot standbys: which node this is and which one is active."""
    node, active = health.get("node"), health.get("active_node")
    if node is None:
        return ""
    if health.get("role") == "active":
        return f" · node {escape(str(node))} ([green]active[/])"
    return f" · node {escape(str(node))} (standby; active: {escape(str(active or 'none'))})"


def status(
    state: Annotated[str | None, typer.Option(help=f"Only hosts in this state ({', '.join(STATES)}).")] = None,
    relay: Annotated[str | None, typer.Option(help="Only hosts heard through this relay.")] = None,
    search: Annotated[str | None, typer.Option(help="Only hosts whose id contains this text.")] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many hosts (0: all).", min=0)] = 50,
    quality: Annotated[
        bool, typer.Option("--quality", help="The detector's own quality over the last 24 h instead (T_D, λ_M, P_A).")
    ] = False,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = None,
) -> None:
    """Relays and hosts with their states, worst first (a colored table from the API)."""
    check_state(state)
    console = Console(highlight=False)
    if quality:
        print_quality(Api(api, token).get("/api/v1/quality", relay=relay), console)
        return
    client = Api(api, token)
    health = client.health()
    relays = client.items("/api/v1/relays")["items"]
    hosts = client.hosts(state, relay, Console(stderr=True))
    if search:
        needle = search.lower()
        hosts = [h for h in hosts if needle in h["id"].lower()]
    rank = {s: i for i, s in enumerate(STATES)}
    hosts.sort(key=lambda h: (rank.get(h["state"], len(STATES)), h["id"]))

    mood = "[green]ok[/]" if health["status"] == "ok" else f"[bold red]{escape(health['status'])}[/]"
    why = " (blind: nothing turns down)" if health.get("blind") else ""
    counts = Counter(h["state"] for h in hosts)
    summary = ", ".join(f"{n} {styled(s)}" for s in STATES if (n := counts[s]))
    listed = f"{len(hosts):,} hosts shown ({summary or 'none'})"
    console.print(f"relaybeat at {escape(client.base)}: {mood}{why} · {listed}{_cluster_line(health)}")

    if relay is not None:
        relays = [r for r in relays if r["id"] == relay]
    if relays and not (state or search):
        table = Table(title="relays", title_justify="left")
        for column in ("relay", "state", "parent", "hosts", "since", "last seen"):
            table.add_column(column)
        for r in relays:
            flap = " [magenta]flapping[/]" if r["flapping"] else ""
            table.add_row(
                escape(r["id"]), styled(r["state"]) + flap, escape(r["parent"] or "—"), str(r["hosts"]),
                ago(r["since"]), local_time(r["last_seen"]),
            )  # fmt: skip
        console.print(table)

    if not hosts:
        console.print("no host matches" if (state or relay or search) else "no host has beaten yet")
        return
    shown = hosts if limit == 0 else hosts[:limit]
    table = Table(title="hosts", title_justify="left")
    for column in ("host", "state", "for", "relay", "last seen"):
        table.add_column(column)
    for h in shown:
        flap = " [magenta]flapping[/]" if h["flapping"] else ""
        table.add_row(
            escape(h["id"]), styled(h["state"]) + flap, ago(h["since"]), escape(h["relay"] or "direct"),
            local_time(h["last_seen"]),
        )  # fmt: skip
    console.print(table)
    if len(shown) < len(hosts):
        console.print(
            f"… and {len(hosts) - len(shown):,} more: narrow with --state/--relay/--search, or --limit 0 for all"
        )


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} s"


def print_quality(report: dict[str, Any], console: Console) -> None:
    """`status --quality`: how good the detector's judgement was, fleet, per relay, per subject."""
    since, until = local_time(report["since"]), local_time(report["until"])
    console.print(f"detector quality from {since} to {until}")
    table = Table(title="quality", title_justify="left")
    for column in ("scope", "subjects", "outages", "real deaths", "false alarms", "T_D (detection)",
                   "λ_M (false alarms/day each)", "T_M (false alarm lasts)", "P_A (right)"):  # fmt: skip
        table.add_column(column)
    rows: list[tuple[str, dict[str, Any]]] = []
    for scope in ("hosts", "relays"):
        if report.get(scope):
            rows.append((f"all {scope}", report[scope]))
    rows += [(f"hosts via {escape(r)}", f) for r, f in report.get("by_relay", {}).items()]
    rows += [(f"{s['kind']} {escape(s['id'])}", s) for s in report.get("subjects", [])[:20]]
    for scope, f in rows:
        rate = f["false_alarms_per_day"]
        accuracy = f["query_accuracy"]
        wrong = f"[bold red]{f['false_alarms']}[/]" if f["false_alarms"] else "0"
        table.add_row(
            scope, str(f["subjects"]), str(f["outages"]), str(f["deaths"]), wrong, _seconds(f["detection_s_mean"]),
            "—" if rate is None else f"{rate:.3g}", _seconds(f["mistake_duration_s"]),
            "—" if accuracy is None else f"{100 * accuracy:.4f} %",
        )  # fmt: skip
    console.print(table)
    alarms = report.get("false_alarms", [])
    for a in alarms[-10:]:
        console.print(
            f"{local_time(a['opened_at'])}  {escape(a['kind'])} {escape(a['subject'])}  [yellow]false alarm[/] "
            f"for {_seconds(_span(a['opened_at'], a['closed_at']))}: {escape(a['detail'])}"
        )
    if not alarms:
        console.print("no false alarm proved in the window")


def _span(start: str, end: str) -> float:
    begin = datetime.fromisoformat(start.replace("Z", "+00:00"))
    return (datetime.fromisoformat(end.replace("Z", "+00:00")) - begin).total_seconds()


# ----------------------------------------------------------------------------------- history


def history(
    subject: Annotated[str, typer.Argument(help="A host id (or a relay id).")],
    limit: Annotated[int, typer.Option(help="At most this many transitions, the newest.", min=1, max=10_000)] = 20,
    since: Annotated[str | None, typer.Option(help="Only from this time on (ISO 8601 with a zone, e.g. ...Z).")] = None,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = None,
) -> None:
    """A host's (or relay's) transitions, oldest first, from the history in SQL."""
    check_since(since)
    console = Console(highlight=False)
    client = Api(api, token)
    client.health()  # a 404 below then means an unknown subject, not some other server
    kind, body = "host", client.get(f"/api/v1/hosts/{subject}/transitions", limit=limit, since=since)
    if body is None:
        kind, body = "relay", client.get(f"/api/v1/relays/{subject}/transitions", limit=limit, since=since)
    if body is None:
        msg = f"no host or relay {subject!r} is known to {client.base}: try `relaybeat status --search {subject}`"
        raise ApiError(msg)
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        what = f"GET /api/v1/{kind}s/{subject}/transitions holds no items"
        raise client.not_relaybeat(what)
    items = list(reversed(body["items"]))
    if not items:
        console.print(f"{kind} {escape(subject)}: no transitions" + (" since then" if since else ""))
        return
    table = Table(title=f"{kind} {escape(subject)}", title_justify="left")
    for column in ("at", "change", "reason", "relay"):
        table.add_column(column)
    for t in items:
        table.add_row(local_time(t["at"]), change(t), escape(t["reason"]), escape(t["relay"] or ""))
    console.print(table)


# ------------------------------------------------------------------------------------- watch


def parse_events(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Server-Sent Events from text lines: one dict per event, comments (heartbeats) skipped."""
    event: dict[str, str] = {}
    for line in lines:
        if not line:
            if event:
                yield event
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            event[name] = f"{event[name]}\n{value}" if name in event else value


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def watch(
    state: Annotated[str | None, typer.Option(help=f"Only transitions into this state ({', '.join(STATES)}).")] = None,
    search: Annotated[str | None, typer.Option(help="Only subjects whose id contains this text.")] = None,
    after_id: Annotated[
        int | None, typer.Option(help="First replay every transition after this id (see `history`).", min=0)
    ] = None,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = None,
) -> None:
    """Live transitions as they are decided (the API's event stream); resumes after a dropped connection."""
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    check_state(state)
    with contextlib.suppress(ValueError):  # not in the main thread (run embedded, or by a test): Ctrl-C only
        signal.signal(signal.SIGTERM, _interrupt)
        # Started with SIGINT ignored (a background job of a script: POSIX shells do that), Python
        # leaves it ignored and `kill -INT` would not stop it: stop on it anyway
        signal.signal(signal.SIGINT, _interrupt)
    client = Api(api, token, timeout_s=10.0)
    client.health()  # says so at once when --api is some other server
    last_id = after_id
    connected_once = False
    delay_s = 1.0
    try:
        while True:
            try:
                headers = {"Accept": "text/event-stream"}
                if last_id is not None:
                    headers["Last-Event-ID"] = str(last_id)
                with client.http.stream(
                    "GET", "/api/v1/events", headers=headers, timeout=httpx.Timeout(10.0, read=None)
                ) as response:
                    client.check(response)
                    if not response.headers.get("content-type", "").startswith("text/event-stream"):
                        msg = "GET /api/v1/events is not an event stream"
                        raise client.not_relaybeat(msg)
                    resumed = "" if last_id is None else f", resuming after #{last_id}"
                    verb = "reconnected to" if connected_once else "watching"
                    err.print(f"[dim]{verb} {escape(client.base)}/api/v1/events{resumed} (Ctrl-C to stop)[/]")
                    connected_once, delay_s = True, 1.0
                    for event in parse_events(response.iter_lines()):
                        if "id" in event:
                            last_id = int(event["id"])
                        if event.get("event") != "transition" or "data" not in event:
                            continue
                        item = json.loads(event["data"])
                        if state and item["to"] != state:
                            continue
                        if search and search.lower() not in item["subject"].lower():
                            continue
                        via = f"  [dim]via {escape(item['relay'])}[/]" if item["relay"] else ""
                        out.print(
                            f"{local_time(item['at'], with_date=False)}  {item['kind']:5} {escape(item['subject'])}  "
                            f"{change(item)}  {escape(item['reason'])}{via}"
                        )
                        sys.stdout.flush()
                err.print("[yellow]the stream ended (monitor restarting?)[/]")
            except httpx.TransportError as exc:
                if not connected_once:
                    raise client.unreachable(exc) from None
                err.print(f"[yellow]connection lost ({type(exc).__name__}); retrying in {delay_s:.0f} s[/]")
            time.sleep(delay_s)
            delay_s = min(30.0, delay_s * 2)
    except KeyboardInterrupt:
        err.print("[dim]stopped[/]")


def register(app: typer.Typer) -> None:
    """Add `status`, `history` and `watch` to the `relaybeat` command line."""
    app.command()(status)
    app.command()(history)
    app.command()(watch)
