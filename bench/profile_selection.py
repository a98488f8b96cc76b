"""Where the selection pass's time goes: one real request size on the served model, the default bank's rule.

Prints, for one input of `--tokens` tokens (default 250, the scoring workload's) cut from the Lee news text:
1. Timings in alternation, same run: the serving pass (`bank_selector`, the bank's own layers, early stop) on
   one thread and on `--threads` threads, and a plain prefill of the same input through the whole model (sdpa
   attention, logits of the last token only: what an engine's prefill computes), each a median of `--repeats`.
2. The pass's time by part, from forward hooks on every decoder layer's modules (one thread): the MLPs, the
   attention projections (q, k, v, o), the attention core (our cached-prompt attention and the score: everything
   in self_attn but its projections), the norms, and the rest (embedding, rotary tables, Python between modules).
3. torch.profiler's operator table over `--seconds` of passes (one thread), by self CPU time.

    python bench/profile_selection.py [--model M] [--bank default] [--tokens 250] [--seconds 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from server.core.banks import bank_dir, load_bank
from server.core.config import Settings
from server.core.identity import resolve, servable
from server.core.selection import bank_selector, load_selection_model
from server.lab.corpus import lee_heldout, token_blocks
from server.online.settings import ServeSettings

PARTS = {"mlp": "MLP", "q_proj": "projections", "k_proj": "projections", "v_proj": "projections"}
PARTS |= {"o_proj": "projections", "input_layernorm": "norms", "post_attention_layernorm": "norms"}


def median_ms(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@contextmanager
def threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def by_part(model: PreTrainedModel, run: Callable[[], object], repeats: int) -> tuple[dict[str, float], float]:
    """Milliseconds per pass spent in each part (see the module doc), and the whole pass's milliseconds."""
    spent: dict[str, float] = defaultdict(float)
    started: dict[int, float] = {}
    handles = []
    for layer in model.get_decoder().layers:
        for name, module in layer.named_modules():
            part = "attention core" if name == "self_attn" else PARTS.get(name.rsplit(".", 1)[-1])
            if part is None:
                continue

            def pre(module: torch.nn.Module, _args: object, key: int = id(module)) -> None:
                started[key] = time.perf_counter()

            def post(
                module: torch.nn.Module, _args: object, _out: object, key: int = id(module), part: str = part
            ) -> None:
                spent[part] += time.perf_counter() - started.pop(key)

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        run()  # warm the hooks' path once, not counted
        spent.clear()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        total = (time.perf_counter() - start) * 1000 / repeats
    finally:
        for handle in handles:
            handle.remove()
    parts = {part: seconds * 1000 / repeats for part, seconds in spent.items()}
    parts["attention core"] -= parts.get("projections", 0.0)  # self_attn's time includes its projections
    parts["rest"] = total - sum(parts.values())
    return parts, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve = ServeSettings()
    parser.add_argument("--model", default=serve.model)
    parser.add_argument("--banks-dir", type=Path, default=serve.banks_dir)
    parser.add_argument("--bank", default="default")
    parser.add_argument("--tokens", type=int, default=250)
    parser.add_argument("--seconds", type=float, default=20.0, help="profiler time (one thread)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--threads", type=int, default=2, help="the wide pass's threads in the timings (1: no wide rows)"
    )
    args = parser.parse_args()

    folder = servable(resolve(args.model, serve.models_dir))
    bank = load_bank(bank_dir(args.banks_dir, args.bank))
    model = load_selection_model(folder)
    selector = bank_selector(model, bank)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = token_blocks(tokenizer, lee_heldout(Settings().data_dir), args.tokens, 1)[0].tolist()
    plain_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    tensor = torch.tensor([ids])

    def select() -> object:
        return selector.scores([ids])

    @torch.no_grad()
    def plain() -> object:
        return plain_model(tensor, logits_to_keep=1).logits

    rule = bank.selection_rule
    print(
        f"model {folder.name}, bank {args.bank} (K={bank.k}, m={bank.m}, layers {rule.layers}), "
        f"input {len(ids)} tokens, float32\n"
    )
    with threads(1):
        select(), plain()  # warm-up
    rows: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.repeats):
        with threads(1):
            rows["select, 1 thread"].append(median_ms(select, 1))
            rows["plain prefill, 1 thread"].append(median_ms(plain, 1))
        if args.threads > 1:
            with threads(args.threads):
                rows[f"select, {args.threads} threads"].append(median_ms(select, 1))
                rows[f"plain prefill, {args.threads} threads"].append(median_ms(plain, 1))
    base = statistics.median(rows["select, 1 thread"])
    print("| run | median ms | min ms | vs select 1 thread |\n|---|---|---|---|")
    for name, times in rows.items():
        print(
            f"| {name} | {statistics.median(times):.1f} | {min(times):.1f} | {statistics.median(times) / base:.2f}x |"
        )

    with threads(1):
        parts, total = by_part(model, select, args.repeats)
    print(f"\nselection pass by part, 1 thread (hooks, {args.repeats} passes, {total:.1f} ms per pass):\n")
    print("| part | ms per pass | share |\n|---|---|---|")
    for part, ms in sorted(parts.items(), key=lambda item: -item[1]):
        print(f"| {part} | {ms:.1f} | {ms / total:.0%} |")

    with threads(1), profile(activities=[ProfilerActivity.CPU]) as profiler:
        deadline = time.monotonic() + args.seconds
        passes = 0
        while time.monotonic() < deadline:
            select()
            passes += 1
    print(f"\ntorch.profiler, {passes} passes in {args.seconds:g} s, 1 thread:\n")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
