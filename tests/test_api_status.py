"""Public status pages (`[[api.status_page]]`, `/status/<name>`): configured in the deployment file,
open without a token even when reads are protected, and showing only what they were configured for."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relaybeat.api import pages
from relaybeat.api.auth import ApiSettings
from relaybeat.api.status import STATUS_CACHE_S
from relaybeat.config import ConfigError, load_config
from relaybeat.monitor.states import Kind
from relaybeat.monitor.store import Store
from relaybeat.monitor.view import StatusPage
from tests.fakes import FakeClock
from tests.monitors import AUTH, READ_TOKEN, WRITE_TOKEN, Fleet, api, call, new_monitor

WEB = StatusPage(name="web", title="Web shop", hosts=("web-*",))
EDGE = StatusPage(name="edge", title="Edge sites", relays=("r2",))
PROTECTED = ApiSettings(
    read_open=False, read_tokens=(READ_TOKEN,), write_tokens=(WRITE_TOKEN,), status_pages=(WEB, EDGE)
)


@pytest.fixture
async def fleet(store: Store) -> Fleet:
    """web-1 up, then down (silent 10 s), web-2 and db-1 up on r1; edge-1 up behind r1's child r2."""
    clock = FakeClock()
    fleet = Fleet(new_monitor(store, clock), clock)
    fleet.send({"web-1": 0, "web-2": 0, "db-1": 0}, {"edge-1": 0})
    fleet.send({"web-1": 10_000, "web-2": 0, "db-1": 0}, {"edge-1": 0}, after=10)
    await fleet.monitor.flush()
    return fleet


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[httpx.AsyncClient]:
    async with api(fleet.monitor, PROTECTED) as http:
        yield http


def ids(entries: list[dict[str, Any]]) -> list[str]:
    return [e["id"] for e in entries]


async def test_a_status_page_needs_no_token_and_shows_only_its_hosts(client: httpx.AsyncClient) -> None:
    await call(client, "GET", "/api/v1/hosts", 401)  # reads are protected...
    page = await call(client, "GET", "/api/v1/status/web", 200)  # ...the status page is not
    assert (page["name"], page["title"]) == ("web", "Web shop")
    assert ids(page["hosts"]) == ["web-1", "web-2"]
    assert page["relays"] == []
    web1, web2 = page["hosts"]
    assert (web1["state"], web2["state"]) == ("down", "up")
    assert [c["to"] for c in web1["changes"]] == ["up", "down"]  # oldest first
    assert web1["uptime_24h"] == pytest.approx(web1["uptime_30d"])
    assert 0 < web1["uptime_24h"] < 1
    assert web2["uptime_24h"] == 1.0
    assert not web1["in_maintenance"]
    assert "reason" not in str(page)  # a public page says what, never why
    html = await client.get("/status/web")
    assert html.status_code == 200
    assert "/api/v1/status/" in html.text


async def test_the_status_page_and_the_dashboard_are_whole_documents_with_one_head(
    client: httpx.AsyncClient,
) -> None:
    head = pages.HEAD.read_text()
    for path, title in (("/status/web", "<title>status</title>"), ("/", "<title>relaybeat</title>")):
        text = (await client.get(path)).text
        assert text.startswith(head), f"{path} does not start with api/head.html"
        assert text.lower().count("<!doctype html>") == 1
        assert text.index(title) < text.index("</head>") < text.index("<body>") < text.rindex("</html>")
        assert "--down: #cf222e" in text  # the state colours come from head.html


async def test_a_relay_status_page_shows_its_subtree_only(client: httpx.AsyncClient) -> None:
    page = await call(client, "GET", "/api/v1/status/edge", 200)
    assert ids(page["relays"]) == ["r2"]
    assert ids(page["hosts"]) == ["edge-1"]
    assert page["hosts"][0]["state"] == "up"


async def test_unknown_status_pages_are_404_in_the_one_error_shape(client: httpx.AsyncClient) -> None:
    for path in ("/api/v1/status/nope", "/status/nope"):
        assert await call(client, "GET", path, 404) == {"error": "not_found", "detail": "no status page 'nope'"}


async def test_a_status_page_shows_maintenance_and_follows_new_rows(fleet: Fleet, client: httpx.AsyncClient) -> None:
    await call(client, "POST", "/api/v1/maintenance", 201, json={"host": "web-2", "duration_s": 600}, headers=AUTH)
    fleet.send({"web-1": 0, "web-2": 0, "db-1": 0}, {"edge-1": 0}, after=1)  # web-1 beats again
    await fleet.monitor.flush()
    page = await call(client, "GET", "/api/v1/status/web", 200)
    web1, web2 = page["hosts"]
    assert web1["state"] == "up"  # a new row is written: the cached answer is not reused
    assert [c["to"] for c in web1["changes"]] == ["up", "down", "up"]
    assert web2["in_maintenance"] is True
    assert fleet.monitor.in_maintenance(Kind.HOST, "web-2", fleet.wall())


async def test_the_openapi_lists_the_status_data_without_a_token(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    operation = schema["paths"]["/api/v1/status/{name}"]["get"]
    assert "security" not in operation
    assert "401" not in operation["responses"]
    assert "/status/{name}" not in schema["paths"]  # the HTML page is not an API operation


async def test_an_answer_is_reused_for_a_few_seconds_while_nothing_is_written(
    fleet: Fleet, client: httpx.AsyncClient
) -> None:
    first = await call(client, "GET", "/api/v1/status/web", 200)
    await call(client, "POST", "/api/v1/maintenance", 201, json={"host": "web-2"}, headers=AUTH)  # writes no row
    assert await call(client, "GET", "/api/v1/status/web", 200) == first  # the same answer, not asked of SQL again
    fleet.clock.t += STATUS_CACHE_S + 0.1
    later = await call(client, "GET", "/api/v1/status/web", 200)
    assert later["hosts"][1]["in_maintenance"] is True
    assert later["at"] > first["at"]


@pytest.mark.parametrize(
    ("kind", "subject", "path", "shown"),
    [
        (Kind.HOST, "web-1", (), True),  # a glob match, even beating directly
        (Kind.HOST, "db-1", ("r1",), False),
        (Kind.HOST, "db-1", ("r2", "r1"), True),  # behind a listed relay
        (Kind.RELAY, "r2", ("r1",), True),  # the listed relay itself
        (Kind.RELAY, "r3", ("r2", "r1"), True),  # a relay below it
        (Kind.RELAY, "r1", (), False),  # the relay above it is not on the page
        (Kind.RELAY, "web-1", (), False),  # host globs are for hosts only
    ],
)
def test_what_a_status_page_shows(kind: Kind, subject: str, path: tuple[str, ...], shown: bool) -> None:
    page = StatusPage(name="mixed", title="Mixed", hosts=("web-*",), relays=("r2",))
    assert page.shows(kind, subject, path) is shown


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relaybeat.toml"
    path.write_text(text)
    return path


def test_status_pages_come_from_the_deployment_file(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
[[api.status_page]]
name = "shop"
title = "Shop"
hosts = ["web-*", "pay-?"]

[[api.status_page]]
name = "edge"
relays = ["relay-a"]
""",
        )
    )
    pages = config.api.settings().status_pages
    assert pages == (
        StatusPage(name="shop", title="Shop", hosts=("web-*", "pay-?")),
        StatusPage(name="edge", title="edge", relays=("relay-a",)),  # the title defaults to the name
    )


@pytest.mark.parametrize(
    ("pages", "found"),
    [
        ('[[api.status_page]]\nname = "x"\n', "api.status_page.0: status page 'x' shows nothing"),
        ('[[api.status_page]]\nname = "a b"\nhosts = ["*"]\n', "api.status_page.0.name: must match"),
        ('[[api.status_page]]\nname = "x"\nrelays = ["r/1"]\n', "api.status_page.0.relays: must match"),
        ('[[api.status_page]]\nname = "x"\nhosts = ["*"]\ncolour = 1\n', "colour: Extra inputs"),
        ('[[api.status_page]]\nname = "x"\nhosts = ["*"]\n[[api.status_page]]\nname = "x"\nhosts = ["a"]\n',
         "status page names must be unique; repeated: x"),
    ],
)  # fmt: skip
def test_bad_status_pages_are_named(tmp_path: Path, pages: str, found: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, pages))
    assert found in str(error.value)
