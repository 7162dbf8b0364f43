"""The relay service: beats in from the local broker, one bundle per flush out to the upstream broker.

It only moves bytes and time; every decision about what goes into a bundle is the assembler's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import aiomqtt

from relaybeat.errors import SettingsError, Unavailable
from relaybeat.relay.assembler import Assembler
from relaybeat.relay.compact import BundleDecoder, BundleEncoder, KeyframeMissing
from relaybeat.relay.mqtt import (
    Brokers,
    BrokerURL,
    LeanClient,
    backlog,
    messages,
    read_backlog,
    stay_connected,
)
from relaybeat.relay.parts import Parts
from relaybeat.relay.rejections import Rejections
from relaybeat.relay.watch import Source, Watch
from relaybeat.relay.wire import (
    BINARY_VERSION,
    DEFAULT_INTERVAL_S,
    DEFAULT_MAX_BUNDLE_BYTES,
    DEFAULT_PREFIX,
    FORMAT_VERSION,
    INTERNAL_ERROR,
    MAX_TREE_DEPTH,
    Bundle,
    Presence,
    RelayStatus,
    TopicKind,
    Topics,
    WireError,
    check_id,
    decode_beat,
)

log = logging.getLogger("relaybeat.relay")

CATCH_UP_QUIET_S = 0.05  # after a pause, the local backlog counts as read once nothing waited for this long
CATCH_UP_MAX_S = 10.0  # and reading it never holds back a bundle longer than this
DEFAULT_KEYFRAME_S = 30.0
BundleFormat = Literal["binary", "json"]  # wire format version 2 (deltas and keyframes), or 1 (keyframes only)
# The local side reads at most every flush/10 (100 ms at the default 1 s flush), many beats per wakeup
# (a fifth of the wakeups at flush/50 cut the relay's CPU per leaf beat 2.4x); a beat read after such
# a pause is dated when the pause began, its earliest possible arrival, so it is never younger than it
# is (up to that much older), and a flush first reads whatever waits.
GATHER_FLUSHES = 0.1


def catch_up_s(planned_at: float, woke_at: float, flush_s: float) -> float:
    """How long a flush may first spend reading what waits on the local side: 0 when on time. More
    than one flush interval late, the relay was paused or stalled (SIGSTOP, a blocked loop, a
    suspended VM) and its leaves' beats since then are probably waiting unread: a bundle flushed now
    would report them silent for the whole pause. Their backlog is as long as the pause, so reading
    it may take up to that long (at least one flush interval, at most CATCH_UP_MAX_S)."""
    late_s = woke_at - planned_at
    if late_s <= flush_s:
        return 0.0
    return min(late_s, CATCH_UP_MAX_S)


@dataclass(frozen=True, slots=True)
class RelaySettings:
    relay_id: str
    local: BrokerURL | Brokers  # one broker, or the nodes of one cluster (tried in order)
    upstream: BrokerURL | Brokers
    flush_s: float = 1.0
    default_interval_s: float = DEFAULT_INTERVAL_S
    prefix: str = DEFAULT_PREFIX
    forget_after_s: float = 86_400.0
    max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES
    # Fold bundles of child relays heard on the local broker into ours (a relay tree). None: only when
    # the local and upstream brokers differ, so sibling relays sharing one broker never nest.
    accept_children: bool | None = None
    keyframe_s: float = DEFAULT_KEYFRAME_S  # a full bundle this often; deltas in between (binary only)
    format: BundleFormat = "binary"
    watch: tuple[Source, ...] = ()  # sources whose devices the relay vouches for (relay/watch.py)
    # 0: a bundle is superseded by the next flush, and a lost delta is caught by its seq gap (the
    # monitor asks for a keyframe); 1 makes a cluster (NATS: JetStream) hold bundles back while it fails over.
    bundle_qos: int = 0
    # After a (re)start, no bundle until the leaves had this long to beat once it hears them: its first
    # keyframe then carries them, so hosts return straight to `up` (not via `unknown`, as a keyframe of
    # nobody would make them). Meanwhile its session and retained `online` status are its liveness.
    # `relaybeat relay` defaults it to default_interval_s (relaybeat/config.py); 0 here: no hold.
    hold_first_s: float = 0.0

    def __post_init__(self) -> None:
        check_id(self.relay_id)
        if not 0.01 <= self.flush_s <= 3600:
            msg = f"flush must be within [0.01, 3600] s, not {self.flush_s}"
            raise SettingsError(msg)
        if not 0 <= self.hold_first_s <= 3600:
            msg = f"hold_first_s must be within [0, 3600] s, not {self.hold_first_s}"
            raise SettingsError(msg)
        if not 0 <= self.keyframe_s <= 86_400:
            msg = f"keyframe_s must be within [0, 86400] s, not {self.keyframe_s}"
            raise SettingsError(msg)
        if self.bundle_qos not in (0, 1):
            msg = f"bundle_qos must be 0 or 1, not {self.bundle_qos}"
            raise SettingsError(msg)

    @property
    def folds_children(self) -> bool:
        if self.accept_children is not None:
            return self.accept_children
        local = {(u.host, u.port) for u in Brokers.of(self.local).urls}
        return local.isdisjoint((u.host, u.port) for u in Brokers.of(self.upstream).urls)


class RelayService:
    def __init__(self, settings: RelaySettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.topics = Topics(settings.prefix)
        self.clock = clock
        self.boot = secrets.token_hex(6)
        self._sessions = 0  # upstream main sessions tried in this boot: each one's will names its number
        self._session_up = 0  # ... the number of the last one that connected (0: none yet)
        self._said_online = -1  # ... the one the spare last said `online` for (with a spare)
        json = settings.format == "json"
        self.assembler = Assembler(
            settings.relay_id,
            self.boot,
            settings.flush_s,
            settings.default_interval_s,
            settings.forget_after_s,
            keyframe_s=0.0 if json else settings.keyframe_s,  # version 1 knows keyframes only
            version=FORMAT_VERSION if json else BINARY_VERSION,
            booted_at=self.clock(),
        )
        self.encoder = BundleEncoder()  # our bundle stream upstream: deltas by index into our last keyframe
        self.decoder = BundleDecoder()  # child relays' streams
        self.resyncs = 0  # keyframe requests heard from upstream
        self.rejections = Rejections(log)
        self.watch = Watch(settings.watch, settings.forget_after_s)
        self._watch_news = asyncio.Event()  # a watched device changed since the last bundle
        self.beats = 0
        self.bundles_sent = 0
        self.upstream_connected = asyncio.Event()
        self._upstream_lost = asyncio.Event()  # the main upstream session was lost: the spare sends bundles
        self._main_sending = asyncio.Event()  # ... until the main one sends them again
        self._main_moved = asyncio.Event()  # the main session began sending (through `upstream_at`)
        self._trying: BrokerURL | None = None  # the node the main session connects to, or last did
        self.upstream_at: BrokerURL | None = None  # the node the main session is connected to
        self.spare_at: BrokerURL | None = None  # ... and the spare session (with a list of nodes)
        self.spare_takeovers = 0  # times the spare session sent bundles while the main one was away
        self.local_connected = asyncio.Event()
        self._local_lost_at = self.clock()  # before the first connection: counts as lost since start
        self._local_client: LeanClient | None = None  # the local session, while there is one
        self._local_heard = 0  # messages from the local broker so far
        self._flush_due = self.clock()  # when the next bundle is planned (kept across upstream sessions)
        self.catch_ups = 0  # flushes that first read a local backlog, after a pause or a stall
        self._sending: aiomqtt.Client | None = None  # the upstream session bundles go through
        self._held = settings.hold_first_s > 0  # the first bundle is still held (relay start)
        self._local_first: float | None = None  # when the local broker first let us hear the leaves

    async def run(self) -> None:
        """Until cancelled. Either broker may come and go; beats keep being assembled meanwhile.
        A part that fails stops the relay with `PartFailed`, naming it."""
        parts = {"local": self._local, "upstream": self._upstream}
        if self._spared:
            parts["spare"] = self._spare
        await Parts(f"relay {self.settings.relay_id}").run(parts)

    # -------------------------------------------------------------------------------- local side

    async def _local(self) -> None:
        s = self.settings
        await stay_connected(
            s.local,
            lambda url: url.lean_client(
                f"{url.username or s.relay_id}/local-{self.boot}",
                self._heard,
                keepalive=10,
                gather_s=s.flush_s * GATHER_FLUSHES,
            ),
            self._consume_local,
            name=f"relay {s.relay_id} (local)",
            max_delay_s=1.0,
            on_state=self._local_state,
        )

    def _local_state(self, connected: bool) -> None:
        if connected:
            if self._local_first is None:
                self._local_first = self.clock()
            self.local_connected.set()
        elif self.local_connected.is_set():
            self.local_connected.clear()
            self._local_lost_at = self.clock()

    async def _consume_local(self, client: LeanClient) -> None:
        await client.subscribe(self.topics.all_beats, qos=0)
        if self.settings.folds_children:
            await client.subscribe(self.topics.all_bundles, qos=1)
        for topic_filter in self.watch.filters:  # retained availability is current state: it is replayed here
            await client.subscribe(topic_filter, qos=1)
        self._local_client = client
        try:
            await client.run()  # every message goes to _heard as it is read; returns only by raising
        finally:
            self._local_client = None

    def _heard(self, topic: str, payload: bytes, retained: bool) -> None:
        self._local_heard += 1
        client = self._local_client
        self.take(topic, payload, retained, 0.0 if client is None else client.waited_s)

    async def _catch_up_local(self, paused_at: float, bound_s: float) -> None:
        """After a pause, let the local side read what waits for it (the local broker's backlog, our
        socket, aiomqtt's queue) before flushing: the beats that waited are the news, and the bundle
        must carry them. Done once our input stayed empty for CATCH_UP_QUIET_S and every leaf that was
        beating before the pause was heard again (an in-process broker may still be routing when our
        socket is empty), or after `bound_s`."""
        started = empty_since = self.clock()
        heard = self._local_heard
        while (now := self.clock()) - started < bound_s:
            client = self._local_client
            if client is None:  # the local broker dropped us meanwhile: what waited comes on reconnecting
                empty_since = now
                await asyncio.sleep(CATCH_UP_QUIET_S / 5)
            elif sum(backlog(client)):
                empty_since = now
                await asyncio.sleep(0)  # the reader and the consumer run; paho reads a packet a turn
            elif now - empty_since >= CATCH_UP_QUIET_S:
                if not self.assembler.awaited(paused_at, started):
                    break
                empty_since = now
            else:
                await asyncio.sleep(CATCH_UP_QUIET_S / 5)
        self.catch_ups += 1
        log.warning(
            "relay %s flushed %.1f s late (paused or stalled): read %d waiting messages in %.2f s first",
            self.settings.relay_id, started - paused_at, self._local_heard - heard, self.clock() - started,
        )  # fmt: skip

    def take(self, topic: str, payload: bytes, retained: bool = False, waited_s: float = 0.0) -> None:
        """One message from the local broker. Bad input is counted and logged, never raised.

        `retained`: the broker replayed a stored message on (re)subscribe. Its age is unknown, so a
        retained beat is no evidence of life (live deliveries never carry the flag). `waited_s`: it
        may have arrived that long before now (read after a pause to gather): it is dated then."""
        now = self.clock() - waited_s
        try:
            if not topic.startswith(self.topics.prefix) and self.watch.wants(topic):
                self._watched(self.watch.take(topic, payload, now))
                return
            kind, subject = self.topics.parse(topic)
            if retained:
                msg = "retained"
                raise WireError(msg, "an old retained message, not a beat: publish beats without retain")
            if kind is TopicKind.BEAT:
                self.assembler.add_beat(subject, decode_beat(payload), now)
                self.beats += 1
            elif kind is TopicKind.BUNDLE and subject != self.settings.relay_id:
                try:
                    bundle = self.decoder.decode(payload, self.settings.max_bundle_bytes, relay=subject)
                except KeyframeMissing as lost:
                    self.assembler.lose_child(lost.header, now)  # asked for a keyframe at our next flush
                    raise
                if bundle.relay != subject:
                    msg = "relay_mismatch"
                    raise WireError(msg, f"bundle says {bundle.relay!r}")
                if _depth(bundle) >= MAX_TREE_DEPTH:  # folded into ours it would be one level too deep
                    msg = "too_deep"
                    raise WireError(msg, f"relay tree under {bundle.relay!r} is too deep to fold in")
                if not self.assembler.add_child(bundle, now):
                    self.rejections.add("stale_bundle", topic, f"seq {bundle.seq} is not newer than the one held")
        except WireError as err:
            self.rejections.add(err.reason, topic, err.detail)
        except Exception as exc:  # a bug, not bad input: counted and logged, and the next message is read
            self.rejections.add(
                INTERNAL_ERROR, topic, f"{type(exc).__name__} (a bug: please report)", with_traceback=True
            )

    def _watched(self, changed: list[str]) -> None:
        if changed:
            self._watch_news.set()
        for host in changed:
            device = self.watch.devices[host]
            log.info(
                "relay %s: %s %s is %s (%s)",
                self.settings.relay_id,
                device.source.name,
                host,
                device.state,
                device.reason,
            )

    # ----------------------------------------------------------------------------- upstream side

    async def _upstream(self) -> None:
        s = self.settings
        try:
            await stay_connected(
                s.upstream,
                self._upstream_client,
                self._publish_bundles,
                name=f"relay {s.relay_id} (upstream)",
                max_delay_s=1.0,  # the monitor's grace after an outage is one relay timeout: be back by then
                on_state=self._upstream_state,
            )
        finally:
            self._upstream_state(False)

    def _upstream_client(self, url: BrokerURL) -> aiomqtt.Client:
        self._trying = url
        return url.client(self.settings.relay_id, will=self._will(), keepalive=self._keepalive_s)

    def _will(self) -> aiomqtt.Will:
        """The Last Will of the next upstream session: `offline`, naming it (a will of a connection the
        relay gave up on, let go by a broker only later, is then known stale by the monitor)."""
        self._sessions += 1
        will = Presence(RelayStatus.OFFLINE, self.boot, self._sessions).encode()
        return aiomqtt.Will(self.topics.relay_status(self.settings.relay_id), will, qos=1, retain=True)

    def _presence(self, status: RelayStatus) -> bytes:
        """`online` or `stopped`, naming the upstream session that connected last (plain before one did)."""
        if not self._session_up:
            return Presence(status).encode()
        return Presence(status, self.boot, self._session_up).encode()

    def _upstream_state(self, connected: bool) -> None:
        if connected:
            self._session_up, self.upstream_at = self._sessions, self._trying
            self.upstream_connected.set()
        else:
            self.upstream_at = None
            self.upstream_connected.clear()
            self._main_sending.clear()
            self._upstream_lost.set()

    async def _spare(self) -> None:
        """With several upstream nodes (one cluster), a second session, kept connected from the list's
        second node on: when the main session's node dies, bundles go on through this one at once while
        the main one reconnects (on a NATS cluster that took 3-10 s: the other nodes take a connection
        but answer only once JetStream has new leaders). No will: its loss says nothing of the relay.
        It keeps off the main session's node, where it would die with it."""
        s = self.settings
        await stay_connected(
            Brokers.of(s.upstream).rotated(),
            self._spare_client,
            self._stand_by,
            name=f"relay {s.relay_id} (upstream spare)",
            max_delay_s=1.0,
            on_state=self._spare_state,
            avoid=lambda url: url == self.upstream_at,
        )

    def _spare_state(self, connected: bool) -> None:
        if not connected:
            self.spare_at = None

    def _spare_client(self, url: BrokerURL) -> aiomqtt.Client:
        self.spare_at = url
        return url.client(f"{url.username or self.settings.relay_id}/spare-{self.boot}", keepalive=self._keepalive_s)

    async def _keep_apart(self) -> None:
        """Ends the spare session once the main one sends through the spare's node (both would die with
        it), and the spare said `online` for it: the wills of the sessions before are then stale."""
        while True:
            self._main_moved.clear()
            said = self._said_online == self._session_up
            if self._main_sending.is_set() and self.upstream_at == self.spare_at and said:
                msg = "the main session now sends through this node; the spare moves to another"
                raise Unavailable(msg)
            await self._main_moved.wait()

    async def _stand_by(self, client: aiomqtt.Client) -> None:
        await client.subscribe(self.topics.relay_resync(self.settings.relay_id), qos=0)
        parts = {
            asyncio.create_task(part)
            for part in (self._hear_resyncs(client), self._take_over(client), self._keep_apart())
        }
        try:
            done, _ = await asyncio.wait(parts, return_when=asyncio.FIRST_COMPLETED)
            for part in done:
                part.result()  # why the session ended (or a bug): neither returns otherwise
        finally:
            for part in parts:
                part.cancel()

    async def _take_over(self, client: aiomqtt.Client) -> None:
        """Send the bundles through the spare session whenever the main one is away."""
        online = asyncio.create_task(self._say_online(client))
        try:
            while True:
                await self._upstream_lost.wait()
                self.spare_takeovers += 1
                log.warning(
                    "relay %s: upstream session lost; bundles go through the spare session", self.settings.relay_id
                )
                flushing = asyncio.create_task(self._flush_forever(client))
                back = asyncio.create_task(self._main_sending.wait())
                try:
                    await asyncio.wait((flushing, back), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    flushing.cancel()
                    back.cancel()
                if flushing.done() and not flushing.cancelled():
                    flushing.result()  # raises: the spare session ended too
                online.cancel()
                online = asyncio.create_task(self._say_online(client))  # the main one is back: say so
        finally:
            online.cancel()

    async def _say_online(self, client: aiomqtt.Client) -> None:
        """With a spare, the spare says the relay is `online` (retained, QoS 1), not the main session: a
        cluster node failing over may take a connection, time out storing the retained status and drop
        that client (NATS did, after 4 s); dropped, the main session's will said `offline` of a relay
        whose bundles never stopped. The spare has no will, so being dropped costs nothing."""
        with contextlib.suppress(aiomqtt.MqttError):  # the session's loss is noticed by its listener
            session = self._session_up
            online = self._presence(RelayStatus.ONLINE)
            await client.publish(self.topics.relay_status(self.settings.relay_id), online, qos=1, retain=True)
            self._said_online = session
            self._main_moved.set()

    @property
    def _spared(self) -> bool:
        """The relay keeps a spare upstream session (its upstream is a list of nodes)."""
        return len(Brokers.of(self.settings.upstream).urls) > 1

    @property
    def _keepalive_s(self) -> int:
        return max(2, round(self.settings.flush_s * 3))

    async def _publish_bundles(self, client: aiomqtt.Client) -> None:
        status_topic = self.topics.relay_status(self.settings.relay_id)
        if not self._spared:
            await client.publish(status_topic, self._presence(RelayStatus.ONLINE), qos=1, retain=True)
        await client.subscribe(self.topics.relay_resync(self.settings.relay_id), qos=0)
        self.assembler.request_keyframe()  # whoever listens may have missed what we sent while away
        self.encoder.send_ids()  # ... and may lack our id table: that keyframe carries it
        listener = asyncio.create_task(self._hear_resyncs(client))
        self._upstream_lost.clear()  # sending again: not before (a cluster node may take the connection, then
        self._main_sending.set()  # hold our status publish while it fails over), so the spare sends meanwhile
        self._main_moved.set()
        try:
            await self._flush_forever(client)
        except asyncio.CancelledError:
            # A planned stop: say so (`stopped`, retained in place of the will, which a clean disconnect
            # never fires), so the monitor pages nobody; but a broker that does not answer within a
            # second must never keep the relay from stopping.
            with contextlib.suppress(Exception):
                stopped = self._presence(RelayStatus.STOPPED)
                await asyncio.wait_for(asyncio.shield(client.publish(status_topic, stopped, qos=1, retain=True)), 1.0)
            raise
        finally:
            listener.cancel()

    async def _hear_resyncs(self, client: aiomqtt.Client) -> None:
        """Requests for a keyframe (the monitor, or our parent, missed a delta of ours)."""
        topic = self.topics.relay_resync(self.settings.relay_id)
        async for message in messages(client):
            if str(message.topic) == topic and not message.retain and self._sending is client:
                self.resyncs += 1
                self.assembler.request_keyframe()
                self.encoder.send_ids()  # the asker lacks our id table: a keyframe by table would not do

    async def _ask_children_for_keyframes(self) -> None:
        """Children whose deltas we missed: ask them for a keyframe on the local broker."""
        local = self._local_client
        if local is None:
            return
        for child in self.assembler.wanted_keyframes:
            with contextlib.suppress(aiomqtt.MqttError):
                await local.publish(self.topics.relay_resync(child), b"", qos=0)

    async def _hold_first(self) -> None:
        """Once per process: wait until the leaves had `hold_first_s` to beat since we first heard the
        local broker (a leaf beats once per interval: one interval, and the first keyframe has it)."""
        if not self._held:
            return
        await self.local_connected.wait()
        heard_from = self.clock() if self._local_first is None else self._local_first
        await asyncio.sleep(max(0.0, heard_from + self.settings.hold_first_s - self.clock()))
        self._held = False
        self._flush_due = self.clock()

    async def _flush_forever(self, client: aiomqtt.Client) -> None:
        s = self.settings
        self._sending = client  # whose keyframe requests count: the spare and the main session both hear them
        topic = self.topics.bundle(s.relay_id)
        await self._hold_first()
        while True:
            catch_up = catch_up_s(self._flush_due, self.clock(), s.flush_s)
            local = self._local_client
            if catch_up:  # back from a pause: read what waits first
                await self._catch_up_local(self._flush_due - s.flush_s, catch_up)  # the last flush before it
                self._flush_due = self.clock()
            elif local is not None and sum(backlog(local)) > 0:  # busy (a flood): beats may wait behind it
                await read_backlog(local, s.flush_s / 2, self.clock)
            await self._ask_children_for_keyframes()
            bundle = self._bundle()
            if not self.local_connected.is_set() and self.clock() - self._local_lost_at > s.flush_s:
                # We cannot hear our leaves: stay silent, so the monitor blames this relay (one outage,
                # its hosts unreachable) instead of watching every host's age grow into its own page.
                await asyncio.sleep(s.flush_s)
                self._flush_due = self.clock()
                continue
            await self._send(client, topic, bundle)
            self._flush_due += s.flush_s
            now = self.clock()
            if now > self._flush_due and not catch_up_s(self._flush_due, now, s.flush_s):
                self._flush_due = now  # a little behind (a slow broker): skip ahead rather than burst
            await self._until_due(client, topic)

    def _bundle(self) -> Bundle:
        now = self.clock()
        self._watched(self.watch.expire(now))
        self._watch_news.clear()  # what the watched sources said until now goes out in this bundle
        return self.assembler.flush(now, self.watch.entries(now))

    async def _send(self, client: aiomqtt.Client, topic: str, bundle: Bundle) -> None:
        payload, s = self.encoder.encode(bundle), self.settings
        if len(payload) > s.max_bundle_bytes:
            self.rejections.add("bundle_too_large", s.relay_id, f"{len(payload)} bytes; raise --max-bundle-bytes")
        else:
            await client.publish(topic, payload, qos=s.bundle_qos)
            self.bundles_sent += 1

    async def _until_due(self, client: aiomqtt.Client, topic: str) -> None:
        """Sleep until the planned flush. A watched device whose state changes meanwhile (its Last Will)
        goes out at once in an extra bundle, at most one per quarter flush, instead of a flush later."""
        quiet_s = self.settings.flush_s / 4
        while (left := self._flush_due - self.clock()) > 0:
            if not self._watch_news.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._watch_news.wait(), left)
            elif left > quiet_s:
                await self._send(client, topic, self._bundle())
                await asyncio.sleep(quiet_s)
            else:
                await asyncio.sleep(left)


def _depth(bundle: Bundle) -> int:
    """Levels of relays in a bundle: 1 for a relay without children."""
    return 1 + max((_depth(child) for child in bundle.children), default=0)
