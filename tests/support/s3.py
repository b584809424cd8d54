"""A local S3 server (npm s3rver, objects on disk) for the embedded broker's S3 storage."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from services.common.kafka import free_port

S3RVER = Path(__file__).resolve().parents[2] / ".s3rver" / "node_modules" / ".bin" / "s3rver"
"""Installed by `make s3rver`."""

S3RVER_NODE_OPTIONS = {"NODE_OPTIONS": "--openssl-legacy-provider"}
"""s3rver makes the token of a listing's next page with DES, which Node 17+ (OpenSSL 3) has
only in its legacy provider: without it, a listing of more than 1,000 objects is a 500."""


@contextmanager
def s3rver(directory: Path) -> Iterator[dict[str, str]]:
    """Run s3rver on ``directory`` with a bucket ``tansu``; yield the variables that point
    Tansu (``MANIAC_BROKER_STORAGE`` and ``AWS_*``) at it. Skips when s3rver is missing."""
    if not S3RVER.exists():
        pytest.skip("npm s3rver not installed (`make s3rver` needs npm)")
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(S3RVER), "-d", str(directory), "-a", "127.0.0.1", "-p", str(port)]
        + ["--configure-bucket", "tansu", "--silent"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **S3RVER_NODE_OPTIONS},
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, "s3rver exited at start"
                time.sleep(0.05)
        yield {
            "MANIAC_BROKER_STORAGE": "s3://tansu/",
            "AWS_ENDPOINT": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "S3RVER",
            "AWS_SECRET_ACCESS_KEY": "S3RVER",
            "AWS_ALLOW_HTTP": "true",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        proc.terminate()
        proc.wait()
