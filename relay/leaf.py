"""The leaf agent: one beat every interval; a final `stopping` beat on a planned stop.

Any MQTT client can be a leaf (`mosquitto_pub -n -t relaybeat/beat/web-1`); this agent adds a
sequence number (so the monitor sees fast restarts) and the declared interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiomqtt

from relaybeat.relay.mqtt import Brokers, BrokerURL, stay_connected
from relaybeat.relay.wire import Beat, LeafStatus, Topics, check_id, encode_beat

log = logging.getLogger("relaybeat.leaf")


async def run_leaf(
    host_id: str,
    broker: BrokerURL | Brokers,
    interval_s: float,
    stop: asyncio.Event,
    topics: Topics | None = None,
    meta: dict[str, Any] | None = None,
) -> int:
    """Beat until `stop` is set, then send `stopping` (if connected). Returns the beats sent."""
    check_id(host_id)
    topic = (topics or Topics()).beat(host_id)
    sent = 0

    async def session(client: aiomqtt.Client) -> None:
        nonlocal sent
        while not stop.is_set():
            sent += 1
            await client.publish(topic, encode_beat(Beat(sent, interval_s, LeafStatus.OK, meta)), qos=0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
        sent += 1
        await client.publish(topic, encode_beat(Beat(sent, interval_s, LeafStatus.STOPPING)), qos=1)
        log.info("leaf %s sent its stopping beat", host_id)

    keepalive = min(65535, max(5, round(interval_s * 2)))  # MQTT caps keepalive at 65535 s
    connect = asyncio.create_task(
        stay_connected(broker, lambda url: url.client(host_id, keepalive=keepalive), session, name=f"leaf {host_id}")
    )
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({connect, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not connect.done():
            # Stop was asked: give a connected session a moment to send its stopping beat.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(connect), 2.0)
    finally:
        # Also on cancellation (a crash, as far as the monitor can tell): no beat after this.
        for task in (connect, stopped):
            task.cancel()
        results = await asyncio.gather(connect, stopped, return_exceptions=True)
    failure = results[0]
    if isinstance(failure, Exception):
        raise failure  # not a connection problem (those are retried): say what went wrong
    return sent
