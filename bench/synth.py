"""Synthetic relays: bundles in the wire format, published through a real broker as relays do.

Each synthetic relay holds its own MQTT connection (QoS 1 publishes, like `relaybeat relay`).

- `wire=1` (JSON version 1): a pre-encoded host list; only the bundle's `seq` changes between its
  bundles, so building one costs a copy, not an encode. Entries are `[id, seq, age_ms, interval_ms,
  "ok"]` with small ages and a constant leaf seq, so every host stays fresh whenever its relay's
  bundles keep coming.
- `wire=2` (what `relaybeat relay` sends by default): version 2 through the relay's own
  `BundleEncoder`, a keyframe first and every `keyframe_every`-th bundle, indexed deltas between.
  Every leaf beats once per bundle (interval = flush), each beat a new leaf seq: every entry of every
  delta is a real leaf beat, as at the issue's interval = flush = 1 s. Those deltas differ only in
  their header (seq, send time), so after the encoder made the first one, the others reuse its
  body (the encoder costs ~2 µs per entry: a publisher encoding each would be slower than the monitor).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import zlib
from collections.abc import Sequence

import httpx
import orjson

from bench import mqtt
from relaybeat.relay.compact import COMPRESS_FROM, GROWS, INDEXED, BundleEncoder, _put, _put_id
from relaybeat.relay.wire import _COMPRESSED, BINARY_VERSION, Bundle, HostEntry, LeafStatus, _envelope_v2


def host_ids(relay: str, count: int) -> list[str]:
    return [f"{relay}-h{i:06d}" for i in range(count)]


def hosts_blob(ids: Sequence[str], interval_ms: int = 1000, seq: int = 7) -> bytes:
    return orjson.dumps([[host, seq, 100 + (i * 37) % 400, interval_ms, "ok"] for i, host in enumerate(ids)])


def bundle_bytes(relay: str, boot: str, seq: int, blob: bytes, flush_ms: int = 1000) -> bytes:
    return b'{"v":1,"relay":"%s","boot":"%s","seq":%d,"flush_ms":%d,"hosts":%s}' % (
        relay.encode(),
        boot.encode(),
        seq,
        flush_ms,
        blob,
    )


class Relays:
    """R synthetic relays, `size` hosts each, one MQTT connection each."""

    def __init__(
        self,
        port: int,
        prefix: str,
        count: int,
        size: int,
        interval_ms: int = 1000,
        tag: str = "r",
        wire: int = 1,
        keyframe_every: int = 30,
        beat_every: int = 1,
    ) -> None:
        self.port = port
        self.wire = wire
        self.keyframe_every = keyframe_every
        # Version 2: each leaf beats once every `beat_every` flushes (its interval), a `beat_every`-th
        # of them each flush, in turn; its seq counts its beats.
        self.beat_every = beat_every
        self.prefix = prefix
        self.size = size
        self.ids = [f"{tag}{i:03d}" for i in range(count)]
        self.boot = secrets.token_hex(4)
        self.blobs = {r: hosts_blob(host_ids(r, size), interval_ms) for r in self.ids}
        self.topics = {r: f"{prefix}bundle/{r}".encode() for r in self.ids}
        self.seq = dict.fromkeys(self.ids, 0)
        self.clients: dict[str, mqtt.Client] = {}
        self.published = 0
        self.interval_ms = interval_ms
        self.hosts = {r: host_ids(r, size) for r in self.ids} if wire == 2 else {}
        self.encoders = {r: BundleEncoder() for r in self.hosts}
        # (relay, phase: seq mod beat_every) -> keyframe seq, table size, the delta's body after its header
        self.templates: dict[tuple[str, int], tuple[int, int, bytes]] = {}
        self.started = time.monotonic()
        self.sent_ms: dict[str, int] = {}  # per relay, the send time of its last bundle (version 2)

    async def connect(self) -> None:
        for r in self.ids:
            will = (f"{self.prefix}relay/{r}/status", b"offline", 1, True)
            self.clients[r] = await mqtt.connect("127.0.0.1", self.port, f"bench-{r}-{self.boot}", will=will)

    def publish(self, relay: str) -> int:
        self.seq[relay] += 1
        seq = self.seq[relay]
        payload = self._v2(relay, seq) if self.wire == 2 else bundle_bytes(relay, self.boot, seq, self.blobs[relay])
        self.clients[relay].publish(self.topics[relay], payload, qos=1)
        self.published += 1
        return seq

    def _v2(self, relay: str, seq: int, sent_ms: int | None = None) -> bytes:
        """Bundle `seq` of `relay` in version 2, sent `sent_ms` after the relay's boot (None: now): the
        leaves whose turn it is beat (heard 100-500 ms ago), each its next seq; a keyframe lists every
        leaf as last heard."""
        if sent_ms is None:  # a flood may publish several a millisecond: each bundle later than the last
            sent_ms = max(int((time.monotonic() - self.started) * 1000), self.sent_ms.get(relay, -1) + 1)
        self.sent_ms[relay] = sent_ms
        keyframe = seq % self.keyframe_every == 1
        every = self.beat_every
        phase = seq % every
        template = self.templates.get((relay, phase))
        if template is not None and not keyframe:
            keyframe_seq, table_size, tail = template
            body = self._header(relay, seq, sent_ms, keyframe_seq, table_size) + tail
            return _envelope_v2(body, COMPRESS_FROM)
        flush = self.interval_ms
        interval = flush * every
        ids = self.hosts[relay]
        hosts = tuple(
            HostEntry(host, (seq + i % every) // every, 100 + (i * 37) % 400 + flush * ((seq + i % every) % every),
                      interval, LeafStatus.OK)
            for i, host in enumerate(ids)
            if keyframe or (seq + i % every) % every == 0
        )  # fmt: skip
        bundle = Bundle(
            relay=relay,
            boot=self.boot,
            seq=seq,
            flush_ms=flush,
            hosts=hosts,
            version=BINARY_VERSION,
            keyframe=keyframe,
            sent_ms=sent_ms,
        )
        encoder = self.encoders[relay]
        payload = encoder.encode(bundle)
        if keyframe:  # its table may differ: each phase's delta is encoded once more after it
            for p in range(every):
                self.templates.pop((relay, p), None)
        table = encoder._table
        if not keyframe and table is not None:
            body = zlib.decompress(payload[2:]) if payload[1] & _COMPRESSED else payload[2:]
            header = self._header(relay, seq, sent_ms, table.keyframe, len(table.ids))
            assert body.startswith(header), "the delta's header is not where the template expects it"
            self.templates[relay, phase] = (table.keyframe, len(table.ids), bytes(body[len(header) :]))
        return payload

    def _header(self, relay: str, seq: int, sent_ms: int, keyframe_seq: int, table_size: int) -> bytearray:
        """An indexed delta's header, as `relay.compact` writes it."""
        out = bytearray([INDEXED | GROWS])
        _put_id(out, relay)
        _put_id(out, self.boot)
        for value in (seq, self.interval_ms, sent_ms, keyframe_seq, table_size):
            _put(out, value)
        return out

    def say_offline(self, relay: str) -> None:
        """What a relay's Last Will says; the monitor takes it as the relay's death."""
        self.clients[relay].publish(f"{self.prefix}relay/{relay}/status".encode(), b"offline", qos=1, retain=True)

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


async def processed(http: httpx.AsyncClient, relay: str) -> int:
    """The last bundle seq the monitor took from this relay (-1 if none)."""
    response = await http.get(f"/api/v1/relays/{relay}")
    if response.status_code == 404:
        return -1
    response.raise_for_status()
    seq = response.json()["seq"]
    return -1 if seq is None else int(seq)


async def wait_processed(http: httpx.AsyncClient, relay: str, seq: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    pause = 0.002  # growing to 20 ms: each poll is an HTTP request the monitor serves
    while await processed(http, relay) < seq:
        if time.monotonic() > deadline:
            msg = f"the monitor did not take bundle {seq} of {relay} within {timeout_s} s"
            raise TimeoutError(msg)
        await asyncio.sleep(pause)
        pause = min(0.02, pause * 1.5)


async def round_all(relays: Relays, http: httpx.AsyncClient, timeout_s: float = 120.0) -> None:
    """One bundle from every relay, and wait until the monitor took them all. (A relay's first bundle
    in version 2 is no evidence yet: its send-time clock is confirmed by the second.)"""
    last = {r: relays.publish(r) for r in relays.ids}
    if relays.wire == 2 and 1 in last.values():
        await asyncio.sleep(0.05)  # a later send time, arriving about as much later
        last = {r: relays.publish(r) if seq == 1 else seq for r, seq in last.items()}
    for r, seq in last.items():
        await wait_processed(http, r, seq, timeout_s)


async def flood(relays: Relays, http: httpx.AsyncClient, seconds: float) -> tuple[int, float]:
    """Publish round-robin as fast as the monitor takes bundles, keeping a bounded backlog in the
    broker (checked through the API every half window). Returns (bundles, seconds until the
    monitor took the last one)."""
    window = max(8, min(400, 400_000 // relays.size))
    half = window // 2
    ids = relays.ids
    sent: list[tuple[str, int]] = []
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        for _ in range(half):
            r = ids[len(sent) % len(ids)]
            sent.append((r, relays.publish(r)))
        await asyncio.sleep(0)
        if len(sent) > half:
            await wait_processed(http, *sent[-half - 1])
    for r in ids:
        last = max((s for rr, s in sent[-len(ids) :] if rr == r), default=0)
        if last:
            await wait_processed(http, r, last)
    return len(sent), time.monotonic() - started


async def paced(relays: Relays, entries_per_s: float, stop: asyncio.Event) -> int:
    """Background ingest at a fixed rate of leaf entries, in round-robin bundles, until `stop`."""
    per_bundle = relays.size
    period = per_bundle / entries_per_s
    started = time.monotonic()
    count = 0
    while not stop.is_set():
        relays.publish(relays.ids[count % len(relays.ids)])
        count += 1
        delay = started + count * period - time.monotonic()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        else:
            await asyncio.sleep(0)
    return count
