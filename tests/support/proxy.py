"""A loopback TCP proxy that can hold back what clients send, for fault tests.

``freeze()`` stops forwarding client -> target bytes: they are held, in order, and forwarded on
``thaw()``; bytes held for a client that disconnects meanwhile are dropped, as a network that
swallowed them would. Target -> client bytes always flow. With a Kafka broker that advertises
the proxy's address, every connection of a client (produce, fetch, heartbeat, commit) passes
through it, so a frozen proxy is a commit that never arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from services.common.kafka import EmbeddedBroker, free_port


class FreezableProxy:
    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.connections = 0
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()  # every pipe then reads EOF and its handler returns
            if self._handlers:
                await asyncio.wait(self._handlers, timeout=5)
            await self._server.wait_closed()

    def freeze(self) -> None:
        self._open.clear()

    def thaw(self) -> None:
        self._open.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.connections += 1
        self._writers |= {writer, up_writer}
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, gated=True),
                self._pipe(up_reader, writer, gated=False),
            )
        finally:
            self.connections -= 1
            self._writers -= {writer, up_writer}
            self._handlers.discard(handler)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, gated: bool
    ) -> None:
        held: asyncio.Queue[bytes] = asyncio.Queue()

        async def forward() -> None:
            while True:
                chunk = await held.get()
                if gated:
                    await self._open.wait()
                writer.write(chunk)
                await writer.drain()
                held.task_done()

        sender = asyncio.create_task(forward())
        try:
            while data := await reader.read(1 << 16):
                held.put_nowait(data)
            if not gated or self._open.is_set():
                # the peer closed normally: deliver what it sent first (unless sending fails)
                delivered = asyncio.ensure_future(held.join())
                await asyncio.wait({delivered, sender}, return_when=asyncio.FIRST_COMPLETED)
                delivered.cancel()
        except OSError:
            pass
        finally:
            sender.cancel()  # anything still held is dropped with the connection
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender
            writer.close()


@contextlib.asynccontextmanager
async def proxied_broker() -> AsyncIterator[tuple[FreezableProxy, str]]:
    """A broker of its own that advertises a proxy in front of it; yields the proxy and the
    bootstrap address. Every connection a client makes to the broker passes the proxy."""
    proxy = FreezableProxy(target_port=free_port())
    broker = EmbeddedBroker(port=proxy.target_port, advertised_port=proxy.port)
    broker.start()
    try:
        await proxy.start()
        yield proxy, f"127.0.0.1:{proxy.port}"
    finally:
        await proxy.stop()
        broker.stop()
