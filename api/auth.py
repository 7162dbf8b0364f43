"""Who may call the HTTP API: bearer tokens for reads (optional) and writes (always), and CORS.

Rules of this module:
- Reads are open unless `ApiSettings.read_open` is False; then a read or a write token is needed.
- Writes always need a write token. With none configured, every write is refused (403): there is
  no way to switch write protection off.
- Tokens are compared in constant time (as SHA-256 digests, so their lengths do not leak either)
  and never appear in a log line, an error body or a repr.
- /healthz, /docs, /openapi.json and the dashboard stay open, and so do the status pages
  (`/status/<name>` and `/api/v1/status/<name>`): they show only the subjects they were configured for.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.middleware.cors import CORSMiddleware

from relaybeat.api.bodies import ErrorOut
from relaybeat.errors import RelaybeatError, SettingsError
from relaybeat.monitor.view import StatusPage


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """Access control of the HTTP API. The defaults suit the local demo: reads open, writes refused."""

    read_open: bool = True
    read_tokens: tuple[str, ...] = field(default=(), repr=False)
    write_tokens: tuple[str, ...] = field(default=(), repr=False)
    cors_origins: tuple[str, ...] = ()
    status_pages: tuple[StatusPage, ...] = ()  # public, read-only, whatever `read_open` says

    def __post_init__(self) -> None:
        if not self.read_open and not (self.read_tokens or self.write_tokens):
            msg = "token-protected reads need at least one read or write token"
            raise SettingsError(msg)


class AccessRefused(RelaybeatError):
    """A request without the right token. Its body names what is missing, never a token."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class Tokens:
    """Token digests, checked without an early exit so timing says nothing about which one matched."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = tuple(_digest(token) for token in tokens)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __repr__(self) -> str:
        return f"Tokens({len(self._digests)} configured)"

    def match(self, presented: str) -> bool:
        candidate = _digest(presented)
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(candidate, digest)
        return found


@dataclass(frozen=True, slots=True)
class _Access:
    read_open: bool
    readers: Tokens  # read tokens and write tokens: a write token may also read
    writers: Tokens


_bearer = HTTPBearer(
    auto_error=False,
    description="`Authorization: Bearer <token>`: a write token for writes; a read or write token for "
    "reads when they are protected ([api] in the deployment file, or RELAYBEAT_API_TOKENS).",
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _access(request: Request) -> _Access:
    access: _Access = request.app.state.access
    return access


def require_read_token(request: Request, credentials: Credentials) -> None:
    """Dependency of read routes when reads are protected."""
    access = _access(request)
    if access.read_open:
        return
    if credentials is None:
        raise AccessRefused(401, "unauthorized", "this API needs a bearer token (Authorization: Bearer <token>)")
    if not access.readers.match(credentials.credentials):
        raise AccessRefused(401, "unauthorized", "the bearer token is not valid")


def require_write_token(request: Request, credentials: Credentials) -> None:
    """Dependency of every write route: a configured write token, always."""
    access = _access(request)
    if not access.writers:
        raise AccessRefused(
            403,
            "writes_disabled",
            "writes are refused: no write token is configured ([api] write_tokens or RELAYBEAT_API_WRITE_TOKENS)",
        )
    if credentials is None:
        raise AccessRefused(401, "unauthorized", "writes need a bearer token (Authorization: Bearer <token>)")
    token = credentials.credentials
    if access.writers.match(token):
        return
    if access.readers.match(token):
        raise AccessRefused(403, "forbidden", "this token may read but not write")
    raise AccessRefused(401, "unauthorized", "the bearer token is not valid")


READ_REFUSED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "reads are token-protected and no valid token was given"},
}
WRITE_REFUSED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "no valid bearer token"},
    403: {"model": ErrorOut, "description": "not a write token, or no write token is configured"},
}


def install(app: FastAPI, settings: ApiSettings) -> None:
    """Keep the access rules on the app, answer refusals as JSON, and add CORS if origins are set."""
    readers = Tokens((*settings.read_tokens, *settings.write_tokens))
    app.state.access = _Access(settings.read_open, readers, Tokens(settings.write_tokens))

    @app.exception_handler(AccessRefused)
    async def refused(_: Request, exc: AccessRefused) -> JSONResponse:
        headers = _CHALLENGE if exc.status == 401 else None
        return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status, headers=headers)

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            allow_credentials=False,  # bearer tokens, not cookies
            max_age=600,
        )
