"""The learning curve of a prompt run: how much of the compression gap is under-training (issue 17, item 1).

For each learning-curve checkpoint a `recipe` run kept (and for no prompt at all, 0 tokens), measure the token
KL to the base model on the whole general **dev** slice (>= 20k tokens; the held-out slice stays for the final
numbers) and the dev accuracy on the damaged tasks that screening found, then plot both against training
tokens. Each point is saved as soon as it is measured (`curve.json` in the run folder), so the command runs in
pieces and resumes.

    python -m server.lab.learning_curve --run general-m32 --tasks step_inference,unit_identification
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from server.lab.recipe import RUNS_DIR, dev_kl
from server.lab.tasks import task_split

DEV_TASK_LIMIT = 300


def checkpoints(run_dir: Path) -> list[tuple[int, Path | None]]:
    """(tokens, prompt file) of every kept checkpoint, in token order, after (0, None): no prompt."""
    files = sorted((run_dir / "checkpoints").glob("prompt-*.safetensors"), key=lambda p: int(p.stem.split("-")[1]))
    return [(0, None), *((int(p.stem.split("-")[1]), p) for p in files)]


def task_accuracy(model, tokenizer, task: str, prompt: torch.Tensor | None, limit: int = DEV_TASK_LIMIT) -> float:
    """Dev accuracy (log-likelihood multiple choice, first `limit` dev examples) behind `prompt`."""
    from server.lab.evaluate.scoring import mc_accuracy

    return mc_accuracy(model, tokenizer, task_split(task, "dev", limit), prompt)


def measure(
    run_dir: Path,
    student,
    tokenizer,
    dev,
    dev_blocks: int,
    tasks: list[str],
    deadline: float,
    dev_limit: int = DEV_TASK_LIMIT,
) -> list[dict]:
    """Measure every checkpoint not yet in curve.json for these tasks and dev limit (saving after each); return all
    points."""
    path = run_dir / "curve.json"
    points = json.loads(path.read_text()) if path.exists() else []
    done = {p["tokens"] for p in points if set(tasks) <= set(p["dev_acc"]) and p.get("dev_limit") == dev_limit}
    for tokens, file in checkpoints(run_dir):
        if tokens in done or time.monotonic() > deadline:
            continue
        prompt = load_file(file)["prompt"].to(student.device) if file else None
        empty = torch.zeros(0, student.get_input_embeddings().weight.shape[1], device=student.device)
        point = {
            "tokens": tokens,
            "dev_kl": dev_kl(student, empty if prompt is None else prompt, dev, dev_blocks, 4),
            "dev_kl_tokens": min(dev_blocks, len(dev.blocks)) * (dev.blocks.shape[1] - 1),
            "dev_limit": dev_limit,
            "dev_acc": {t: task_accuracy(student, tokenizer, t, prompt, dev_limit) for t in tasks},
        }
        points = sorted([p for p in points if p["tokens"] != tokens] + [point], key=lambda p: p["tokens"])
        path.write_text(json.dumps(points, indent=1))
    return points


def base_reference(screened: Path, tasks: list[str], limit: int) -> dict[str, dict[str, float]]:
    """The base model's accuracy on the same first `limit` dev examples, from its screening picks (the base line a
    point must be read against; the screening's own figure covers more examples)."""
    reference = {}
    for task in tasks:
        if (path := screened / f"{task}.json").exists():
            state = json.loads(path.read_text())
            picks, answers = state["picks"][:limit], state["answers"][:limit]
            reference[task] = {"base": sum(p == a for p, a in zip(picks, answers, strict=True)) / len(picks)}
    return reference


def plot(points: list[dict], out: Path, reference: dict[str, dict[str, float]] | None = None) -> None:
    """dev KL and damaged-task dev accuracy against training tokens (log axis; no prompt drawn at 1k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [max(p["tokens"], 1000) for p in points]
    fig, (kl, acc) = plt.subplots(1, 2, figsize=(10, 4))
    kl.plot(xs, [p["dev_kl"] for p in points], "o-")
    kl.set(xscale="log", xlabel="training tokens (no prompt at 1k)", ylabel="token KL to base (general dev)")
    for task in points[0]["dev_acc"]:
        (line,) = acc.plot(xs, [p["dev_acc"][task] for p in points], "o-", label=task)
        if reference and task in reference:
            acc.axhline(reference[task]["base"], color=line.get_color(), linestyle="--", linewidth=0.8)
    acc.set(xscale="log", xlabel="training tokens", ylabel="dev accuracy (dashed: base model)")
    acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from server.core.config import Settings
    from server.core.identity import DEFAULT_BASE
    from server.lab.loading import freeze, load_model, torch_device
    from server.lab.teacher_cache import general_cache

    settings = Settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--tasks", required=True, help="Comma-separated damaged tasks (from screening.json).")
    parser.add_argument("--teacher", type=Path, default=settings.models_dir / DEFAULT_BASE)
    parser.add_argument("--dev-blocks", type=int, default=10_000, help="Dev blocks for the KL (default: all).")
    parser.add_argument("--dev-limit", type=int, default=DEV_TASK_LIMIT, help="First N dev examples per task.")
    parser.add_argument("--max-seconds", type=float, default=math.inf)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    torch.set_num_threads(settings.torch_threads)
    run_dir = RUNS_DIR / args.run
    spec = json.loads((run_dir / "spec.json").read_text())
    student_dir = settings.models_dir / spec["student"]
    from server.core.identity import verified_weights_digest

    if verified_weights_digest(student_dir) != spec["student_weights_sha256"]:
        raise SystemExit(f"{student_dir} is not the model run {args.run} trained against: its points would be void")
    dev = general_cache(args.teacher, settings.data_dir, "dev", spec["seq_len"])
    student = freeze(load_model(student_dir, device=torch_device(args.device)))
    points = measure(
        run_dir,
        student,
        AutoTokenizer.from_pretrained(student_dir),
        dev,
        args.dev_blocks,
        args.tasks.split(","),
        time.monotonic() + args.max_seconds,
        args.dev_limit,
    )
    reference = base_reference(RUNS_DIR / "screening" / "base", args.tasks.split(","), args.dev_limit)
    if points:
        plot(points, run_dir / "curve.png", reference)
    print(json.dumps(points, indent=1))


if __name__ == "__main__":
    main()
