"""Does idp-serve's own math give on a GPU what it gives on the CPU? One command, one summary line.

Same weights, same inputs, the CPU and `--device` (default: cuda) in one run:
1. selection: `CachedSelector` scores of --inputs random inputs in batches of 16 (the server's GPU batch size):
   the same prompt chosen wherever the CPU's margin exceeds --score-tol, and max |score difference| <= --score-tol;
   on the device, the cached pass also against `ReferenceSelector` (the oracle) on 4 inputs.
2. cost on the device: median time of one selection pass (16 inputs of 256 tokens over the bank's K*m prompt
   tokens, every selection layer) over a plain sdpa prefill of the same inputs (logits of the last token only,
   as a serving engine computes them): the ratio bench/selection.py measures on CPU.
3. training: --steps Adam steps of one prompt with the lab's loss (`server.lab.train.prompt_loss`), objectives lm
   and kd (the teacher: the same weights without the prompt); every step's loss within --rel-tol.
4. evaluation: `server.lab.evaluate.scoring.perplexity` of 8 held-out blocks with and without the prompt, within
   --rel-tol.
The exit status is 0 when every comparison passes.

It needs only torch, transformers, safetensors, pydantic and this repository: no vLLM, no network, no model files.
`--model smollm2-shape` (the default) builds SmolLM2-135M's architecture with seeded random weights, since a bare
GPU machine has no converted model, and takes the prompts of the image's default bank (prompt_banks/default,
trained for that hidden size); agreement between devices does not depend on the weights being trained. `--model
PATH` uses a converted model folder instead, `--model tiny` a 2-layer random Llama with a random bank (the fast
test runs that on the CPU, with --device cpu).

Run from the repository root: `python bench/gpu_check.py` where idp-serve is installed, `PYTHONPATH=. python
bench/gpu_check.py` on a bare machine with only those packages. Most of its time is the CPU side.
Float32 throughout, TF32 off, so differences are rounding only.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from server.core.banks import load_bank
from server.core.selection import CachedSelector, ReferenceSelector, prepare_selection_model
from server.lab.evaluate.scoring import perplexity
from server.lab.train import Models, prompt_loss

ROOT = Path(__file__).resolve().parents[1]
BANK = ROOT / "prompt_banks" / "default"
SMOLLM2_135M = LlamaConfig(  # SmolLM2-135M-Instruct's config.json, minus its weights
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)
TINY = LlamaConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
SELECTION_BATCH, COST_LEN, TRAIN_BATCH, TRAIN_LEN, EVAL_BLOCKS = 16, 256, 4, 64, 8


@dataclass
class Setup:
    model: PreTrainedModel  # float32, on the CPU
    prompts: torch.Tensor  # [K, m, d] float32
    layers: list[int] | None
    name: str


def setup(model_arg: str, bank: Path) -> Setup:
    torch.manual_seed(0)
    if model_arg == "tiny":
        model = LlamaForCausalLM(TINY)
        prompts = model.get_input_embeddings().weight[torch.randint(TINY.vocab_size, (3, 4))].detach().clone()
        return Setup(model.eval(), prompts, None, "tiny random llama (2 layers, hidden 64), random bank K=3 m=4")
    if model_arg == "smollm2-shape":
        model, name = LlamaForCausalLM(SMOLLM2_135M), "SmolLM2-135M shape, random weights (seed 0)"
    else:
        model = AutoModelForCausalLM.from_pretrained(model_arg, dtype=torch.float32, local_files_only=True)
        name = Path(model_arg).name
    loaded = load_bank(bank)
    return Setup(
        model.float().eval(),
        loaded.embeddings,
        loaded.selection_layers,
        f"{name}, bank {loaded.name} K={loaded.k} m={loaded.m}",
    )


def copy_to(model: PreTrainedModel, device: str, selection: bool = False) -> PreTrainedModel:
    clone = copy.deepcopy(model).requires_grad_(False)
    if selection:
        prepare_selection_model(clone)
    else:
        clone.set_attn_implementation("sdpa")
    return clone.to(device)


def random_inputs(vocab: int, count: int, generator: torch.Generator, low: int = 8, high: int = 160) -> list[list[int]]:
    lengths = torch.randint(low, high, (count,), generator=generator).tolist()
    return [torch.randint(vocab, (n,), generator=generator).tolist() for n in lengths]


def batched_scores(selector: CachedSelector, inputs: list[list[int]]) -> torch.Tensor:
    return torch.cat(
        [selector.scores(inputs[i : i + SELECTION_BATCH]).cpu() for i in range(0, len(inputs), SELECTION_BATCH)]
    )


def check_selection(s: Setup, device: str, count: int, tol: float) -> tuple[bool, str]:
    inputs = random_inputs(s.model.config.vocab_size, count, torch.Generator().manual_seed(1))
    cpu = batched_scores(CachedSelector(copy_to(s.model, "cpu", True), s.prompts, s.layers), inputs)
    on_device = copy_to(s.model, device, True)
    selector = CachedSelector(on_device, s.prompts.to(device), s.layers)
    dev = batched_scores(selector, inputs)
    oracle = ReferenceSelector(on_device, s.prompts.to(device), s.layers).scores(inputs[:4]).cpu()
    diff, oracle_diff = (cpu - dev).abs().max().item(), (oracle - dev[:4]).abs().max().item()
    top2 = cpu.topk(min(2, cpu.shape[1]), dim=1).values
    margins = top2[:, 0] - top2[:, -1]
    decisive = margins > tol
    same = cpu.argmax(1) == dev.argmax(1)
    ok = diff <= tol and oracle_diff <= tol and bool(same[decisive].all())
    return ok, (
        f"selection {int(same.sum())}/{count} same choice ({int(decisive.sum())} decisive, all agree: "
        f"{bool(same[decisive].all())}), max|dscore| {diff:.1e}, cached-vs-oracle {oracle_diff:.1e} "
        f"(tol {tol:g})"
    )


def median_seconds(run: Callable[[], object], device: str, repeats: int) -> float:
    def timed() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(min(3, repeats)):
        timed()
    return statistics.median(timed() for _ in range(repeats))


def measure_cost(s: Setup, device: str, repeats: int) -> str:
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(s.model.config.vocab_size, (SELECTION_BATCH, COST_LEN), generator=generator)
    plain = copy_to(s.model, device)
    selector = CachedSelector(copy_to(s.model, device, True), s.prompts.to(device), s.layers)
    batch, on_device = ids.tolist(), ids.to(device)
    with torch.no_grad():
        prefill_s = median_seconds(lambda: plain(on_device, logits_to_keep=1), device, repeats)
    select_s = median_seconds(lambda: selector.scores(batch), device, repeats)
    k, m, _ = s.prompts.shape
    return (
        f"select/prefill {select_s / prefill_s:.2f}x ({1000 * select_s:.1f} vs {1000 * prefill_s:.1f} ms, "
        f"{SELECTION_BATCH}x{COST_LEN} tokens, K*m={k * m})"
    )


def train_losses(
    student: PreTrainedModel, init: torch.Tensor, blocks: torch.Tensor, objective: str, lr: float = 3e-3
) -> list[float]:
    """Adam steps of one prompt with the lab's loss, one block batch per step (teacher: the same weights)."""
    models = Models(student=student, teacher=student if objective == "kd" else None)
    prompt = torch.nn.Parameter(init.clone().to(student.device))
    optimizer = torch.optim.Adam([prompt], lr=lr)
    losses = []
    for ids in blocks:
        loss = prompt_loss(models, prompt.expand(len(ids), -1, -1), ids, objective).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=True))


def check_training(s: Setup, device: str, steps: int, tol: float) -> tuple[bool, str]:
    generator = torch.Generator().manual_seed(3)
    blocks = torch.randint(s.model.config.vocab_size, (steps, TRAIN_BATCH, TRAIN_LEN), generator=generator)
    cpu_model, dev_model = copy_to(s.model, "cpu"), copy_to(s.model, device)
    worst = {}
    for objective in ("lm", "kd"):
        cpu = train_losses(cpu_model, s.prompts[0], blocks, objective)
        dev = train_losses(dev_model, s.prompts[0], blocks, objective)
        worst[objective] = relative(cpu, dev)
    ok = all(v <= tol for v in worst.values())
    detail = ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
    return ok, f"train {steps} steps max rel dloss {detail} (tol {tol:g})"


def check_evaluation(s: Setup, device: str, tol: float) -> tuple[bool, str]:
    generator = torch.Generator().manual_seed(4)
    blocks = torch.randint(s.model.config.vocab_size, (EVAL_BLOCKS, TRAIN_LEN), generator=generator)
    cpu_model, dev_model = copy_to(s.model, "cpu"), copy_to(s.model, device)
    cpu = [perplexity(cpu_model, blocks, p) for p in (None, s.prompts[0])]
    dev = [perplexity(dev_model, blocks, None if p is None else p.to(device)) for p in (None, s.prompts[0])]
    worst = relative(cpu, dev)
    return worst <= tol, f"eval ppl {cpu[1]:.4g} (no prompt {cpu[0]:.4g}) max rel dppl {worst:.1e} (tol {tol:g})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="device compared with the CPU (default: cuda)")
    parser.add_argument("--model", default="smollm2-shape", help="smollm2-shape (default), tiny, or a model folder")
    parser.add_argument("--bank", type=Path, default=BANK, help="bank folder for the prompts (default: %(default)s)")
    parser.add_argument("--inputs", type=int, default=64, help="inputs whose selections are compared")
    parser.add_argument("--steps", type=int, default=5, help="training steps per objective")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs of each side of the cost ratio")
    parser.add_argument("--score-tol", type=float, default=1e-4, help="largest |score difference| allowed")
    parser.add_argument("--rel-tol", type=float, default=1e-3, help="largest relative loss/perplexity difference")
    args = parser.parse_args()

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: FAIL torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 2
    torch.set_float32_matmul_precision("highest")  # no TF32: float32 on both sides
    start = time.perf_counter()
    s = setup(args.model, args.bank)
    results = [
        check_selection(s, args.device, args.inputs, args.score_tol),
        check_training(s, args.device, args.steps, args.rel_tol),
        check_evaluation(s, args.device, args.rel_tol),
    ]
    cost = measure_cost(s, args.device, args.repeats)
    ok = all(passed for passed, _ in results)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(
        f"gpu_check: {'PASS' if ok else 'FAIL'} {args.device} ({where}, torch {torch.__version__}) vs cpu; "
        f"{s.name}; " + "; ".join(text for _, text in results) + f"; {cost}; {time.perf_counter() - start:.0f} s"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
