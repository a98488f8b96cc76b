"""The routing study: choose a bank's selection rule on dev inputs (docs/evaluation-protocol.md, section 7).

IDP can only beat its best single prompt if selection sends each input to a prompt that repairs it better. So
every input gets an **oracle prompt**, the bank prompt with the lowest KD loss on it (mean token KL from the base
model to the compressed model with that prompt), and a rule is judged by its **routing accuracy**: how often
its pick is the oracle prompt. The candidates are every `SelectionRule` the server can run: score mass or
mass_no_sink, centred or not (centre = each prompt's mean score over dev-A), over all layers, each single layer
or a contiguous run of up to 4 layers. dev-A chooses (ties to the simpler rule), dev-B reports.

The dev inputs are the dev splits of the tasks the bank trained on (its manifest's `trained.sources`, through
`corpus.SOURCES`) plus general dev text (`general_text`, split "dev"); test splits are never read. Each input
is selected from what the server would see (a task example's context without its answer; a general chunk's
first `select_len` tokens) and its oracle judged on the whole text (context + right answer; the whole chunk).

One pass per input measures everything the candidates need: the K losses and the per-layer scores of both score
variants (`CachedSelector.layer_scores`). These are cached, one JSON line per input, under the data dir, so an
interrupted run resumes and a changed candidate set costs nothing.

    python -m server.lab.routing --bank prompt_banks/default [--write]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from server.core.banks import SCORES, BankManifest, PromptBank, Score, SelectionRule, load_bank, save_bank
from server.core.selection import CachedSelector

MAX_RUN = 4
"""Longest contiguous run of layers a candidate rule may use (protocol section 7)."""

Half = Literal["A", "B"]
CACHE_VERSION = 1


@dataclass(frozen=True)
class DevInput:
    """One dev input: `select_ids` is what the server would select from, `loss_ids` what the oracle is judged on."""

    key: str
    source: str
    select_ids: tuple[int, ...]
    loss_ids: tuple[int, ...]


def half_of(key: str) -> Half:
    """dev-A or dev-B by a stable hash of the input's key (not its position, so adding inputs moves none)."""
    return "A" if hashlib.sha256(f"routing\0{key}".encode()).digest()[0] % 2 == 0 else "B"


def bank_task_sources(trained: dict) -> dict[str, tuple[str, ...]]:
    """Training source -> its tasks, from a manifest's `trained.sources` (sources without tasks, like news or
    general text, have no task dev split and are left out)."""
    from server.lab.corpus import SOURCES

    named = trained.get("sources") or []
    unknown = [s for s in named if s not in SOURCES]
    if unknown:
        raise ValueError(f"manifest field 'trained.sources' names {unknown}, not in corpus.SOURCES")
    return {source: SOURCES[source] for source in named if SOURCES[source]}


def task_inputs(
    tokenizer: PreTrainedTokenizerBase, source: str, tasks: Sequence[str], limit: int, max_tokens: int
) -> list[DevInput]:
    """Up to `limit` dev examples of a source, taken round-robin over its tasks in file order; an example whose
    context + answer exceeds `max_tokens` is skipped (the oracle's K forwards must fit)."""
    from server.lab.tasks import task_split

    per_task = [iter(task_split(task, "dev")) for task in tasks]
    chosen: list[DevInput] = []
    while per_task and len(chosen) < limit:
        for examples in list(per_task):
            example = next(examples, None)
            if example is None:
                per_task.remove(examples)
                continue
            full = tokenizer.encode(example.rendered())
            if len(full) <= max_tokens and len(chosen) < limit:
                digest = hashlib.sha256(example.context.encode()).hexdigest()[:16]
                context = tuple(tokenizer.encode(example.context))
                chosen.append(DevInput(f"{example.task}/{digest}", source, context, tuple(full)))
    return chosen


def general_inputs(
    tokenizer: PreTrainedTokenizerBase, data_dir: Path, limit: int, chunk_len: int, select_len: int
) -> list[DevInput]:
    """The first `limit` general dev chunks of `chunk_len` tokens (general_text's seeded block order)."""
    from server.lab.general_text import general_blocks

    blocks = general_blocks(tokenizer, data_dir, "dev", chunk_len)[:limit].tolist()
    return [
        DevInput(
            f"general/{hashlib.sha256(str(ids).encode()).hexdigest()[:16]}",
            "general",
            tuple(ids[:select_len]),
            tuple(ids),
        )
        for ids in blocks
    ]


# ----- measuring ------------------------------------------------------------------------------------------------


@torch.no_grad()
def kd_losses(
    student: PreTrainedModel, teacher: PreTrainedModel, prompts: torch.Tensor, ids: Sequence[int]
) -> list[float]:
    """Per prompt, the mean token KL(teacher || student with that prompt) over the positions predicting ids[1:].

    The K prompted forwards run as one batch; the LM head runs on the text positions only, and the KL is taken
    as sum p log p - sum p z + logsumexp z of the student's logits z, so no [K, n, V] log-softmax is made."""
    tokens = torch.tensor([list(ids)])
    target = teacher(input_ids=tokens).logits[0, :-1].float().log_softmax(-1)
    probs = target.exp()
    embeds = student.get_input_embeddings()(tokens).expand(len(prompts), -1, -1)
    m = prompts.shape[1]
    hidden = student.get_decoder()(inputs_embeds=torch.cat([prompts.to(embeds.dtype), embeds], dim=1))
    logits = student.get_output_embeddings()(hidden.last_hidden_state[:, m:-1]).float()
    cross = torch.einsum("tv,ktv->kt", probs, logits)
    kl = (probs * target).sum(-1) - cross + logits.logsumexp(-1)
    return kl.mean(-1).tolist()


def measure(
    selector: CachedSelector, student: PreTrainedModel, teacher: PreTrainedModel, prompts: torch.Tensor, item: DevInput
) -> dict:
    """The cache record of one input: its K oracle losses and per-layer scores [L][K] of each score variant."""
    scores = selector.layer_scores([list(item.select_ids)])
    return {
        "key": item.key,
        "source": item.source,
        "losses": kd_losses(student, teacher, prompts, item.loss_ids),
        **{score: scores[score][0].tolist() for score in SCORES},
    }


class MeasurementCache:
    """Measured inputs, one JSON line each after a header naming what they were measured with; another bank,
    student, teacher or input shape starts a fresh file rather than mixing numbers."""

    def __init__(self, path: Path, identity: dict) -> None:
        self.path = path
        self.identity = {"version": CACHE_VERSION, **identity}
        self.records: dict[str, dict] = {}
        if path.exists():
            lines = path.read_text().splitlines()
            if lines and json.loads(lines[0]) == self.identity:
                for line in lines[1:]:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by an interrupted run: measure it again
                        continue
                    self.records[record["key"]] = record
                return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.identity) + "\n")

    def add(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.records[record["key"]] = record


# ----- choosing -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A rule before its centre is fitted: `layers` None means all layers."""

    score: Score
    centred: bool
    layers: tuple[int, ...] | None

    def simplicity(self, num_layers: int) -> tuple:
        """Sort key, simplest first: the paper's score before its variant, uncentred before centred, fewer
        layers before more (all layers count as `num_layers`), then lower layers first (determinism)."""
        count = num_layers if self.layers is None else len(self.layers)
        return (SCORES.index(self.score), self.centred, count, self.layers or ())

    def describe(self) -> str:
        layers = "all" if self.layers is None else ",".join(map(str, self.layers))
        return f"{self.score}{'+centred' if self.centred else ''}@{layers}"


def candidates(num_layers: int) -> list[Candidate]:
    """Every candidate rule, simplest first: score x centred x (all, each layer, each run of 2..MAX_RUN)."""
    layer_sets: list[tuple[int, ...] | None] = [None]
    for size in range(1, MAX_RUN + 1):
        layer_sets += [tuple(range(start, start + size)) for start in range(num_layers - size + 1)]
    found = [Candidate(s, c, layers) for s in SCORES for c in (False, True) for layers in layer_sets]
    return sorted(found, key=lambda cand: cand.simplicity(num_layers))


def uncentred(layer_scores: dict[Score, np.ndarray], candidate: Candidate) -> np.ndarray:
    """Scores [N, K] of a candidate before centring, from per-layer scores [N, L, K]."""
    per_layer = layer_scores[candidate.score]
    chosen = per_layer if candidate.layers is None else per_layer[:, list(candidate.layers)]
    return chosen.mean(1)


def picks(scores: np.ndarray) -> np.ndarray:
    """argmax per row, ties to the lowest index (as the selectors break them)."""
    return scores.argmax(1)


@dataclass(frozen=True)
class Choice:
    candidate: Candidate
    centre: np.ndarray | None
    accuracy_a: float
    table: list[tuple[Candidate, float]]

    def rule(self, source: str) -> SelectionRule:
        centre = tuple(float(c) for c in self.centre) if self.centre is not None else None
        return SelectionRule(score=self.candidate.score, layers=self.candidate.layers, centre=centre, source=source)

    def scores(self, layer_scores: dict[Score, np.ndarray]) -> np.ndarray:
        """The chosen rule's final scores [N, K] on any inputs."""
        raw = uncentred(layer_scores, self.candidate)
        return raw - self.centre if self.centre is not None else raw


def choose(layer_scores: dict[Score, np.ndarray], oracle: np.ndarray, in_a: np.ndarray) -> Choice:
    """The candidate with the highest routing accuracy on dev-A (`in_a`), ties to the simpler rule; a centred
    candidate's centre is its mean uncentred score per prompt over dev-A."""
    num_layers = next(iter(layer_scores.values())).shape[1]
    best: Choice | None = None
    table = []
    for candidate in candidates(num_layers):
        raw = uncentred(layer_scores, candidate)[in_a]
        centre = raw.mean(0) if candidate.centred else None
        accuracy = float((picks(raw - centre if centre is not None else raw) == oracle[in_a]).mean())
        table.append((candidate, accuracy))
        if best is None or accuracy > best.accuracy_a:
            best = Choice(candidate, centre, accuracy, [])
    assert best is not None
    return Choice(best.candidate, best.centre, best.accuracy_a, table)


# ----- the study ------------------------------------------------------------------------------------------------


def loss_difference(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean of a - b (paired per input) with a 95% percentile bootstrap interval over inputs."""
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(1)
    return {"mean": float(diff.mean()), "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]}


def study(records: list[dict], prompt_names: list[str]) -> dict:
    """The report of the study on measured inputs: the choice on dev-A and what it does on dev-B, next to the
    majority baseline (the most frequent dev-A oracle prompt, always) and the best fixed prompt (lowest dev-A mean
    KD loss, always: what routing must beat in loss, not only in accuracy)."""
    from server.lab.pooled import wilson

    keys = [r["key"] for r in records]
    halves = np.array([half_of(key) for key in keys])
    in_a, in_b = halves == "A", halves == "B"
    if not in_a.any() or not in_b.any():
        raise ValueError(f"dev-A and dev-B both need inputs; have {int(in_a.sum())} and {int(in_b.sum())}")
    losses = np.array([r["losses"] for r in records])
    layer_scores = {score: np.array([r[score] for r in records]) for score in SCORES}
    oracle = losses.argmin(1)
    choice = choose(layer_scores, oracle, in_a)
    chosen = picks(choice.scores(layer_scores))
    paper = picks(uncentred(layer_scores, Candidate("mass", False, None)))
    majority = int(np.bincount(oracle[in_a], minlength=len(prompt_names)).argmax())
    best_fixed = int(losses[in_a].mean(0).argmin())
    rows = np.arange(len(records))

    def on_b(pick: np.ndarray) -> dict:
        hits = int((pick[in_b] == oracle[in_b]).sum())
        n = int(in_b.sum())
        return {
            "routing_accuracy": hits / n,
            "ci95": list(wilson(hits, n)),
            "mean_kd_loss": float(losses[rows, pick][in_b].mean()),
        }

    sources = sorted({r["source"] for r in records})
    return {
        "inputs": {
            "dev_a": int(in_a.sum()),
            "dev_b": int(in_b.sum()),
            "per_source": {s: sum(r["source"] == s for r in records) for s in sources},
        },
        "oracle_histogram": {
            half: {
                prompt_names[k]: int(v) for k, v in enumerate(np.bincount(oracle[mask], minlength=len(prompt_names)))
            }
            for half, mask in (("dev_a", in_a), ("dev_b", in_b))
        },
        "oracle_histogram_per_source": {
            s: dict(Counter(prompt_names[int(o)] for o, r in zip(oracle, records) if r["source"] == s)) for s in sources
        },
        "chosen": {
            "rule": choice.candidate.describe(),
            "score": choice.candidate.score,
            "layers": list(choice.candidate.layers) if choice.candidate.layers is not None else None,
            "centre": choice.centre.tolist() if choice.centre is not None else None,
            "dev_a_routing_accuracy": choice.accuracy_a,
            "dev_b": on_b(chosen),
        },
        "paper_rule_mass_all_layers": {
            "dev_a_routing_accuracy": float((paper[in_a] == oracle[in_a]).mean()),
            "dev_b": on_b(paper),
        },
        "majority_baseline": {"prompt": prompt_names[majority], "dev_b": on_b(np.full(len(records), majority))},
        "best_fixed_prompt": {
            "prompt": prompt_names[best_fixed],
            "dev_b": on_b(np.full(len(records), best_fixed)),
            "chosen_minus_fixed_kd_loss_dev_b": loss_difference(losses[rows, chosen][in_b], losses[in_b, best_fixed]),
        },
        "oracle_dev_b_mean_kd_loss": float(losses[rows, oracle][in_b].mean()),
        "candidates_dev_a": {c.describe(): a for c, a in sorted(choice.table, key=lambda t: -t[1])},
        "_choice": choice,
    }


def dev_set(
    tokenizer: PreTrainedTokenizerBase,
    data_dir: Path,
    sources: dict[str, tuple[str, ...]],
    per_source: int,
    chunk_len: int,
    select_len: int,
    max_tokens: int,
) -> list[DevInput]:
    """Every dev input of the study: `per_source` per training source, and as many general chunks."""
    inputs = [item for s, tasks in sources.items() for item in task_inputs(tokenizer, s, tasks, per_source, max_tokens)]
    return inputs + general_inputs(tokenizer, data_dir, per_source, chunk_len, select_len)


def run_measurements(
    items: list[DevInput], cache: MeasurementCache, selector: CachedSelector, student, teacher, prompts
) -> Iterator[dict]:
    """The record of every input, measuring (and caching) those the cache lacks, with a progress bar."""
    from tqdm.auto import tqdm

    for item in tqdm(items, desc="routing inputs", unit="input"):
        if item.key not in cache.records:
            cache.add(measure(selector, student, teacher, prompts, item))
        yield cache.records[item.key]


def write_rule(folder: Path, bank: PromptBank, rule: SelectionRule, report: dict) -> Path:
    """Record `rule` (and the study's dev-B numbers) in the bank's manifest; the tensor file is rewritten with the
    same bytes, so its sha256 (and every prompt) is unchanged."""
    measured = {
        **bank.manifest.measured,
        "routing_dev_b_accuracy": report["chosen"]["dev_b"]["routing_accuracy"],
        "routing_dev_b_majority_accuracy": report["majority_baseline"]["dev_b"]["routing_accuracy"],
    }
    data = {**bank.manifest.model_dump(), "selection": rule.model_dump(), "measured": measured}
    return save_bank(PromptBank(bank.embeddings, BankManifest.model_validate(data)), folder)


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from server.core.config import Settings
    from server.core.identity import DEFAULT_BASE, fingerprint, resolve, verified_weights_digest
    from server.core.selection import load_selection_model
    from server.lab.loading import load_model
    from server.lab.recipe import RUNS_DIR

    settings = Settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", type=Path, required=True, help="The bank folder.")
    parser.add_argument("--write", action="store_true", help="Record the chosen rule in the bank's manifest.")
    parser.add_argument("--tasks", default="", help="Comma-separated tasks, when the manifest names no sources.")
    parser.add_argument("--per-source", type=int, default=120, help="Dev inputs per source (and general chunks).")
    parser.add_argument("--chunk-len", type=int, default=192, help="Tokens of a general dev chunk.")
    parser.add_argument("--select-len", type=int, default=128, help="Tokens of a chunk the selection sees.")
    parser.add_argument("--max-tokens", type=int, default=384, help="Longest task example (context + answer).")
    parser.add_argument("--student", help="Compressed model (default: the bank manifest's model.weights).")
    parser.add_argument("--teacher", default=DEFAULT_BASE, help="The base model the oracle's KL is taken to.")
    parser.add_argument("--out", type=Path, help="Report path (default: bench/runs/routing/<bank>.json).")
    args = parser.parse_args(argv)
    torch.set_num_threads(settings.torch_threads)

    student_dir = resolve(args.student or load_bank(args.bank).manifest.model.weights, settings.models_dir)
    teacher_dir = resolve(args.teacher, settings.models_dir)
    bank = load_bank(args.bank, expect=fingerprint(student_dir))
    sources = (
        {task: (task,) for task in args.tasks.split(",")} if args.tasks else bank_task_sources(bank.manifest.trained)
    )
    if not sources:
        parser.error(f"{args.bank}: the manifest's trained.sources name no task; give --tasks")
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    items = dev_set(
        tokenizer, settings.data_dir, sources, args.per_source, args.chunk_len, args.select_len, args.max_tokens
    )
    identity = {
        "bank_sha256": bank.manifest.sha256,
        "student": verified_weights_digest(student_dir),
        "teacher": verified_weights_digest(teacher_dir),
        "chunk_len": args.chunk_len,
        "select_len": args.select_len,
    }
    cache = MeasurementCache(
        settings.data_dir / "routing-cache" / f"{bank.name}-{bank.manifest.sha256[:16]}.jsonl", identity
    )
    selector = CachedSelector(load_selection_model(student_dir), bank.embeddings)
    student, teacher = load_model(student_dir), load_model(teacher_dir)
    records = list(run_measurements(items, cache, selector, student, teacher, bank.embeddings))

    report = study(records, bank.prompt_names)
    choice: Choice = report.pop("_choice")
    out = args.out or RUNS_DIR / "routing" / f"{bank.name}.json"
    report = {
        "bank": bank.name,
        "bank_sha256": bank.manifest.sha256,
        "student": student_dir.name,
        "teacher": teacher_dir.name,
        **identity,
        "sources": {s: list(t) for s, t in sources.items()},
        "command": shlex.join(["python", "-m", "server.lab.routing", *(argv if argv is not None else sys.argv[1:])]),
        **report,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    chosen, accuracy = report["chosen"], lambda part: f"{part['dev_b']['routing_accuracy']:.3f}"
    print(
        f"chosen {chosen['rule']}: dev-A {chosen['dev_a_routing_accuracy']:.3f}, dev-B {accuracy(chosen)} "
        f"(majority {accuracy(report['majority_baseline'])}, "
        f"paper's rule {accuracy(report['paper_rule_mass_all_layers'])}); dev-B KD loss chosen - best fixed prompt "
        f"{report['best_fixed_prompt']['chosen_minus_fixed_kd_loss_dev_b']}; report {out}"
    )
    if args.write:
        rel = out.relative_to(RUNS_DIR.parent.parent) if out.is_relative_to(RUNS_DIR.parent.parent) else out
        print(write_rule(args.bank, bank, choice.rule(f"routing study {rel}"), report))


if __name__ == "__main__":
    main()
