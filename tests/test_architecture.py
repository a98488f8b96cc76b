"""The house rules, checked in CI: the import contracts (import-linter, pyproject.toml's [tool.importlinter]),
lint and format (ruff, [tool.ruff]), and every third-party import declared on its own side of the dependency split
(the server's in the base install, the lab's in the `lab` extra, the tests' and benchmarks' in any)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from tests.helpers import ROOT

LINTED = ["server", "tests", "bench"]


def tool(name: str) -> str:
    """A console script installed beside the running interpreter (the project's venv)."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        pytest.fail(
            f"{name} is missing from {path.parent}; install the test extra (IDP_EXTRAS=lab,test scripts/install.sh)",
            pytrace=False,
        )
    return str(path)


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    result = run(tool("lint-imports"), "--no-cache")
    assert result.returncode == 0 and " BROKEN" not in result.stdout, result.stdout + result.stderr
    kept = re.search(r"Contracts: (\d+) kept, (\d+) broken", result.stdout)
    assert kept and int(kept.group(1)) >= 6 and kept.group(2) == "0", result.stdout


def test_ruff_lint_passes():
    result = run(tool("ruff"), "check", "--no-cache", "--output-format", "concise", *LINTED)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_applied():
    result = run(tool("ruff"), "format", "--no-cache", "--check", *LINTED)
    assert result.returncode == 0, "run `ruff format server tests bench`:\n" + result.stdout + result.stderr


# ----- every import declared on its side ----------------------------------------------------------------------


def _name(requirement: str) -> str:
    """The normalized distribution name of a requirement line (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9._-]+)", requirement).group(1)).lower()


def declared() -> dict[str, set[str]]:
    """Distribution names each side may import: serving = the base install and either vLLM flavour; lab adds the
    lab extra and the packages install.sh puts in without dependencies; everything = lab plus the test extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    no_deps = [
        ln
        for ln in (ROOT / "requirements" / "lab-no-deps.txt").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    serving = {_name(r) for r in project["dependencies"] + extras["cpu"] + extras["gpu"]}
    lab = serving | {_name(r) for r in extras["lab"] + no_deps}
    return {"serving": serving, "lab": lab, "everything": lab | {_name(r) for r in extras["test"]}}


def third_party_imports(paths: list[Path]) -> dict[str, set[str]]:
    """Top-level module -> files importing it, for every absolute import that is neither stdlib nor ours (our
    packages, and the bench scripts' sibling modules, which they import by bare name)."""
    ours = {"server", "tests", "bench"} | {p.stem for p in (ROOT / "bench").glob("*.py")}
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ours and top != "__future__":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


SIDES = {
    "serving": ["server/online", "server/core", "server/cli.py", "server/__init__.py"],
    "lab": ["server/lab"],
    "everything": ["tests", "bench"],
}


@pytest.mark.parametrize("side", list(SIDES))
def test_every_import_is_declared_on_its_side(side):
    paths = [
        p
        for entry in SIDES[side]
        for p in ([ROOT / entry] if entry.endswith(".py") else sorted((ROOT / entry).rglob("*.py")))
    ]
    assert paths, SIDES[side]
    providers = packages_distributions()  # module -> the installed distributions that provide it
    allowed = declared()[side]
    undeclared = {}
    for module, files in sorted(third_party_imports(paths).items()):
        dists = {_name(d) for d in providers.get(module, [])}
        if not dists:
            undeclared[module] = f"not installed, so no distribution to declare (imported by {sorted(files)})"
        elif not dists & allowed:
            undeclared[module] = f"{sorted(dists)} is not declared for {side} (imported by {sorted(files)})"
    assert not undeclared, undeclared
