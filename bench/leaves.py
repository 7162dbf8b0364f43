"""Thousands of simulated leaves in a few worker processes, each leaf a real MQTT connection.

Every leaf publishes `relaybeat/beat/<id>` with `{"seq":N,"interval":S}` (what `relaybeat leaf`
sends) at QoS 0 every `interval_s`, with send times spread evenly over the interval. A worker holds
at most `per_worker` connections (one process cannot open 20,000 sockets here: the hard
RLIMIT_NOFILE is 20,000) and runs uvloop. The parent talks to workers over pipes: connect, start
(at a common wall-clock instant), count what was sent, stop chosen leaves (`kill`: they just go
quiet, as a crashed host does) and close.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from bench import mqtt

SLOTS = 100  # send ticks per interval


@dataclass(frozen=True, slots=True)
class Leaf:
    host: str
    port: int  # the broker it beats to (127.0.0.1)


def _worker(pipe: Connection, leaves: Sequence[Leaf], prefix: str, interval_s: float, seed: int) -> None:
    try:
        import uvloop

        uvloop.run(_work(pipe, leaves, prefix, interval_s, seed))
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        asyncio.run(_work(pipe, leaves, prefix, interval_s, seed))


async def _work(pipe: Connection, leaves: Sequence[Leaf], prefix: str, interval_s: float, seed: int) -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    n = len(leaves)
    clients: list[mqtt.Client | None] = [None] * n
    gate = asyncio.Semaphore(200)
    failed = 0

    async def open_one(i: int) -> None:
        nonlocal failed
        async with gate:
            try:
                clients[i] = await mqtt.connect("127.0.0.1", leaves[i].port, f"bl-{leaves[i].host}", timeout_s=30)
            except (OSError, TimeoutError, ConnectionError):
                failed += 1

    started = time.monotonic()
    await asyncio.gather(*(open_one(i) for i in range(n)))
    pipe.send({"connected": n - failed, "failed": failed, "connect_s": time.monotonic() - started})

    heads = [mqtt.utf8(f"{prefix}beat/{leaf.host}") for leaf in leaves]
    interval_text = f"{interval_s:g}".encode()
    seqs = [0] * n
    last = [0.0] * n
    killed = [False] * n
    order = list(range(n))
    rng.shuffle(order)
    buckets: list[list[int]] = [[] for _ in range(SLOTS)]
    for rank, i in enumerate(order):
        buckets[rank * SLOTS // max(1, n)].append(i)
    index = {leaf.host: i for i, leaf in enumerate(leaves)}
    state: dict[str, Any] = {"sent": 0, "errors": 0, "t0": None, "stop": False}
    wake = asyncio.Event()

    def command() -> None:
        message = pipe.recv()
        what = message[0]
        if what == "start":
            state["t0"] = message[1]
            wake.set()
            pipe.send(True)
        elif what == "sent":
            pipe.send({"sent": state["sent"], "errors": state["errors"]})
        elif what == "kill":
            out = {}
            for host in message[1]:
                i = index.get(host)
                if i is not None:
                    killed[i] = True
                    out[host] = last[i]
            pipe.send(out)
        elif what == "close":
            state["stop"] = True
            wake.set()

    loop.add_reader(pipe.fileno(), command)
    await wake.wait()
    t0: float = state["t0"]
    slot_s = interval_s / SLOTS
    tick = 0
    while not state["stop"]:
        delay = t0 + tick * slot_s - time.time()
        if delay > 0:
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), delay)
            continue
        now = time.time()
        sent = 0
        for i in buckets[tick % SLOTS]:
            client = clients[i]
            if killed[i] or client is None:
                continue
            transport = client.transport
            if transport is None:
                state["errors"] += 1
                continue
            seqs[i] += 1
            payload = b'{"seq":%d,"interval":%s}' % (seqs[i], interval_text)
            head = heads[i]
            transport.write(b"\x30" + mqtt.varint(len(head) + len(payload)) + head + payload)
            last[i] = now
            sent += 1
        state["sent"] += sent
        tick += 1
    loop.remove_reader(pipe.fileno())
    for client in clients:
        if client is not None:
            client.close()
    await asyncio.sleep(0.2)
    pipe.send("closed")


class Fleet:
    """Leaves spread over worker processes. Every method is blocking and bounded by a timeout."""

    def __init__(self, leaves: Sequence[Leaf], prefix: str, interval_s: float, per_worker: int = 9000) -> None:
        self.leaves = list(leaves)
        self.interval_s = interval_s
        context = multiprocessing.get_context("spawn")
        self._workers: list[tuple[Any, Connection]] = []
        self._lock = threading.Lock()
        for w, start in enumerate(range(0, len(self.leaves), per_worker)):
            mine, theirs = context.Pipe()
            process = context.Process(
                target=_worker,
                args=(theirs, self.leaves[start : start + per_worker], prefix, interval_s, 1000 + w),
                daemon=True,
                name=f"bench-leaves-{w}",
            )
            process.start()
            self._workers.append((process, mine))

    def _ask(self, message: tuple[Any, ...] | None, timeout_s: float = 10.0) -> list[Any]:
        with self._lock:
            if message is not None:
                for _, pipe in self._workers:
                    pipe.send(message)
            replies = []
            for process, pipe in self._workers:
                if not pipe.poll(timeout_s):
                    msg = f"{process.name} did not answer {message!r} within {timeout_s} s"
                    raise TimeoutError(msg)
                replies.append(pipe.recv())
            return replies

    @property
    def pids(self) -> list[int]:
        return [process.pid for process, _ in self._workers]

    def connect(self, timeout_s: float = 120.0) -> dict[str, float]:
        replies = self._ask(None, timeout_s)
        return {
            "connected": sum(r["connected"] for r in replies),
            "failed": sum(r["failed"] for r in replies),
            "connect_s": max(r["connect_s"] for r in replies),
        }

    def start(self, delay_s: float = 0.2) -> float:
        t0 = time.time() + delay_s
        self._ask(("start", t0))
        return t0

    def sent(self) -> int:
        return sum(r["sent"] for r in self._ask(("sent",)))

    def kill(self, hosts: Sequence[str]) -> dict[str, float]:
        """Stop these leaves beating; returns the wall-clock time of each one's last beat."""
        out: dict[str, float] = {}
        for reply in self._ask(("kill", list(hosts))):
            out.update(reply)
        return out

    def close(self) -> None:
        with contextlib.suppress(TimeoutError, OSError, EOFError):
            self._ask(("close",), 10.0)
        for process, pipe in self._workers:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
            pipe.close()
