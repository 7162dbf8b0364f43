"""The monitor's ingest part: one MQTT session (persistent, QoS 1) in, decoded and validated news to
the detector out. Bad input is counted and logged (`rejections`), never raised.

With several broker nodes (one cluster), a spare session (clean, `<client id>/spare`, QoS 0) is
kept connected and subscribed from the list's second node on (`run_spare`, its own part). While the
main session hears, what the spare hears is dropped unread (a duplicate: its cost is the bytes and
MQTT parsing of every message a second time, no decoding); while the main session is lost after it
was hearing, it goes through the same `take`. On NATS a reconnecting persistent session waits for
JetStream while it elects new leaders after a node died; the spare needs nothing of JetStream then.

When the detector lost track of a relay's deltas it asks for a keyframe: the request goes out on
`<prefix>relay/<id>/resync` (QoS 0; asked again while it stays out of sync).

Bundles are dated by their relay's send time (monitor/dating.py): while a relay boot's clock is not
yet confirmed by two bundles that arrived about as fast as they were sent, its bundles prove nothing
and go no further; the newest of them is held, and passed on (dated) once the clock is confirmed.

It also reads the backlog before each expiry pass (`catch_up`): input that outlasts BEHIND_S of
reading means the monitor is behind (`Behind`): every pass, and every bundle read meanwhile, then
renews a timeout of grace, as a stall does, for up to BEHIND_GRACE_S; behind longer than that, it
decides anyway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable

from relaybeat.errors import RelaybeatError, Unavailable
from relaybeat.monitor.clock import Clock
from relaybeat.monitor.dating import Dating
from relaybeat.monitor.detector import Detector
from relaybeat.monitor.expiry import EXPIRE_STEP, Expiry
from relaybeat.monitor.states import Transition
from relaybeat.relay.compact import BundleDecoder, KeyframeMissing
from relaybeat.relay.mqtt import (
    HAND_ON_BUDGET_S,
    Brokers,
    BrokerURL,
    LeanClient,
    backlog,
    read_backlog,
    stay_connected,
)
from relaybeat.relay.rejections import Rejections
from relaybeat.relay.wire import (
    DEFAULT_MAX_BUNDLE_BYTES,
    DEFAULT_MAX_BUNDLE_ENTRIES,
    INTERNAL_ERROR,
    Bundle,
    RelayStatus,
    TopicKind,
    Topics,
    WireError,
    decode_beat,
    decode_relay_status,
)

__all__ = ["BEHIND_GRACE_S", "BEHIND_S", "Behind", "Ingest", "SessionStolen"]

log = logging.getLogger("relaybeat.monitor")

BEHIND_S = 1.0  # input still waiting after reading this long: the monitor is behind, news may be late
# Behind its input this long, the monitor decides anyway: a flood that never ends must not stop every
# decision. A fleet's first keyframes are a long episode: 1M new hosts behind 200 relays kept one
# monitor behind for about 3 minutes here (BENCHMARKS.md, row 7); 60 s made that a spiral of false
# relay deaths.
BEHIND_GRACE_S = 300.0
# A session lost this soon after connecting, this many times within STOLEN_WINDOW_S: someone else
# uses our client id (each takes the session from the other), so the monitor stops instead.
SHORT_SESSION_S = 5.0
STOLEN_SESSIONS = 5
STOLEN_WINDOW_S = 30.0


class SessionStolen(RelaybeatError):
    """The monitor's MQTT session keeps being taken over: another client uses its client id."""


class Ingest:
    def __init__(
        self,
        topics: Topics,
        detector: Detector,
        clock: Clock,
        decide: Callable[[list[Transition]], None],
        expiry: Expiry,
        *,
        accept_direct_beats: bool = True,
        relays: frozenset[str] | None = None,
        max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
        max_bundle_entries: int = DEFAULT_MAX_BUNDLE_ENTRIES,
        behind_grace_s: float = BEHIND_GRACE_S,
    ) -> None:
        self.topics = topics
        self.detector = detector
        self.clock = clock
        self.decide = decide  # where decisions go (the writer)
        self.expiry = expiry  # woken when news moves a deadline earlier
        self.accept_direct_beats = accept_direct_beats
        self.relays = relays
        self.max_bundle_bytes = max_bundle_bytes
        self.max_bundle_entries = max_bundle_entries
        # Per relay, the table of its last keyframe (indexed deltas refer to it); ordinary news by column.
        self.bundles = BundleDecoder(columnar=True)
        self.dating = Dating()
        self._held: dict[str, tuple[Bundle, bool]] = {}  # per relay, its newest undated bundle (and unreadable)
        self.rejections = Rejections(log)
        self.ignored_log = Rejections(log)  # rate-limited warnings for bundles the detector ignores (it counts)
        self.received: Counter[str] = Counter()
        self.lag = Behind(behind_grace_s)
        self._main: LeanClient | None = None  # the main session's client, while it is hearing
        self._stand_in: LeanClient | None = None  # the spare session's client, while it hears instead
        # What the main session heard before it was ready (a persistent session's backlog comes at once
        # after CONNACK), and whatever follows while that is taken, in order, a step at a time.
        self._early: deque[tuple[str, bytes, bool]] = deque()
        self._draining = False
        self._resyncs: asyncio.Task[None] | None = None  # asking relays for keyframes, while it runs
        self._main_up = False  # the main session is connected
        self._spare_up = False  # the spare session is connected (subscribed or not)
        self._main_lost = asyncio.Event()  # the main session was hearing and was lost: the spare stands in
        self._main_changed = asyncio.Event()  # the main session began or stopped hearing (for the spare)
        self.spare_takeovers = 0  # times the spare session heard in the main one's place
        self.broker: str | None = None  # the node the main session hears through (password redacted)
        self.spare_broker: str | None = None  # ... and the spare session, subscribed
        self.client_id = ""
        self._connected_at: float | None = None  # monotonic, while connected
        self._ever_connected = False
        self._short_sessions: deque[float] = deque()  # when sessions ended soon after they began

    async def run(self, broker: BrokerURL | Brokers, client_id: str) -> None:
        self.client_id = client_id
        await stay_connected(
            broker,
            lambda url: url.lean_client(client_id, self._heard, keepalive=5, clean_session=False),
            self._session,
            name="monitor",
            max_delay_s=1.0,
            on_state=self._connection_changed,
        )

    async def run_spare(self, broker: Brokers, client_id: str) -> None:
        """The spare session, from the list's second node on (see the module's doc)."""
        await stay_connected(
            broker.rotated(),
            lambda url: url.lean_client(f"{client_id}/spare", self._heard_by_spare, keepalive=5),
            self._stand_by,
            name="monitor (spare)",
            max_delay_s=1.0,
            on_state=self._spare_changed,
            avoid=lambda url: str(url) == self.broker,  # a spare on the main session's node dies with it
        )

    @property
    def _client(self) -> LeanClient | None:
        """The session we hear through: the main one, or the spare while it stands in."""
        return self._main or self._stand_in

    def _connection_changed(self, connected: bool) -> None:
        self._count_short_sessions(connected)
        self._main_up = connected
        if connected and not self._ever_connected:
            # Blind until the first session: the start-up grace counts from it, not from the start of a
            # process that took a while to connect (a standby deciding on nothing would write it later).
            self._ever_connected = True
            self.detector.regain_sight(self.clock.now())
        self._see(quiet=not connected and self._spare_up)  # the spare says so when it stands in, at once

    def _spare_changed(self, connected: bool) -> None:
        self._spare_up = connected
        if not connected:
            self._stand_in = None
            self._see()

    def _see(self, quiet: bool = False) -> None:
        """Tell the detector whether we hear the broker: through the main session, or the spare standing in."""
        connected = self._main_up or self._stand_in is not None
        if connected != (not self.detector.disconnected) and not quiet:
            log.warning("monitor %s its broker", "regained" if connected else "lost")
        self.detector.set_connected(connected, self.clock.now())
        self.expiry.wake()

    def _count_short_sessions(self, connected: bool) -> None:
        now = time.monotonic()
        if connected:
            self._connected_at = now
            return
        began, self._connected_at = self._connected_at, None
        if began is None or now - began > SHORT_SESSION_S:
            return
        short = self._short_sessions
        short.append(now)
        while short and short[0] < now - STOLEN_WINDOW_S:
            short.popleft()
        if len(short) >= STOLEN_SESSIONS:
            msg = (
                f"the MQTT session of client id {self.client_id!r} was lost {len(short)} times within "
                f"{STOLEN_WINDOW_S:g} s, each within {SHORT_SESSION_S:g} s of connecting: another client (a second "
                "monitor?) uses the same client id; give each monitor its own --client-id"
            )
            raise SessionStolen(msg)

    async def _session(self, client: LeanClient) -> None:
        await self._subscribe(client, qos=1)
        self._main, self.broker = client, str(client.url)
        self._main_lost.clear()
        self._main_changed.set()
        run = asyncio.ensure_future(client.run())  # returns only by raising: the session ended
        try:
            await self._drain_early()
            await run  # every message goes to `_heard` as it is read
        finally:
            run.cancel()
            self._early.clear()
            self._draining = False
            self._main = self.broker = None
            self._main_lost.set()
            self._main_changed.set()

    async def _stand_by(self, client: LeanClient) -> None:
        """The spare session: subscribed from its start, its input dropped unread while the main one
        hears; heard in its place while the main one is lost. (Subscribing only once the main session
        is lost fails on NATS when it is needed most: a SUBSCRIBE, clean session and QoS 0 included,
        stores the session's record in JetStream, which times out while it elects new leaders, and the
        node then drops the client: seen in 2 of 3 runs of tests/test_nats_cluster.py.)

        It keeps off the main session's node, where it would die with it: it connects elsewhere, and
        leaves when the main session comes to hear through its node."""
        await self._subscribe(client, qos=0)
        self.spare_broker = str(client.url)
        reader = asyncio.create_task(client.run())
        try:
            while True:
                if self.broker == self.spare_broker:
                    msg = "the main session now hears through this node; the spare moves to another"
                    raise Unavailable(msg)
                if self._main_lost.is_set() and self._stand_in is None:
                    self._stand_in = client
                    self.spare_takeovers += 1
                    log.warning("monitor lost its broker session; the spare session hears in its place")
                    self._see(quiet=True)
                elif not self._main_lost.is_set() and self._stand_in is not None:
                    self._stand_in = None  # the main one hears again: what the spare hears is dropped unread
                    log.info("monitor's main broker session hears again; the spare stands by")
                self._main_changed.clear()
                changed = asyncio.create_task(self._main_changed.wait())
                try:
                    await asyncio.wait((reader, changed), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                if reader.done():
                    reader.result()  # raises: the spare session ended (noticed now, not at the next takeover)
        finally:
            reader.cancel()
            self._stand_in = self.spare_broker = None

    @property
    def _filters(self) -> list[str]:
        filters = [self.topics.all_bundles, self.topics.all_relay_statuses]
        return [*filters, self.topics.all_beats] if self.accept_direct_beats else filters

    async def _subscribe(self, client: LeanClient, qos: int) -> None:
        """One SUBSCRIBE for every filter: NATS stores the session's record in JetStream per SUBSCRIBE."""
        await client.subscribe([(topic_filter, qos) for topic_filter in self._filters])

    async def _drain_early(self) -> None:
        """Take what the session heard before it was ready, in order, the event loop free every
        HAND_ON_BUDGET_S: a reconnected persistent session's backlog (thousands of bundles) is no hold.
        All of it, even if the session ends meanwhile: each message was acknowledged when heard."""
        early, loop = self._early, asyncio.get_running_loop()
        self._draining = True
        try:
            started = loop.time()
            while early:
                self._take_heard(*early.popleft())
                if loop.time() - started >= HAND_ON_BUDGET_S:
                    await asyncio.sleep(0)
                    started = loop.time()
        finally:
            self._draining = False

    def _heard(self, topic: str, payload: bytes, retained: bool) -> None:
        """A message of the main session, as its client reads it (no task or queue per message)."""
        if self._main is None or self._draining:
            self._early.append((topic, payload, retained))
            return
        self._take_heard(topic, payload, retained)

    def _take_heard(self, topic: str, payload: bytes, retained: bool) -> None:
        self.take(topic, payload, retained)
        if self.detector.resync_wanted:
            self._ask_resyncs_soon()

    def _heard_by_spare(self, topic: str, payload: bytes, retained: bool) -> None:
        if self._stand_in is None:
            return  # the spare while the main session hears: a duplicate, dropped unread
        self.take(topic, payload, retained)
        if self.detector.resync_wanted:
            self._ask_resyncs_soon()

    def _ask_resyncs_soon(self) -> None:
        client = self._client
        if client is not None and (self._resyncs is None or self._resyncs.done()):
            self._resyncs = asyncio.get_running_loop().create_task(self.ask_resyncs(client))

    def take(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """One message from the broker. Bad input is counted and logged, never raised.

        `retained`: replayed by the broker on (re)subscribe, of unknown age. A retained relay status
        is what it is meant for; a retained beat or bundle is no evidence of life."""
        now = self.clock.now()
        try:
            kind, subject = self.topics.parse(topic)
            if retained and kind is not TopicKind.RELAY_STATUS:
                msg = "retained"
                raise WireError(msg, "an old retained message: publish beats and bundles without retain")
            if kind is TopicKind.BUNDLE:
                unreadable = False
                try:
                    bundle = self.bundles.decode(payload, self.max_bundle_bytes, self.max_bundle_entries, subject)
                except KeyframeMissing as lost:  # alive, but what it said is unknown: wait for a keyframe, ask one
                    bundle, unreadable = lost.header, True
                    self.received["need_keyframe"] += 1
                if bundle.relay != subject:
                    msg = "relay_mismatch"
                    raise WireError(msg, f"bundle for {bundle.relay!r} on {topic!r}")
                if self.relays is not None:
                    unknown = _relay_ids(bundle) - self.relays
                    if unknown:
                        msg = "unknown_relay"
                        raise WireError(msg, f"{sorted(unknown)[0]!r} is not in [monitor] relays")
                self.received["bundles"] += 1
                self.received["bundle_entries"] += bundle.entry_count()
                ignored = self.detector.ignored
                before = dict(ignored)
                self._date(bundle, unreadable, now)
                if ignored != before:  # a duplicate or older bundle (seq, boot): counted by the detector
                    for reason in [r for r, n in ignored.items() if n != before.get(r)]:
                        self.ignored_log.add(f"detector_{reason}", topic, "ignored: not newer than what was seen")
            elif kind is TopicKind.BEAT:
                if self.accept_direct_beats:
                    self.received["beats"] += 1
                    self.decide(self.detector.observe_beat(subject, decode_beat(payload), now, EXPIRE_STEP))
            else:
                self._take_presence(subject, payload, now)
        except WireError as err:
            self.rejections.add(err.reason, topic, err.detail)
        except Exception as exc:  # a bug, not bad input: counted and logged, and the next message is read
            self.rejections.add(
                INTERNAL_ERROR, topic, f"{type(exc).__name__} (a bug: please report)", with_traceback=True
            )
        self.expiry.news()

    def _take_presence(self, relay_id: str, payload: bytes, now: float) -> None:
        presence = decode_relay_status(payload)
        status = presence.status
        if status is RelayStatus.OFFLINE:
            self.received["relay_offline"] += 1
            will = self.detector.relay_offline(
                relay_id, now, EXPIRE_STEP, boot=presence.boot, session=presence.session or 0
            )
            self.decide(will)
        elif status is RelayStatus.ONLINE and presence.boot is not None and presence.session is not None:
            self.detector.relay_online(relay_id, presence.boot, presence.session)
        elif status is RelayStatus.STOPPED:
            self.received["relay_stopped"] += 1
            self.decide(self.detector.relay_stopped(relay_id, now, EXPIRE_STEP))

    def _date(self, bundle: Bundle, unreadable: bool, now: float) -> None:
        """Date a bundle by its relay's clock and hand it on; hold it while that clock is unconfirmed."""
        sent = self.dating.date(bundle.relay, bundle.boot, bundle.sent_ms, now)
        if sent is None:
            self.received["bundles_undated"] += 1  # no evidence yet: a replayed backlog, or a boot's first
            self._held[bundle.relay] = (bundle, unreadable)  # an older one held is dropped: a delta lost
            return
        held = self._held.pop(bundle.relay, None)
        if held is not None and held[0].boot == bundle.boot and held[0].seq < bundle.seq:
            self._observe(*held, self.dating.sent_at(bundle.relay, bundle.boot, held[0].sent_ms or 0), now)
        self._observe(bundle, unreadable, sent, now)

    def _observe(self, bundle: Bundle, unreadable: bool, sent: float | None, now: float) -> None:
        if self.lag.graced(now):  # behind: this bundle is late because we are, not its relay
            self.detector.regain_sight(now)
        # A mass event's hosts (a relay back, or found dead) beyond EXPIRE_STEP: owed, decided by the
        # expiry in steps (`expiry.news` wakes it at once).
        self.decide((self.detector.lost_track if unreadable else self.detector.observe)(bundle, now, sent, EXPIRE_STEP))

    async def ask_resyncs(self, client: LeanClient) -> None:
        """Ask the relays the detector lost track of for a keyframe."""
        for relay in self.detector.take_resync_requests():
            self.received["resync_requests"] += 1
            await client.publish(self.topics.relay_resync(relay), b"", qos=0)

    async def catch_up(self) -> None:
        """Read what already reached us (our socket) before judging anyone on it: news that is late
        because we are behind is no silence. Input that outlasts BEHIND_S of reading (the first
        keyframes of a large fleet, a flood) renews a timeout of grace at every pass, as a stall does,
        for up to BEHIND_GRACE_S (`Behind`); still behind after that, we decide anyway, so a flood that
        never ends cannot stop every decision."""
        client = self._client
        if client is None or not (self._early or sum(backlog(client))) or await self._read_backlog(client):
            self.lag.caught_up()
            return
        now = self.clock.now()
        grace = self.lag.still_behind(now)
        if self.lag.passes == 1:
            queued, unread = backlog(client)
            log.warning(
                "monitor is behind its input (%d messages, %d bytes waiting): no new decisions while it reads"
                " them, for up to %g s",
                queued,
                unread,
                BEHIND_GRACE_S,
            )
        elif not grace and self.lag.passes_past_grace == 1:
            log.warning("monitor still behind its input after %g s: deciding anyway", BEHIND_GRACE_S)
        if grace:
            self.detector.regain_sight(now)

    async def _read_backlog(self, client: LeanClient) -> bool:
        """`read_backlog`, with what the session heard before it was ready counted as waiting too."""
        started = self.clock.now()
        while self._early:
            if self.clock.now() - started >= BEHIND_S:
                return False
            await asyncio.sleep(0)
        return await read_backlog(client, BEHIND_S - (self.clock.now() - started), self.clock.now)

    @property
    def behind(self) -> int:
        """Expiry passes that found input waiting and could not read it all first."""
        return self.lag.total


class Behind:
    """An episode of the monitor being behind its input, and whether it still earns grace: every
    pass that finds it behind renews a timeout of grace (news we have not read is no silence),
    until the episode is BEHIND_GRACE_S old; then it decides anyway. Pure: the caller brings the time."""

    def __init__(self, grace_s: float = BEHIND_GRACE_S) -> None:
        self.grace_s = grace_s
        self.since: float | None = None  # when this episode began (None: caught up)
        self.passes = 0  # passes behind in this episode
        self.passes_past_grace = 0  # of those, past its grace
        self.total = 0  # passes behind, ever

    def still_behind(self, now: float) -> bool:
        """A pass found input still waiting: True while it earns grace."""
        if self.since is None:
            self.since, self.passes, self.passes_past_grace = now, 0, 0
        self.passes += 1
        self.total += 1
        if self.graced(now):
            return True
        self.passes_past_grace += 1
        return False

    def graced(self, now: float) -> bool:
        """Whether we are behind, within grace (a bundle read now is late because we are)."""
        return self.since is not None and now - self.since < self.grace_s

    def caught_up(self) -> None:
        self.since = None


def _relay_ids(bundle: Bundle) -> set[str]:
    """Every relay a bundle speaks for: its own and its children's, at any depth."""
    ids = {bundle.relay}
    for child in bundle.children:
        ids |= _relay_ids(child)
    return ids
