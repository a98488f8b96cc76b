"""The numbers docs/evaluation-protocol.md asks for (sections 4 and 6), computed from per-example outcomes.

Everything here is a function of the records the shards hold (picks, answers, selected prompts, per-method KL),
so anyone can recompute the report from the committed JSON. Besides the scored methods it derives: IDP (the
selected prompt's forced outcome), the label-free oracle (per example, the bank prompt with the lowest token KL
to the base model over context + answer), "any prompt correct" (an upper bound, not a method: it has no pick),
the best forced prompt chosen on test (favours that baseline) and on the dev pass, and the router that knows each
example's task (the prompt trained on it): what routing by domain could reach at best.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.lab.pooled import (
    agreement,
    gap_recovered,
    mean_interval,
    paired_difference,
    pooled_mean,
    ratio_interval,
    wilson,
)

PRESEEN = ("unit_identification", "step_inference")
"""Tasks whose test results were seen before the protocol was written: the secondary analysis leaves them out."""
ORACLE, ANY, DOMAIN = "oracle", "any-correct", "own-domain"
Outcomes = dict[str, np.ndarray]


@dataclass(frozen=True)
class Pools:
    """The screened pools (bench/runs/screening/screening.json): primary, transfer task, do-no-harm set."""

    primary: tuple[str, ...]
    transfer: str | None
    do_no_harm: tuple[str, ...]

    @classmethod
    def from_screening(cls, path: Path) -> Pools:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no screening result (python -m server.lab.screening report)")
        data = json.loads(path.read_text())
        try:
            pools = cls(tuple(data["primary_pool"]), data["transfer_task"], tuple(data["do_no_harm"]))
        except KeyError as exc:
            raise ValueError(f"{path}: no field {exc} (written by python -m server.lab.screening report?)") from None
        if not pools.primary:
            raise ValueError(f"{path}: the primary pool is empty (no damaged task): there is nothing to evaluate")
        return pools

    @property
    def tasks(self) -> list[str]:
        """Every evaluated task: primary pool, transfer task, do-no-harm set."""
        return [*self.primary, *([self.transfer] if self.transfer else []), *self.do_no_harm]


@dataclass(frozen=True)
class Table:
    """Per method and task, in example order: correct (0/1) by log-likelihood and by acc_norm, and picks."""

    correct: dict[str, Outcomes]
    correct_norm: dict[str, Outcomes]
    picks: dict[str, Outcomes]


def oracle_prompt(record: dict) -> str:
    """The label-free oracle's prompt: the forced bank prompt with the lowest mean token KL to base."""
    forced = {m: kl for m, kl in record["kl"].items() if m.startswith("forced:")}
    return min(forced, key=forced.__getitem__)


def tabulate(records: dict[str, list[dict]]) -> Table:
    """Outcome arrays from eval records (per task), with IDP's, the oracle's and any-correct's derived."""
    correct: dict[str, Outcomes] = {}
    norm: dict[str, Outcomes] = {}
    picks: dict[str, Outcomes] = {}
    for task, rows in records.items():
        answers = np.array([r["answer"] for r in rows])
        per_method = {m: np.array([r["picks"][m] for r in rows]) for m in rows[0]["picks"]}
        per_norm = {m: np.array([r["picks_norm"][m] for r in rows]) for m in rows[0]["picks_norm"]}
        if "kl" in rows[0]:
            oracle = [oracle_prompt(r) for r in rows]
            per_method[ORACLE] = np.array([r["picks"][o] for r, o in zip(rows, oracle, strict=True)])
            per_norm[ORACLE] = np.array([r["picks_norm"][o] for r, o in zip(rows, oracle, strict=True)])
        for m, p in per_method.items():
            picks.setdefault(m, {})[task] = p
            correct.setdefault(m, {})[task] = (p == answers).astype(float)
        for m, p in per_norm.items():
            norm.setdefault(m, {})[task] = (p == answers).astype(float)
        forced = [m for m in per_method if m.startswith("forced:")]
        correct.setdefault(ANY, {})[task] = np.max([correct[m][task] for m in forced], axis=0)
        norm.setdefault(ANY, {})[task] = np.max([norm[m][task] for m in forced], axis=0)
    return Table(correct, norm, picks)


def with_own_domain(table: Table, domains: dict[str, str]) -> Table:
    """Adds the task-label router: per task the bank prompt trained on it (`domains`: task -> prompt name), IDP's
    pick on tasks no prompt was trained on. It needs labels no request carries, so it bounds what routing by
    domain could give; when it does not beat the single prompt, no better router of this bank will by domain."""
    if not domains:
        return table

    def routed(field: dict[str, Outcomes]) -> Outcomes:
        return {t: field[f"forced:{domains[t]}" if t in domains else "idp"][t] for t in field["idp"]}

    return Table(
        table.correct | {DOMAIN: routed(table.correct)},
        table.correct_norm | {DOMAIN: routed(table.correct_norm)},
        table.picks | {DOMAIN: routed(table.picks)},
    )


def only(outcomes: Outcomes, tasks: tuple[str, ...] | list[str]) -> Outcomes:
    return {t: outcomes[t] for t in tasks}


def best_forced(correct: dict[str, Outcomes], tasks: tuple[str, ...] | list[str]) -> str:
    """The forced prompt with the highest pooled accuracy on `tasks` (ties: the first in bank order)."""
    forced = [m for m in correct if m.startswith("forced:")]
    return max(forced, key=lambda m: pooled_mean(only(correct[m], tasks)))


def per_task(table: Table, task: str, chance: float, resamples: int) -> dict:
    """acc and acc_norm with Wilson 95% intervals, and the paired difference to compressed with its bootstrap CI."""
    reference = {task: table.correct["compressed"][task]}
    out: dict = {"n": len(reference[task]), "chance": chance, "methods": {}}
    for method in table.correct:
        right, right_norm = table.correct[method][task], table.correct_norm[method][task]
        n = len(right)
        out["methods"][method] = {
            "acc": float(right.mean()),
            "acc_ci": wilson(int(right.sum()), n),
            "acc_norm": float(right_norm.mean()),
            "acc_norm_ci": wilson(int(right_norm.sum()), n),
            "vs_compressed": paired_difference({task: right}, reference, resamples),
        }
    return out


def pooled_block(table: Table, tasks: tuple[str, ...] | list[str], resamples: int) -> dict:
    """Per method over `tasks`: pooled acc and acc_norm with CIs, FGR (undefined when the gap's CI holds 0),
    agreement with base, the paired difference to compressed."""
    base, compressed = only(table.correct["base"], tasks), only(table.correct["compressed"], tasks)
    out = {}
    for method, outcomes in table.correct.items():
        mine = only(outcomes, tasks)
        out[method] = {
            "acc": mean_interval(mine, resamples),
            "acc_norm": mean_interval(only(table.correct_norm[method], tasks), resamples),
            "fgr": gap_recovered(base, compressed, mine, resamples),
            "vs_compressed": paired_difference(mine, compressed, resamples),
            "agreement": (
                agreement(only(table.picks[method], tasks), only(table.picks["base"], tasks), resamples)
                if method in table.picks
                else None
            ),
        }
    return out


def general_summary(records: list[dict]) -> dict:
    """Per method on the held-out general text: mean token KL(base || method) and perplexity, each with a 95%
    bootstrap interval over documents."""
    docs = sorted({r["doc"] for r in records})
    where = {d: i for i, d in enumerate(docs)}
    tokens = np.zeros(len(docs))
    for r in records:
        tokens[where[r["doc"]]] += r["tokens"]
    out = {}
    for method in records[0]["nll"]:
        nll, kl = np.zeros(len(docs)), np.zeros(len(docs))
        for r in records:
            nll[where[r["doc"]]] += r["nll"][method]
            kl[where[r["doc"]]] += r["kl"][method]
        low, high = ratio_interval(nll, tokens)
        out[method] = {
            "kl": float(kl.sum() / tokens.sum()),
            "kl_ci": ratio_interval(kl, tokens),
            "ppl": float(np.exp(nll.sum() / tokens.sum())),
            "ppl_ci": (float(np.exp(low)), float(np.exp(high))),
        }
    return {"documents": len(docs), "tokens": int(tokens.sum()), "methods": out}


def targets(primary: dict, paired: dict) -> dict:
    """Section 6, applied as written: FGR >= 50% with CI lower bound > 0; IDP >= single and >= the best forced
    prompt by point estimate ("better" only when the paired CI's lower bound is > 0)."""
    fgr = primary["idp"]["fgr"]
    out = {"fgr": {"met": bool(fgr["defined"] and fgr["fgr"] >= 0.5 and fgr["ci"][0] > 0), "value": fgr}}
    for name in ("idp - single", "idp - best forced (test-chosen)"):
        diff = paired[name]
        out[name] = {"met": diff["difference"] >= 0, "better": diff["ci"][0] > 0, "value": diff}
    return out


def report(
    pools: Pools,
    shards: dict[tuple[str, str], list[dict]],
    chance: dict[str, float],
    trainable: dict[str, int],
    prompt_tokens: dict[str, int],
    resamples: int,
    domains: dict[str, str] | None = None,
) -> dict:
    """The protocol's summary from every shard's records: per task, the primary pool (FGR, agreement, paired
    differences, targets), the secondary pool without the pre-seen tasks, the transfer task, the do-no-harm set,
    the general-text fidelity, the cost per method, and where IDP routes each task (`domains`, task -> the prompt
    trained on it, adds the task-label router)."""
    evaluated = {task: rows for (kind, task), rows in shards.items() if kind == "eval"}
    table = with_own_domain(tabulate(evaluated), domains or {})
    dev = tabulate({task: rows for (kind, task), rows in shards.items() if kind == "dev-choice"})
    primary = pooled_block(table, pools.primary, resamples)
    chosen = {"test": best_forced(table.correct, pools.primary), "dev": best_forced(dev.correct, pools.primary)}
    pool = {m: only(table.correct[m], pools.primary) for m in table.correct}
    paired = {
        "idp - single": paired_difference(pool["idp"], pool["single"], resamples),
        "idp - best forced (test-chosen)": paired_difference(pool["idp"], pool[chosen["test"]], resamples),
        "idp - best forced (dev-chosen)": paired_difference(pool["idp"], pool[chosen["dev"]], resamples),
        **{f"idp - {m}": paired_difference(pool["idp"], pool[m], resamples) for m in pool if m.startswith("lora:")},
    }
    if DOMAIN in pool:
        paired["own-domain - single"] = paired_difference(pool[DOMAIN], pool["single"], resamples)
    secondary = [t for t in pools.primary if t not in PRESEEN]
    eval_rows = [r for t in pools.primary for r in evaluated[t]]
    return {
        "pools": {"primary": pools.primary, "transfer": pools.transfer, "do_no_harm": pools.do_no_harm},
        "per_task": {t: per_task(table, t, chance[t], resamples) for t in pools.tasks},
        "primary": {"n": len(eval_rows), "methods": primary, "paired": paired, "best_forced": chosen},
        "targets": targets(primary, paired),
        "secondary": (
            {"tasks": secondary, "methods": pooled_block(table, secondary, resamples)}
            if secondary and len(secondary) < len(pools.primary)
            else None
        ),
        "transfer": pooled_block(table, [pools.transfer], resamples) if pools.transfer else None,
        "do_no_harm": (
            {
                m: {**d, "harm": d["ci"][1] < 0}
                for m in table.correct
                if m != "compressed"
                for d in [
                    paired_difference(
                        only(table.correct[m], pools.do_no_harm),
                        only(table.correct["compressed"], pools.do_no_harm),
                        resamples,
                    )
                ]
            }
            if pools.do_no_harm
            else None
        ),
        "general": general_summary(shards[("general", "general")]),
        "cost": {
            "trainable": trainable,
            "prompt_tokens": prompt_tokens,
            "selection_s": float(np.mean([r["select_s"] for r in eval_rows])),
            "oracle_prompts": _shares([oracle_prompt(r) for r in eval_rows]),
            "idp_prompts": _shares(["forced:" + r["selected"] for r in eval_rows]),
        },
        "routing": {t: routing(evaluated[t]) for t in pools.tasks},
    }


def routing(rows: list[dict]) -> dict:
    """Where IDP sends a task's examples: the share of each selected prompt, the label-free oracle's shares, and
    how often the two agree (the headroom a better router could reach is the oracle's accuracy)."""
    selected = ["forced:" + r["selected"] for r in rows]
    oracle = [oracle_prompt(r) for r in rows]
    return {
        "idp": _shares(selected),
        "oracle": _shares(oracle),
        "idp_is_oracle": float(np.mean([s == o for s, o in zip(selected, oracle, strict=True)])),
    }


def measured(summary: dict, method: str, split: str) -> dict[str, float]:
    """What a bank's manifest records of this evaluation about the method it serves: pooled accuracy, FGR with its
    CI (when defined), agreement with base over the primary pool, and held-out general KL and perplexity."""
    pooled, general = summary["primary"]["methods"][method], summary["general"]["methods"][method]
    out = {
        f"{split}_primary_n": float(summary["primary"]["n"]),
        f"{split}_primary_acc": pooled["acc"]["mean"],
        f"{split}_agreement_with_base": pooled["agreement"]["agreement"],
        "general_heldout_kl_to_base": general["kl"],
        "general_heldout_ppl": general["ppl"],
    }
    if pooled["fgr"]["defined"]:
        low, high = pooled["fgr"]["ci"]
        out |= {f"{split}_fgr": pooled["fgr"]["fgr"], f"{split}_fgr_ci_low": low, f"{split}_fgr_ci_high": high}
    return out


def _shares(names: list[str]) -> dict[str, float]:
    return {n: names.count(n) / len(names) for n in sorted(set(names))}


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _ci(ci: tuple[float, float] | list[float] | None, scale: float = 100, digits: int = 1) -> str:
    return "" if ci is None else f"[{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"


def _rows(summary: dict) -> list[tuple[str, str]]:
    """(label, method key) of the table rows: references, the repairs, the headroom, then each forced prompt."""
    chosen = summary["primary"]["best_forced"]
    methods = summary["primary"]["methods"]
    rows = [("base", "base"), ("compressed", "compressed"), ("+ single prompt", "single"), ("+ IDP", "idp")]
    rows += [(f"+ LoRA {m[5:]}", m) for m in methods if m.startswith("lora:")]
    rows += [
        (f"+ best forced, test-chosen ({chosen['test'][7:]})", chosen["test"]),
        (f"+ best forced, dev-chosen ({chosen['dev'][7:]})", chosen["dev"]),
        ("oracle prompt per example (label-free)", ORACLE),
        *([("own-domain prompt per task (task label known)", DOMAIN)] if DOMAIN in methods else []),
        ("any prompt correct (upper bound)", ANY),
    ]
    return rows + [(f"+ forced {m[7:]}", m) for m in methods if m.startswith("forced:")]


def _transfer(method: str, block: dict) -> str:
    """One method on the transfer task: accuracy, its paired difference to compressed, FGR, with CIs."""
    fgr = block["fgr"]
    return (
        f"{method} {_pct(block['acc']['mean'])} {_ci(block['acc']['ci'])} "
        f"({100 * block['vs_compressed']['difference']:+.1f} {_ci(block['vs_compressed']['ci'])}, FGR "
        + (f"{_pct(fgr['fgr'])} {_ci(fgr['ci'])})" if fgr["defined"] else "undefined)")
    )


def markdown(summary: dict, command: str) -> str:
    """The README table (one row per method) and the paired differences, transfer, do-no-harm and per-task
    tables, in %, with 95% CIs."""
    primary, general, cost = summary["primary"], summary["general"]["methods"], summary["cost"]
    lines = [
        f"Command: `{command}`",
        "",
        f"Primary pool: {', '.join(summary['pools']['primary'])} ({primary['n']} paired examples); transfer task: "
        f"{summary['pools']['transfer']}; do-no-harm: {', '.join(summary['pools']['do_no_harm']) or 'none'}. "
        f"KL(base || method) and perplexity on {summary['general']['tokens']:,} held-out general tokens "
        f"({summary['general']['documents']} documents).",
        "",
        "| method | pooled acc % [95% CI] | FGR % [95% CI] | acc_norm % [95% CI] | agreement with base % | KL | ppl "
        "| trainable params | prompt tokens/request | selection s/request |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, key in _rows(summary):
        m = primary["methods"][key]
        fgr = m["fgr"]
        fgr_text = f"{_pct(fgr['fgr'])} {_ci(fgr['ci'])}" if fgr["defined"] else "undefined (gap CI holds 0)"
        agree = _pct(m["agreement"]["agreement"]) if m["agreement"] else ""
        text = general.get(key)
        kl, ppl = (f"{text['kl']:.3f}", f"{text['ppl']:.1f}") if text else ("", "")
        params = f"{cost['trainable'][key]:,}" if key in cost["trainable"] else ""
        tokens = str(cost["prompt_tokens"][key]) if key in cost["prompt_tokens"] else ""
        select = f"{cost['selection_s']:.4f}" if key == "idp" else ""
        lines.append(
            f"| {label} | {_pct(m['acc']['mean'])} {_ci(m['acc']['ci'])} | {fgr_text} "
            f"| {_pct(m['acc_norm']['mean'])} {_ci(m['acc_norm']['ci'])} | {agree} | {kl} | {ppl} "
            f"| {params} | {tokens} | {select} |"
        )
    lines += ["", "| paired difference (pooled, points) | estimate | 95% CI |", "|---|---|---|"]
    lines += [f"| {k} | {100 * v['difference']:+.1f} | {_ci(v['ci'])} |" for k, v in primary["paired"].items()]
    lines += [
        "",
        "Targets (protocol section 6): "
        + "; ".join(
            f"{name}: {'met' if t['met'] else 'missed'}" + (" (better, CI > 0)" if t.get("better") else "")
            for name, t in summary["targets"].items()
        ),
    ]
    if summary["secondary"]:
        fgr = summary["secondary"]["methods"]["idp"]["fgr"]
        lines += [
            "",
            f"Secondary (pool without {', '.join(t for t in PRESEEN if t in summary['pools']['primary'])}, seen "
            "before the protocol): IDP FGR "
            + (f"{_pct(fgr['fgr'])} {_ci(fgr['ci'])}" if fgr["defined"] else "undefined (gap CI holds 0)"),
        ]
    if summary["transfer"]:
        compared = ["idp", "single", *(m for m in summary["transfer"] if m.startswith("lora:"))]
        lines += [
            "",
            f"Transfer task {summary['pools']['transfer']}, method (vs compressed, FGR): "
            + "; ".join(_transfer(m, summary["transfer"][m]) for m in compared if m in summary["transfer"]),
        ]
    if summary["do_no_harm"]:
        lines += [
            "",
            "Do-no-harm set, method - compressed: "
            + "; ".join(
                f"{m} {100 * d['difference']:+.1f} {_ci(d['ci'])}{' HARM' if d['harm'] else ''}"
                for m, d in summary["do_no_harm"].items()
            ),
        ]
    lines += _routing_table(summary)
    shown = [k for _, k in _rows(summary)[:4]] + [m for m in primary["methods"] if m.startswith("lora:")]
    lines += ["", "| task | n | chance | " + " | ".join(shown) + " |", "|---|---|---|" + "---|" * len(shown)]
    for task, info in summary["per_task"].items():
        cells = [f"{_pct(info['methods'][m]['acc'])} {_ci(info['methods'][m]['acc_ci'])}" for m in shown]
        lines.append(f"| {task} | {info['n']} | {_pct(info['chance'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _routing_table(summary: dict) -> list[str]:
    """Per task, each bank prompt forced (acc %) with the share of examples IDP sends to it in parentheses, and
    how often IDP's pick is the label-free oracle's."""
    forced = [m for m in summary["primary"]["methods"] if m.startswith("forced:")]
    lines = [
        "",
        "Per task, each bank prompt forced: accuracy % (share of the task's examples IDP selects it, %)",
        "",
        "| task | " + " | ".join(m[7:] for m in forced) + " | IDP | oracle | IDP = oracle % |",
        "|---|" + "---|" * (len(forced) + 3),
    ]
    for task, info in summary["per_task"].items():
        route = summary["routing"][task]
        cells = [f"{_pct(info['methods'][m]['acc'])} ({_pct(route['idp'].get(m, 0.0))})" for m in forced]
        idp, oracle = info["methods"]["idp"]["acc"], info["methods"][ORACLE]["acc"]
        lines.append(
            f"| {task} | " + " | ".join(cells) + f" | {_pct(idp)} | {_pct(oracle)} | {_pct(route['idp_is_oracle'])} |"
        )
    return lines
