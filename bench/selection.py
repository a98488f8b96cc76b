"""What does IDP's selection pass cost next to the prefill the request needs anyway?

For each input length n, bank size K and prompt length m, prints (in ms, medians) the wall time of
- plain: a prefill of the n input tokens with no prompts (the model's sdpa attention, logits of the last token
  only, as a serving engine computes them),
- select: `CachedSelector.scores` with every layer selecting (one prefill of n tokens over K*m cached prompt
  tokens, no LM head),
- ratio select / plain of the medians (the issue's goal: <= 1.1x with all layers), and of the fastest runs
  ("min ratio"): on a loaded shared machine the minimum is the steadier estimate of the intrinsic cost,
- reference: `ReferenceSelector.scores`, the full-sequence oracle; eager over K*m + n tokens with every attention
  materialised, so it is run only where K*m + n <= --reference-max (default 256) and shown as "-" elsewhere.

One torch thread, float32, a batch of one request, random token ids and a bank whose rows are sampled from the
model's embedding table. Run: `python bench/selection.py [--quick] [--tiny]`.

`--batch-sizes 1 4 16` prints instead what batching buys per input: the selection time per 128-token input
(K=4, m=16, every layer selecting) in batches of each size, and its ratio to a batch of one. It is what the
server's default batch size on CPU rests on (server/app.py `selection_batch_size`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from itertools import product

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from server.core.config import Settings
from server.core.selection import CachedSelector, ReferenceSelector, load_selection_model, prepare_selection_model

MODEL = "smollm2-135m-instruct"


def timings(runs: Sequence[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Wall times of each callable, timed in alternation after one warm-up call each.

    Alternating puts the load of other processes on this shared machine on every column alike.
    """
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, bucket in zip(runs, times):
            start = time.perf_counter()
            run()
            bucket.append(time.perf_counter() - start)
    return times


def real_models() -> tuple[PreTrainedModel, PreTrainedModel, str]:
    """The plain (sdpa) and selection copies of the converted SmolLM2 model."""
    folder = Settings().models_dir / MODEL
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder} is missing: run `idp-serve prepare`, or pass --tiny")
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    return plain, load_selection_model(folder), MODEL


def tiny_models() -> tuple[PreTrainedModel, PreTrainedModel, str]:
    """A random 4-layer Llama, for a machine without the converted model."""
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    plain = LlamaForCausalLM(config).eval()
    selection = LlamaForCausalLM(config)
    selection.load_state_dict(plain.state_dict())
    return plain, prepare_selection_model(selection), "tiny random llama (4 layers, hidden 64)"


def bench_row(
    plain: PreTrainedModel, selection: PreTrainedModel, n: int, k: int, m: int, repeats: int, reference_max: int
) -> str:
    embeddings = selection.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(n * 1000 + k * 10 + m)
    bank = embeddings[torch.randint(embeddings.shape[0], (k, m), generator=generator)]
    ids = torch.randint(embeddings.shape[0], (1, n), generator=generator)
    batch = ids.tolist()
    selector = CachedSelector(selection, bank)

    @torch.no_grad()
    def prefill() -> object:
        return plain(ids, logits_to_keep=1)

    plain_s, select_s = timings([prefill, lambda: selector.scores(batch)], repeats)
    ratio, best_ratio = statistics.median(select_s) / statistics.median(plain_s), min(select_s) / min(plain_s)
    reference = "-"
    if k * m + n <= reference_max:
        oracle = ReferenceSelector(selection, bank)
        (reference_s,) = timings([lambda: oracle.scores(batch)], max(1, repeats // 2))
        reference = f"{1000 * statistics.median(reference_s):.1f}"
    times = f"{1000 * statistics.median(plain_s):>9.1f} {1000 * statistics.median(select_s):>10.1f}"
    return f"{n:>5} {k:>3} {m:>3} {times} {ratio:>6.2f}x {best_ratio:>8.2f}x {reference:>12}"


def batch_rows(selection: PreTrainedModel, sizes: Sequence[int], repeats: int, n: int = 128) -> list[str]:
    """Median selection time per input of batches of each size, and its ratio to the first size."""
    embeddings = selection.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(n)
    selector = CachedSelector(selection, embeddings[torch.randint(embeddings.shape[0], (4, 16), generator=generator)])
    batches = [torch.randint(embeddings.shape[0], (size, n), generator=generator).tolist() for size in sizes]
    times = timings([lambda batch=batch: selector.scores(batch) for batch in batches], repeats)
    per_input = [statistics.median(t) / size for t, size in zip(times, sizes, strict=True)]
    return [f"{size:>5} {1000 * cost:>13.1f} {cost / per_input[0]:>6.2f}x" for size, cost in zip(sizes, per_input)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n in (32, 128), K in (4, 16), m in (8, 32), 3 repeats")
    parser.add_argument("--tiny", action="store_true", help="a random tiny Llama instead of the real model")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per setting (default 5, quick 3)")
    parser.add_argument("--reference-max", type=int, default=256, help="largest K*m+n the reference is timed on")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="time batching instead (e.g. 1 4 16)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    plain, selection, name = tiny_models() if args.tiny else real_models()
    if args.batch_sizes:
        print(f"model: {name}; 1 thread, float32, 128-token inputs, K=4, m=16, median of {args.repeats or 5}")
        print(f"{'batch':>5} {'ms per input':>13} {'ratio':>7}")
        print("\n".join(batch_rows(selection, args.batch_sizes, args.repeats or 5)))
        return
    lengths, banks = ((32, 128), (4, 16)) if args.quick else ((32, 128, 512), (4, 8, 16))
    repeats = args.repeats or (3 if args.quick else 5)
    print(
        f"model: {name}; 1 thread, float32, batch of 1, median of {repeats}; reference where K*m+n <= "
        f"{args.reference_max}"
    )
    header = f"{'n':>5} {'K':>3} {'m':>3} {'plain ms':>9} {'select ms':>10} {'ratio':>7} {'min ratio':>9}"
    print(f"{header} {'reference ms':>12}")
    for n, k, m in product(lengths, banks, (8, 32)):
        print(bench_row(plain, selection, n, k, m, repeats, args.reference_max), flush=True)


if __name__ == "__main__":
    main()
