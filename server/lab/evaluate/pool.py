"""`idp-serve evaluate-pool`: the one command of docs/evaluation-protocol.md (section 8) on the screened pools.

What it evaluates comes from the screening (`screening.json`: primary pool, transfer task, do-no-harm set); every
method is scored on the same examples of every task. The work is cut into units (each task's evaluated split,
each primary-pool task's dev pass for the dev-chosen forced prompt, the held-out general text), each kept in its
own shard under `--out`: `--max-seconds` stops a run and the next one continues, and `--tasks` gives two
processes disjoint units. When every unit is complete, the report (`protocol.py`) is written from the shards.
Refused: test examples found in a training source, a transfer task that a training source contains, and shards
measured on other weights, banks or examples than the inputs given.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoTokenizer

from server.core.banks import PromptBank, load_bank, save_bank
from server.core.identity import fingerprint, verified_weights_digest
from server.core.selection import bank_selector, prepare_selection_model
from server.lab.corpus import SOURCES
from server.lab.evaluate.examples import EvalExample
from server.lab.evaluate.leaks import clean_split, leaked_examples, training_text
from server.lab.evaluate.outcomes import Deadline, Scorer, ScoringSet, Shard, example_record, text_record
from server.lab.evaluate.protocol import Pools, markdown, measured, report
from server.lab.general_text import documents
from server.lab.loading import freeze, load_model
from server.lab.lora_recipe import load_lora
from server.lab.tasks import chance as task_chance
from server.lab.tasks import task_split

MIN_POOL = 1_000
CAP_STEP = 100
DOC_BLOCKS = 2
GENERAL = "general"
"""The unit name of the held-out general text (for `--tasks`)."""
RECORD_KEY = ("index", "doc", "tokens")
"""What names a record's example (its index) or block of text (document, length): joined records must agree."""


@dataclass(frozen=True)
class PoolInputs:
    """Everything the evaluation depends on: folders, the screening, the caps, where shards go."""

    screening: Path
    base_dir: Path
    compressed_dir: Path
    bank_dir: Path
    single_dir: Path
    lora_dirs: tuple[Path, ...]
    data_dir: Path
    out: Path
    split: Literal["test", "dev"] = "test"
    cap: int = 400
    dev_cap: int = 100
    general_tokens: int = 20_000
    general_block: int = 256
    device: torch.device | str = "cpu"
    command: str = ""
    bootstrap: int = 10_000
    pools: Pools = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pools", Pools.from_screening(self.screening))

    def effective_cap(self) -> int:
        """Amendment 1: the per-task test cap, raised in steps of 100 until the primary pool holds >= 1,000
        examples (or every example of it); a dev smoke run keeps the cap it is given."""
        if self.split != "test":
            return self.cap
        sizes = [len(task_split(t, self.split)) for t in self.pools.primary]
        cap = self.cap
        while sum(min(cap, n) for n in sizes) < MIN_POOL and cap < max(sizes, default=0):
            cap += CAP_STEP
        return cap

    def describe(self) -> dict:
        """The inputs as recorded in the report (paths as given, the caps, the split)."""
        return {
            "screening": str(self.screening),
            "base": str(self.base_dir),
            "compressed": str(self.compressed_dir),
            "bank": str(self.bank_dir),
            "single": str(self.single_dir),
            "lora": [str(d) for d in self.lora_dirs],
            "split": self.split,
            "cap": self.cap,
            "effective_cap": self.effective_cap(),
            "dev_cap": self.dev_cap,
            "general_tokens": self.general_tokens,
            "general_block": self.general_block,
            "bootstrap": self.bootstrap,
        }

    def units(self) -> list[tuple[str, str]]:
        """(kind, task) of every unit: each task's evaluated split, each pool task's dev pass, general text, and
        per adapter (kind `lora:<run>`) its own evaluated split and general text: an adapter trained later adds
        its shards without touching the others'."""
        tasks = [("eval", t) for t in self.pools.tasks]
        adapters = [(f"lora:{d.name}", t) for d in self.lora_dirs for t in [*self.pools.tasks, GENERAL]]
        return tasks + [("dev-choice", t) for t in self.pools.primary] + [(GENERAL, GENERAL)] + adapters

    def shard_path(self, kind: str, task: str) -> Path:
        if kind == "eval":
            name = f"eval-{self.split}"
        elif kind.startswith("lora:"):
            name = f"{kind.removeprefix('lora:')}-{self.split}"
        else:
            name = kind
        return self.out / "shards" / name / f"{task}.json"


def folder_digest(folder: Path) -> str:
    """sha256 over a folder's files (names and bytes, sorted): a bank's manifest and prompts, an adapter."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def bank_digest(bank: PromptBank) -> str:
    """sha256 of what decides a bank's outcomes: its manifest (which names the prompts' tensor sha256, the model,
    the selection rule) without `measured`, so writing this evaluation's results into the manifest keeps its
    shards valid."""
    manifest = bank.manifest.model_dump(mode="json", exclude={"measured"})
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def fingerprints(inputs: PoolInputs, banks: tuple[PromptBank, PromptBank]) -> dict[str, str | None]:
    """Weights digests of the models, digests of the banks, adapters and screening: a shard is tied to them."""
    return {
        "base": verified_weights_digest(inputs.base_dir),
        "compressed": verified_weights_digest(inputs.compressed_dir),
        "bank": bank_digest(banks[0]),
        "single": bank_digest(banks[1]),
        **{f"lora:{d.name}": folder_digest(d) for d in inputs.lora_dirs},
        "screening": hashlib.sha256(inputs.screening.read_bytes()).hexdigest(),
    }


def load_banks(inputs: PoolInputs) -> tuple[PromptBank, PromptBank]:
    """The IDP bank and the single prompt, each verified against the compressed model's fingerprint."""
    model_print = fingerprint(inputs.compressed_dir)
    return load_bank(inputs.bank_dir, expect=model_print), load_bank(inputs.single_dir, expect=model_print)


def training_sources(banks: tuple[PromptBank, ...]) -> list[str]:
    """The sources the banks' manifests name (every `corpus.SOURCES` domain when one names none), so a check
    never passes because a manifest forgot to say what it trained on."""
    return sorted({s for b in banks for s in b.manifest.trained.get("sources", SOURCES)})


def check_sources(inputs: PoolInputs, banks: tuple[PromptBank, ...], examples: list[EvalExample]) -> None:
    """Refuse evaluated examples found in a training source, and a transfer task a training source contains."""
    names = training_sources(banks)
    transfer = inputs.pools.transfer
    if transfer is not None and (holders := [s for s in names if transfer in SOURCES.get(s, ())]):
        raise ValueError(f"transfer task {transfer} is in the training source(s) {', '.join(holders)}")
    if leaks := leaked_examples(names, examples, inputs.data_dir):
        raise ValueError(f"evaluated examples found in training data ({len(leaks)}): {', '.join(leaks[:10])}")


def general_items(tokenizer, inputs: PoolInputs) -> list[tuple[str, list[int]]]:
    """(document id, token ids) blocks of the held-out general slice: documents in the order of a hash of their
    id (a fair mix of the sources), the first DOC_BLOCKS blocks of `general_block` tokens of each (a last piece
    of >= 16 kept; no single long article outweighs the rest), until >= `general_tokens` predicted tokens."""
    docs = sorted(documents(inputs.data_dir, "heldout"), key=lambda d: hashlib.sha256(d.doc_id.encode()).hexdigest())
    items, total = [], 0
    for doc in docs:
        if total >= inputs.general_tokens:
            break
        ids = tokenizer(doc.text)["input_ids"][: DOC_BLOCKS * inputs.general_block]
        for start in range(0, len(ids), inputs.general_block):
            block = ids[start : start + inputs.general_block]
            if len(block) >= 16:
                items.append((doc.doc_id, block))
                total += len(block) - 1
    return items


def load_scoring(inputs: PoolInputs, bank: PromptBank, single: PromptBank) -> ScoringSet:
    """The base model, every directly scored method (compressed, single, forced prompts, LoRAs) and IDP's
    selector over the bank (the manifest's selection rule, as the server selects), on the inputs' device."""
    base = Scorer("base", freeze(load_model(inputs.base_dir, inputs.device)))
    compressed = prepare_selection_model(load_model(inputs.compressed_dir, inputs.device))
    prompts = bank.embeddings.to(compressed.device)
    scorers = [
        Scorer("compressed", compressed),
        Scorer("single", compressed, single.embeddings[0].to(compressed.device)),
        *(Scorer(f"forced:{name}", compressed, prompts[k]) for k, name in enumerate(bank.prompt_names)),
        *(lora_scorer(inputs, folder) for folder in inputs.lora_dirs),
    ]
    return ScoringSet(base, scorers, bank_selector(compressed, bank), bank.prompt_names)


def own_domains(bank: PromptBank, tasks: list[str]) -> dict[str, str]:
    """Per evaluated task, the bank prompt trained on it: the one prompt whose manifest sources hold the task
    (`corpus.SOURCES`); tasks no prompt, or several, trained on are left out."""
    prompts = bank.manifest.trained.get("prompts", {})
    sources = {p: prompts.get(p, {}).get("sources", ()) for p in bank.prompt_names}
    out = {}
    for task in tasks:
        holders = [p for p, names in sources.items() if any(task in SOURCES.get(s, ()) for s in names)]
        if len(holders) == 1:
            out[task] = holders[0]
    return out


def trainable_parameters(inputs: PoolInputs, bank: PromptBank, single: PromptBank) -> dict[str, int]:
    """What each method trained: one prompt (single, each forced), the bank (IDP), the adapter (LoRA)."""
    counts = {"base": 0, "compressed": 0, "single": single.embeddings.numel(), "idp": bank.embeddings.numel()}
    counts |= {f"forced:{name}": bank.m * bank.hidden_size for name in bank.prompt_names}
    counts |= {f"lora:{d.name}": load_lora(d, inputs.compressed_dir)[1] for d in inputs.lora_dirs}
    return counts


def prompt_tokens(inputs: PoolInputs, bank: PromptBank, single: PromptBank) -> dict[str, int]:
    """Virtual tokens each method puts in front of every request (a merged adapter none): the prefill and KV
    cache it adds, besides IDP's selection pass."""
    counts = {"base": 0, "compressed": 0, "single": single.m, "idp": bank.m}
    return (
        counts
        | {f"forced:{name}": bank.m for name in bank.prompt_names}
        | {f"lora:{d.name}": 0 for d in inputs.lora_dirs}
    )


def lora_scorer(inputs: PoolInputs, run_dir: Path) -> Scorer:
    """The compressed model with the best-dev adapter of a LoRA run (`lora_recipe`) merged in: inference is one
    plain forward, as a served merged adapter would be."""
    model, _ = load_lora(run_dir, inputs.compressed_dir, inputs.device, merge=True)
    return Scorer(f"lora:{run_dir.name}", model)


def scored_names(bank: PromptBank) -> list[str]:
    """The directly scored methods of the main units besides base, in scoring order (IDP is looked up, never
    scored; adapters score in their own units)."""
    return ["compressed", "single", *(f"forced:{name}" for name in bank.prompt_names)]


@dataclass(frozen=True)
class Unit:
    """A piece of the evaluation with its own shard: `items` are examples or (document id, token ids) blocks."""

    kind: str
    task: str
    split: str
    items: list
    methods: list[str]
    removed: list[int] = field(default_factory=list)
    """Split positions skipped as contaminated (amendment 2): the items are the split minus these, capped."""

    def scoring(self, full: ScoringSet) -> ScoringSet:
        """The dev pass scores the forced prompts alone, an adapter's unit the base model and the adapter; the
        others every method but the adapters."""
        if self.kind == "eval" or self.kind == GENERAL:
            return replace(full, scorers=[s for s in full.scorers if s.name in self.methods])
        base = full.base if "base" in self.methods else None
        return ScoringSet(base, [s for s in full.scorers if s.name in self.methods], None, ())

    def record(self, scoring: ScoringSet, tokenizer, index: int) -> dict:
        if self.task == GENERAL:
            return text_record(scoring, *self.items[index])
        return example_record(scoring, tokenizer, index, self.items[index])


def plan(inputs: PoolInputs, bank: PromptBank, tokenizer, training: str) -> list[Unit]:
    """Every unit of the evaluation, with its items (task examples found in the `training` text removed) and
    methods."""
    scored, cap = scored_names(bank), inputs.effective_cap()
    units = []
    for kind, task in inputs.units():
        methods = ["base", kind] if kind.startswith("lora:") else ["base", *scored, "idp"]
        if task == GENERAL:
            units.append(Unit(kind, task, "heldout", general_items(tokenizer, inputs), methods))
        elif kind == "eval" or kind.startswith("lora:"):
            items, removed = clean_split(task, inputs.split, cap, training)
            units.append(Unit(kind, task, inputs.split, items, methods, removed))
        else:
            forced = [m for m in scored if m.startswith("forced:")]
            items, removed = clean_split(task, "dev", inputs.dev_cap, training)
            units.append(Unit(kind, task, "dev", items, forced, removed))
    return units


@dataclass(frozen=True)
class Prepared:
    """The checked inputs of a run: fingerprints, banks (verified for the model, no leaks), tokenizer, units."""

    prints: dict[str, str | None]
    bank: PromptBank
    single: PromptBank
    tokenizer: object
    units: list[Unit]


def prepare(inputs: PoolInputs) -> Prepared:
    """Fingerprint and check the inputs (refusing leaks and a transfer task in training data), plan the units."""
    bank, single = load_banks(inputs)
    prints = fingerprints(inputs, (bank, single))
    tokenizer = AutoTokenizer.from_pretrained(inputs.compressed_dir)
    units = plan(inputs, bank, tokenizer, training_text(training_sources((bank, single)), inputs.data_dir))
    evaluated = [(u.task, i, e) for u in units if u.kind == "eval" for i, e in enumerate(u.items)]
    check_sources(inputs, (bank, single), evaluated)
    return Prepared(prints, bank, single, tokenizer, units)


def unit_prints(unit: Unit, prints: dict[str, str | None]) -> dict[str, str | None]:
    """The fingerprints a unit's outcomes depend on: an adapter's unit its adapter's, the others every input but
    the adapters."""
    if unit.kind.startswith("lora:"):
        return {k: prints[k] for k in ("base", "compressed", unit.kind, "screening")}
    return {k: v for k, v in prints.items() if not k.startswith("lora:")}


def merged_records(shards: dict[tuple[str, str], Shard]) -> dict[tuple[str, str], list[dict]]:
    """Every unit's records, with each adapter's outcomes joined into its task's (or the general text's) main
    records, example by example, so the report sees one record per example with every method."""
    records = {k: [dict(r) for r in s.records] for k, s in shards.items() if not k[0].startswith("lora:")}
    for (kind, task), shard in shards.items():
        if not kind.startswith("lora:"):
            continue
        main = records[(GENERAL, GENERAL) if task == GENERAL else ("eval", task)]
        for record, extra in zip(main, shard.records, strict=True):
            if [record.get(k) for k in RECORD_KEY] != [extra.get(k) for k in RECORD_KEY]:
                raise ValueError(f"{shard.path}: its examples are not those of the {task} unit")
            for name in ("picks", "picks_norm", "kl", "nll"):
                if name in extra:
                    record[name] = record[name] | {kind: extra[name][kind]}
    return records


def shard_for(inputs: PoolInputs, unit: Unit, prints: dict) -> Shard:
    """The unit's shard, refused when it was measured on other inputs, methods or items."""
    header = {
        "unit": unit.kind,
        "task": unit.task,
        "split": unit.split,
        "count": len(unit.items),
        "removed": unit.removed,
        "methods": unit.methods,
        "fingerprints": unit_prints(unit, prints),
        **(
            {"general_block": inputs.general_block, "general_tokens": inputs.general_tokens}
            if unit.task == GENERAL
            else {}
        ),
    }
    return Shard(inputs.shard_path(unit.kind, unit.task), header)


def run_units(inputs: PoolInputs, prepared: Prepared, only: list[str] | None, max_seconds: float) -> bool:
    """Score the units of `only` (task names and/or "general"; None: all) until done or `max_seconds`; return
    whether they are complete. Models load only when a unit needs scoring."""
    deadline = Deadline(max_seconds)
    full: ScoringSet | None = None
    for unit in (u for u in prepared.units if only is None or u.task in only):
        shard = shard_for(inputs, unit, prepared.prints)
        if len(shard.records) >= len(unit.items):
            continue
        print(f"{unit.kind} {unit.task}: {len(shard.records)}/{len(unit.items)} done", flush=True)
        full = full or load_scoring(inputs, prepared.bank, prepared.single)
        record = functools.partial(unit.record, unit.scoring(full), prepared.tokenizer)
        if not shard.fill(len(unit.items), record, deadline):
            print(f"stopped in {unit.kind} {unit.task} after {max_seconds:.0f} s; run again to continue", flush=True)
            return False
    return True


def write_measured(inputs: PoolInputs, prepared: Prepared, summary: dict) -> None:
    """Record what the served methods measured (IDP for the bank, the single prompt for its bank) in their
    manifests' `measured`; the prompts and the selection rule stay as they are, and so do the shards'
    fingerprints (`bank_digest` leaves `measured` out)."""
    served = ((inputs.bank_dir, prepared.bank, "idp"), (inputs.single_dir, prepared.single, "single"))
    for folder, bank, method in served:
        update = bank.manifest.measured | measured(summary, method, inputs.split)
        save_bank(replace(bank, manifest=bank.manifest.model_copy(update={"measured": update})), folder)


def evaluate_pool(
    inputs: PoolInputs, only: list[str] | None, max_seconds: float, score: bool = True, write: bool = False
) -> Path | None:
    """Score what is missing of `only` (nothing when `score` is False), then, when every unit is complete, write
    the report (`evaluation-<split>.json` with every outcome, and `.md`) under `out` and return the JSON's path
    (and with `write`, the served methods' results into the banks' manifests); None while units are missing."""
    known = {task for _, task in inputs.units()}
    if only is not None and (unknown := [t for t in only if t not in known]):
        raise ValueError(f"--tasks: {', '.join(unknown)} not evaluated here; the units are {', '.join(sorted(known))}")
    prepared = prepare(inputs)
    if score and not run_units(inputs, prepared, only, max_seconds):
        return None
    shards = {(u.kind, u.task): shard_for(inputs, u, prepared.prints) for u in prepared.units}
    if missing := [f"{k} {t}" for (k, t), s in shards.items() if len(s.records) < s.header["count"]]:
        print(f"not complete yet: {', '.join(missing)}", flush=True)
        return None
    chance = {u.task: task_chance(u.items) for u in prepared.units if u.kind == "eval"}
    trainable = trainable_parameters(inputs, prepared.bank, prepared.single)
    tokens = prompt_tokens(inputs, prepared.bank, prepared.single)
    domains = own_domains(prepared.bank, list(chance))
    summary = report(inputs.pools, merged_records(shards), chance, trainable, tokens, inputs.bootstrap, domains)
    out = inputs.out / f"evaluation-{inputs.split}.json"
    body = {
        "command": inputs.command,
        "protocol": "docs/evaluation-protocol.md",
        "inputs": inputs.describe(),
        "fingerprints": prepared.prints,
        "summary": summary,
        "shards": [{"header": s.header, "records": s.records} for s in shards.values()],
    }
    for path, text in ((out, json.dumps(body)), (out.with_suffix(".md"), markdown(summary, inputs.command))):
        tmp = path.with_suffix(".tmp")  # two processes finishing together each write the whole file, atomically
        tmp.write_text(text)
        os.replace(tmp, path)
    if write:
        write_measured(inputs, prepared, summary)
    return out
