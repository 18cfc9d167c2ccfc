"""A TCP proxy that holds every chunk of data back for a fixed time in each direction.

Run ``.venv/bin/python bench/delayproxy.py --target 127.0.0.1:5432 --delay-ms 1``. It listens
on 127.0.0.1 (a free port unless ``--listen`` names one), prints ``listening on HOST:PORT``
once it accepts connections, and forwards each connection to the target, delaying the bytes by
half of ``--delay-ms`` on the way there and half on the way back: a round trip through it
takes ``--delay-ms`` more than a direct one. It runs until SIGTERM or SIGINT.

bench/run.py uses it to put the workers a simulated network away from PostgreSQL
(``--delay-ms``). The kernel way, netem on a veth pair into a network namespace, costs no CPU
in the measured path, but needs ``sch_netem``, and the kernel of the benchmark machine is
built without it (nor ``sch_fq``, whose departure times a BPF program could set). This proxy
is a process of its own and uses CPU for every chunk it forwards: bench/run.py reports that
CPU, and ``--delay-ms 0`` measures the proxy without any delay.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import selectors
import signal
import sys

HIGH_WATER = 1 << 20  # bytes queued towards one side before we stop reading from the other
# A chunk due within this much of now leaves with the ones that are due.
TOLERANCE = 20e-6


class Lateness:
    """How late timers fire, on average: waking a sleeping process takes tens to hundreds of
    microseconds (more in a VM whose idle vCPU must be woken), and two such wake-ups per round
    trip would add a third to a 1 ms delay. Timers are set this much early instead."""

    def __init__(self, limit: float):
        self.seconds = 0.0
        self.limit = limit  # never more than this: a busy machine's stalls are not the timer's

    def observe(self, late: float) -> None:
        self.seconds = min(max(0.9 * self.seconds + 0.1 * late, 0.0), self.limit)


class Direction:
    """Bytes from one socket to the other, each chunk written ``delay`` seconds after it came.

    One timer per direction, not one per chunk: asyncio does not order timers that fall due
    at the same time, and the bytes must leave in the order they came.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, lateness: Lateness):
        self.loop = loop
        self.delay = delay
        self.lateness = lateness
        self.armed_for = 0.0  # when the pending timer was asked to fire
        self.sink: asyncio.Transport | None = None  # None until the upstream is connected
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.queued = 0
        self.source: asyncio.Transport | None = None
        self.paused = False
        self.ended = False  # the source closed: nothing more to queue

    def feed(self, data: bytes | None) -> None:
        """Queue ``data`` (None: the source closed; close the sink once the rest is out)."""
        if self.ended:
            return
        self.ended = data is None
        self.queue.append((self.loop.time() + self.delay, data))
        self.queued += len(data) if data else 0
        if self.queued > HIGH_WATER and self.source is not None and not self.paused:
            self.source.pause_reading()
            self.paused = True
        self._arm()

    def attach(self, sink: asyncio.Transport) -> None:
        self.sink = sink
        self._arm()

    def _arm(self) -> None:
        if self.timer is None and self.sink is not None and self.queue:
            self.armed_for = self.queue[0][0] - self.lateness.seconds
            self.timer = self.loop.call_at(self.armed_for, self._flush)

    def _flush(self) -> None:
        self.timer = None
        sink = self.sink
        assert sink is not None
        now = self.loop.time()
        if self.armed_for > 0 and now >= self.armed_for:
            self.lateness.observe(now - self.armed_for)
        # Due chunks leave in one write: one send() for what a single recv() would also have
        # coalesced on a real link.
        out: list[bytes] = []
        close = False
        while self.queue and self.queue[0][0] <= now + TOLERANCE:
            data = self.queue.popleft()[1]
            if data is None:
                close = True
                break
            out.append(data)
        if out and not sink.is_closing():
            chunk = b"".join(out)
            self.queued -= len(chunk)
            sink.write(chunk)
        if close:
            self.queue.clear()
            sink.close()  # after what is buffered has been sent
            return
        if self.paused and self.queued <= HIGH_WATER // 2 and self.source is not None:
            self.source.resume_reading()
            self.paused = False
        self._arm()


class Side(asyncio.Protocol):
    """One of the two sockets of a proxied connection; what it reads goes to ``out``."""

    def __init__(self, out: Direction, back: Direction):
        self.out = out
        self.back = back
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.out.source = transport
        self.back.attach(transport)

    def data_received(self, data: bytes) -> None:
        self.out.feed(data)

    def eof_received(self) -> bool | None:
        self.out.feed(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.out.feed(None)


class Proxy:
    def __init__(self, target: tuple[str, int], delay: float):
        self.target = target
        self.delay = delay
        self.lateness = Lateness(limit=delay / 2)
        self.connecting: set[asyncio.Task[None]] = set()  # the loop keeps weak references

    def accept(self) -> Side:
        """A client connected: connect to the target; the client's bytes wait in the queue."""
        loop = asyncio.get_running_loop()
        up = Direction(loop, self.delay, self.lateness)
        down = Direction(loop, self.delay, self.lateness)
        client = Side(up, down)
        task = loop.create_task(self._connect(client, up, down))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)
        return client

    async def _connect(self, client: Side, up: Direction, down: Direction) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: Side(down, up), *self.target)
        except OSError:
            if client.transport is not None:
                client.transport.close()


def _fine_timers() -> None:
    """Wake up when asked, not up to 50 µs later (the default timer slack of a process)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 µs


async def serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    loop = asyncio.get_running_loop()
    proxy = Proxy(target, delay)
    server = await loop.create_server(proxy.accept, *listen, backlog=512)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--target", required=True, type=_address, help="HOST:PORT to forward to")
    parser.add_argument(
        "--listen", default="127.0.0.1:0", type=_address, help="HOST:PORT (default: a free port)"
    )
    parser.add_argument(
        "--delay-ms", type=float, default=1.0, help="round trip added, ms (half each way)"
    )
    args = parser.parse_args(argv)
    _fine_timers()
    # select(), not epoll: epoll_wait takes its timeout in whole milliseconds (Python rounds
    # it up), which would make 0.5 ms waits last 1 ms; select() takes microseconds. The
    # proxy has a few hundred sockets at most, well under select()'s limit of 1024.
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        loop.run_until_complete(serve(args.listen, args.target, args.delay_ms / 2000.0))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
