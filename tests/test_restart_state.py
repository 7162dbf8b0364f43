"""What a monitor restart must not forget (issue 12): a subject's flapping episode and the state
changes within the flap window are read back from SQL, so a restart neither ends flapping at once
nor starts counting from zero. In process: a real monitor and store, a hand-driven clock."""

from __future__ import annotations

from relaybeat.monitor.states import Event
from relaybeat.monitor.store import Store
from tests.fakes import FakeClock
from tests.monitors import Feed, new_monitor


async def test_a_restart_keeps_flapping_history_from_sql(store: Store) -> None:
    clock = FakeClock()
    first = new_monitor(store, clock)
    await first.restore()
    feed = Feed(first, clock)
    await feed.up("web-1", "web-2")
    for _ in range(3):  # six more state changes of web-1: flapping
        await feed.down("web-1")
        await feed.up("web-1")
    events = [r.event for r in await store.history(subject="web-1", newest_first=False)]
    assert events.count(Event.FLAPPING_START) == 1

    clock.t += 5.0  # restarted: a new monitor on the same database
    second = new_monitor(store, clock)
    await second.restore()
    track = second.detector.hosts["web-1"]
    assert track.flapping
    assert len(track.flaps) == second.detector.policy.flap_start
    again = Feed(second, clock, seq=feed.seq, known=dict(feed.known))
    clock.t += 30.0
    await again.send()  # a fresh bundle after the start-up grace: web-1 still flapping, no flapping_end
    await again.down("web-1")
    events = [r.event for r in await store.history(subject="web-1", newest_first=False)]
    assert Event.FLAPPING_END not in events
