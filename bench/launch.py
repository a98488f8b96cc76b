"""Start an idp-serve process for a benchmark and stop it afterwards (shared by `serve.py` and `soak.py`, which
run as scripts from this folder, so they import it by its bare name)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

STARTUP_S = 900
"""Time to become healthy: vLLM's CPU start-up (model load, KV-cache sizing, warm-up) on a loaded 2-core host."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server_process(
    cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[str, int]]:
    """Run `cmd` (output to `log`), wait until GET /health answers 200, stop it afterwards; yields the base URL
    and the process id. Raises RuntimeError naming the log when the process exits or never becomes healthy."""
    with open(log, "w") as out:
        environment = (env or dict(os.environ)) | {"PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=environment)
        try:
            deadline = time.time() + STARTUP_S
            while time.time() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}; see {log}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(2)
            else:
                raise RuntimeError(f"{cmd[:4]} did not become healthy; see {log}")
            yield f"http://127.0.0.1:{port}", proc.pid
        finally:
            proc.terminate()
            proc.wait(60)
