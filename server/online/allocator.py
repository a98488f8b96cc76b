"""Which malloc vLLM's engine processes run with.

Under long mixed traffic, vLLM's CPU worker process grows under glibc's malloc while every other process of the
server levels off (the soaks in docs/serving-cost.md): capping glibc's arenas does not stop it, a preloaded
tcmalloc slows it, a preloaded jemalloc levels it off. vLLM's own CPU wheels preload a tcmalloc they bundle; the
PyPI build this server installs bundles none. So before the engine starts, the server puts the system's jemalloc
(Debian: libjemalloc2) in front of LD_PRELOAD, as vLLM does with its bundled copy: vLLM starts its engine core
and workers as new processes (spawn), and a new process reads LD_PRELOAD when it starts. This process started
before and keeps its malloc, and `engine_malloc` puts LD_PRELOAD back once the engine has started, so no later
child of this process inherits the choice.

`auto` does that on CPU when the library is installed and no allocator is preloaded already, and otherwise warns
and leaves glibc; naming an allocator makes a missing library an error at start; `glibc` leaves LD_PRELOAD alone.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

Allocator = Literal["auto", "glibc", "tcmalloc", "jemalloc"]
LIBRARIES: dict[str, tuple[tuple[str, ...], str]] = {
    "tcmalloc": (("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), "libtcmalloc-minimal4"),
    "jemalloc": (("libjemalloc.so.2",), "libjemalloc2"),
}
"""Per allocator: the library names `ldconfig -p` lists for it, and the Debian package that ships them."""
AUTO = "jemalloc"
"""What `auto` preloads on CPU: the allocator the soak found to stop the worker's growth."""


class AllocatorError(RuntimeError):
    """An allocator was asked for by name and is not installed."""


def find_library(allocator: str) -> Path | None:
    """The path of an installed library of `allocator` (tcmalloc or jemalloc), from the linker's cache."""
    names, _ = LIBRARIES[allocator]
    listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    for line in listing.splitlines():
        library, _, path = line.strip().partition(" => ")
        if library.split(" ")[0] in names and Path(path).is_file():
            return Path(path)
    return None


def engine_preload(choice: Allocator, environ: Mapping[str, str], on_cpu: bool) -> str | None:
    """The LD_PRELOAD the engine's processes should start with for `choice`, or None to leave it as it is."""
    if choice == "glibc" or (choice == "auto" and not on_cpu):
        return None
    current = environ.get("LD_PRELOAD", "")
    preloaded = [name for name, (libraries, _) in LIBRARIES.items() if any(lib in current for lib in libraries)]
    if preloaded and (choice == "auto" or choice in preloaded):
        return None  # the operator's own choice, or ours already
    allocator = AUTO if choice == "auto" else choice
    path = find_library(allocator)
    if path is None:
        package = LIBRARIES[allocator][1]
        if choice != "auto":
            raise AllocatorError(f"--engine-allocator {allocator}: not installed (Debian: apt-get install {package})")
        logger.warning(
            "%s is not installed, so vLLM's engine runs on glibc's malloc, under which its CPU worker grows over "
            "hours of traffic (Debian: apt-get install %s; docs/serving-cost.md)",
            allocator,
            package,
        )
        return None
    return ":".join(part for part in (str(path), current) if part)


@contextmanager
def engine_malloc(choice: Allocator, on_cpu: bool) -> Iterator[None]:
    """Around the start of vLLM's engine: LD_PRELOAD as `engine_preload` says, then as it was before."""
    preload = engine_preload(choice, os.environ, on_cpu)
    if preload is None:
        yield
        return
    before = os.environ.get("LD_PRELOAD")
    os.environ["LD_PRELOAD"] = preload
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = before
