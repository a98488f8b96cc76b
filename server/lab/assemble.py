"""Make a servable bank from finished `recipe` runs: each prompt is the best-dev-KL prompt of one run.

Training (`python -m server.lab.recipe`) and shipping are separate steps, so a bank can be rebuilt from its run
folders without retraining, and its manifest can say exactly where every prompt came from: the run, its
hyper-parameters, how far it got, why it stopped, its dev KL, and the weights it was trained against. A run
trained against other weights than the student's is refused: a bank is only as good as that match.

    python -m server.lab.assemble --name default --out prompt_banks/default \\
        --prompt general=general-m32 --prompt units=units-m32 --prompt howto=howto-m32
    python -m server.lab.assemble --name single --out prompt_banks/single --prompt single=single-m32
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from server.core.banks import PromptBank, make_bank, save_bank
from server.core.identity import fingerprint, verified_weights_digest
from server.lab.recipe import RUNS_DIR, RunFolder


class AssemblyError(ValueError):
    """A run cannot go into the bank (unfinished, missing, or trained against other weights)."""


def run_record(run_dir: Path, digest: str) -> dict:
    """What the manifest says about one prompt's run; refuses a run that is unfinished or for other weights."""
    spec_path = run_dir / "spec.json"
    if not spec_path.exists():
        raise AssemblyError(f"{run_dir}: no spec.json (not a recipe run)")
    spec = json.loads(spec_path.read_text())
    if spec.get("student_weights_sha256") != digest:
        raise AssemblyError(
            f"{run_dir}: trained against weights {spec.get('student_weights_sha256')}, the student's are {digest}"
        )
    loaded = RunFolder(run_dir).load()
    if loaded is None or loaded[0].done is None:
        raise AssemblyError(f"{run_dir}: the run has not finished (resume it with python -m server.lab.recipe)")
    state = loaded[0]
    return {
        "run": run_dir.name,
        "steps": state.step,
        "done": state.done,
        "best_dev_kl": state.best_dev,
        **{k: v for k, v in spec.items() if k not in ("student", "student_weights_sha256")},
    }


def assemble(name: str, prompts: dict[str, str], student: Path, runs_dir: Path = RUNS_DIR) -> PromptBank:
    """A bank of the best prompt of each run (`prompts`: prompt name -> run name), fingerprinted for `student`."""
    digest = verified_weights_digest(student)
    if digest is None:
        raise AssemblyError(f"{student}: no weights digest; banks bind to exact weights")
    records = {prompt: run_record(runs_dir / run, digest) for prompt, run in prompts.items()}
    sources = sorted({s for r in records.values() for s in r.get("sources", [])})
    trained = {
        "mode": "recipe",
        "sources": sources,
        "general_text": True,
        "prompts": records,
        "command": shlex.join(["python", "-m", "server.lab.assemble", *sys.argv[1:]]),
    }
    tensors = [RunFolder(runs_dir / run).best_prompt() for run in prompts.values()]
    return make_bank(name, tensors, list(prompts), fingerprint(student), trained=trained)


def main(argv: list[str] | None = None) -> None:
    from server.core.config import Settings
    from server.core.identity import DEFAULT_MODEL

    settings = Settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="The bank's name (its folder name when served).")
    parser.add_argument("--out", type=Path, required=True, help="The bank folder to (over)write.")
    parser.add_argument("--prompt", action="append", required=True, metavar="NAME=RUN", help="One per prompt.")
    parser.add_argument("--student", type=Path, default=settings.models_dir / DEFAULT_MODEL)
    args = parser.parse_args(argv)
    pairs = [p.split("=", 1) for p in args.prompt]
    if any(len(p) != 2 for p in pairs):
        parser.error("--prompt takes NAME=RUN")
    try:
        bank = assemble(args.name, dict(pairs), args.student)
    except AssemblyError as error:
        raise SystemExit(f"assemble: {error}") from None
    print(save_bank(bank, args.out))


if __name__ == "__main__":
    main()
