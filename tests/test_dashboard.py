"""The dashboard at `/`, driven in headless Chromium over the DevTools protocol.

Needs Debian's Chromium (`apt-get install -y chromium`; CI installs it in `.ci/run`). Without it the
tests skip and say so, except under CI (CI=true), where a missing browser is a failure.
Set RELAYBEAT_SCREENSHOT=docs/dashboard.png to refresh the README's screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from relaybeat.api.auth import ApiSettings
from relaybeat.monitor.maintenance import TargetKind
from relaybeat.monitor.states import Kind
from relaybeat.monitor.view import StatusPage
from relaybeat.relay.ports import pick_free
from tests.conftest import CentralBroker
from tests.monitors import READ_TOKEN, WRITE_TOKEN, Served, served_monitor
from tests.processes import Topology, wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
    "--remote-debugging-port=0", "--window-size=1600,1000",
]  # fmt: skip


def need_chromium() -> None:
    if Path(CHROMIUM).exists():
        return
    message = "Chromium is not installed: run `apt-get install -y chromium` (Debian) to run the dashboard tests"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class PageError(Exception):
    """JavaScript threw, or the DevTools protocol said no."""


class Browser:
    """Headless Chromium with one page, driven by DevTools protocol commands over a websocket."""

    def __init__(self, work: Path, flags: tuple[str, ...] = ()) -> None:
        profile = work / "chromium-profile"
        self._log = (work / "chromium.log").open("ab")
        self.events: list[dict[str, Any]] = []  # DevTools events received while waiting for answers
        self.process = subprocess.Popen(
            [CHROMIUM, *FLAGS, *flags, f"--user-data-dir={profile}", "about:blank"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            port_file = profile / "DevToolsActivePort"

            def devtools_port() -> str | None:
                self._alive()
                return port_file.read_text().split("\n")[0].strip() if port_file.exists() else None

            port = wait_until(devtools_port, 30, "Chromium's DevTools port")
            base = f"http://127.0.0.1:{port}"

            def page_socket() -> str | None:
                pages = [t for t in httpx.get(f"{base}/json/list", timeout=5).json() if t["type"] == "page"]
                return pages[0]["webSocketDebuggerUrl"] if pages else None

            self.ws: ClientConnection = connect(wait_until(page_socket, 15, "a page target"), max_size=None)
        except BaseException:
            self.close()
            raise
        self._id = 0

    def _alive(self) -> None:
        if self.process.poll() is not None:
            msg = f"Chromium exited with {self.process.returncode}"
            raise AssertionError(msg)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if "method" in message:
                self.events.append(message)
            elif message.get("id") == self._id:
                if "error" in message:
                    msg = f"{method}: {message['error']}"
                    raise PageError(msg)
                result: dict[str, Any] = message["result"]
                return result

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise PageError(result["exceptionDetails"].get("exception", {}).get("description", str(result)))
        return result["result"].get("value")

    def wait(self, expression: str, within_s: float, what: str) -> Any:
        """Evaluate `expression` until it is truthy (a page still loading counts as not yet)."""
        deadline = time.monotonic() + within_s
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.evaluate(expression)
            except PageError as exc:
                last = exc
            else:
                if last:
                    return last
            time.sleep(0.1)
        msg = f"timed out after {within_s} s waiting for {what}; last saw {last!r}"
        raise AssertionError(msg)

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    need_chromium()
    chromium = Browser(tmp_path)
    try:
        yield chromium
    finally:
        chromium.close()


def row_state(host: str) -> str:
    return f"document.querySelector('tr[data-host=\"{host}\"]')?.dataset.state"


def host_rows() -> str:
    return "[...document.querySelectorAll('#hosts tr[data-host]')].map(r => r.dataset.host)"


READY = "window.relaybeat && relaybeat.ready && relaybeat.live"


@pytest.mark.e2e
def test_a_host_going_down_shows_up_live_without_a_reload(
    central_broker: CentralBroker, tmp_path: Path, browser: Browser
) -> None:
    topology = Topology(tmp_path, central_broker.prefix)
    try:
        relay_port = pick_free("127.0.0.1")
        topology.relay("relay-a", central_broker.url, serve=relay_port, flush=0.5)
        topology.monitor(central_broker.url, pick_free("127.0.0.1"))
        site = f"mqtt://127.0.0.1:{relay_port}"
        for host in ("web-1", "web-2", "db-1"):
            topology.leaf(host, site, interval=0.5)
        for host in ("web-1", "web-2", "db-1"):
            topology.wait_state("hosts", host, "up", timeout=30)

        browser.open(topology.api + "/")
        browser.wait(READY, 30, "the dashboard to load and go live")
        browser.wait(f"{row_state('web-1')} === 'up'", 15, "web-1 shown up")
        assert browser.evaluate("document.querySelector('[data-relay=\"relay-a\"]').dataset.state") == "up"
        browser.evaluate("window.notReloaded = true")
        events_before = browser.evaluate("relaybeat.events")

        topology.services["web-1"].kill()  # no goodbye: it just stops beating
        browser.wait(f"{row_state('web-1')} === 'down'", 30, "web-1 shown down")
        assert browser.evaluate("window.notReloaded") is True  # the same page, not a reload
        assert browser.evaluate("relaybeat.events") > events_before  # it came over the event stream
        assert topology.state("hosts", "web-1") == "down"
        latest = browser.evaluate("document.querySelector('#transitions tr[data-id]').textContent")
        assert "web-1" in latest
        assert "up → down" in latest
        # grouped by state: down first, with its own group header
        assert browser.evaluate(host_rows())[0] == "web-1"
        assert "down · 1" in browser.evaluate("document.querySelector('#hosts tr.group').textContent")

        # per-host history on click
        browser.evaluate("document.querySelector('tr[data-host=\"web-1\"]').click()")
        history = browser.wait(
            "document.querySelector('#detail.shown') && document.querySelector('#detail-history').textContent",
            15, "web-1's history",
        )  # fmt: skip
        assert "up → down" in history
        assert "no beat for" in history

        # filters and search
        browser.evaluate("document.querySelector('#chips [data-state=\"up\"]').click()")
        assert sorted(browser.evaluate(host_rows())) == ["db-1", "web-2"]
        browser.evaluate("""(() => { const s = document.getElementById('search');
            s.value = 'db'; s.dispatchEvent(new Event('input')); })()""")
        assert browser.evaluate(host_rows()) == ["db-1"]
        browser.evaluate("""(() => { const s = document.getElementById('search');
            s.value = ''; s.dispatchEvent(new Event('input'));
            document.querySelector('#chips [data-state=""]').click(); })()""")
        assert len(browser.evaluate(host_rows())) == 3

        browser.screenshot(tmp_path / "dashboard.png")
        if target := os.environ.get("RELAYBEAT_SCREENSHOT"):
            browser.screenshot(Path(target))
    finally:
        topology.close()


async def in_thread(call: Callable[..., Any], *args: Any) -> Any:
    """The browser is driven synchronously; the server under test runs in this event loop."""
    return await asyncio.to_thread(call, *args)


async def test_ten_thousand_hosts_render_one_page_and_stay_live(tmp_path: Path, browser: Browser) -> None:
    async with served_monitor(tmp_path) as served:
        await feed_many(served, 10_000)
        started = time.monotonic()
        await in_thread(browser.open, served.url + "/")
        await in_thread(browser.wait, READY, 60, "the dashboard to load 10,000 hosts")
        loaded_s = time.monotonic() - started
        assert await in_thread(browser.evaluate, "relaybeat.hosts.size") == 10_000
        rows = await in_thread(browser.evaluate, host_rows())
        assert len(rows) == 100
        assert rows[0] == "h00000"
        info = await in_thread(browser.evaluate, "document.getElementById('page-info').textContent")
        assert info == "1–100 of 10,000"
        assert loaded_s < 30, f"took {loaded_s:.1f} s to load"

        await in_thread(browser.evaluate, "document.getElementById('next').click()")
        assert (await in_thread(browser.evaluate, host_rows()))[0] == "h00100"
        await in_thread(
            browser.evaluate,
            """(() => { const s = document.getElementById('search');
            s.value = 'h0999'; s.dispatchEvent(new Event('input')); })()""",
        )
        assert len(await in_thread(browser.evaluate, host_rows())) == 10  # h09990..h09999

        # the relay dies: 10,000 hosts turn unreachable in one burst, and the page keeps up
        served.monitor.take("relaybeat/relay/r1/status", b"offline")
        # Beyond the first EXPIRE_STEP hosts, a mass event's hosts are decided by the expiry part in
        # steps; it does not run in this in-process monitor, so the test drives it as the part would.
        served.monitor.expire()
        await served.monitor.flush()
        chip = "document.querySelector('#chips [data-state=\"unreachable\"] b').textContent"
        await in_thread(browser.wait, f"{chip} === '10,000'", 60, "10,000 unreachable hosts")
        relay = "document.querySelector('[data-relay=\"r1\"]').dataset.state"
        assert await in_thread(browser.evaluate, relay) == "down"


async def feed_many(served: Served, count: int) -> None:
    served.feed.known.update({f"h{n:05}": 0 for n in range(count)})
    await served.feed.send()
    async with httpx.AsyncClient() as client:
        total = (await client.get(f"{served.url}/api/v1/hosts?limit=1")).json()["total"]
    assert total == count


OFFLINE = ("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",)  # no name resolves: no CDN is reachable


@pytest.fixture
def offline_browser(tmp_path: Path) -> Iterator[Browser]:
    need_chromium()
    chromium = Browser(tmp_path, OFFLINE)
    try:
        yield chromium
    finally:
        chromium.close()


def requested(browser: Browser) -> list[str]:
    return [e["params"]["request"]["url"] for e in browser.events if e["method"] == "Network.requestWillBeSent"]


@pytest.mark.parametrize(
    ("page", "rendered"),
    [
        ("/docs", "document.querySelectorAll('.swagger-ui .opblock').length"),
        ("/redoc", "document.querySelectorAll('[data-section-id^=\"operation/\"]').length"),
    ],
)
async def test_api_docs_render_with_the_network_off(
    tmp_path: Path, offline_browser: Browser, page: str, rendered: str
) -> None:
    """Swagger UI and ReDoc come from the fastapi-offline package's files: nothing off this machine."""
    async with served_monitor(tmp_path) as served:
        await in_thread(offline_browser.call, "Network.enable")
        await in_thread(offline_browser.open, served.url + page)
        await in_thread(offline_browser.wait, f"{rendered} > 10", 30, f"{page} to render the operations")
        urls = requested(offline_browser)
        assert any(url.endswith("/openapi.json") for url in urls)
        outside = [url for url in urls if not url.startswith((served.url, "data:", "blob:", "about:"))]
        assert outside == [], f"{page} asked the network for {outside}"


def fill_and_submit(**values: str) -> str:
    """JavaScript that fills the action dialog's fields (and the write token, if `token` is given) and submits."""
    token = values.pop("token", None)
    sets = "".join(f"f.elements[{name!r}].value = {value!r};" for name, value in values.items())
    if token is not None:
        sets += f"document.getElementById('action-token').value = {token!r};"
    return f"(() => {{ const f = document.getElementById('action-form'); {sets} f.requestSubmit(); }})()"


OPEN_DIALOG = "document.getElementById('action').open"
WRITES = "relaybeat.writes"


async def test_operators_act_from_the_dashboard(tmp_path: Path, browser: Browser) -> None:
    """Acknowledge an outage, schedule and end maintenance and forget a host, asking for the write
    token once (kept in sessionStorage); uptime, the change strip and zoned times in the detail panel.
    Set RELAYBEAT_ACTIONS_SCREENSHOT=docs/dashboard-actions.png to refresh the README's second picture."""
    async with served_monitor(tmp_path, ApiSettings(write_tokens=(WRITE_TOKEN,))) as served:
        await served.feed.up("web-1", "web-2", "db-1")
        await served.feed.down("web-1")
        run = browser.evaluate

        def step(expression: str) -> Any:
            return in_thread(run, expression)

        def until(expression: str, what: str) -> Any:
            return in_thread(browser.wait, expression, 20, what)

        await in_thread(lambda: browser.call("Emulation.setTimezoneOverride", timezoneId="Asia/Kolkata"))
        await in_thread(browser.open, served.url + "/")
        await until(READY, "the dashboard to go live")
        assert await step("document.getElementById('summary').textContent") == "3 hosts · 1 relay"
        assert await step("document.querySelector('[data-relay=\"r1\"] .count').textContent") == "3 hosts"

        # the detail panel: uptime over 24 h and 30 d, the strip of state changes, times with their zone
        await step("document.querySelector('tr[data-host=\"web-1\"]').click()")
        await until("!!document.querySelector('#detail.shown #uptime-24h')", "web-1's details")
        day = await step("document.getElementById('uptime-24h').textContent")
        assert day.endswith("%")
        assert 0 < float(day.rstrip("%")) < 100  # up 10 s, then down
        assert await step("document.getElementById('uptime-30d').textContent") == day
        assert await step("[...document.querySelectorAll('#detail-strip i')].map(i => i.className)") == ["up", "down"]
        fields = await step("document.getElementById('detail-fields').textContent")
        assert "UTC+05:30" in fields
        history = await step("document.getElementById('detail-history').textContent")
        assert "UTC+05:30" in history
        assert "Z" not in history.replace("UTC", "")  # no raw ISO times left

        # acknowledge: the dialog asks for the write token, once
        await step("document.querySelector('[data-act=\"ack\"]').click()")
        assert await until(OPEN_DIALOG, "the acknowledge dialog")
        assert await step("getComputedStyle(document.getElementById('action-token-row')).display") != "none"
        await step(fill_and_submit(comment="disk full, on it", by="ana", token=WRITE_TOKEN))
        await until(f"{WRITES} === 1 && !{OPEN_DIALOG}", "the acknowledgement")
        await until("!!document.querySelector('tr[data-host=\"web-1\"] .badge.ack')", "web-1 marked acknowledged")
        assert "disk full, on it" in await step("document.getElementById('acks').textContent")
        assert await step(f"sessionStorage.getItem('relaybeat-write-token') === {WRITE_TOKEN!r}")
        acks = await served.app.state.view.acknowledgements(Kind.HOST, "web-1", True, 10)
        assert [(a.ack.comment, a.ack.by) for a in acks] == [("disk full, on it", "ana")]

        # schedule maintenance for a glob: no token asked this time
        await step("document.getElementById('schedule').click()")
        await until(OPEN_DIALOG, "the maintenance dialog")
        assert await step("getComputedStyle(document.getElementById('action-token-row')).display") == "none"
        await step(fill_and_submit(target_kind="glob", target="web-*", minutes="30", reason="kernel update"))
        await until(f"{WRITES} === 2", "the maintenance window")
        await until("!!document.querySelector('tr[data-host=\"web-2\"] .badge.maint')", "web-2 marked in maintenance")
        assert "kernel update" in await step("document.getElementById('maintenance').textContent")
        assert served.monitor.in_maintenance(Kind.HOST, "web-2", served.app.state.view.now())
        await step("document.querySelector('tr[data-host=\"web-1\"]').click()")
        await until("!!document.querySelector('#detail.shown #detail-ack:not(:empty)')", "web-1's acknowledgement")
        if target := os.environ.get("RELAYBEAT_ACTIONS_SCREENSHOT"):  # docs/dashboard-actions.png
            await in_thread(browser.screenshot, Path(target))

        # end it from the list
        await step("document.querySelector('#maintenance [data-end]').click()")
        await until(OPEN_DIALOG, "the end-maintenance dialog")
        await step(fill_and_submit())
        await until(f"{WRITES} === 3 && !document.querySelector('#maintenance [data-end]')", "the window ended")
        assert not served.monitor.in_maintenance(Kind.HOST, "web-2", served.app.state.view.now())

        # forget a host
        await step("document.querySelector('tr[data-host=\"db-1\"]').click()")
        forget = "document.querySelector('#detail.shown [data-act=\"forget\"]')"
        await until(f"!!{forget} && relaybeat.selected.id === 'db-1'", "db-1's details")
        await step(f"{forget}.click()")
        await until(OPEN_DIALOG, "the forget dialog")
        await step(fill_and_submit())
        await until(f"{WRITES} === 4 && !document.querySelector('tr[data-host=\"db-1\"]')", "db-1 gone")
        assert "db-1" not in served.monitor.detector.hosts
        assert await step("document.getElementById('summary').textContent") == "2 hosts · 1 relay"

        # a wrong token is refused, said so, and forgotten
        await step("sessionStorage.setItem('relaybeat-write-token', 'not-the-token-0123456789')")
        await step("document.getElementById('schedule').click()")
        await until(OPEN_DIALOG, "the maintenance dialog")
        await step(fill_and_submit(target_kind="host", target="web-2"))
        error = await until("document.getElementById('action-error').textContent", "the refusal")
        assert "401" in error
        assert await step("sessionStorage.getItem('relaybeat-write-token')") is None
        assert await step(OPEN_DIALOG)
        assert served.monitor.maintenance.windows()[-1].target == "web-*"  # nothing new was scheduled


async def test_a_status_page_renders_only_its_hosts_without_a_token(tmp_path: Path, browser: Browser) -> None:
    """Reads are token-protected, yet /status/shop shows its hosts (and nothing else) with no token.
    Set RELAYBEAT_STATUS_SCREENSHOT=docs/status-page.png to refresh the README's picture."""
    shop = StatusPage(name="shop", title="Web shop", hosts=("web-*", "pay-*"))
    settings = ApiSettings(read_open=False, read_tokens=(READ_TOKEN,), status_pages=(shop,))
    async with served_monitor(tmp_path, settings) as served:
        await served.feed.up("web-1", "web-2", "web-3", "pay-1", "db-1")
        await served.feed.down("web-3")
        view = served.app.state.view
        await view.add_maintenance(TargetKind.HOST, "pay-1", starts_at=None, ends_at=None, duration_s=3600,
                                   reason="card terminal update")  # fmt: skip
        await in_thread(browser.open, served.url + "/status/shop")
        await in_thread(browser.wait, "window.statusPage && statusPage.data", 20, "the status page")
        shown = await in_thread(browser.evaluate, "[...document.querySelectorAll('.entry')].map(e => e.dataset.id)")
        assert shown == ["pay-1", "web-1", "web-2", "web-3"]
        text = await in_thread(browser.evaluate, "document.body.innerText")
        assert "db-1" not in text
        assert "r1" not in text  # its relay is not on this page
        assert "Web shop" in text
        banner = await in_thread(browser.evaluate, "document.getElementById('banner').textContent")
        assert banner == "1 system down: web-3"
        strip = "[...document.querySelectorAll('.entry[data-id=\"web-3\"] .strip i')].map(i => i.className)"
        assert await in_thread(browser.evaluate, strip) == ["up", "down"]
        maintenance = "!!document.querySelector('.entry[data-id=\"pay-1\"] .badge')"
        assert await in_thread(browser.evaluate, maintenance)
        assert await in_thread(browser.evaluate, "statusPage.error") is None
        if target := os.environ.get("RELAYBEAT_STATUS_SCREENSHOT"):
            size = {"width": 1000, "height": 640, "deviceScaleFactor": 1, "mobile": False}
            await in_thread(lambda: browser.call("Emulation.setDeviceMetricsOverride", **size))
            await in_thread(browser.screenshot, Path(target))


async def test_with_protected_reads_the_dashboard_asks_for_a_token(tmp_path: Path, browser: Browser) -> None:
    async with served_monitor(tmp_path, ApiSettings(read_open=False, read_tokens=(READ_TOKEN,))) as served:
        await served.feed.up("web-1")
        await in_thread(browser.open, served.url + "/")
        await in_thread(browser.wait, "!!document.querySelector('#token-form.shown')", 20, "the token form")
        assert await in_thread(browser.evaluate, "relaybeat.ready") is False
        submit = f"""(() => {{ document.getElementById('token').value = {READ_TOKEN!r};
            document.getElementById('token-form').requestSubmit(); }})()"""
        await in_thread(browser.evaluate, submit)  # kept in localStorage, then the page reloads
        await in_thread(browser.wait, READY, 30, "the dashboard to load with the token")
        assert await in_thread(browser.evaluate, host_rows()) == ["web-1"]
        assert await in_thread(browser.evaluate, "localStorage.getItem('relaybeat-token')") == READ_TOKEN
