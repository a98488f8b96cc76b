"""Train soft prompts against the frozen compressed model: one prompt, a curated bank, or a bank trained jointly
with the IDP selection rule in the loop.

Only the prompt embeddings are trainable: the served weights stay exactly as vLLM serves them. Two objectives:
- `lm`: next-token cross-entropy on the text (the paper's baseline, as in "Compress, then Prompt");
- `kd`: KL from the uncompressed model's next-token distribution to the prompted compressed model's
  (distillation), which recovers more of what compression lost than the LM loss does on real tasks.
Runs are seeded and deterministic, write resumable checkpoints (safetensors), and show progress bars.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedModel

from server.core.banks import bank_dir, load_bank, make_bank, save_bank
from server.core.identity import fingerprint
from server.core.selection import CachedSelector, load_selection_model
from server.lab.corpus import source_texts, token_blocks
from server.lab.loading import freeze, load_model

Objective = Literal["lm", "kd"]


class TrainSpec(BaseModel):
    """Hyper-parameters of one training run (recorded verbatim in the bank manifest)."""

    objective: Objective = Field("kd", description="lm: next-token loss; kd: distil the uncompressed teacher.")
    num_virtual_tokens: int = Field(16, ge=1, le=256, description="Virtual tokens per prompt (m).")
    steps: int = Field(
        40,
        ge=1,
        description="Optimizer steps per prompt: single and curated train each prompt "
        "this long; joint trains the K prompts together for K times as many steps.",
    )
    lr: float = Field(3e-3, gt=0, description="Adam learning rate of the prompt embeddings.")
    batch_size: int = Field(4, ge=1, description="Text blocks per step.")
    seq_len: int = Field(64, ge=8, description="Tokens per training block.")
    seed: int = Field(0, description="Seeds the prompt initialisation and the data order.")
    checkpoint_every: int = Field(40, ge=1, description="Steps between resumable checkpoints.")
    capacity: float = Field(1.5, ge=1.0, description="Joint mode: a prompt takes at most capacity*B/K of a batch.")


@dataclass(frozen=True)
class Models:
    """The frozen compressed model being repaired and, for distillation, the uncompressed teacher (same device)."""

    student: PreTrainedModel
    teacher: PreTrainedModel | None = None

    @property
    def device(self) -> torch.device:
        return self.student.device


def init_prompt(model: PreTrainedModel, blocks: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
    """A prompt initialised from the embeddings of m real tokens drawn from the training text.

    Starting inside the model's token manifold (as PEFT's TEXT/sampled-vocab init does) trains faster and more
    stably than random vectors, whose norms the model has never seen. The prompt is float32 whatever the model's
    dtype: it is the trained (master) copy, cast to the model's dtype only on the way in.
    """
    flat = blocks.flatten()
    picks = flat[torch.randint(0, flat.numel(), (m,), generator=generator)]
    weight = model.get_input_embeddings().weight
    return weight[picks.to(weight.device)].detach().float().clone()


def prompt_loss(models: Models, prompts: torch.Tensor, ids: torch.Tensor, objective: Objective) -> torch.Tensor:
    """Per-example loss of text `ids` [B, n] behind per-example prompts [B, m, d] (text tokens only).

    Position i of the text predicts token i+1 in both objectives, so `lm` and `kd` score the same positions,
    and the numbers are comparable with `evaluate.scoring.perplexity`. Losses are taken in float32 whatever the
    models compute in.
    """
    ids = ids.to(models.device)
    embeds = models.student.get_input_embeddings()(ids)
    m = prompts.shape[1]
    logits = models.student(inputs_embeds=torch.cat([prompts.to(embeds.dtype), embeds], dim=1)).logits[:, m:-1]
    logits = logits.float()
    if objective == "lm":
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return nll.mean(dim=1)
    assert models.teacher is not None, "kd needs the uncompressed teacher model"
    with torch.no_grad():
        teacher = models.teacher(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
    student = logits.log_softmax(-1)
    return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean(dim=1)


@dataclass
class Checkpoint:
    """Resumable state of a run: the prompts, Adam's moments and the step reached, in safetensors + JSON."""

    folder: Path

    def load(self, prompts: torch.Tensor, optimizer: torch.optim.Adam) -> int:
        """Restore state into `prompts` / `optimizer` if a checkpoint exists; return the next step."""
        meta = self.folder / "state.json"
        if not meta.exists():
            return 0
        tensors = load_file(self.folder / "state.safetensors", device=str(prompts.device))
        prompts.data.copy_(tensors["prompts"])
        state = optimizer.state[prompts]
        state["exp_avg"], state["exp_avg_sq"] = tensors["exp_avg"], tensors["exp_avg_sq"]
        state["step"] = torch.tensor(float(json.loads(meta.read_text())["step"]))
        return int(json.loads(meta.read_text())["step"])

    def save(self, prompts: torch.Tensor, optimizer: torch.optim.Adam, step: int, extra: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = optimizer.state[prompts]
        save_file(
            {
                "prompts": prompts.detach().cpu().contiguous(),
                "exp_avg": state["exp_avg"].cpu().contiguous(),
                "exp_avg_sq": state["exp_avg_sq"].cpu().contiguous(),
            },
            self.folder / "state.safetensors",
        )
        (self.folder / "state.json").write_text(json.dumps({"step": step} | extra))


def batch_stream(blocks: torch.Tensor, batch_size: int, generator: torch.Generator):
    """An endless, seeded stream of batches [B, n] drawn without replacement per epoch (on the CPU generator, so
    the data order is the same on every device)."""
    while True:
        order = torch.randperm(blocks.shape[0], generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield blocks[order[start : start + batch_size]]


def train_prompts(
    models: Models,
    init: torch.Tensor,
    data: torch.Tensor,
    spec: TrainSpec,
    checkpoint: Checkpoint,
    route: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    desc: str = "train",
) -> tuple[torch.Tensor, list[float]]:
    """Train prompts [K, m, d] on token blocks [N, n]; return the prompts and the loss per step.

    Without `route`, K must be 1 (one prompt sees every example). With `route(prompts, batch) -> index[B]`,
    each example trains only the prompt it is routed to (joint IDP training). The prompts train on `init`'s
    device, which must be the models' one.
    """
    generator = torch.Generator().manual_seed(spec.seed)
    prompts = torch.nn.Parameter(init.clone())
    optimizer = torch.optim.Adam([prompts], lr=spec.lr)
    start = checkpoint.load(prompts, optimizer)
    batches = batch_stream(data, spec.batch_size, generator)
    for _ in range(start):  # replay the data stream so a resumed run sees what an uninterrupted one would
        next(batches)
    losses: list[float] = []
    for step in (bar := tqdm(range(start, spec.steps), desc=desc, initial=start, total=spec.steps)):
        ids = next(batches)
        index = torch.zeros(len(ids), dtype=torch.long) if route is None else route(prompts.detach(), ids)
        loss = prompt_loss(models, prompts[index.to(prompts.device)], ids, spec.objective).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if (step + 1) % spec.checkpoint_every == 0 or step + 1 == spec.steps:
            checkpoint.save(prompts, optimizer, step + 1, {"desc": desc})
    return prompts.detach(), losses


def capacity_route(scores: torch.Tensor, capacity: float) -> torch.Tensor:
    """Route each example to its highest-scoring prompt, but no prompt takes more than ceil(capacity*B/K).

    The cap is the guard against collapse: without it, the prompt that wins early attracts every example and
    the other K-1 prompts never train. Examples are placed in order of their best score; an example whose
    best prompt is full goes to its next best.
    """
    b, k = scores.shape
    cap = max(1, math.ceil(capacity * b / k))
    load = torch.zeros(k, dtype=torch.long)
    index = torch.empty(b, dtype=torch.long)
    for i in scores.max(dim=1).values.argsort(descending=True).tolist():
        for choice in scores[i].argsort(descending=True).tolist():
            if load[choice] < cap:
                index[i], load[choice] = choice, load[choice] + 1
                break
    return index


def mean_loss(
    models: Models, prompt: torch.Tensor | None, blocks: torch.Tensor, objective: Objective, batch_size: int = 8
) -> float:
    """Average per-example loss on held-out blocks behind one prompt [m, d], or behind none."""
    if prompt is None:
        prompt = torch.zeros(0, models.student.get_input_embeddings().weight.shape[1], device=models.device)
    prompt = prompt.to(models.device)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            ids = blocks[start : start + batch_size]
            total += prompt_loss(models, prompt.expand(len(ids), -1, -1), ids, objective).sum().item()
    return total / len(blocks)


class BankPlan(BaseModel):
    """What to train: the mode, the data sources (one prompt each, or one prompt on all for `single`)."""

    mode: Literal["single", "curated", "joint"]
    sources: tuple[str, ...] = Field(
        ("news", "howto", "units", "knowledge"),
        description="Data sources (comma-separated): one prompt each, or one prompt on all of them (single).",
    )
    heldout_blocks: int = Field(8, ge=1, description="Held-out blocks per source for the measurements.")


def source_blocks(
    tokenizer, sources: tuple[str, ...], data_dir: Path, seq_len: int, heldout: bool, limit: int | None = None
) -> dict[str, torch.Tensor]:
    """Token blocks [N, seq_len] per data source (all that the text fills, or at most `limit`)."""
    blocks = {name: token_blocks(tokenizer, source_texts(name, data_dir, heldout=heldout), seq_len) for name in sources}
    return {name: b[:limit] for name, b in blocks.items()}


def train_bank(
    models: Models,
    plan: BankPlan,
    spec: TrainSpec,
    train: dict[str, torch.Tensor],
    work_dir: Path,
    router: PreTrainedModel | None = None,
) -> tuple[torch.Tensor, list[str], dict]:
    """Train the prompts of a bank; return prompts [K, m, d], their names and a training record.

    `single` trains one prompt on all sources together; `curated` one prompt per source on that source only;
    `joint` K prompts (started like curated ones) on all sources, each example routed by the IDP selection
    rule (`router`: a selection model on the student's weights) under a capacity cap.
    """
    generator = torch.Generator().manual_seed(spec.seed)
    names = list(plan.sources)
    if plan.mode == "single":
        data = torch.cat([train[s] for s in names])
        init = init_prompt(models.student, data, spec.num_virtual_tokens, generator)[None]
        prompts, losses = train_prompts(models, init, data, spec, Checkpoint(work_dir / "single"), desc="single")
        return prompts, ["general"], {"losses": {"general": loss_summary(losses)}}
    inits = torch.stack([init_prompt(models.student, train[s], spec.num_virtual_tokens, generator) for s in names])
    if plan.mode == "curated":
        trained, record = [], {}
        for k, name in enumerate(names):
            sub = spec.model_copy(update={"seed": spec.seed + k})
            p, losses = train_prompts(
                models, inits[k : k + 1], train[name], sub, Checkpoint(work_dir / name), desc=name
            )
            trained.append(p[0])
            record[name] = loss_summary(losses)
        return torch.stack(trained), names, {"losses": record}
    assert router is not None, "joint training needs a selection model"

    def route(prompts: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        scores = CachedSelector(router, prompts).scores(ids.tolist())
        return capacity_route(scores, spec.capacity)

    data = torch.cat([train[s] for s in names])
    joint = spec.model_copy(update={"steps": spec.steps * len(names)})
    prompts, losses = train_prompts(models, inits, data, joint, Checkpoint(work_dir / "joint"), route, desc="joint")
    return prompts, [f"p{k}" for k in range(len(names))], {"losses": {"joint": loss_summary(losses)}}


def loss_summary(losses: list[float]) -> dict[str, float]:
    """First and last loss (means of 10 steps), enough to see that training did something."""
    head, tail = losses[:10], losses[-10:]
    return {"first": round(sum(head) / len(head), 4), "last": round(sum(tail) / len(tail), 4), "steps": len(losses)}


def calibrate_layers(
    router: PreTrainedModel, prompts: torch.Tensor, train: dict[str, torch.Tensor], per_source: int = 8
) -> tuple[list[int] | None, dict[str, float]]:
    """The selection layer that best routes a curated bank's training examples to their own source's prompt.

    IDP's default score averages attention over all layers. On SmolLM2 that average is dominated by layers whose
    attention prefers one prompt whatever the input (docs/banks.md has the measurement), while single later layers route
    by domain. A curated bank knows which prompt each training example belongs to, so we pick the layer with the
    highest routing accuracy on (a few) training blocks, never on held-out ones, and keep all layers when no
    single layer beats them (the manifest records both accuracies, `route_acc/*`).
    """
    ids = torch.cat([blocks[:per_source] for blocks in train.values()]).tolist()
    labels = torch.arange(len(train)).repeat_interleave(per_source)

    def accuracy(layers: list[int] | None) -> float:
        chosen = CachedSelector(router, prompts, layers).scores(ids).argmax(dim=1).cpu()
        return round((chosen == labels).float().mean().item(), 4)

    record = {"route_acc/all_layers": accuracy(None)}
    per_layer = {layer: accuracy([layer]) for layer in range(router.config.num_hidden_layers)}
    best = max(per_layer, key=per_layer.__getitem__)
    record[f"route_acc/layer_{best}"] = per_layer[best]
    if per_layer[best] <= record["route_acc/all_layers"]:
        return None, record
    return [best], record


def measure_bank(
    models: Models,
    prompts: torch.Tensor,
    names: list[str],
    heldout: dict[str, torch.Tensor],
    selector_model: PreTrainedModel,
    single: torch.Tensor | None = None,
    layers: list[int] | None = None,
) -> dict[str, float]:
    """Held-out perplexity per source: no prompt, the single prompt, each bank prompt, and IDP's choice.

    Perplexity (the `lm` loss) whatever the training objective, so banks trained either way compare. IDP runs
    with the bank's selection layers (`layers`); `idp_all_layers` is the paper's all-layer rule for comparison.
    """
    out: dict[str, float] = {}
    if layers is not None:
        out |= _measure_idp(models, prompts, names, heldout, CachedSelector(selector_model, prompts), "idp_all_layers")
    out |= _measure_idp(models, prompts, names, heldout, CachedSelector(selector_model, prompts, layers), "idp")
    for source, blocks in heldout.items():
        out[f"ppl/{source}/none"] = _ppl(models, None, blocks)
        if single is not None:
            out[f"ppl/{source}/single"] = _ppl(models, single, blocks)
        for k, name in enumerate(names):
            out[f"ppl/{source}/{name}"] = _ppl(models, prompts[k], blocks)
    return out


def _ppl(models: Models, prompt: torch.Tensor | None, blocks: torch.Tensor) -> float:
    return round(math.exp(mean_loss(models, prompt, blocks, "lm")), 3)


def _measure_idp(
    models: Models, prompts: torch.Tensor, names: list[str], heldout: dict[str, torch.Tensor], selector, label: str
) -> dict[str, float]:
    """Perplexity when each held-out block is decoded behind the prompt `selector` picks, and the picks' shares."""
    out: dict[str, float] = {}
    for source, blocks in heldout.items():
        chosen = [s.index for s in selector.select(blocks.tolist())]
        losses = [mean_loss(models, prompts[c], blocks[i : i + 1], "lm") for i, c in enumerate(chosen)]
        out[f"ppl/{source}/{label}"] = round(math.exp(sum(losses) / len(losses)), 3)
        for k, name in enumerate(names):
            out[f"share/{source}/{label}/{name}"] = round(chosen.count(k) / len(chosen), 3)
    return out


def build_and_save(
    student_dir: Path,
    teacher_dir: Path | None,
    plan: BankPlan,
    spec: TrainSpec,
    bank_name: str,
    banks_dir: Path,
    data_dir: Path,
    work_dir: Path,
    command: str,
    single_bank: Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Train a bank for the model in `student_dir`, measure it, save it under `banks_dir`; return its folder.

    Checkpoints go to a folder named by a hash of the model, plan and spec: rerunning the same command resumes,
    while any change of hyper-parameters starts afresh instead of resuming someone else's run. Student and
    teacher compute in `dtype` on `device`; the prompts, their optimizer and the selection model stay float32.
    """
    torch.manual_seed(spec.seed)
    if spec.objective == "kd" and teacher_dir is None:
        raise ValueError("objective kd needs --teacher (the uncompressed model)")
    target = bank_dir(banks_dir, bank_name)
    model_print = fingerprint(student_dir)
    student = freeze(load_model(student_dir, device, dtype))
    models = Models(student, freeze(load_model(teacher_dir, device, dtype)) if teacher_dir else None)
    router = load_selection_model(student_dir, str(device))
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    train = source_blocks(tokenizer, plan.sources, data_dir, spec.seq_len, heldout=False)
    heldout = source_blocks(tokenizer, plan.sources, data_dir, spec.seq_len, heldout=True, limit=plan.heldout_blocks)
    run_key = f"{student_dir.name}{plan.model_dump_json()}{spec.model_dump_json()}"
    run_key += "" if dtype == torch.float32 else str(dtype)  # float32 runs keep the ids they always had
    run_id = hashlib.sha256(run_key.encode()).hexdigest()
    prompts, names, record = train_bank(models, plan, spec, train, work_dir / f"{bank_name}-{run_id[:12]}", router)
    single = load_bank(single_bank, expect=model_print).embeddings[0] if single_bank else None
    layers, routing = calibrate_layers(router, prompts, train) if plan.mode == "curated" else (None, {})
    measured = measure_bank(models, prompts, names, heldout, router, single, layers) | routing
    trained = {
        "mode": plan.mode,
        "sources": list(plan.sources),
        "spec": spec.model_dump(),
        "teacher": teacher_dir.name if teacher_dir else None,
        "train_blocks": {k: len(v) for k, v in train.items()},
        "command": command,
        "selection_layers": layers,
        "compute": {"device": str(device), "dtype": str(dtype).removeprefix("torch.")},
        **record,
    }
    save_bank(make_bank(bank_name, prompts.cpu(), names, model_print, trained, measured), target)
    return target
