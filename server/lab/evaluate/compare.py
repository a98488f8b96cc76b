"""`evaluate_all`: every method on the same test examples and held-out text, refused if any example leaked into
training data, summarised with confidence intervals, optionally checked against a live server."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from server.lab.corpus import SOURCES
from server.lab.evaluate.examples import GEN_TASKS, eval_examples
from server.lab.evaluate.leaks import leaked_examples
from server.lab.evaluate.lora import lora_method
from server.lab.evaluate.methods import Method, load_methods
from server.lab.evaluate.records import method_perplexity, run_methods, selected_records
from server.lab.evaluate.scoring import HELDOUT_BLOCKS, heldout_blocks
from server.lab.evaluate.server_check import check_server
from server.lab.evaluate.statistics import chance, summarize
from server.lab.tasks import TASKS


def evaluate_all(
    base_dir: Path,
    compressed_dir: Path,
    bank_dir: Path,
    single_dir: Path | None,
    tasks: Sequence[str] | None,
    limit: int | None,
    data_dir: Path,
    cache_dir: Path,
    lora_rank: int,
    lora_lr: float,
    samples: int = 2000,
    server_url: str | None = None,
    server_limit: int = 3,
    ppl_blocks: int = HELDOUT_BLOCKS,
    device: torch.device | str = "cpu",
) -> dict:
    """Every method on the same test examples and held-out text; the raw records and the summary, as JSON data.

    Refuses to report if any evaluated example occurs in the training text of the bank, the single prompt or
    the LoRA (they all train on the train splits of `corpus.SOURCES`). With `server_url`, the first
    `server_limit` examples of each task are re-scored through that live server (serving `compressed_dir`).
    Perplexity uses the first `ppl_blocks` held-out blocks. Models run on `device`.
    """
    tasks = list(tasks or [*TASKS, *GEN_TASKS])
    base, methods, bank, single = load_methods(base_dir, compressed_dir, bank_dir, single_dir, device)
    methods.insert(0, Method("base", base))
    lora_record = None
    if single is not None and lora_rank > 0:
        lora, lora_record = lora_method(compressed_dir, base, single, data_dir, cache_dir, lora_rank, lora_lr)
        methods.append(lora)
    examples = eval_examples(tasks, limit)
    sources = {s for b in (bank, single) if b is not None for s in b.manifest.trained.get("sources", SOURCES)}
    if leaks := leaked_examples(sorted(sources), examples, data_dir):
        raise ValueError(f"test examples found in training data: {leaks[:10]}")
    tokenizer = AutoTokenizer.from_pretrained(compressed_dir)
    records = run_methods([m for m in methods if m.selector is None], tokenizer, examples)
    for method in (m for m in methods if m.selector is not None):
        records += selected_records(method, tokenizer, examples, records)
    blocks = heldout_blocks(compressed_dir, data_dir)[:ppl_blocks]
    summary = summarize(records, [m.name for m in methods], tasks, "compressed", samples)
    for method in tqdm(methods, desc="perplexity"):
        summary[method.name] |= {
            "ppl": method_perplexity(method, blocks),
            "trainable": method.trainable,
            "extra_tokens": method.extra_tokens,
        }
    sample = [r for r in records if r["example"] < server_limit]
    check = (
        check_server(server_url, compressed_dir.name, tokenizer, sample, examples, bank, single) if server_url else None
    )
    return {
        "server_check": check,
        "models": {"base": base_dir.name, "compressed": compressed_dir.name},
        "banks": {
            "idp": bank.name,
            "k": bank.k,
            "m": bank.m,
            "prompts": bank.prompt_names,
            "trained": bank.manifest.trained.get("mode"),
            "selection_layers": bank.selection_layers,
            "single": single.name if single else None,
        },
        "tasks": {
            t: {
                "chance": chance(t, limit),
                "n": sum(1 for e in examples if e[0] == t),
                "kind": "gen" if t in GEN_TASKS else "mc",
            }
            for t in tasks
        },
        "limit": limit,
        "leaked_examples": 0,
        "lora": lora_record,
        "methods": summary,
        "records": records,
    }
