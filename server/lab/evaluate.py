"""Offline evaluation: held-out perplexity, task accuracy, and `idp-serve evaluate`, the paper's comparison.

Perplexity and scores are computed on float32 weights (fast on these CPUs) from the same folder vLLM serves.
`evaluate_all` runs every method on the same test examples: the base model, the compressed model, the single
prompt, IDP over the bank, each bank prompt forced, and a LoRA trained like the single prompt at a comparable
parameter budget. Multiple choice is scored by log-likelihood with the prompt chosen from the context alone;
generative tasks by exact match of a greedy answer. `check_server` re-scores records through a live server's
`/v1/completions` (echo + logprobs of token ids), which must give the same numbers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedModel

from server.core.banks import PromptBank, load_bank
from server.lab.corpus import SOURCES, lee_heldout, source_texts, token_blocks
from server.core.identity import fingerprint
from server.core.selection import CachedSelector, prepare_selection_model
from server.lab.loading import load_model
from server.lab.tasks import TASKS, Example, task_split
from server.lab.train import Models, TrainSpec, batch_stream, freeze, loss_summary, prompt_loss, source_blocks

if TYPE_CHECKING:
    import httpx

HELDOUT_BLOCKS = 8
HELDOUT_LEN = 256


def heldout_blocks(folder: Path, data_dir: Path) -> torch.Tensor:
    """The fixed held-out evaluation text (Lee `lee.cor`) as [HELDOUT_BLOCKS, HELDOUT_LEN] token ids."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return token_blocks(tokenizer, lee_heldout(data_dir), HELDOUT_LEN, HELDOUT_BLOCKS)


@torch.no_grad()
def perplexity(model: PreTrainedModel, blocks: torch.Tensor, prompt: torch.Tensor | None = None) -> float:
    """exp(mean next-token NLL over the text tokens), optionally behind a soft prompt [m, d].

    The prompt's own positions carry no loss: only the text is scored, so numbers with and without a prompt
    are comparable.
    """
    total, count = 0.0, 0
    embed = model.get_input_embeddings()
    for row in blocks:
        ids = row.unsqueeze(0)
        embeds = embed(ids)
        if prompt is not None:
            embeds = torch.cat([prompt.unsqueeze(0).to(embeds.dtype), embeds], dim=1)
        logits = model(inputs_embeds=embeds).logits[0, -ids.shape[1]:-1]
        total += torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(total / count)


def record_perplexity(folder: Path, data_dir: Path) -> float:
    """Measure a model folder's held-out perplexity and keep it in its model card (twin included)."""
    from server.core.identity import read_card, write_card

    ppl = perplexity(load_model(folder), heldout_blocks(folder, data_dir))
    for path in {folder} | ({folder.parent / card.twin} if (card := read_card(folder)) and card.twin else set()):
        if (c := read_card(path)) is not None:
            c.measured["heldout_ppl"] = round(ppl, 3)
            write_card(path, c)
    return ppl


@torch.no_grad()
def choice_logprobs(model: PreTrainedModel, tokenizer, example, prompt: torch.Tensor | None = None) -> list[float]:
    """Sum of log-probabilities of each choice's tokens after the context (behind an optional soft prompt).

    All choices of an item go through the model as one right-padded batch; the context is tokenized once and
    each choice's tokens appended, so every choice is scored against the same context tokens.
    """
    context = tokenizer(example.context)["input_ids"]
    rows = [context + tokenizer(choice, add_special_tokens=False)["input_ids"] for choice in example.choices]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    embeds = model.get_input_embeddings()(ids)
    if prompt is not None:
        embeds = torch.cat([prompt.expand(len(rows), -1, -1), embeds], dim=1)
    # only the positions that predict choice tokens go through the LM head (a fifth of this model's compute)
    keep = width - len(context) + 1
    logprobs = model(inputs_embeds=embeds, logits_to_keep=keep).logits[:, :-1].log_softmax(-1)
    scores = []
    for i, row in enumerate(rows):
        targets = torch.tensor(row[len(context):])
        scores.append(logprobs[i, torch.arange(len(targets)), targets].sum().item())
    return scores


def mc_accuracy(model: PreTrainedModel, tokenizer, examples, prompt: torch.Tensor | None = None) -> float:
    """Multiple-choice accuracy by log-likelihood (the highest-scoring choice must be the right one)."""
    right = 0
    for example in examples:
        scores = choice_logprobs(model, tokenizer, example, prompt)
        right += int(max(range(len(scores)), key=scores.__getitem__) == example.answer)
    return right / len(examples)


# ----- `idp-serve evaluate`: every method on the same examples -------------------------------------------------

GEN_TASKS: dict[str, str] = {f"{task}:gen": task for task in ("general_knowledge", "human_organs_senses")}
"""Generative tasks derived from MC tasks: greedy answers scored by exact match against the right choice.

Chosen by a probe where the base model answers some items exactly (3-shot) and the compressed model fewer;
zero-shot, SmolLM2-135M matched none on any task, which would make the comparison empty.
"""
GEN_MAX_TOKENS = 16
GEN_SHOTS = 3


@dataclass(frozen=True, eq=False)
class Method:
    """One way to run a model on an input, as the report compares them.

    `prompts` None: the model alone; [1, m, d]: that prompt in front of every input; [K, m, d] with a `selector`:
    IDP, the prompt chosen per input by the selection pass over the input alone (never over an answer).
    """

    name: str
    model: PreTrainedModel
    prompts: torch.Tensor | None = None
    prompt_names: tuple[str, ...] = ()
    selector: CachedSelector | None = None
    trainable: int = 0

    @property
    def extra_tokens(self) -> int:
        """Virtual tokens decoded in front of each request (what a prompt costs at inference)."""
        return 0 if self.prompts is None else int(self.prompts.shape[1])

    def choose(self, ids: list[int]) -> tuple[torch.Tensor | None, str | None, float]:
        """The prompt for input `ids`, its name and the selection pass's wall seconds (0 without selection)."""
        if self.prompts is None:
            return None, None, 0.0
        if self.selector is None:
            return self.prompts[0], self.prompt_names[0], 0.0
        chosen = self.selector.select([ids])[0]
        return self.prompts[chosen.index], self.prompt_names[chosen.index], chosen.seconds


def bank_methods(model: PreTrainedModel, bank: PromptBank, single: PromptBank | None) -> list[Method]:
    """The prompt methods on the compressed `model` (a selection model): single prompt, IDP, each prompt forced.

    IDP selects with the bank's own selection layers, as the server does; when the bank has some, the paper's
    all-layer rule runs too (`idp:all-layers`), so the report shows what the calibration changed.
    """
    params, names = bank.embeddings.numel(), tuple(bank.prompt_names)
    methods = [Method("single", model, single.embeddings, tuple(single.prompt_names), trainable=single.embeddings.numel())
               ] if single is not None else []
    selector = CachedSelector(model, bank.embeddings, bank.selection_layers)
    methods.append(Method("idp", model, bank.embeddings, names, selector, params))
    if bank.selection_layers is not None:
        methods.append(Method("idp:all-layers", model, bank.embeddings, names, CachedSelector(model, bank.embeddings),
                              params))
    methods += [Method(f"forced:{name}", model, bank.embeddings[k:k + 1], (name,), trainable=params)
                for k, name in enumerate(bank.prompt_names)]
    return methods


def request_ids(tokenizer, task: str, example: Example) -> list[int]:
    """What a request holds for an example, all that selection may see: the context (multiple choice), or
    the demonstrations and the question (generative tasks, see `gen_record`)."""
    if task in GEN_TASKS:
        return tokenizer(shots(example.task) + example.context.rstrip())["input_ids"]
    return tokenizer(example.context)["input_ids"]


def mc_record(method: Method, tokenizer, example: Example) -> dict:
    """Score every choice behind the prompt chosen from the context alone; the prediction is the best choice."""
    prompt, name, seconds = method.choose(request_ids(tokenizer, example.task, example))
    scores = choice_logprobs(method.model, tokenizer, example, prompt)
    pred = max(range(len(scores)), key=scores.__getitem__)
    return {"prompt": name, "select_s": seconds, "scores": scores, "pred": pred, "correct": int(pred == example.answer)}


@torch.no_grad()
def greedy(model: PreTrainedModel, tokenizer, ids: list[int], prompt: torch.Tensor | None, max_new: int) -> str:
    """Greedy continuation of `ids` behind an optional soft prompt, stopped at EOS (the tokenizer's or the
    generation config's, e.g. an instruct model's end of turn) or at the first newline."""
    embeds = model.get_input_embeddings()(torch.tensor([ids]))
    if prompt is not None:
        embeds = torch.cat([prompt[None].to(embeds.dtype), embeds], dim=1)
    out = model(inputs_embeds=embeds, use_cache=True)
    stop = {tokenizer.eos_token_id, *np.atleast_1d(model.generation_config.eos_token_id or []).tolist()}
    new: list[int] = []
    for _ in range(max_new):
        token = int(out.logits[0, -1].argmax())
        if token in stop or "\n" in tokenizer.decode([token]):
            break
        new.append(token)
        out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokenizer.decode(new)


def normalize(text: str) -> str:
    """An answer's first line, lower case, without surrounding spaces or a final period (BIG-bench style EM)."""
    return text.strip().split("\n")[0].strip().rstrip(".").strip().lower()


@functools.cache
def shots(task: str) -> str:
    """The few-shot demonstrations of a generative task: its first GEN_SHOTS train examples, answered."""
    return "".join(e.rendered() + "\n\n" for e in task_split(task, "train", GEN_SHOTS))


def gen_record(method: Method, tokenizer, example: Example) -> dict:
    """Exact match of the greedy answer to the right choice, after `shots` (the prompt is chosen from this
    request, demonstrations and question, alone). The context's trailing space is dropped: a lone space token
    is not how answers start in text, and after it the small model mostly emits a newline."""
    ids = request_ids(tokenizer, f"{example.task}:gen", example)
    prompt, name, seconds = method.choose(ids)
    output = greedy(method.model, tokenizer, ids, prompt, GEN_MAX_TOKENS)
    target = example.choices[example.answer]
    return {"prompt": name, "select_s": seconds, "output": output, "target": target,
            "correct": int(normalize(output) == normalize(target))}


def eval_examples(tasks: Sequence[str], limit: int | None) -> list[tuple[str, int, Example]]:
    """(task, index, example) of the test split of each task (MC names or GEN_TASKS names), `limit` per task."""
    return [(task, i, e) for task in tasks for i, e in enumerate(task_split(GEN_TASKS.get(task, task), "test", limit))]


def run_methods(methods: Sequence[Method], tokenizer, examples: list[tuple[str, int, Example]]) -> list[dict]:
    """Per-example records of every method on the same examples, with wall seconds per example."""
    records = []
    for method in methods:
        for task, index, example in tqdm(examples, desc=method.name):
            start = time.perf_counter()
            record = (gen_record if task in GEN_TASKS else mc_record)(method, tokenizer, example)
            records.append({"method": method.name, "task": task, "example": index,
                            "seconds": time.perf_counter() - start, **record})
    return records


def selected_records(method: Method, tokenizer, examples: list[tuple[str, int, Example]],
                     records: list[dict]) -> list[dict]:
    """Records of a selecting method (IDP) from those of the forced prompts: select on each request, then take the
    chosen prompt's forced record. Decoding behind the chosen prompt is exactly forcing it (the end-to-end test
    checks it against decoding), so this saves a decode per example; `seconds` adds the selection pass."""
    forced = {(r["method"], r["task"], r["example"]): r for r in records}
    out = []
    for task, index, example in tqdm(examples, desc=method.name):
        _, name, seconds = method.choose(request_ids(tokenizer, task, example))
        twin = forced[f"forced:{name}", task, index]
        out.append(twin | {"method": method.name, "prompt": name, "select_s": seconds,
                           "seconds": twin["seconds"] + seconds})
    return out


def method_perplexity(method: Method, blocks: torch.Tensor) -> float:
    """Held-out perplexity; IDP selects per block from the block itself, as the server does for an echo request.

    Blocks have equal lengths, so the geometric mean of per-block perplexities is the overall perplexity.
    """
    logs = []
    for row in blocks:
        prompt, _, _ = method.choose(row.tolist())
        logs.append(math.log(perplexity(method.model, row[None], prompt)))
    return math.exp(sum(logs) / len(logs))


def bootstrap_ci(groups: Sequence[Sequence[float]], samples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of group means, resampling examples within each group.

    Stratified by task so that the average over tasks keeps every task's weight; pass per-example differences
    of two methods on the same examples for a paired CI of their difference.
    """
    rng = np.random.default_rng(seed)
    means = np.zeros(samples)
    for group in groups:
        values = np.asarray(group, dtype=float)
        means += values[rng.integers(0, len(values), (samples, len(values)))].mean(axis=1)
    means /= len(groups)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def chance(task: str, limit: int | None) -> float:
    """Accuracy of a uniform random guess on the evaluated examples (0 for generative tasks)."""
    if task in GEN_TASKS:
        return 0.0
    examples = task_split(task, "test", limit)
    return sum(1 / len(e.choices) for e in examples) / len(examples)


def summarize(records: list[dict], methods: Sequence[str], tasks: Sequence[str], reference: str,
              samples: int = 2000) -> dict[str, dict]:
    """Per method: accuracy and CI per task, the average over tasks, and paired differences to `reference`."""
    def correct(method: str, task: str) -> list[int]:
        rows = sorted((r for r in records if r["method"] == method and r["task"] == task), key=lambda r: r["example"])
        return [r["correct"] for r in rows]

    out = {}
    for method in methods:
        per_task = {t: correct(method, t) for t in tasks}
        diffs = [[a - b for a, b in zip(per_task[t], correct(reference, t), strict=True)] for t in tasks]
        mine = [r for r in records if r["method"] == method]
        out[method] = {
            "tasks": {t: {"acc": float(np.mean(v)), "ci": bootstrap_ci([v], samples), "n": len(v),
                          "delta_ci": bootstrap_ci([d], samples)} for (t, v), d in zip(per_task.items(), diffs)},
            "avg": float(np.mean([np.mean(v) for v in per_task.values()])),
            "avg_ci": bootstrap_ci(list(per_task.values()), samples),
            "delta": float(np.mean([np.mean(d) for d in diffs])),
            "delta_ci": bootstrap_ci(diffs, samples),
            "select_ms": 1000 * float(np.mean([r["select_s"] for r in mine])),
            "seconds": float(np.mean([r["seconds"] for r in mine])),
        }
    return out


# ----- the LoRA baseline: same objective, data and steps as the single prompt -----------------------------------

LORA_TARGETS = ("q_proj", "v_proj")


def train_lora(model: PreTrainedModel, teacher: PreTrainedModel, data: torch.Tensor, spec: TrainSpec,
               lr: float) -> list[float]:
    """Train the LoRA parameters of a PEFT `model` in place with the prompts' loss (`train.prompt_loss`, no prompt).

    Same batches (seeded stream), objective and steps as a single prompt trained with `spec`; only the learning
    rate is LoRA's own, since weight deltas and input embeddings live on different scales.
    """
    generator = torch.Generator().manual_seed(spec.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    batches = batch_stream(data, spec.batch_size, generator)
    no_prompt = torch.zeros(spec.batch_size, 0, model.get_input_embeddings().embedding_dim)
    losses: list[float] = []
    for _ in (bar := tqdm(range(spec.steps), desc="lora")):
        loss = prompt_loss(Models(model, teacher), no_prompt, next(batches), spec.objective).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def lora_method(student_dir: Path, teacher: PreTrainedModel, single: PromptBank, data_dir: Path, cache_dir: Path,
                rank: int, lr: float) -> tuple[Method, dict]:
    """The compressed model with a rank-`rank` LoRA on q/v, trained like `single` was (its manifest's spec and
    sources), merged for inference; the adapter is cached under `cache_dir` by a hash of everything it depends on.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    spec = TrainSpec(**single.manifest.trained["spec"])
    sources = tuple(single.manifest.trained["sources"])
    key = json.dumps([student_dir.name, teacher.name_or_path, spec.model_dump(), sources, rank, lr], sort_keys=True)
    folder = cache_dir / f"lora-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    student = freeze(load_model(student_dir))
    if (folder / "record.json").is_file():
        model = PeftModel.from_pretrained(student, folder)
    else:
        torch.manual_seed(spec.seed)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
        model = get_peft_model(student, config)
        tokenizer = AutoTokenizer.from_pretrained(student_dir)
        data = torch.cat(list(source_blocks(tokenizer, sources, data_dir, spec.seq_len, heldout=False).values()))
        losses = train_lora(model, teacher, data, spec, lr)
        model.save_pretrained(folder)
        (folder / "record.json").write_text(json.dumps({"key": json.loads(key), "losses": loss_summary(losses)}))
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    record = json.loads((folder / "record.json").read_text()) | {"adapter": str(folder)}
    return Method(f"lora-r{rank}", model.merge_and_unload().eval(), trainable=trainable), record


# ----- the whole comparison ---------------------------------------------------------------------------------------

def leaked_examples(sources: Sequence[str], examples: list[tuple[str, int, Example]], data_dir: Path) -> list[str]:
    """Evaluated examples whose context starts a training text or a line of one, in `sources` (must be none).

    Anchored at a line start: unanchored, "8 m expressed in units of km is" would match inside "22.8 m ...".
    """
    text = "\n" + "\n".join(t for source in sources for t in source_texts(source, data_dir))
    return [f"{task}#{index}" for task, index, e in examples if "\n" + e.context.strip() in text]


def load_methods(base_dir: Path, compressed_dir: Path, bank_dir: Path, single_dir: Path | None
                 ) -> tuple[PreTrainedModel, list[Method], PromptBank, PromptBank | None]:
    """The base model and the methods on the compressed model (one shared selection model), banks verified."""
    model_print = fingerprint(compressed_dir)
    bank = load_bank(bank_dir, expect=model_print)
    single = load_bank(single_dir, expect=model_print) if single_dir else None
    base = freeze(load_model(base_dir))
    compressed = prepare_selection_model(load_model(compressed_dir))
    return base, [Method("compressed", compressed), *bank_methods(compressed, bank, single)], bank, single


def evaluate_all(base_dir: Path, compressed_dir: Path, bank_dir: Path, single_dir: Path | None,
                 tasks: Sequence[str] | None, limit: int | None, data_dir: Path, cache_dir: Path, lora_rank: int,
                 lora_lr: float, samples: int = 2000, server_url: str | None = None, server_limit: int = 3,
                 ppl_blocks: int = HELDOUT_BLOCKS) -> dict:
    """Every method on the same test examples and held-out text; the raw records and the summary, as JSON data.

    Refuses to report if any evaluated example occurs in the training text of the bank, the single prompt or
    the LoRA (they all train on the train splits of `corpus.SOURCES`). With `server_url`, the first
    `server_limit` examples of each task are re-scored through that live server (serving `compressed_dir`).
    Perplexity uses the first `ppl_blocks` held-out blocks.
    """
    tasks = list(tasks or [*TASKS, *GEN_TASKS])
    base, methods, bank, single = load_methods(base_dir, compressed_dir, bank_dir, single_dir)
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
        summary[method.name] |= {"ppl": method_perplexity(method, blocks), "trainable": method.trainable,
                                 "extra_tokens": method.extra_tokens}
    sample = [r for r in records if r["example"] < server_limit]
    check = check_server(server_url, compressed_dir.name, tokenizer, sample, examples, bank, single) if server_url else None
    return {
        "server_check": check,
        "models": {"base": base_dir.name, "compressed": compressed_dir.name},
        "banks": {"idp": bank.name, "k": bank.k, "m": bank.m, "prompts": bank.prompt_names,
                  "trained": bank.manifest.trained.get("mode"),
                  "selection_layers": bank.selection_layers, "single": single.name if single else None},
        "tasks": {t: {"chance": chance(t, limit), "n": sum(1 for e in examples if e[0] == t),
                      "kind": "gen" if t in GEN_TASKS else "mc"} for t in tasks},
        "limit": limit, "leaked_examples": 0, "lora": lora_record, "methods": summary, "records": records,
    }


# ----- the same numbers through a live server ---------------------------------------------------------------------

def idp_request(method: str, bank: PromptBank, single: PromptBank | None) -> dict | None:
    """The `idp` field that makes a server run `method` (None: the method is not a served one, e.g. base, LoRA)."""
    if method == "compressed":
        return {"mode": "none"}
    if method == "idp":
        return {"bank": bank.name, "mode": "dynamic"}
    if method.startswith("forced:"):
        return {"bank": bank.name, "prompt": method.removeprefix("forced:")}
    if method == "single" and single is not None:
        return {"bank": single.name, "prompt": single.prompt_names[0]}
    return None


def _echo(client: httpx.Client, model: str, ids: list[int], idp: dict) -> tuple[list[float | None], dict]:
    """Per-token logprobs of token ids scored by the server (echo, nothing generated) and its `idp` info."""
    body = {"model": model, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0, "idp": idp}
    choice = client.post("/v1/completions", json=body).raise_for_status().json()["choices"][0]
    return choice["logprobs"]["token_logprobs"], choice["idp"]


def server_mc_record(client: httpx.Client, model: str, tokenizer, example: Example, idp: dict) -> dict:
    """`mc_record` through `/v1/completions`: a dynamic request first selects on the context alone (an echo of
    the context), then every choice is scored with that prompt forced, as the in-process path does."""
    context = tokenizer(example.context)["input_ids"]
    if idp.get("mode") == "dynamic":
        _, info = _echo(client, model, context, idp)
        idp = {"bank": info["bank"], "prompt": info["prompt"]}
    scores = []
    for choice in example.choices:
        logprobs, info = _echo(client, model, context + tokenizer(choice, add_special_tokens=False)["input_ids"], idp)
        scores.append(float(sum(logprobs[len(context):])))
    pred = max(range(len(scores)), key=scores.__getitem__)
    return {"prompt": info["prompt"], "scores": scores, "pred": pred, "correct": int(pred == example.answer)}


def check_server(url: str, model: str, tokenizer, records: list[dict], examples: list[tuple[str, int, Example]],
                 bank: PromptBank, single: PromptBank | None) -> dict:
    """Re-score in-process MC records through a live server; the largest score difference and agreements."""
    import httpx  # a client library (the test extra): only this check talks HTTP

    by_key = {(t, i): e for t, i, e in examples}
    worst, same_pred, same_prompt, count = 0.0, 0, 0, 0
    with httpx.Client(base_url=url, timeout=300) as client:
        for record in tqdm(records, desc="server check"):
            idp = idp_request(record["method"], bank, single)
            if idp is None or record["task"] in GEN_TASKS:
                continue
            served = server_mc_record(client, model, tokenizer, by_key[record["task"], record["example"]], idp)
            worst = max(worst, *(abs(a - b) for a, b in zip(served["scores"], record["scores"], strict=True)))
            same_pred += served["pred"] == record["pred"]
            same_prompt += served["prompt"] == record["prompt"]
            count += 1
    return {"url": url, "records": count, "max_abs_score_diff": worst, "same_prediction": same_pred,
            "same_prompt": same_prompt}
