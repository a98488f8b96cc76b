"""The training recipe for prompts that repair: distillation from cached teacher targets, a cosine schedule with
warm-up, early stopping on dev KL, exact resume.

One function, `train_prompt`, serves every prompt of issue 17's recipe:
- the **general prompt**: general text only, from token embeddings sampled from that text;
- each **bank prompt**: warm-started from the general prompt, fine-tuned on its domain mixed with general text
  (`domain_per_batch` of each batch from the domain, the rest general), so a wrong pick costs little;
- the **compute-matched single prompt**: the general prompt continued on the union of the bank's domains with
  the same mixing and the bank's total number of steps.
Its loop, `train`, knows a method only as a `Trainable` (named parameters + the student's logits with them), so
the LoRA baseline (`lora_recipe`) trains on the very same stream, targets, schedule and early stopping.

Supervision is the base model's next-token distribution (`teacher_cache`): every method sees the same
targets and training runs no teacher forward. Blocks are read in a fixed order (step s reads the next
`batch_size` blocks; each later epoch a seeded permutation), so the data of a step is a function of the step
and a resumed run sees exactly what an uninterrupted one would. The run state (prompt, Adam moments, schedule,
best dev prompt, learning-curve checkpoints, a JSON log) is a few hundred KB in one folder: `bench/runs/<run>/`.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, get_cosine_with_min_lr_schedule_with_warmup

from server.lab.teacher_cache import CacheError, JoinedCaches, TeacherCache, TeacherTargets, kd_loss, teacher_targets

RUNS_DIR = Path(__file__).resolve().parents[2] / "bench" / "runs"


class RecipeSpec(BaseModel):
    """Hyper-parameters of one prompt's training (recorded in the run folder; a resume must match them)."""

    num_virtual_tokens: int = Field(32, ge=1, le=256)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    min_lr_rate: float = Field(0.1, ge=0, le=1, description="The cosine ends at lr * min_lr_rate.")
    batch_size: int = Field(4, ge=1)
    tokens: int = Field(300_000, ge=1, description="Training budget in text tokens (sets the schedule's length).")
    domain_per_batch: int = Field(0, ge=0, description="Blocks of each batch drawn from the domain stream.")
    eval_every: int = Field(20, ge=1, description="Steps between dev-KL evaluations.")
    dev_blocks: int = Field(16, ge=1, description="Dev blocks the dev KL averages over.")
    patience: int = Field(5, ge=1, description="Stop after this many evaluations without a better dev KL.")
    checkpoints: tuple[int, ...] = Field((), description="Token counts at which the prompt is kept (learning curve).")
    save_every: int = Field(10, ge=1, description="Steps between state saves (a killed run loses at most these).")
    seed: int = 0


class Supervision(Protocol):
    """Token blocks [N, n] and the teacher's targets for any of them (a `TeacherCache`, or a `LiveTeacher`)."""

    blocks: torch.Tensor

    def targets(self, index: torch.Tensor) -> TeacherTargets: ...


@dataclass
class LiveTeacher:
    """Targets computed by a teacher model on demand: for tests, and where a GPU makes the teacher cheap."""

    teacher: PreTrainedModel
    blocks: torch.Tensor
    k: int = 64

    def targets(self, index: torch.Tensor) -> TeacherTargets:
        device = next(self.teacher.parameters()).device
        return teacher_targets(self.teacher, self.blocks[index].to(device), self.k)


@functools.lru_cache(maxsize=8)
def _epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    if epoch == 0:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def stream_index(step: int, per_batch: int, n: int, seed: int) -> torch.Tensor:
    """The blocks a step reads from a stream of n blocks: the given order first, then a seeded permutation per
    epoch; a pure function of the step, which is what makes resuming exact."""
    positions = range(step * per_batch, (step + 1) * per_batch)
    return torch.stack([_epoch_order(n, pos // n, seed)[pos % n] for pos in positions])


def sampled_init(student: PreTrainedModel, blocks: torch.Tensor, m: int, seed: int) -> torch.Tensor:
    """m embeddings of tokens drawn from the training text: a start inside the model's token manifold."""
    flat = blocks.flatten()
    picks = flat[torch.randint(0, flat.numel(), (m,), generator=torch.Generator().manual_seed(seed))]
    return student.get_input_embeddings().weight[picks.to(student.device)].detach().float().cpu().clone()


def prompted_logits(student: PreTrainedModel, prompt: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The student's logits at the text positions that predict the next text token: [B, n-1, V]."""
    embeds = student.get_input_embeddings()(ids)
    m = prompt.shape[0]
    x = torch.cat([prompt.to(embeds.dtype).expand(len(ids), -1, -1), embeds], dim=1)
    return student(inputs_embeds=x).logits[:, m:-1]


Logits = Callable[[torch.Tensor], torch.Tensor]
"""The repaired student's logits at the text positions of token blocks: ids [B, n] -> [B, n-1, V]."""


@dataclass
class Trainable:
    """What a run trains: named parameters on `device` and the student's logits with them.

    The recipe's loop (`train`) knows nothing else about the method, so a prompt (one parameter in front of the
    input) and a LoRA adapter (many weight deltas) share one loop, one data stream and one run-folder format.
    `kind` names the checkpoint files (`checkpoints/<kind>-<tokens>.safetensors`).
    """

    params: dict[str, torch.nn.Parameter]
    logits: Logits
    device: torch.device
    kind: str = "prompt"


def prompt_trainable(student: PreTrainedModel, init: torch.Tensor) -> Trainable:
    """A soft prompt, started at `init` [m, d], in front of a frozen student."""
    prompt = torch.nn.Parameter(init.clone().float().to(student.device))
    return Trainable({"prompt": prompt}, lambda ids: prompted_logits(student, prompt, ids), student.device)


@torch.no_grad()
def mean_kl(logits: Logits, dev: Supervision, blocks: int, batch_size: int, device: torch.device) -> float:
    """Mean KD loss of a student's `logits` over the first `blocks` dev blocks."""
    total, count = 0.0, 0
    for start in range(0, min(blocks, len(dev.blocks)), batch_size):
        index = torch.arange(start, min(start + batch_size, blocks, len(dev.blocks)))
        loss = kd_loss(logits(dev.blocks[index].to(device)), dev.targets(index).to(device))
        total, count = total + loss.sum().item(), count + len(index)
    return total / count


def dev_kl(student: PreTrainedModel, prompt: torch.Tensor, dev: Supervision, blocks: int, batch_size: int) -> float:
    """Mean KD loss behind `prompt` over the first `blocks` dev blocks."""
    prompt = prompt.to(student.device)
    return mean_kl(lambda ids: prompted_logits(student, prompt, ids), dev, blocks, batch_size, student.device)


@dataclass
class RunState:
    """Where a run stands; `state.json` holds it, `state.safetensors` its tensors."""

    step: int = 0
    best_dev: float | None = None
    bad_evals: int = 0
    done: str | None = None  # why the run ended: "budget" or "early stop"; None while it can go on
    scheduler: dict = field(default_factory=dict)
    param_groups: list = field(default_factory=list)


class RunFolder:
    """A run's folder: spec.json, state.json + state.safetensors, log.jsonl, checkpoints/prompt-<tokens>."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def start(self, spec: RecipeSpec, identity: dict) -> None:
        """Record the spec and what the run trains against; refuse to resume a run made with others."""
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"spec": spec.model_dump(mode="json"), **identity}
        path = self.folder / "spec.json"
        if path.exists() and json.loads(path.read_text()) != record:
            raise ValueError(
                f"{path} records another run ({json.loads(path.read_text())}); use a new run folder for {record}"
            )
        path.write_text(json.dumps(record, indent=1))

    def state(self) -> RunState | None:
        """Where the run stands (state.json alone): enough for a finished run, whose tensors a commit may leave
        out (a learning-rate grid's short runs keep only their result)."""
        if not (self.folder / "state.json").exists():
            return None
        return RunState(**json.loads((self.folder / "state.json").read_text()))

    def load(self) -> tuple[RunState, dict[str, torch.Tensor]] | None:
        state = self.state()
        if state is None:
            return None
        tensors = load_file(self.folder / "state.safetensors")
        if int(tensors["adam_step"].item()) != state.step:  # a copy taken between the two writes
            raise ValueError(
                f"{self.folder}: state.safetensors is at step {int(tensors['adam_step'].item())}, "
                f"state.json at {state.step}; restore both from the same save"
            )
        return state, tensors

    def save(self, state: RunState, tensors: dict[str, torch.Tensor], log: list[dict]) -> None:
        """Append the log lines, then write the state (tensors first, then the JSON that points past them)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "log.jsonl", "a") as f:
            f.writelines(json.dumps(line) + "\n" for line in log)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, self.folder / "state.tmp")
        (self.folder / "state.tmp").replace(self.folder / "state.safetensors")
        (self.folder / "state.json.tmp").write_text(json.dumps(state.__dict__))
        (self.folder / "state.json.tmp").replace(self.folder / "state.json")

    def trim_log(self, step: int) -> None:
        """Drop log lines written after the last saved state (a run killed between the two writes)."""
        path = self.folder / "log.jsonl"
        if path.exists():
            lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in lines))

    def log(self) -> list[dict]:
        path = self.folder / "log.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def checkpoint(self, tokens: int, tensors: dict[str, torch.Tensor], record: dict, kind: str = "prompt") -> None:
        (self.folder / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            self.folder / "checkpoints" / f"{kind}-{tokens}.safetensors",
            metadata={k: str(v) for k, v in record.items()},
        )

    def best_prompt(self) -> torch.Tensor:
        return load_file(self.folder / "state.safetensors")["best"]


def total_steps(spec: RecipeSpec, seq_len: int) -> int:
    return math.ceil(spec.tokens / (spec.batch_size * seq_len))


def train_prompt(
    student: PreTrainedModel,
    init: torch.Tensor,
    general: Supervision,
    spec: RecipeSpec,
    run: RunFolder,
    dev: Supervision | None = None,
    domain: Supervision | None = None,
    max_seconds: float = math.inf,
    max_steps: int | None = None,
    progress: bool = True,
) -> RunState:
    """Train (or resume) one prompt started at `init`; return the run's state (see `train`)."""
    return train(prompt_trainable(student, init), general, spec, run, dev, domain, max_seconds, max_steps, progress)


def state_key(kind: str, name: str, single: bool) -> str:
    """A tensor's name in `state.safetensors`: a parameter's own name, or `<kind>.<name>` for its best value
    ("best") and Adam moments ("exp_avg", "exp_avg_sq"); a one-parameter run (a prompt) drops the suffix."""
    if kind == "value":
        return name
    return kind if single else f"{kind}.{name}"


def _check_state(run: RunFolder, tensors: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter]) -> None:
    """Refuse saved tensors that are not this run's parameters (names and shapes), before any is loaded."""
    single = len(params) == 1
    kinds = ("value", "best", "exp_avg", "exp_avg_sq")
    expected = {state_key(kind, name, single): tuple(p.shape) for name, p in params.items() for kind in kinds}
    found = {name: tuple(t.shape) for name, t in tensors.items() if name != "adam_step"}
    if found != expected:
        wrong = sorted(set(found.items()) ^ set(expected.items()))[:4]
        raise ValueError(f"{run.folder}/state.safetensors holds other parameters than this run trains, e.g. {wrong}")


def train(
    trainable: Trainable,
    general: Supervision,
    spec: RecipeSpec,
    run: RunFolder,
    dev: Supervision | None = None,
    domain: Supervision | None = None,
    max_seconds: float = math.inf,
    max_steps: int | None = None,
    progress: bool = True,
) -> RunState:
    """Train (or resume) `trainable`'s parameters; return the run's state. Stops at the budget, on early stopping,
    after `max_seconds` or `max_steps` steps of this call (state saved: run again to resume), or when the teacher
    cache lacks a shard it needs."""
    deadline = time.monotonic() + max_seconds
    device, params = trainable.device, trainable.params
    single = len(params) == 1
    seq_len = general.blocks.shape[1]
    steps = total_steps(spec, seq_len)
    optimizer = torch.optim.Adam(list(params.values()), lr=spec.lr)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, spec.warmup_steps, steps, min_lr_rate=spec.min_lr_rate
    )
    best = {name: p.detach().clone() for name, p in params.items()}
    state = RunState()
    if (saved := run.load()) is not None:
        state, tensors = saved
        _check_state(run, tensors, params)
        adam = {}
        for i, (name, p) in enumerate(params.items()):
            p.data.copy_(tensors[state_key("value", name, single)].to(device))
            best[name] = tensors[state_key("best", name, single)].to(device)
            adam[i] = {"step": tensors["adam_step"].clone()} | {
                moment: tensors[state_key(moment, name, single)].to(device) for moment in ("exp_avg", "exp_avg_sq")
            }
        optimizer.load_state_dict({"state": adam, "param_groups": state.param_groups})
        scheduler.load_state_dict(state.scheduler)
        run.trim_log(state.step)
    if state.done is not None:
        return state
    general_per_batch = spec.batch_size - (spec.domain_per_batch if domain is not None else 0)
    last = steps if max_steps is None else min(steps, state.step + max_steps)
    pending: list[dict] = []
    losses: list[float] = []

    def save() -> None:
        state.scheduler, state.param_groups = scheduler.state_dict(), optimizer.state_dict()["param_groups"]
        tensors: dict[str, torch.Tensor] = {}
        for name, p in params.items():
            adam = optimizer.state[p]
            tensors |= {
                state_key("value", name, single): p,
                state_key("best", name, single): best[name],
                state_key("exp_avg", name, single): adam["exp_avg"],
                state_key("exp_avg_sq", name, single): adam["exp_avg_sq"],
                "adam_step": adam["step"],
            }
        run.save(state, tensors, pending)
        pending.clear()

    bar = tqdm(total=steps, initial=state.step, desc=run.folder.name, disable=not progress)
    while state.step < steps:
        try:
            ids, targets = _batch(state.step, general, general_per_batch, domain, spec)
        except CacheError as error:
            if optimizer.state:  # before the first step there is nothing to keep
                save()
            print(f"waiting for the teacher cache: {error}", flush=True)
            return state
        loss = kd_loss(trainable.logits(ids.to(device)), targets.to(device)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        state.step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        tokens = state.step * spec.batch_size * seq_len
        crossed = [c for c in spec.checkpoints if tokens - spec.batch_size * seq_len < c <= tokens]
        line: dict = {"step": state.step, "tokens": tokens, "loss": losses[-1], "lr": scheduler.get_last_lr()[0]}
        if dev is not None and (state.step % spec.eval_every == 0 or crossed or state.step == steps):
            line["dev_kl"] = mean_kl(trainable.logits, dev, spec.dev_blocks, spec.batch_size, device)
            if state.best_dev is None or line["dev_kl"] < state.best_dev:
                state.best_dev, state.bad_evals = line["dev_kl"], 0
                best = {name: p.detach().clone() for name, p in params.items()}
            else:
                state.bad_evals += 1
                if state.bad_evals >= spec.patience:
                    state.done = "early stop"
        for c in crossed:
            record = {"tokens": tokens, "step": state.step, "dev_kl": line.get("dev_kl")}
            run.checkpoint(c, dict(params), record, trainable.kind)
        pending.append(line)
        if state.step == steps and state.done is None:
            state.done = "budget"
        pause = time.monotonic() > deadline or state.step >= last
        if state.done is not None or state.step % spec.save_every == 0 or pause:
            save()
        if state.done is not None or pause:
            break
    bar.close()
    return state


def _batch(
    step: int, general: Supervision, general_per_batch: int, domain: Supervision | None, spec: RecipeSpec
) -> tuple[torch.Tensor, TeacherTargets]:
    """The blocks and targets of one step: general blocks, then domain blocks when mixing."""
    parts = []
    if general_per_batch:
        index = stream_index(step, general_per_batch, len(general.blocks), spec.seed)
        parts.append((general.blocks[index], general.targets(index)))
    if domain is not None and spec.domain_per_batch:
        index = stream_index(step, spec.domain_per_batch, len(domain.blocks), spec.seed + 1)
        parts.append((domain.blocks[index], domain.targets(index)))
    ids = torch.cat([p[0] for p in parts])
    targets = TeacherTargets(
        *(
            torch.cat(t)
            for t in zip(*[(p[1].topk_logprobs, p[1].topk_ids, p[1].tail_logprob) for p in parts], strict=True)
        )
    )
    return ids, targets


def streams(
    teacher_dir: Path,
    data_dir: Path,
    seq_len: int,
    sources: tuple[str, ...] = (),
    spec: RecipeSpec | None = None,
) -> tuple[TeacherCache, TeacherCache, TeacherCache | JoinedCaches | None]:
    """The general stream, the dev set and the domain stream (None without `sources`) of a run: general train
    text; with sources, their training text and their held-out text as the dev set (else general dev text).
    Every method of the recipe (prompts, LoRA) reads its supervision from here, so all see the same targets.

    Domain caches are built on demand, and with `spec` only for the blocks the run can read: of each source,
    an equal share of the steps x domain_per_batch blocks the run reads (the first ones of the source's seeded
    shuffle), and the first dev_blocks held-out blocks of the union. A big source (bbq's long contexts: ~700
    blocks) would otherwise cost the teacher forwards of blocks no step ever reads. Sources are cached one by
    one and joined, so a run on several sources (the compute-matched single prompt) reads exactly the blocks,
    and cached targets, of the runs on each source with the same share (the bank's prompts)."""
    from transformers import AutoTokenizer

    from server.lab.corpus import domain_blocks
    from server.lab.loading import freeze, load_model
    from server.lab.teacher_cache import cache_for, general_cache

    general = general_cache(teacher_dir, data_dir, "train", seq_len)
    if not sources:
        return general, general_cache(teacher_dir, data_dir, "dev", seq_len), None
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    share = total_steps(spec, seq_len) * spec.domain_per_batch // len(sources) if spec else None
    parts = [
        cache_for(teacher_dir, data_dir, domain_blocks(tokenizer, (s,), data_dir, seq_len)[:share]) for s in sources
    ]
    held_out = domain_blocks(tokenizer, sources, data_dir, seq_len, heldout=True)
    dev = cache_for(teacher_dir, data_dir, held_out[: spec.dev_blocks if spec else None])
    for cache in (*parts, dev):
        if not cache.complete():
            cache.build(freeze(load_model(teacher_dir)))
    return general, dev, parts[0] if len(parts) == 1 else JoinedCaches(parts)


def run_identity(
    student_dir: Path,
    seq_len: int,
    general: TeacherCache,
    dev: TeacherCache,
    domain: TeacherCache | None,
    sources: tuple[str, ...],
    **extra: object,
) -> dict:
    """What a run trains against (recorded in spec.json next to the spec; a resume must match it): the student's
    exact weights and the teacher caches' keys."""
    from server.core.identity import verified_weights_digest

    identity = {
        "student": student_dir.name,
        "student_weights_sha256": verified_weights_digest(student_dir),
        "teacher_cache": general.folder.name,
        "seq_len": seq_len,
        **extra,
    }
    if domain is not None:
        identity |= {"sources": list(sources), "domain_cache": domain.folder.name}
    return identity | {"dev_cache": dev.folder.name}


def main(argv: list[str] | None = None) -> None:
    """Train (or resume) one prompt of the recipe against the default compressed model; state in bench/runs/<run>/.

    `general`: the general prompt on general text, keeping learning-curve checkpoints.
    `domain`: a prompt warm-started from a general run's best prompt and fine-tuned on the union of `--sources`
    mixed with general text: one source makes a bank prompt; all the bank's sources with the bank's summed
    `--tokens` make the compute-matched single prompt.
    """
    import argparse

    from server.core.config import Settings
    from server.core.identity import DEFAULT_BASE, DEFAULT_MODEL
    from server.lab.loading import freeze, load_model, torch_device

    settings = Settings()
    parser = argparse.ArgumentParser(description=main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("general", "domain"))
    parser.add_argument("--run", required=True, help="Run name: state lives in bench/runs/<run>/.")
    parser.add_argument("--student", type=Path, default=settings.models_dir / DEFAULT_MODEL)
    parser.add_argument("--teacher", type=Path, default=settings.models_dir / DEFAULT_BASE)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=300_000)
    parser.add_argument("--checkpoints", default="10000,30000,100000,300000")
    parser.add_argument("--num-virtual-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--init-run", help="domain: the general run whose best prompt starts this one.")
    parser.add_argument("--sources", default="", help="domain: comma-separated corpus.SOURCES names.")
    parser.add_argument("--domain-per-batch", type=int, default=2, help="domain: blocks of 4 from the domain.")
    parser.add_argument("--max-seconds", type=float, default=math.inf)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    torch.set_num_threads(settings.torch_threads)
    domain_run = args.what == "domain"
    if domain_run and not (args.init_run and args.sources):
        parser.error("domain needs --init-run and --sources")
    spec = RecipeSpec(
        tokens=args.tokens,
        num_virtual_tokens=args.num_virtual_tokens,
        lr=args.lr,
        checkpoints=tuple(int(c) for c in args.checkpoints.split(",") if c),
        domain_per_batch=args.domain_per_batch if domain_run else 0,
    )
    sources = tuple(args.sources.split(",")) if domain_run else ()
    general, dev, domain = streams(args.teacher, settings.data_dir, args.seq_len, sources, spec)
    extra = {"init_run": args.init_run} if domain_run else {}
    identity = run_identity(args.student, args.seq_len, general, dev, domain, sources, **extra)
    run = RunFolder(RUNS_DIR / args.run)
    run.start(spec, identity)
    student = freeze(load_model(args.student, device=torch_device(args.device)))
    if domain_run:
        init = RunFolder(RUNS_DIR / args.init_run).best_prompt()
    else:
        init = sampled_init(student, general.blocks, spec.num_virtual_tokens, spec.seed)
    state = train_prompt(student, init, general, spec, run, dev=dev, domain=domain, max_seconds=args.max_seconds)
    print_outcome(run, state, spec, args.seq_len)


def print_outcome(run: RunFolder, state: RunState, spec: RecipeSpec, seq_len: int, **extra: object) -> None:
    """One JSON line saying where a run stands: what a driver script (or a person) reads to know whether to
    run the command again."""
    of = total_steps(spec, seq_len)
    record = {"run": str(run.folder), **extra, "step": state.step, "of": of, "best_dev_kl": state.best_dev}
    print(json.dumps(record | {"done": state.done}), flush=True)


if __name__ == "__main__":
    main()
