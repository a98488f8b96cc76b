"""The LoRA baseline: the compressed model with a low-rank adapter on q/v, so the report compares repairs at a
comparable parameter budget. Two sources: `lora_method` trains one live with the prompts' own loss, data and steps
(`server.lab.train`, the small-budget evaluation); `recipe_lora_method` reads one trained by issue 17's recipe
(`server.lab.lora_recipe`, bench/runs/<run>/) against the same cached teacher targets as the prompts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedModel

from server.core.banks import PromptBank
from server.lab.evaluate.methods import Method
from server.lab.loading import freeze, load_model
from server.lab.lora_recipe import LORA_TARGETS, load_lora
from server.lab.train import Models, TrainSpec, batch_stream, loss_summary, prompt_loss, source_blocks


def train_lora(
    model: PreTrainedModel, teacher: PreTrainedModel, data: torch.Tensor, spec: TrainSpec, lr: float
) -> list[float]:
    """Train the LoRA parameters of a PEFT `model` in place with the prompts' loss (`train.prompt_loss`, no prompt).

    Same batches (seeded stream), objective and steps as a single prompt trained with `spec`; only the learning
    rate is LoRA's own, since weight deltas and input embeddings live on different scales.
    """
    generator = torch.Generator().manual_seed(spec.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    batches = batch_stream(data, spec.batch_size, generator)
    width = model.get_input_embeddings().embedding_dim
    no_prompt = torch.zeros(spec.batch_size, 0, width, device=teacher.device)
    losses: list[float] = []
    for _ in (bar := tqdm(range(spec.steps), desc="lora")):
        loss = prompt_loss(Models(model, teacher), no_prompt, next(batches), spec.objective).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def lora_method(
    student_dir: Path,
    teacher: PreTrainedModel,
    single: PromptBank,
    data_dir: Path,
    cache_dir: Path,
    rank: int,
    lr: float,
) -> tuple[Method, dict]:
    """The compressed model with a rank-`rank` LoRA on q/v, trained like `single` was (its manifest's spec and
    sources), merged for inference, on the teacher's device; the adapter is cached under `cache_dir` by a hash of
    everything it depends on.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    spec = TrainSpec(**single.manifest.trained["spec"])
    sources = tuple(single.manifest.trained["sources"])
    key = json.dumps([student_dir.name, teacher.name_or_path, spec.model_dump(), sources, rank, lr], sort_keys=True)
    folder = cache_dir / f"lora-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    student = freeze(load_model(student_dir, teacher.device))
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


def recipe_lora_method(run_dir: Path, student_dir: Path, device: torch.device | str = "cpu") -> tuple[Method, dict]:
    """The best-dev adapter of a `lora_recipe` run, merged into the student, as a method named by its rank; the
    record is the run's spec.json plus where the run stands (steps, best dev KL, why it ended)."""
    model, trainable = load_lora(run_dir, student_dir, device, merge=True)
    record = json.loads((run_dir / "spec.json").read_text())
    state = json.loads((run_dir / "state.json").read_text())
    record |= {"run": str(run_dir), **{k: state[k] for k in ("step", "best_dev", "done")}}
    return Method(f"lora-r{record['spec']['rank']}", model, trainable=trainable), record
