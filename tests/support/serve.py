"""`maniac serve` as a separate process, as a user runs it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx

from services.common.kafka import free_port
from tests.conftest import eventually

MANIAC = str(Path(sys.executable).parent / "maniac")


class Serve:
    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.env = env
        self.log = data_dir.parent / f"serve-{self.port}.log"

    def start(self) -> None:
        self.log_handle = self.log.open("wb")
        self.proc = subprocess.Popen(
            [MANIAC, "serve", "--port", str(self.port), "--data-dir", str(self.data_dir)],
            stdout=self.log_handle,
            stderr=subprocess.STDOUT,
            env=self.env,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ready(self) -> None:
        async def check() -> bool:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                async with httpx.AsyncClient() as client:
                    return (await client.get(f"{self.url}/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(check, timeout_s=60, interval_s=0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout_s)
        self.log_handle.close()
        return code

    def output(self) -> str:
        return self.log.read_text(errors="replace")


async def start_serve(servers: list[Serve], data_dir: Path, env: dict[str, str]) -> Serve:
    """Start `maniac serve` on ``data_dir``, ready to answer; ``servers`` (the test's fixture)
    has it killed after the test if it still runs."""
    server = Serve(data_dir, env)
    servers.append(server)
    server.start()
    await server.ready()
    return server
