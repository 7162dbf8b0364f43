"""Refresh docs/dashboard.png from the demo: `.venv/bin/python docs/screenshot.py`.

Runs `relaybeat up` on free ports, waits for its scripted crash (web-3 down) and planned stop
(db-2 stopped), opens the dashboard in headless Chromium, clicks web-3 and saves the page.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relaybeat.relay.ports import pick_free  # noqa: E402
from tests.processes import Service, api_get, wait_until  # noqa: E402
from tests.test_dashboard import Browser, need_chromium  # noqa: E402


def main() -> None:
    need_chromium()
    with tempfile.TemporaryDirectory() as work:
        tmp = Path(work)
        api_port = pick_free("127.0.0.1")
        api = f"http://127.0.0.1:{api_port}"
        demo = Service(
            "demo",
            ["up", "--db", f"sqlite:///{tmp / 'demo.db'}", "--api-port", str(api_port),
             "--broker-port", str(pick_free("127.0.0.1")), "--duration", "90"],
            tmp,
        )  # fmt: skip
        try:

            def settled() -> bool:
                hosts = {h["id"]: h["state"] for h in api_get(api, "/api/v1/hosts")["items"]}
                return hosts.get("web-3") == "down" and hosts.get("db-2") == "stopped"

            wait_until(settled, 60, "web-3 down and db-2 stopped")
            browser = Browser(tmp)
            try:
                browser.open(api + "/")
                browser.wait("window.relaybeat && relaybeat.ready && relaybeat.live", 30, "the dashboard")
                browser.evaluate("document.querySelector('tr[data-host=\"web-3\"]').click()")
                browser.wait("!!document.querySelector('#detail.shown')", 10, "web-3's history")
                browser.wait("!!document.querySelector('tr.selected')", 10, "web-3 selected")
                browser.screenshot(ROOT / "docs" / "dashboard.png")
            finally:
                browser.close()
        finally:
            demo.stop()
    print("saved docs/dashboard.png")


if __name__ == "__main__":
    main()
