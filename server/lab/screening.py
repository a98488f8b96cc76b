"""Task screening on dev splits: which tasks can show a repair at all (docs/evaluation-protocol.md, section 2).

A task shows a repair only where the base model is clearly above chance and compression clearly hurts it.
This scores the base and the compressed model on each candidate task's dev split (never test) and applies the
protocol's fixed rule. It runs in pieces: per-example outcomes are saved as they come (every 25 examples) under
`bench/runs/screening/<role>/<task>.json`, so `run` stops after `--max-seconds` and the next `run` resumes;
outcomes measured on weights other than the current model's (the compressed model changed) are void and
measured again.

    python -m server.lab.screening run --role base --max-seconds 540
    python -m server.lab.screening run --role compressed --max-seconds 540
    python -m server.lab.screening report        # bench/runs/screening/screening.json + a table
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from server.lab.tasks import ALL_TASKS, chance, task_split

RUN_DIR = Path(__file__).resolve().parents[2] / "bench" / "runs" / "screening"
DEV_LIMIT = 300
MIN_DEV = 150
ABOVE_CHANCE = 0.10
DAMAGED = 0.08
UNDAMAGED = 0.03
MIN_TRANSFER_TEST = 300
SCREENED = (
    "unit_identification",
    "step_inference",
    "goal_inference",
    "si_conversion",
    "different_systems",
    "chained_conversion",
    "novel_systems",
    "step_ordering",
    "fever",
    "question_selection",
    "timedial",
    "social_iqa",
    "winowhy",
    "strategyqa",
    "epistemic_reasoning",
    "logical_fallacy_detection",
    "bbq_race_disambig",
    "hyperbaton",
    "sentiment_en",
    "knowledge_conflicts",
)
"""Every task with >= 1,500 examples (so >= 150 dev); the smaller vendored tasks cannot meet n >= 150."""


def role_folder(role: str, models_dir: Path) -> Path:
    """The model folder scored for a role: the base model, or the default compressed model's dense twin."""
    from server.core.identity import DEFAULT_BASE, DEFAULT_MODEL

    return models_dir / (DEFAULT_BASE if role == "base" else DEFAULT_MODEL)


def screen_task(model, tokenizer, task: str, out: Path, digest: str, deadline: float) -> bool:
    """Score the dev examples of `task` (resuming from `out`); return True when the task is finished."""
    from server.lab.evaluate.scoring import choice_logprobs

    examples = task_split(task, "dev", DEV_LIMIT)
    state = json.loads(out.read_text()) if out.exists() else {}
    if state.get("weights_sha256") != digest:
        state = {
            "task": task,
            "weights_sha256": digest,
            "n": len(examples),
            "chance": chance(examples),
            "picks": [],
            "picks_norm": [],
            "answers": [e.answer for e in examples],
        }
    done = len(state["picks"])
    for i in tqdm(range(done, len(examples)), desc=task, initial=done, total=len(examples)):
        example = examples[i]
        scores = choice_logprobs(model, tokenizer, example)
        norm = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, example.choices, strict=True)]
        state["picks"].append(int(np.argmax(scores)))
        state["picks_norm"].append(int(np.argmax(norm)))
        if (i + 1) % 25 == 0 or i + 1 == len(examples) or time.monotonic() > deadline:
            out.write_text(json.dumps(state))
        if time.monotonic() > deadline:
            return i + 1 == len(examples)
    out.write_text(json.dumps(state))
    return True


def run(role: str, tasks: list[str], max_seconds: float, models_dir: Path, threads: int) -> None:
    """Screen `tasks` for one role until all are done or `max_seconds` have passed."""
    from transformers import AutoTokenizer

    from server.core.identity import verified_weights_digest
    from server.lab.loading import freeze, load_model

    deadline = time.monotonic() + max_seconds
    torch.set_num_threads(threads)
    folder = role_folder(role, models_dir)
    digest = verified_weights_digest(folder)
    assert digest is not None, f"{folder}: a dense folder has a weights digest"
    (RUN_DIR / role).mkdir(parents=True, exist_ok=True)
    (RUN_DIR / role / "model.json").write_text(json.dumps({"folder": folder.name, "weights_sha256": digest}))
    model, tokenizer = freeze(load_model(folder)), AutoTokenizer.from_pretrained(folder)
    for task in tasks:
        if not screen_task(model, tokenizer, task, RUN_DIR / role / f"{task}.json", digest, deadline):
            print(f"stopped in {task} after {max_seconds:.0f} s; run again to resume", flush=True)
            return
    print(f"{role}: all {len(tasks)} tasks screened", flush=True)


def accuracy(state: dict, key: str = "picks") -> np.ndarray:
    return (np.array(state[key]) == np.array(state["answers"][: len(state[key])])).astype(float)


def paired_ci(diff: np.ndarray, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of paired differences."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def classify(n: int, chance_acc: float, base: float, compressed: float) -> str:
    """The protocol's rule on dev point estimates: damaged, undamaged, or unused."""
    above, damage = round(base - chance_acc, 9), round(base - compressed, 9)  # 0.60 - 0.52 is 8 points, not 7.99..
    if n < MIN_DEV or above < ABOVE_CHANCE:
        return "unused"
    if damage >= DAMAGED:
        return "damaged"
    return "undamaged" if abs(damage) < UNDAMAGED else "unused"


def _ruled_out_by_base(task: str, base_state: dict) -> dict | None:
    """The row of a task the base model alone rules out (too few dev examples, or base near chance): whatever the
    compressed model scores, the rule cannot make it damaged or undamaged, so its compressed half is not needed."""
    base = accuracy(base_state)
    if len(base) >= MIN_DEV and round(base.mean() - base_state["chance"], 9) >= ABOVE_CHANCE:
        return None
    return {
        "task": task,
        "n": len(base),
        "chance": round(base_state["chance"], 4),
        "base": round(base.mean(), 4),
        "compressed": None,
        "status": "unused",
        "why": "the base model alone rules it out (n < 150 or base < chance + 10 points)",
        "test_n": len(task_split(task, "test")),
    }


def report(tasks: list[str]) -> dict:
    """Apply the rule to every task screened for both roles; write screening.json; return it."""
    models = {role: json.loads((RUN_DIR / role / "model.json").read_text()) for role in ("base", "compressed")}
    rows = []
    for task in tasks:
        states = {r: json.loads(p.read_text()) for r in models if (p := RUN_DIR / r / f"{task}.json").exists()}
        valid = {
            r: s
            for r, s in states.items()
            if len(s["picks"]) == s["n"] and s["weights_sha256"] == models[r]["weights_sha256"]
        }
        if "compressed" not in valid and "base" in valid and (row := _ruled_out_by_base(task, valid["base"])):
            rows.append(row)
            continue
        if len(valid) < 2:
            rows.append({"task": task, "status": "incomplete"})
            continue
        base, comp = accuracy(states["base"]), accuracy(states["compressed"])
        row = {
            "task": task,
            "n": len(base),
            "chance": round(states["base"]["chance"], 4),
            "base": round(base.mean(), 4),
            "compressed": round(comp.mean(), 4),
            "damage": round(base.mean() - comp.mean(), 4),
            "damage_ci": [round(x, 4) for x in paired_ci(base - comp)],
            "base_norm": round(accuracy(states["base"], "picks_norm").mean(), 4),
            "compressed_norm": round(accuracy(states["compressed"], "picks_norm").mean(), 4),
            "test_n": len(task_split(task, "test")),
        }
        row["status"] = classify(row["n"], row["chance"], row["base"], row["compressed"])
        rows.append(row)
    damaged = [r for r in rows if r.get("status") == "damaged"]
    transfer = (
        min(
            (r for r in damaged if r["test_n"] >= MIN_TRANSFER_TEST),
            key=lambda r: (r["test_n"], r["task"]),
            default=None,
        )
        if len(damaged) >= 2
        else None
    )
    pool = [r["task"] for r in damaged if transfer is None or r["task"] != transfer["task"]]
    result = {
        "rule": "docs/evaluation-protocol.md section 2-3",
        "models": models,
        "tasks": rows,
        "primary_pool": pool,
        "primary_pool_test_n": sum(r["test_n"] for r in damaged if r["task"] in pool),
        "transfer_task": transfer["task"] if transfer else None,
        "do_no_harm": [r["task"] for r in rows if r.get("status") == "undamaged"],
    }
    (RUN_DIR / "screening.json").write_text(json.dumps(result, indent=1))
    return result


def table(result: dict) -> str:
    lines = ["| task | n dev | chance | base | compressed | damage [95% CI] | status |", "|" + " --- |" * 7]
    for r in result["tasks"]:
        if r["status"] == "incomplete":
            lines.append(f"| {r['task']} | | | | | | incomplete |")
            continue
        if r["compressed"] is None:
            lines.append(f"| {r['task']} | {r['n']} | {r['chance']:.3f} | {r['base']:.3f} | not needed | | unused |")
            continue
        lo, hi = r["damage_ci"]
        lines.append(
            f"| {r['task']} | {r['n']} | {r['chance']:.3f} | {r['base']:.3f} | {r['compressed']:.3f} | "
            f"{r['damage']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {r['status']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from server.core.config import Settings

    settings = Settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="score dev splits for one role, resumable")
    go.add_argument("--role", choices=("base", "compressed"), required=True)
    go.add_argument("--max-seconds", type=float, default=math.inf)
    for p in (go, sub.add_parser("report", help="apply the rule; write screening.json")):
        p.add_argument("--tasks", default=",".join(SCREENED), help="comma-separated task names")
    args = parser.parse_args(argv)
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        parser.error(f"unknown tasks: {', '.join(unknown)}")
    if args.command == "run":
        run(args.role, tasks, args.max_seconds, settings.models_dir, settings.torch_threads)
    else:
        print(table(report(tasks)))


if __name__ == "__main__":
    main()
