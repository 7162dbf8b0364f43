"""The one root of every error relaybeat raises on purpose, and the tree beneath it.

`except RelaybeatError` catches all of them; anything else that escapes is a bug. Each class lives
next to the code that raises it; this module holds the root and the branches, and the tree below
is checked against the code by tests/test_layering.py.

    RelaybeatError
    ├── WireError            relay.wire: input that breaks the wire contract (`reason` is its counter key)
    │   └── KeyframeMissing      relay.compact: an indexed delta whose keyframe the receiver lacks
    ├── PacketError          relay.packets: a broker's byte stream that breaks MQTT 3.1.1 (the session is dropped)
    ├── JournalError         monitor.journal: a journal line that cannot be read (torn by a crash)
    ├── SettingsError        a setting, flag, URL or file that cannot be used; names the key and what is allowed
    │   ├── ConfigError          relaybeat.config: the deployment file, RELAYBEAT_* variables and flags
    │   ├── BrokerConfigError    broker_config.settings: the embedded broker's TOML and password file
    │   └── BrokerURLError       relay.mqtt: a broker URL that cannot be used
    ├── Unavailable          something outside relaybeat is not there (a port, a file, a server, a version)
    │   ├── PortInUse            relay.ports: another process holds the port
    │   │   └── BrokerPortInUse      broker_config.settings: ... the embedded broker's port
    │   ├── JournalUnavailable   monitor.journal: the journal cannot be opened, or another monitor holds it
    │   ├── DatabaseUnavailable  monitor.store: the database cannot be reached or used (down, missing, refused)
    │   └── DatabaseHeld         monitor.cluster: another monitor runs on this SQLite file
    ├── NotActive            monitor.store: a write refused: this monitor does not hold the lease (standby)
    ├── SessionStolen        monitor.ingest: the MQTT session is taken over again and again (same client id)
    ├── PartFailed           relay.parts: a part of a running service died; the process stops
    ├── AccessRefused        api.auth: a request without the token it needs
    └── ApiError             relaybeat.people: the HTTP API answered with an error

The command line turns every `RelaybeatError` that stops a command into one line on stderr and
exit status 2 (relaybeat/cli.py, `_Commands`); `--debug` or RELAYBEAT_LOG_LEVEL=debug adds the
traceback. `message(exc)` below is that line's text.

`WireError`, `PacketError`, `JournalError`, `SettingsError` and its children are also `ValueError`s, and
`Unavailable` is an `OSError`, so code (and pydantic validators) that expect those keep working.
A bare `ValueError`, `TypeError` or `RuntimeError` from relaybeat means a caller broke a function's
contract (a naive datetime, a limit below 1): a bug, never a condition to handle.
"""

from __future__ import annotations


class RelaybeatError(Exception):
    """Every error relaybeat raises on purpose."""


class SettingsError(RelaybeatError, ValueError):
    """A setting, flag, URL or file that cannot be used. The message names the key and what is allowed."""


class Unavailable(RelaybeatError, OSError):
    """Something relaybeat needs from outside is not there: a port, a file, a server."""


def message(exc: RelaybeatError) -> str:
    """The one line a person reads: an `Unavailable` (an OSError) without its "[Errno N]" prefix."""
    if isinstance(exc, OSError) and exc.strerror:
        return str(exc.strerror)
    return str(exc)
