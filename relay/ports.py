"""Listening addresses: parse `HOST:PORT`, and say clearly when a port is taken."""

from __future__ import annotations

import errno
import random
import socket
from pathlib import Path

from relaybeat.errors import SettingsError, Unavailable


class PortInUse(Unavailable):
    def __init__(self, host: str, port: int) -> None:
        super().__init__(errno.EADDRINUSE, f"{host}:{port} is already in use (another broker or server?)")
        self.host = host
        self.port = port


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """`HOST:PORT`, `[::1]:PORT` or `:PORT` (loopback); otherwise `SettingsError` (a ValueError) naming the text."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        if default_port is None:
            msg = f"{text!r} is not HOST:PORT"
            raise SettingsError(msg)
        host, port_text = text, str(default_port)
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        msg = f"{text!r}: port {port_text!r} is not a number"
        raise SettingsError(msg) from None
    if not 0 <= port <= 65535:
        msg = f"{text!r}: port {port} is not in [0, 65535]"
        raise SettingsError(msg)
    return host, port


def ensure_free(host: str, port: int) -> None:
    """Raise PortInUse if something already listens on host:port (port 0 is always fine)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return  # let the server report name-resolution problems itself
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio and uvicorn do
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(host, port) from None
                raise Unavailable(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None


def is_free(host: str, port: int) -> bool:
    try:
        ensure_free(host, port)
    except PortInUse:
        return False
    return True


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PICKED = 10000
_picked: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The ports the OS hands to outgoing connections (Linux's file; its default elsewhere)."""
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def pick_free(host: str = "127.0.0.1") -> int:
    """A port free right now, below the ephemeral range, and not picked before by this process.

    Binding port 0 would return an ephemeral port, which any outgoing connection (a client of the
    broker, of PostgreSQL) may take before the server that was given it listens. Ports below the
    range are never handed out that way; the random start keeps parallel pickers apart.
    """
    low, _ = ephemeral_range()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        port = random.randrange(LOWEST_PICKED, max(low, LOWEST_PICKED + 1000))  # noqa: S311 (not a secret)
        if port in _picked:
            continue
        with socket.socket(family) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        _picked.add(port)
        return port
    with socket.socket(family) as probe:  # a crowded range: an ephemeral port is still better than none
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
