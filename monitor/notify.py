"""Notifications: which webhook targets hear of which transitions, grouped into incidents.

Rules of this module:
- Pure and synchronous: no clock, no I/O, no randomness. Callers pass the transitions just written
  (`Change`), the targets, what each target has already been told (`AlertBook`) and, for reminders,
  the moment; they get back a `Plan`: the messages to queue and the book's changes. The shell
  writes both in the transaction that writes the transitions, then applies the plan to its book.
- Bad states are `down` and `unreachable`. A state change into a bad state opens an alert for every
  target whose filters want it (`Target.wants`); nothing is opened for a change marked
  `maintenance`. Any later change of that subject closes the alert, and the recovery goes to every
  target that was told of the outage, whatever its filters or maintenance say by then: a receiver
  never keeps an incident open that relaybeat knows is over, and never hears of a recovery of an
  outage it was not told about.
- An incident is what one message is about: a relay outage (`relay:<id>`: the relay itself and
  everything that went unreachable blaming it) or a host or relay going down on its own
  (`host:<id>`, `relay:<id>`). The changes of one batch that open (or close) the same incident for
  the same target go out as one message, so a dead relay sends one message listing its hosts. A
  message never jumps over a message of the other kind for the same incident: outage, recovery,
  outage in one batch stay three messages, in that order.
- Reminders (off unless a target sets `remind_every_s`): one message per incident still open,
  listing what is still bad, at most every `remind_every_s`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum

import orjson

from relaybeat.monitor.records import Change, FalseAlarmRow, carried
from relaybeat.monitor.states import Event, Kind, State

__all__ = [
    "BAD_STATES",
    "Alert",
    "AlertBook",
    "AlertKey",
    "Change",
    "Item",
    "Notice",
    "NoticeType",
    "Plan",
    "Target",
    "follow_up",
    "incident_of",
    "plan",
    "planning",
    "remind",
    "render",
    "signature",
]

BAD_STATES = frozenset({State.DOWN, State.UNREACHABLE})
SUMMARY_NAMES = 10  # subjects named in a summary line; the `subjects` list always has them all


class NoticeType(StrEnum):
    OUTAGE = "outage"
    RECOVERY = "recovery"
    REMINDER = "reminder"
    FALSE_ALARM = "false_alarm"  # a follow-up: the outage told of was proved a false alarm


@dataclass(frozen=True, slots=True)
class Target:
    """Who to tell about what. Empty `relays`: everywhere; `hosts` are id globs (fnmatch, case-sensitive)."""

    name: str
    states: frozenset[State] = BAD_STATES
    hosts: tuple[str, ...] = ("*",)
    relays: tuple[str, ...] = ()  # only subjects at or behind these relays
    kinds: frozenset[Kind] = frozenset(Kind)
    remind_every_s: float | None = None

    def wants(self, change: Change) -> bool:
        """Whether a change into a bad state opens an alert for this target."""
        if change.maintenance or change.to_state not in self.states or change.kind not in self.kinds:
            return False
        if change.kind is Kind.HOST and not any(fnmatch.fnmatchcase(change.subject, glob) for glob in self.hosts):
            return False
        if self.relays:
            mine = change.kind is Kind.RELAY and change.subject in self.relays
            return mine or any(relay in self.relays for relay in change.path)
        return True


AlertKey = tuple[str, Kind, str]  # (target, kind, subject)


@dataclass(frozen=True, slots=True)
class Alert:
    """A subject one target has been told is bad, and not yet told is fine again."""

    target: str
    kind: Kind
    subject: str
    incident: str
    state: State
    since: datetime  # when it went bad
    reminded_at: datetime  # when the target last heard of it (the outage, or a reminder)

    @property
    def key(self) -> AlertKey:
        return (self.target, self.kind, self.subject)


@dataclass(frozen=True, slots=True)
class Item:
    """One subject in a message: its change (`from_state` None in reminders: still `to_state`)."""

    kind: Kind
    subject: str
    from_state: State | None
    to_state: State
    at: datetime
    reason: str
    relay: str | None = None


@dataclass(frozen=True, slots=True)
class Notice:
    """One message for one target about one incident."""

    target: str
    type: NoticeType
    incident: str
    at: datetime  # the newest change in it, or the reminder's moment
    started_at: datetime  # when the incident's oldest alert (for this target) began
    items: tuple[Item, ...]
    still_open: int  # subjects of the incident still bad for this target after this message


@dataclass(frozen=True, slots=True)
class Plan:
    notices: tuple[Notice, ...] = ()
    opened: tuple[Alert, ...] = ()  # alerts to insert or replace
    closed: tuple[AlertKey, ...] = ()  # alerts to delete (none of them is also in `opened`)
    # Who was told of each recovery: (the closing change's key, target, incident, started_at), so a
    # false alarm proved now or a little later is followed up to the same targets.
    recovered: tuple[tuple[str, str, str, datetime], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.notices or self.opened or self.closed)


def incident_of(change: Change) -> str:
    """The incident a change into a bad state belongs to: the blamed relay's outage, or its own."""
    if change.to_state is State.UNREACHABLE and change.relay is not None:
        return f"relay:{change.relay}"
    return f"{change.kind.value}:{change.subject}"


class AlertBook:
    """Every open alert, by (target, kind, subject), and by (target, incident)."""

    def __init__(self, alerts: Iterable[Alert] = ()) -> None:
        self._alerts: dict[AlertKey, Alert] = {}
        self._incidents: dict[tuple[str, str], set[AlertKey]] = {}
        self.load(alerts)

    def load(self, alerts: Iterable[Alert]) -> None:
        self._alerts = {}
        self._incidents = {}
        for alert in alerts:
            self._put(alert)

    def get(self, key: AlertKey) -> Alert | None:
        return self._alerts.get(key)

    def count(self, target: str, incident: str) -> int:
        """How many subjects of the incident are still out for the target."""
        return len(self._incidents.get((target, incident), ()))

    def started(self, target: str, incident: str) -> datetime | None:
        """When the incident's oldest open alert for the target began (None: nothing open)."""
        keys = self._incidents.get((target, incident))
        return min(self._alerts[k].since for k in keys) if keys else None

    def alerts(self, target: str | None = None) -> list[Alert]:
        """Open alerts (of one target), in (target, kind, subject) order."""
        return [self._alerts[k] for k in sorted(self._alerts) if target is None or k[0] == target]

    def __len__(self) -> int:
        return len(self._alerts)

    def apply(self, plan: Plan) -> None:
        """Take in a plan once it is written."""
        for key in plan.closed:
            self._drop(key)
        for alert in plan.opened:
            self._put(alert)

    def _put(self, alert: Alert) -> None:
        self._drop(alert.key)
        self._alerts[alert.key] = alert
        self._incidents.setdefault((alert.target, alert.incident), set()).add(alert.key)

    def _drop(self, key: AlertKey) -> None:
        old = self._alerts.pop(key, None)
        if old is not None:
            keys = self._incidents[old.target, old.incident]
            keys.discard(key)
            if not keys:
                del self._incidents[old.target, old.incident]


@dataclass
class _Group:
    target: str
    type: NoticeType
    incident: str
    items: list[Item] = field(default_factory=list)
    started_at: datetime | None = None
    still_open: int = 0


class _Draft:
    """A plan being made: the book as it would be after the changes so far, without copying it."""

    def __init__(self, book: AlertBook) -> None:
        self.book = book
        self.opened: dict[AlertKey, Alert] = {}
        self.closed: set[AlertKey] = set()
        self.counts: Counter[tuple[str, str]] = Counter()  # change against the book's counts
        self.starts: dict[tuple[str, str], datetime | None] = {}  # incident starts as of now (cached)
        self.groups: list[_Group] = []
        self._current: dict[tuple[str, str], tuple[NoticeType, int]] = {}  # (target, incident) -> open group

    def get(self, key: AlertKey) -> Alert | None:
        if key in self.opened:
            return self.opened[key]
        return None if key in self.closed else self.book.get(key)

    def count(self, target: str, incident: str) -> int:
        return self.book.count(target, incident) + self.counts[target, incident]

    def start(self, target: str, incident: str) -> datetime | None:
        """When the incident began, as far as its open alerts say (None: none open)."""
        if (target, incident) not in self.starts:
            self.starts[target, incident] = self.book.started(target, incident)
        return self.starts[target, incident]

    def open(self, alert: Alert) -> None:
        started = self.start(alert.target, alert.incident)
        self.opened[alert.key] = alert
        self.closed.discard(alert.key)
        self.counts[alert.target, alert.incident] += 1
        self.starts[alert.target, alert.incident] = alert.since if started is None else min(started, alert.since)

    def close(self, alert: Alert) -> None:
        self.start(alert.target, alert.incident)
        self.opened.pop(alert.key, None)
        self.closed.add(alert.key)
        self.counts[alert.target, alert.incident] -= 1
        if not self.count(alert.target, alert.incident):
            self.starts[alert.target, alert.incident] = None  # over: a new outage starts afresh

    def add(self, target: str, kind: NoticeType, incident: str, item: Item, started_at: datetime) -> None:
        current = self._current.get((target, incident))
        if current is None or current[0] is not kind:
            self.groups.append(_Group(target, kind, incident))
            current = (kind, len(self.groups) - 1)
            self._current[target, incident] = current
        group = self.groups[current[1]]
        group.items.append(item)
        group.started_at = started_at if group.started_at is None else min(group.started_at, started_at)
        group.still_open = self.count(target, incident)

    def plan(self, recovered: Sequence[tuple[str, str, str, datetime]] = ()) -> Plan:
        notices = tuple(
            Notice(
                g.target,
                g.type,
                g.incident,
                max(item.at for item in g.items),
                g.started_at or g.items[0].at,
                tuple(g.items),
                g.still_open,
            )
            for g in self.groups
        )
        closed = tuple(sorted(key for key in self.closed if self.book.get(key) is not None))
        return Plan(notices, tuple(self.opened[k] for k in sorted(self.opened)), closed, tuple(recovered))


def _item(change: Change) -> Item:
    return carried(change, Item)


def plan(changes: Sequence[Change], targets: Sequence[Target], book: AlertBook) -> Plan:
    """What to send about `changes` (one written batch, in order), and how the book changes.

    The book is not modified: apply the plan once it is written.
    """
    steps = planning(changes, targets, book, max(1, len(changes)))
    while True:
        try:
            next(steps)
        except StopIteration as done:
            planned: Plan = done.value
            return planned


def planning(
    changes: Sequence[Change], targets: Sequence[Target], book: AlertBook, step: int
) -> Generator[None, None, Plan]:
    """`plan`, `step` changes at a time: it yields between steps (the caller may let other work run,
    as long as the book does not change meanwhile) and returns the plan."""
    draft = _Draft(book)
    recovered: list[tuple[str, str, str, datetime]] = []
    for number, change in enumerate(changes):
        if number and not number % step:
            yield
        if change.event is not Event.TRANSITION or change.from_state == change.to_state:
            continue
        for target in targets:
            key = (target.name, change.kind, change.subject)
            told = draft.get(key)
            if told is not None and told.state != change.to_state:
                started = draft.start(target.name, told.incident) or told.since
                draft.close(told)
                draft.add(target.name, NoticeType.RECOVERY, told.incident, _item(change), started)
                if change.key is not None:
                    recovered.append((change.key, target.name, told.incident, started))
            if change.to_state in BAD_STATES and target.wants(change) and draft.get(key) is None:
                incident = incident_of(change)
                draft.open(
                    Alert(target.name, change.kind, change.subject, incident, change.to_state, change.at, change.at)
                )
                draft.add(
                    target.name,
                    NoticeType.OUTAGE,
                    incident,
                    _item(change),
                    draft.start(target.name, incident) or change.at,
                )
    return draft.plan(recovered)


def follow_up(
    false_alarms: Sequence[FalseAlarmRow], recovered: Callable[[str], Sequence[tuple[str, str, datetime]]]
) -> tuple[Notice, ...]:
    """The follow-ups of outages proved false alarms: one message per target and incident, to the
    targets told of the recovery (`recovered(closing key)`: (target, incident, started_at) each)."""
    groups: dict[tuple[str, str], tuple[datetime, list[Item]]] = {}
    for alarm in false_alarms:
        for target, incident, started in recovered(alarm.closed_key or ""):
            item = Item(alarm.kind, alarm.subject, None, State.UP, alarm.closed_at, alarm.detail, None)
            first, items = groups.setdefault((target, incident), (started, []))
            items.append(item)
            groups[target, incident] = (min(first, started), items)
    return tuple(
        Notice(target, NoticeType.FALSE_ALARM, incident, max(i.at for i in items), started, tuple(items), 0)
        for (target, incident), (started, items) in groups.items()
    )


def remind(
    book: AlertBook,
    targets: Sequence[Target],
    now: datetime,
    current: Callable[[Kind, str], State | None],
) -> Plan:
    """Reminders due at `now`: per target with `remind_every_s`, per incident still open.

    `current(kind, subject)` is the subject's state now, None if it is no longer known. An alert
    whose subject is gone (forgotten) is closed without a message; one whose subject has changed
    state is left alone (its transition is on its way to `plan`).
    """
    notices: list[Notice] = []
    opened: list[Alert] = []
    closed: list[AlertKey] = []
    for target in targets:
        incidents: dict[str, list[Alert]] = {}
        gone: Counter[str] = Counter()
        for alert in book.alerts(target.name):
            state = current(alert.kind, alert.subject)
            if state is None:
                closed.append(alert.key)
                gone[alert.incident] += 1
            elif state == alert.state:
                incidents.setdefault(alert.incident, []).append(alert)
        every = target.remind_every_s
        if every is None:
            continue
        for incident, alerts in incidents.items():
            if (now - max(a.reminded_at for a in alerts)).total_seconds() < every:
                continue
            items = tuple(Item(a.kind, a.subject, None, a.state, a.since, "", None) for a in alerts)
            left = book.count(target.name, incident) - gone[incident]
            notices.append(
                Notice(
                    target.name,
                    NoticeType.REMINDER,
                    incident,
                    now,
                    book.started(target.name, incident) or now,
                    items,
                    left,
                )
            )
            opened.extend(replace(a, reminded_at=now) for a in alerts)
    return Plan(tuple(notices), tuple(opened), tuple(closed))


# ------------------------------------------------------------------------------------- the wire


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _names(items: Sequence[Item]) -> str:
    shown = [f"{item.subject} ({item.to_state.value})" for item in items[:SUMMARY_NAMES]]
    more = len(items) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _count(items: Sequence[Item]) -> str:
    hosts = sum(1 for i in items if i.kind is Kind.HOST)
    relays = len(items) - hosts
    parts = [f"{n} {noun}{'s' * (n != 1)}" for n, noun in ((hosts, "host"), (relays, "relay")) if n]
    return " and ".join(parts)


def _summary(notice: Notice) -> str:
    kind, _, subject = notice.incident.partition(":")
    lead = next((i for i in notice.items if i.kind.value == kind and i.subject == subject), None)
    others = [i for i in notice.items if i is not lead]
    behind = _count(others)
    if notice.type is NoticeType.OUTAGE:
        head = f"{kind} {subject} {lead.to_state.value}" if lead else f"{kind} {subject} outage"
        if lead and not others and lead.reason:
            return f"{head}: {lead.reason}"
        return f"{head}; {behind} unreachable: {_names(others)}" if others else head
    if notice.type is NoticeType.RECOVERY:
        head = f"{kind} {subject} recovered ({lead.to_state.value})" if lead else f"{kind} {subject} outage"
        tail = f"; {behind} back: {_names(others)}" if others else ""
        still = f"; {notice.still_open} still out" if notice.still_open else ""
        return head + tail + still
    if notice.type is NoticeType.FALSE_ALARM:
        lead = notice.items[0]
        more = f" (and {len(notice.items) - 1} more)" if len(notice.items) > 1 else ""
        return f"false alarm: {lead.kind.value} {lead.subject} was alive throughout{more}: {lead.reason}"
    return f"{kind} {subject} outage still open since {_iso(notice.started_at)}: {_names(notice.items)}"


def render(notice: Notice, key: str) -> bytes:
    """The JSON body of a message. `key` names it for ever (the Idempotency-Key header too)."""
    relay = notice.incident.partition(":")[2] if notice.incident.startswith("relay:") else None
    body = {
        "id": key,
        "type": notice.type.value,
        "target": notice.target,
        "incident": notice.incident,
        "relay": relay,
        "started_at": _iso(notice.started_at),
        "at": _iso(notice.at),
        "summary": _summary(notice),
        "resolved": notice.still_open == 0 and notice.type is NoticeType.RECOVERY,
        "still_open": notice.still_open,
        "hosts": [item.subject for item in notice.items if item.kind is Kind.HOST],
        "subjects": [
            {
                "kind": item.kind.value,
                "id": item.subject,
                "from": None if item.from_state is None else item.from_state.value,
                "to": item.to_state.value,
                "at": _iso(item.at),
                "reason": item.reason,
                "relay": item.relay,
            }
            for item in notice.items
        ],
    }
    return orjson.dumps(body)


def signature(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """`sha256=<hex>`: HMAC-SHA256 with the target's secret over `<timestamp>.<body>` (exact bytes)."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"
