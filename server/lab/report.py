"""Writing evaluation results: a markdown report for people, JSON for programs, PNG plots for both.

The report says plainly where a comparison cannot show anything: a task on which even the base model's
confidence interval reaches chance cannot separate the methods, whatever their numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _ci(ci: tuple[float, float] | list[float]) -> str:
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def near_chance(result: dict) -> list[str]:
    """Tasks where the base model's 95% CI reaches chance: no method can be told apart there."""
    base = result["methods"].get("base")
    if base is None:
        return []
    return [t for t, info in result["tasks"].items() if base["tasks"][t]["ci"][0] <= info["chance"]]


def no_measured_loss(result: dict) -> list[str]:
    """Tasks where the paired CI of base − compressed contains 0: repair cannot be shown on them."""
    base = result["methods"].get("base")
    if base is None:
        return []
    return [t for t in result["tasks"] if base["tasks"][t]["delta_ci"][0] <= 0]


def markdown(result: dict, command: str) -> str:
    """The evaluation report: summary per method, accuracy per task, and what the numbers cannot show."""
    methods, tasks = result["methods"], result["tasks"]
    lines = [
        f"# IDP evaluation: {result['models']['compressed']} (base {result['models']['base']})",
        "",
        f"Command: `{command}`",
        "",
        (
            f"Bank `{result['banks']['idp']}` (K={result['banks']['k']}, m={result['banks']['m']}, "
            f"prompts {', '.join(result['banks']['prompts'])}, trained {result['banks']['trained']}, "
            "IDP selection layers "
            f"{result['banks']['selection_layers'] or 'all'}); single prompt "
            f"`{result['banks']['single']}`. Test splits only, at most {result['limit']} examples per task; "
            f"{result['leaked_examples']} evaluated examples occur in any training data. Accuracy in %, "
            "95% percentile bootstrap CIs (stratified by task; Δ is paired against `compressed`)."
        ),
        "",
        (
            "| method | avg acc | 95% CI | Δ vs compressed | 95% CI | held-out ppl | trainable params | "
            "extra tokens/request | selection ms/request | s/example |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        lines.append(
            f"| {name} | {_pct(m['avg'])} | {_ci(m['avg_ci'])} | {100 * m['delta']:+.1f} | {_ci(m['delta_ci'])} | "
            f"{m['ppl']:.1f} | {m['trainable']:,} | {m['extra_tokens']} | {m['select_ms']:.1f} | {m['seconds']:.2f} |"
        )
    lines += [
        "",
        "## Per task",
        "",
        "| task | kind | n | chance | " + " | ".join(methods) + " |",
        "|---|---|---|---|" + "---|" * len(methods),
    ]
    for task, info in tasks.items():
        cells = [f"{_pct(m['tasks'][task]['acc'])} {_ci(m['tasks'][task]['ci'])}" for m in methods.values()]
        lines.append(f"| {task} | {info['kind']} | {info['n']} | {_pct(info['chance'])} | " + " | ".join(cells) + " |")
    lines += ["", "## What these numbers cannot show", ""]
    if low := near_chance(result):
        lines.append(
            f"- The base model itself is not distinguishable from chance on: {', '.join(low)}. "
            "Differences between methods there are noise, not repair."
        )
    if intact := no_measured_loss(result):
        lines.append(
            f"- Compression lost nothing measurable (paired CI of base − compressed contains 0) on: "
            f"{', '.join(intact)}. There is nothing to repair there at this sample size."
        )
    lines.append("- A Δ whose CI contains 0 is no evidence of a difference at this sample size.")
    if check := result.get("server_check"):
        lines.append(
            f"- Live-server check ({check['url']}): {check['records']} in-process records re-scored through "
            f"`/v1/completions`; max |Δ log-likelihood| {check['max_abs_score_diff']:.1e}, same prediction "
            f"{check['same_prediction']}/{check['records']}, same prompt {check['same_prompt']}/{check['records']}."
        )
    if result.get("lora"):
        lora = result["lora"]
        lines.append(
            f"- LoRA baseline: KD loss {lora['losses']['first']} -> {lora['losses']['last']} over "
            f"{lora['losses']['steps']} steps (adapter cached at `{lora['adapter']}`)."
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Average accuracy per method with its 95% CI, the compressed model and chance as reference lines."""
    methods = result["methods"]
    names = list(methods)
    avg = [methods[n]["avg"] for n in names]
    err = [
        [a - methods[n]["avg_ci"][0] for n, a in zip(names, avg)],
        [methods[n]["avg_ci"][1] - a for n, a in zip(names, avg)],
    ]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 4))
    ax.bar(names, avg, yerr=err, capsize=4, color="tab:blue")
    if "compressed" in methods:
        ax.axhline(methods["compressed"]["avg"], color="tab:red", linestyle="--", label="compressed")
    chance = sum(t["chance"] for t in result["tasks"].values()) / len(result["tasks"])
    ax.axhline(chance, color="grey", linestyle=":", label="chance")
    ax.set_ylabel("mean accuracy over tasks (95% CI)")
    ax.set_title(f"{result['models']['compressed']}: repair methods")
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result: dict, out_dir: Path, command: str) -> Path:
    """report.md, results.json (every per-example record) and accuracy.png in `out_dir`; return the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result | {"command": command}, indent=1))
    plot(result, out_dir / "accuracy.png")
    path = out_dir / "report.md"
    path.write_text(markdown(result, command))
    return path


def write_attention(rows: list[dict], out_dir: Path, command: str) -> Path:
    """attention.md / attention.json / attention.png: per-layer deviation of each variant from the base model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "attention.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    variants = [k for k in rows[0] if k != "layer"]
    lines = [
        "# Attention deviation from the base model, per layer",
        "",
        f"Command: `{command}`",
        "",
        (
            "Mean total-variation (tv) and Jensen-Shannon distance (js, base 2) between the variant's and the base "
            "model's attention rows over the input tokens (prompt positions dropped, rows renormalised), "
            "averaged over heads, query tokens and inputs. 0 = the base model's attention. `*_nosink`: the same with "
            "the first input token's row and column dropped too (the base model's attention sink), so mass that "
            "moved from that token onto the prompt is not counted as deviation. `on_prompt`: mean attention mass "
            "of the input rows on the prompt."
        ),
        "",
        "| layer | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    lines += [f"| {r['layer']} | " + " | ".join(f"{r[v]:.4f}" for v in variants) + " |" for r in rows]
    means = {v: sum(r[v] for r in rows) / len(rows) for v in variants}
    lines.append("| mean | " + " | ".join(f"{means[v]:.4f}" for v in variants) + " |")
    (out_dir / "attention.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    for v in (v for v in variants if v.endswith("/tv")):
        ax.plot([r["layer"] for r in rows], [r[v] for r in rows], marker=".", label=v.removesuffix("/tv"))
    ax.set_xlabel("layer")
    ax.set_ylabel("mean TV distance to base attention")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "attention.png", dpi=120)
    plt.close(fig)
    return out_dir / "attention.md"
