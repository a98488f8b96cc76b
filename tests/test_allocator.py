"""The engine's malloc: which library goes in front of LD_PRELOAD before vLLM starts its processes, and when none.

The live check (the real engine's worker runs on the preloaded tcmalloc) is in tests/test_server.py.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest

from server.online import allocator
from server.online.allocator import AllocatorError, engine_malloc, engine_preload, find_library


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Path]:
    """tcmalloc and jemalloc as `ldconfig -p` lists them, at real files under tmp_path."""
    paths = {"tcmalloc": tmp_path / "libtcmalloc_minimal.so.4", "jemalloc": tmp_path / "libjemalloc.so.2"}
    for path in paths.values():
        path.write_bytes(b"")
    listing = "3 libs found in cache `/etc/ld.so.cache'\n" + "".join(
        f"\t{p.name} (libc6,x86-64) => {p}\n" for p in paths.values()
    )

    def ldconfig(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(["ldconfig", "-p"], 0, stdout=listing, stderr="")

    monkeypatch.setattr(allocator.subprocess, "run", ldconfig)
    return paths


@pytest.fixture
def missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "find_library", lambda name: None)


def test_the_linkers_cache_tells_where_each_allocator_is(installed: dict[str, Path]) -> None:
    assert find_library("tcmalloc") == installed["tcmalloc"]
    assert find_library("jemalloc") == installed["jemalloc"]


def test_auto_puts_jemalloc_in_front_of_what_is_preloaded_on_cpu(installed: dict[str, Path]) -> None:
    assert engine_preload("auto", {}, on_cpu=True) == str(installed["jemalloc"])
    assert (
        engine_preload("auto", {"LD_PRELOAD": "/opt/libfoo.so"}, on_cpu=True)
        == f"{installed['jemalloc']}:/opt/libfoo.so"
    )


def test_auto_leaves_a_gpu_host_an_operators_allocator_and_a_second_start_alone(installed: dict[str, Path]) -> None:
    assert engine_preload("auto", {}, on_cpu=False) is None, "measured on CPU only"
    assert engine_preload("auto", {"LD_PRELOAD": str(installed["tcmalloc"])}, on_cpu=True) is None
    assert engine_preload("auto", {"LD_PRELOAD": str(installed["jemalloc"])}, on_cpu=True) is None


def test_glibc_leaves_ld_preload_as_it_is(installed: dict[str, Path]) -> None:
    assert engine_preload("glibc", {"LD_PRELOAD": "/opt/libfoo.so"}, on_cpu=True) is None


def test_a_named_allocator_is_preloaded_first_on_any_host(installed: dict[str, Path]) -> None:
    assert engine_preload("tcmalloc", {}, on_cpu=False) == str(installed["tcmalloc"])
    both = engine_preload("tcmalloc", {"LD_PRELOAD": str(installed["jemalloc"])}, on_cpu=True)
    assert both == f"{installed['tcmalloc']}:{installed['jemalloc']}", "the named one first: it wins"


def test_a_missing_named_allocator_stops_the_start_naming_the_package(missing: None) -> None:
    with pytest.raises(AllocatorError, match="apt-get install libtcmalloc-minimal4"):
        engine_preload("tcmalloc", {}, on_cpu=True)


def test_a_missing_jemalloc_under_auto_is_a_warning_and_glibc(missing: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=allocator.__name__):
        assert engine_preload("auto", {}, on_cpu=True) is None
    assert "apt-get install libjemalloc2" in caplog.text


def test_the_preload_lasts_while_the_engine_starts_and_is_put_back(
    installed: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/opt/libfoo.so")
    with engine_malloc("auto", on_cpu=True):
        assert os.environ["LD_PRELOAD"] == f"{installed['jemalloc']}:/opt/libfoo.so"
    assert os.environ["LD_PRELOAD"] == "/opt/libfoo.so"
    monkeypatch.delenv("LD_PRELOAD")
    with pytest.raises(RuntimeError), engine_malloc("auto", on_cpu=True):
        raise RuntimeError("vLLM failed to start")
    assert "LD_PRELOAD" not in os.environ
