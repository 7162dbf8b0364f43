"""While a broker is away a client says so once, then once a minute, then that it is back
(`ReconnectLog` in relay/mqtt.py, driven here with a fake clock: no broker, no waiting)."""

from __future__ import annotations

import logging

import pytest

from relaybeat.relay.mqtt import BrokerURL, ReconnectLog, failure_reason
from tests.fakes import FakeClock

URL = BrokerURL.parse("mqtt://broker.example:1883")


def said(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "relaybeat.mqtt"]
    caplog.clear()
    return lines


def test_an_outage_costs_one_line_then_one_per_minute_then_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relaybeat.mqtt")
    clock = FakeClock()
    reconnects = ReconnectLog("monitor", URL, clock=clock.now, every_s=60.0)
    reconnects.connected()
    assert said(caplog) == [(logging.INFO, "monitor connected to mqtt://broker.example:1883")]

    refused = ConnectionRefusedError(111, "Connection refused")
    for _ in range(241):  # 0.25 s apart: the 241st is 60 s after the first
        reconnects.failed(refused)
        clock.t += 0.25
    first, summary = said(caplog)
    assert first == (
        logging.WARNING,
        "monitor: broker mqtt://broker.example:1883 unavailable ([Errno 111] Connection refused). Is the broker "
        "running on that host and port? Retrying; a summary every 60 s until it is back.",
    )
    assert summary[0] == logging.WARNING
    assert summary[1].startswith("monitor: broker mqtt://broker.example:1883 still unavailable after 60 s")
    assert "(240 attempts in the last 60 s; last: [Errno 111] Connection refused)" in summary[1]

    for _ in range(79):
        reconnects.failed(refused)
        clock.t += 0.25
    assert said(caplog) == []  # 20 s more: no summary yet
    reconnects.connected()
    back = "monitor: broker mqtt://broker.example:1883 is back after 80 s (320 failed attempts)"
    assert said(caplog) == [(logging.WARNING, back)]

    reconnects.failed(OSError("Disconnected during message iteration"))  # a new outage: said at once
    reconnects.connected()
    assert [level for level, _ in said(caplog)] == [logging.WARNING, logging.WARNING]


def test_a_new_reason_is_said_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relaybeat.mqtt")
    clock = FakeClock()
    reconnects = ReconnectLog("leaf h1", URL, clock=clock.now)
    for error in ("[Errno 111] Connection refused", "[Errno 111] Connection refused", "[code:135] Not authorized"):
        reconnects.failed(OSError(error))
        clock.t += 1.0
    lines = [line for _, line in said(caplog)]
    assert len(lines) == 2
    assert "Is the broker running" in lines[0]
    assert "Not authorized). Check the user name and password" in lines[1]


@pytest.mark.parametrize(
    ("error", "advice"),
    [
        (OSError(-2, "Name or service not known"), "Unknown host: check the broker URL."),
        (OSError("[code:135] Not authorized"), "Check the user name and password in the broker URL."),
        (OSError("Connection refused: Bad user name or password"), "Check the user name and password"),
        (TimeoutError("timed out"), "Is the host reachable and the port open?"),
    ],
)
def test_the_first_line_says_what_to_do(error: OSError, advice: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relaybeat.mqtt")
    ReconnectLog("leaf h1", URL, clock=FakeClock().now).failed(error)
    ((_, line),) = said(caplog)
    assert advice in line


def test_a_failure_without_a_message_is_named_by_its_type() -> None:
    """asyncio.timeout raises a bare TimeoutError: the log says so, not "unavailable ()"."""
    assert failure_reason(TimeoutError()) == "TimeoutError"
    assert failure_reason(OSError("broker\n closed  it")) == "broker closed it"
