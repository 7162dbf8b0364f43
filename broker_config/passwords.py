"""The embedded broker's password file: `user:<argon2id hash>` lines, read, written and checked here.

`python -m broker_config.passwords add-user PASSWORD_FILE USERNAME` (or `relaybeat passwd`) adds or
replaces a user. No amqtt: the broker's auth plugin (broker_config/amqtt_adapter.py) calls
`read_password_file` and `verify_password`.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import hmac
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import argon2

from relaybeat.broker_config.settings import BrokerConfigError
from relaybeat.relay.wire import is_valid_id

_HASHER: Final = argon2.PasswordHasher(time_cost=2, memory_cost=19_456, parallelism=1)


def hash_password(password: str) -> str:
    """An argon2id hash with cheap parameters (m=19 MiB, t=2, p=1: about 20 ms to verify)."""
    return _HASHER.hash(password)


def read_password_file(path: Path) -> dict[str, str]:
    """`user:<argon2 hash>` lines; blank lines and `#` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BrokerConfigError(str(path), f"cannot read password file: {exc.strerror}") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        username, sep, hashed = line.partition(":")
        where = f"{path}:{number}"
        if not sep or not is_valid_id(username):
            raise BrokerConfigError(where, "expected 'username:<argon2 hash>' with username [A-Za-z0-9._-]+")
        if not hashed.startswith("$argon2"):
            raise BrokerConfigError(where, f"the hash for {username!r} is not argon2 (use hash_password)")
        if username in users:
            raise BrokerConfigError(where, f"user {username!r} appears twice")
        users[username] = hashed
    return users


def add_user(password_file: Path, username: str, password: str) -> None:
    """Add or replace `username` in `password_file` (created with mode 0600). Atomic."""
    if not is_valid_id(username):
        msg = "username"
        raise BrokerConfigError(msg, f"{username!r} is not [A-Za-z0-9._-]{{1,128}}")
    if not password:
        msg = "password"
        raise BrokerConfigError(msg, "must not be empty")
    lines = password_file.read_text(encoding="utf-8").splitlines() if password_file.exists() else []
    kept = [line for line in lines if line.strip().partition(":")[0] != username]
    kept.append(f"{username}:{hash_password(password)}")
    fd, tmp = tempfile.mkstemp(dir=password_file.parent, prefix=f".{password_file.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write("\n".join(kept) + "\n")
        os.replace(tmp, password_file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def verify_password(hashed: str, password: str) -> bool:
    """Whether `password` matches `hashed`; a malformed hash is a mismatch. Slow (argon2): run it
    off the event loop."""
    try:
        return _HASHER.verify(hashed, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


class RecentLogins:
    """The last password each user logged in with, remembered as an HMAC-SHA256 under a key made
    at start and never stored, next to the argon2 hash it was verified against. A client that logs in
    again with the same password is let in without another argon2 check (about 40 ms of a core here):
    reconnecting leaves stay fast while a storm of bad guesses keeps the password threads busy. A
    different password, or a hash changed in the password file, takes the full check. At most one
    entry per user in the file; memory holds keyed digests, never passwords."""

    def __init__(self) -> None:
        self._key = os.urandom(32)
        self._seen: dict[str, tuple[str, bytes]] = {}

    def _digest(self, username: str, password: str) -> bytes:
        return hmac.new(self._key, f"{username}\0{password}".encode(), hashlib.sha256).digest()

    def known(self, username: str, hashed: str, password: str) -> bool:
        """Whether `username` last logged in with exactly `password` against this same `hashed`."""
        seen = self._seen.get(username)
        return seen is not None and seen[0] == hashed and hmac.compare_digest(seen[1], self._digest(username, password))

    def remember(self, username: str, hashed: str, password: str) -> None:
        self._seen[username] = (hashed, self._digest(username, password))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m broker_config.passwords add-user PASSWORD_FILE USERNAME` (password from a prompt or stdin)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] != "add-user":
        print("usage: python -m broker_config.passwords add-user PASSWORD_FILE USERNAME", file=sys.stderr)
        return 2
    _, file_name, username = args
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {username}: ")
        if password != getpass.getpass("again: "):
            print("passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    try:
        add_user(Path(file_name), username, password)
    except BrokerConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{username} written to {file_name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
