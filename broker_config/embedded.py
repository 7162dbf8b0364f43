"""The embedded MQTT broker as relaybeat runs it: `EmbeddedBroker` (for `async with`) and
`serve_broker` (`relaybeat broker`). amqtt itself, and every liberty taken with it, is in
broker_config/amqtt_adapter.py; this module checks the settings' files and ports first, so that a
mistake is one clear error before amqtt logs a traceback.

Without a password file the broker is anonymous and applies no topic policy (the loopback demo).
With one, every user is a leaf unless listed as a relay or monitor (broker_config/policy.py).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import ssl
from types import TracebackType

from relaybeat.broker_config.amqtt_adapter import (
    RelaybeatBroker,
    check_amqtt_version,
    listening_port,
    quiet_amqtt_logs,
    start_amqtt,
)
from relaybeat.broker_config.settings import BrokerConfigError, BrokerPortInUse, BrokerSettings, host_port
from relaybeat.relay.ports import PortInUse, ensure_free

log = logging.getLogger(__name__)

_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _check_port_free(host: str, port: int) -> None:
    """Fail with a clear error before amqtt logs a traceback for the same problem."""
    try:
        ensure_free(host, port)
    except PortInUse:
        raise BrokerPortInUse(host, port) from None


def _check_tls_files(settings: BrokerSettings) -> None:
    """Load the certificate and key once here, so a mistake is named before amqtt logs a traceback."""
    if settings.tls_cert is None or settings.tls_key is None:
        return
    for key, tls_file in (("tls_cert", settings.tls_cert), ("tls_key", settings.tls_key)):
        if not tls_file.is_file():
            raise BrokerConfigError(key, f"{tls_file} is not a file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(settings.tls_cert, settings.tls_key)
    except ssl.SSLError as exc:
        msg = "tls_cert"
        raise BrokerConfigError(msg, f"cannot use the TLS certificate and key: {exc}") from None


class EmbeddedBroker:
    """An amqtt broker running in the current event loop, for `async with`:

    async with EmbeddedBroker(BrokerSettings(port=0)) as broker:
        print(broker.url)  # mqtt://127.0.0.1:<the free port it got>
    """

    def __init__(self, settings: BrokerSettings | None = None) -> None:
        self.settings = settings or BrokerSettings()
        self._broker: RelaybeatBroker | None = None
        self._port: int | None = None

    async def __aenter__(self) -> EmbeddedBroker:
        if self._broker is not None:
            msg = "this EmbeddedBroker is already running"
            raise RuntimeError(msg)
        check_amqtt_version()
        quiet_amqtt_logs()
        settings = self.settings
        if settings.anonymous and settings.host not in _LOOPBACK:
            log.warning("broker on %s allows anonymous clients: set a password file", settings.host)
        _check_tls_files(settings)
        _check_port_free(settings.host, settings.port)
        broker = await start_amqtt(settings)
        self._port = listening_port(broker, settings.port)
        self._broker = broker
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()

    @property
    def host(self) -> str:
        return self.settings.host

    @property
    def port(self) -> int:
        if self._port is None:
            msg = "the broker has not started"
            raise RuntimeError(msg)
        return self._port

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.settings.tls else "mqtt"
        return f"{scheme}://{host_port(self.host, self.port)}"


async def serve_broker(settings: BrokerSettings, stop: asyncio.Event) -> None:
    """Run the embedded broker until `stop` is set (`relaybeat broker`)."""
    async with EmbeddedBroker(settings) as broker:
        gc.collect()
        gc.freeze()  # what start-up built lives on: a full collection during a login storm need not scan it
        mode = "anonymous" if settings.anonymous else f"password file {settings.password_file}"
        log.info("broker listening on %s (%s, topic prefix %r)", broker.url, mode, settings.prefix)
        await stop.wait()
    log.info("broker stopped")
