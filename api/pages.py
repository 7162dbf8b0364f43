"""The HTML pages: the dashboard (`dashboard.html`, at `/`) and a status page (`status.html`, at
`/status/<name>`). Each file is its page's own part, from its `<title>` on; `head.html`, the start
they share (the document's head, the state colours), is served before it. No build step."""

from __future__ import annotations

from functools import cache
from pathlib import Path

HERE = Path(__file__).parent
HEAD = HERE / "head.html"


@cache
def document(name: str) -> str:
    """The whole document of the page `name` (e.g. "dashboard.html"), read once."""
    return HEAD.read_text() + (HERE / name).read_text()
