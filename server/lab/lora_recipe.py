"""The LoRA baseline of issue 17, trained by the prompts' own recipe: a low-rank adapter on q_proj and v_proj of
the compressed model, distilled from the same cached teacher targets, on the same data stream (`recipe._batch`,
general text mixed with the bank's domains), with the same cosine schedule, early stopping on the same dev KL and
the same exact resume. Only the learning rate is LoRA's own (weight deltas and input embeddings live on different
scales), chosen on dev by a short grid.

The loop is `recipe.train`: LoRA is one more `Trainable` (its parameters + the wrapped student's forward), so a
LoRA run folder has the prompt runs' format (spec.json, state.json + state.safetensors, log.jsonl), with one
tensor per adapter matrix instead of one prompt, and `load_lora` rebuilds the best-dev adapter from it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import Field
from transformers import PreTrainedModel

from server.lab.recipe import RUNS_DIR, RecipeSpec, RunFolder, RunState, Supervision, Trainable, print_outcome, train

LORA_TARGETS = ("q_proj", "v_proj")


class LoraSpec(RecipeSpec):
    """The recipe's hyper-parameters plus the adapter's shape (recorded in spec.json; a resume must match)."""

    num_virtual_tokens: int = Field(0, ge=0, le=0, description="LoRA trains no prompt.")
    lr: float = Field(1e-3, gt=0)
    rank: int = Field(4, ge=1)
    alpha: float | None = Field(None, gt=0, description="LoRA's alpha; None: the rank (scale 1).")
    target_modules: tuple[str, ...] = LORA_TARGETS


def lora_model(student: PreTrainedModel, spec: LoraSpec) -> PreTrainedModel:
    """The frozen `student` wrapped with a fresh PEFT LoRA adapter (dropout 0), initialised from `spec.seed`
    without touching the caller's random state; only the adapter's matrices require gradients."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha or spec.rank,
        lora_dropout=0.0,
        target_modules=list(spec.target_modules),
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return get_peft_model(student, config)


def lora_trainable(model: PreTrainedModel) -> Trainable:
    """A PEFT LoRA model as the recipe's `Trainable`: its trainable matrices, and its logits at text positions."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return Trainable(
        params, lambda ids: model(input_ids=ids).logits[:, :-1], next(iter(params.values())).device, kind="lora"
    )


def train_lora(
    model: PreTrainedModel,
    general: Supervision,
    spec: LoraSpec,
    run: RunFolder,
    dev: Supervision | None = None,
    domain: Supervision | None = None,
    max_seconds: float = math.inf,
    max_steps: int | None = None,
    progress: bool = True,
) -> RunState:
    """Train (or resume) the adapter of a `lora_model` with the recipe; the run's state (see `recipe.train`)."""
    return train(lora_trainable(model), general, spec, run, dev, domain, max_seconds, max_steps, progress)


def set_best_adapter(model: PreTrainedModel, run_dir: Path) -> None:
    """Copy the best-dev adapter of the LoRA run in `run_dir` into `model`'s adapter: to rebuild it, or to start
    another run from it, as the domain prompts start from the general prompt. Refuses an adapter of another
    rank or other target modules, naming the file."""
    from safetensors.torch import load_file

    from server.lab.recipe import state_key

    path = run_dir / "state.safetensors"
    best = load_file(path)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saved = {name: best.get(state_key("best", name, len(params) == 1)) for name in params}
    for name, p in params.items():
        if (tensor := saved[name]) is None or tensor.shape != p.shape:
            found = "none" if tensor is None else tuple(tensor.shape)
            raise ValueError(f"{path}: its best adapter has {found} for {name}, this adapter {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device))


def trainable_parameters(model: PreTrainedModel) -> int:
    """The adapter's parameter count (what the evaluation reports as the method's trainable parameters)."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)


def load_lora(
    run_dir: Path, student_dir: Path, device: torch.device | str = "cpu", merge: bool = False
) -> tuple[PreTrainedModel, int]:
    """The student in `student_dir` with the best-dev adapter of the LoRA run in `run_dir`, and the adapter's
    parameter count. Refuses a run trained against other weights (spec.json's digest). `merge` folds the
    adapter into the weights (a plain model, rounding-level differences); otherwise the PEFT model as trained."""
    from server.core.identity import verified_weights_digest
    from server.lab.loading import freeze, load_model

    record = json.loads((run_dir / "spec.json").read_text())
    if record.get("method") != "lora":
        raise ValueError(f"{run_dir / 'spec.json'}: not a LoRA run (field 'method' is {record.get('method')!r})")
    digest = verified_weights_digest(student_dir)
    if digest != record["student_weights_sha256"]:
        raise ValueError(
            f"{run_dir}: trained on weights {record['student_weights_sha256']}, {student_dir} holds {digest}"
        )
    model = lora_model(freeze(load_model(student_dir, device=device)), LoraSpec(**record["spec"]))
    set_best_adapter(model, run_dir)
    trainable = trainable_parameters(model)
    return (model.merge_and_unload() if merge else model).eval(), trainable


Fit = Callable[[LoraSpec, RunFolder, int], RunState]


def choose_lr(
    grid: list[float], base: LoraSpec, run: str, steps: int, fit: Fit, runs_dir: Path = RUNS_DIR
) -> tuple[float, dict] | None:
    """Short runs of the first `steps` steps, one per learning rate (run folders `<run>-lr<x>`, resumable), and
    the rate with the lowest best dev KL with every rate's; None while a short run is unfinished (time ran out).
    `fit(spec, folder, max_steps)` trains one. The short runs share the full run's schedule, so the chosen one
    is exactly the full run's beginning."""
    results: dict[str, float | None] = {}
    for lr in grid:
        folder = RunFolder(runs_dir / f"{run}-lr{lr:g}")
        state = folder.state() or RunState()
        if state.step < steps and state.done is None:
            state = fit(base.model_copy(update={"lr": lr}), folder, steps - state.step)
            if state.step < steps and state.done is None:
                return None
        results[f"{lr:g}"] = state.best_dev
    scored = {lr: kl for lr, kl in results.items() if kl is not None}
    if not scored:
        raise ValueError(f"no dev KL within {steps} steps: raise --grid-steps above eval_every ({base.eval_every})")
    return float(min(scored, key=scored.__getitem__)), results


def grid_choice(grid: list[float], chosen: float, results: dict, steps: int) -> dict:
    """What lr-grid.json records: every rate's dev KL, the chosen rate, and whether it is the grid's smallest or
    largest (then the best rate may lie outside the grid, and the baseline may be under-tuned)."""
    return {
        "grid": results,
        "grid_steps": steps,
        "chosen_lr": chosen,
        "criterion": "best dev KL",
        "at_edge": len(grid) > 1 and chosen in (min(grid), max(grid)),
    }


def main(argv: list[str] | None = None) -> None:
    """Train (or resume) the LoRA baseline against the default compressed model; state in bench/runs/<run>/.

    The data mirror `python -m server.lab.recipe domain` for the same `--sources`, `--tokens` and
    `--domain-per-batch` (the compute-matched single prompt's stream), or general text only without `--sources`.
    `--lr-grid 1e-4,3e-4,1e-3` first trains `--grid-steps` steps per rate (bench/runs/<run>-lr<x>/), records
    the grid and the rate with the lowest dev KL in bench/runs/<run>/lr-grid.json, and continues that run.
    `--init-run` starts every run (the grid's too) from another LoRA run's best adapter: a general-text run, then
    the domain mix, as the single prompt is the general prompt continued.
    """
    import argparse

    from server.core.config import Settings
    from server.core.identity import DEFAULT_BASE, DEFAULT_MODEL
    from server.lab.loading import freeze, load_model, torch_device
    from server.lab.recipe import run_identity, streams

    settings = Settings()
    parser = argparse.ArgumentParser(description=main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="Run name: state lives in bench/runs/<run>/.")
    parser.add_argument("--rank", type=int, required=True)
    lr = parser.add_mutually_exclusive_group(required=True)
    lr.add_argument("--lr", type=float)
    lr.add_argument("--lr-grid", help="Comma-separated learning rates to choose from on dev.")
    parser.add_argument("--grid-steps", type=int, default=60, help="Steps of each learning rate's short run.")
    parser.add_argument("--sources", default="", help="Comma-separated corpus.SOURCES names (none: general only).")
    parser.add_argument("--tokens", type=int, default=300_000)
    parser.add_argument("--domain-per-batch", type=int, default=2, help="With --sources: blocks of 4 from them.")
    parser.add_argument("--init-run", help="A LoRA run of the same rank whose best adapter starts this one.")
    parser.add_argument("--student", type=Path, default=settings.models_dir / DEFAULT_MODEL)
    parser.add_argument("--teacher", type=Path, default=settings.models_dir / DEFAULT_BASE)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-seconds", type=float, default=math.inf)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    torch.set_num_threads(settings.torch_threads)
    sources = tuple(s for s in args.sources.split(",") if s)
    base = LoraSpec(
        rank=args.rank,
        lr=args.lr or 1e-3,
        tokens=args.tokens,
        domain_per_batch=args.domain_per_batch if sources else 0,
    )
    general, dev, domain = streams(args.teacher, settings.data_dir, args.seq_len, sources, base)
    extra = {"init_run": args.init_run} if args.init_run else {}
    identity = run_identity(args.student, args.seq_len, general, dev, domain, sources, method="lora", **extra)
    device = torch_device(args.device)
    deadline = time.monotonic() + args.max_seconds

    def fit(spec: LoraSpec, folder: RunFolder, max_steps: int | None = None) -> RunState:
        folder.start(spec, identity)
        model = lora_model(freeze(load_model(args.student, device=device)), spec)
        if args.init_run:  # a resumed run then loads its own saved adapter over it
            set_best_adapter(model, RUNS_DIR / args.init_run)
        return train_lora(model, general, spec, folder, dev, domain, deadline - time.monotonic(), max_steps)

    run = RunFolder(RUNS_DIR / args.run)
    spec = base
    if args.lr_grid:
        grid = [float(x) for x in args.lr_grid.split(",")]
        if (picked := choose_lr(grid, base, args.run, args.grid_steps, fit)) is None:
            raise SystemExit(f"{args.run}: --max-seconds ran out during the learning-rate grid; run again to resume")
        chosen, results = picked
        spec = base.model_copy(update={"lr": chosen})
        if not (run.folder / "state.json").exists():  # the chosen short run is this run's first steps: go on from it
            shutil.copytree(RUNS_DIR / f"{args.run}-lr{chosen:g}", run.folder, dirs_exist_ok=True)
        choice = grid_choice(grid, chosen, results, args.grid_steps)
        if choice["at_edge"]:
            print(f"{args.run}: the chosen rate {chosen:g} is the grid's edge; a wider grid may do better", flush=True)
        (run.folder / "lr-grid.json").write_text(json.dumps(choice, indent=1))
    state = fit(spec, run)
    print_outcome(run, state, spec, args.seq_len, lr=spec.lr)


if __name__ == "__main__":
    main()
