"""`evaluate_all`: every method on the same test examples and held-out text, refused if any example leaked into
training data, summarised with confidence intervals, optionally checked against a live server."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedModel

from server.core.banks import PromptBank
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


@dataclass(frozen=True)
class Comparison:
    """What is compared, by `evaluate_all` and by the attention analysis: the base and compressed models, the IDP
    bank and the single prompt, the test examples (`limit` per task), the LoRA baseline's rank and learning rate
    (its adapter cached under `cache_dir`), and the device the models run on."""

    base_dir: Path
    compressed_dir: Path
    bank_dir: Path
    single_dir: Path | None
    tasks: Sequence[str] | None
    limit: int | None
    data_dir: Path
    cache_dir: Path
    lora_rank: int
    lora_lr: float
    device: torch.device | str = "cpu"

    def lora(self, base: PreTrainedModel, single: PromptBank | None) -> tuple[Method, dict] | None:
        """The LoRA baseline and its training record, when asked for and a single prompt gives its recipe."""
        if single is None or self.lora_rank <= 0:
            return None
        return lora_method(
            self.compressed_dir, base, single, self.data_dir, self.cache_dir, self.lora_rank, self.lora_lr
        )


def evaluate_all(
    comparison: Comparison,
    samples: int = 2000,
    server_url: str | None = None,
    server_limit: int = 3,
    ppl_blocks: int = HELDOUT_BLOCKS,
) -> dict:
    """Every method on the same test examples and held-out text; the raw records and the summary, as JSON data.

    Refuses to report if any evaluated example occurs in the training text of the bank, the single prompt or
    the LoRA (they all train on the train splits of `corpus.SOURCES`). With `server_url`, the first
    `server_limit` examples of each task are re-scored through that live server (serving the compressed model).
    Perplexity uses the first `ppl_blocks` held-out blocks.
    """
    c = comparison
    tasks = list(c.tasks or [*TASKS, *GEN_TASKS])
    base, methods, bank, single = load_methods(c.base_dir, c.compressed_dir, c.bank_dir, c.single_dir, c.device)
    methods.insert(0, Method("base", base))
    lora, lora_record = c.lora(base, single) or (None, None)
    if lora is not None:
        methods.append(lora)
    examples = eval_examples(tasks, c.limit)
    sources = {s for b in (bank, single) if b is not None for s in b.manifest.trained.get("sources", SOURCES)}
    if leaks := leaked_examples(sorted(sources), examples, c.data_dir):
        raise ValueError(f"test examples found in training data: {leaks[:10]}")
    tokenizer = AutoTokenizer.from_pretrained(c.compressed_dir)
    records = run_methods([m for m in methods if m.selector is None], tokenizer, examples)
    for method in (m for m in methods if m.selector is not None):
        records += selected_records(method, tokenizer, examples, records)
    blocks = heldout_blocks(c.compressed_dir, c.data_dir)[:ppl_blocks]
    summary = summarize(records, [m.name for m in methods], tasks, "compressed", samples)
    for method in tqdm(methods, desc="perplexity"):
        summary[method.name] |= {
            "ppl": method_perplexity(method, blocks),
            "trainable": method.trainable,
            "extra_tokens": method.extra_tokens,
        }
    sample = [r for r in records if r["example"] < server_limit]
    check = (
        check_server(server_url, c.compressed_dir.name, tokenizer, sample, examples, bank, single)
        if server_url
        else None
    )
    return {
        "server_check": check,
        "models": {"base": c.base_dir.name, "compressed": c.compressed_dir.name},
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
                "chance": chance(t, c.limit),
                "n": sum(1 for e in examples if e[0] == t),
                "kind": "gen" if t in GEN_TASKS else "mc",
            }
            for t in tasks
        },
        "limit": c.limit,
        "leaked_examples": 0,
        "lora": lora_record,
        "methods": summary,
        "records": records,
    }
