"""Two ways to have vLLM decode [soft prompt | input], measured against each other in one run.

A. prompt_embeds (what idp-serve serves): `server.online.engine.Engine` sends [P_k | E(x)] as mixed-mode prompt embeds
   (placeholder ids for the m virtual positions, the real ids after them). Banks stay outside the model: hot
   reload, any number of banks, no copy of the weights.
B. virtual tokens: a copy of the served model whose embedding table has K*m extra rows, the bank's prompts; the
   request is plain token ids [V + k*m .. V + k*m + m-1 | x]. Everything is native vLLM, but every bank (and every
   reload) needs its own model copy and an engine restart, and the untied LM head gets K*m extra outputs (zero rows
   here: logit 0, counted below if greedy ever picks one).
C. no prompt: plain token ids of the input alone, the floor both designs pay on top of.

Same model, dtype, KV cache, eager mode; one engine at a time, never two at once. Workloads (128-token inputs cut
from held-out news, prompt k = request index mod K):
- `c=1`: requests one after another, 64 output tokens: p50 latency;
- `c=N`: N requests at once, 64 output tokens: output tokens per second;
- `echo`: N lm-eval-style requests at once (max_tokens 1, prompt logprobs): requests per second.
Printed: a table per design and the ratios B / A; the share of requests where A and B decode the same tokens.

    python bench/decode_design.py [--requests 32] [--bank default]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from server.core.banks import PromptBank, load_bank
from server.core.config import Settings
from server.core.identity import resolve
from server.lab.corpus import lee_heldout, token_blocks
from server.online.engine import DecodeParams, Engine, EngineConfig, Prefix
from server.online.settings import ServeSettings

INPUT_TOKENS, OUTPUT_TOKENS, MAX_MODEL_LEN = 128, 64, 512
EMBED_KEY, HEAD_KEY = "model.embed_tokens.weight", "lm_head.weight"

Run = Callable[[int, list[int], bool], Awaitable[list[int]]]
"""Decode input i (its prompt is i mod K) and return the generated token ids; `echo` asks the lm-eval payload."""


def virtual_token_model(folder: Path, bank: PromptBank, out: Path) -> int:
    """Write a copy of `folder` with the bank's K*m prompt rows appended to the embedding table; return V."""
    state = load_file(folder / "model.safetensors")
    table = state[EMBED_KEY]
    vocab = table.shape[0]
    rows = bank.embeddings.reshape(-1, table.shape[1]).to(table.dtype)
    state[EMBED_KEY] = torch.cat([table, rows]).contiguous()
    head = state.get(HEAD_KEY, table)
    state[HEAD_KEY] = torch.cat([head, torch.zeros_like(rows)]).contiguous()
    out.mkdir(parents=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = AutoConfig.from_pretrained(folder)
    config.vocab_size = vocab + rows.shape[0]
    config.tie_word_embeddings = False
    config.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (folder / name).exists():
            shutil.copy(folder / name, out / name)
    return vocab


def engine_args(model: Path, embeds: bool) -> AsyncEngineArgs:
    return AsyncEngineArgs(
        model=str(model),
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        enforce_eager=True,
        kv_cache_memory_bytes=2**30,
        enable_prompt_embeds=embeds,
    )


def sampling(echo: bool) -> SamplingParams:
    if echo:
        return SamplingParams(
            max_tokens=1, temperature=0, logprobs=1, prompt_logprobs=1, output_kind=RequestOutputKind.FINAL_ONLY
        )
    return SamplingParams(
        max_tokens=OUTPUT_TOKENS, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY
    )


async def measure(run: Run, inputs: list[list[int]]) -> dict[str, object]:
    """Latency at c=1, throughput with all inputs at once, echo throughput; the greedy tokens of the batch."""
    await run(0, inputs[0], False)  # warm-up
    latencies = []
    for i, ids in enumerate(inputs[:4]):
        start = time.perf_counter()
        await run(i, ids, False)
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    tokens = await asyncio.gather(*(run(i, ids, False) for i, ids in enumerate(inputs)))
    wall = time.perf_counter() - start
    start = time.perf_counter()
    await asyncio.gather(*(run(i, ids, True) for i, ids in enumerate(inputs)))
    echo_wall = time.perf_counter() - start
    return {
        "p50 s (c=1)": statistics.median(latencies),
        "tok/s (all at once)": sum(map(len, tokens)) / wall,
        "echo req/s": len(inputs) / echo_wall,
        "tokens": tokens,
    }


async def design_a(folder: Path, bank: PromptBank, inputs: list[list[int]]) -> dict[str, object]:
    engine = Engine.start(EngineConfig(model=folder, served_model_name=folder.name, max_model_len=MAX_MODEL_LEN))

    async def run(i: int, ids: list[int], echo: bool) -> list[int]:
        params = (
            DecodeParams(max_tokens=1, temperature=0, logprobs=1, prompt_logprobs=1)
            if echo
            else DecodeParams(max_tokens=OUTPUT_TOKENS, temperature=0, ignore_eos=True)
        )
        prefix = Prefix(bank, i % bank.k)
        async for out in engine.generate(uuid.uuid4().hex, ids, prefix, params):
            final = out
        return list(final.choices[0].token_ids)

    try:
        return await measure(run, inputs)
    finally:
        engine.shutdown()


async def design_ids(model: Path, inputs: list[list[int]], prefix: Callable[[int], list[int]]) -> dict[str, object]:
    llm = AsyncLLM.from_engine_args(engine_args(model, embeds=False))

    async def run(i: int, ids: list[int], echo: bool) -> list[int]:
        prompt = {"prompt_token_ids": prefix(i) + ids}
        async for out in llm.generate(prompt, sampling(echo), uuid.uuid4().hex):
            final = out
        return list(final.outputs[0].token_ids)

    try:
        return await measure(run, inputs)
    finally:
        llm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--bank", default="default")
    args = parser.parse_args()

    serve = ServeSettings()
    folder = resolve(serve.model, serve.models_dir)
    bank = load_bank(serve.banks_dir / args.bank)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    blocks = token_blocks(tokenizer, lee_heldout(Settings().data_dir), INPUT_TOKENS)
    inputs = [blocks[i % len(blocks)].tolist() for i in range(args.requests)]
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        virtual = Path(tmp) / "virtual-token-model"
        vocab = virtual_token_model(folder, bank, virtual)
        print("A: prompt_embeds ...", file=sys.stderr)
        results["A prompt_embeds"] = asyncio.run(design_a(folder, bank, inputs))
        print("B: virtual tokens ...", file=sys.stderr)
        results["B virtual tokens"] = asyncio.run(
            design_ids(
                virtual, inputs, lambda i: list(range(vocab + (i % bank.k) * bank.m, vocab + (i % bank.k + 1) * bank.m))
            )
        )
        print("C: no prompt ...", file=sys.stderr)
        results["C no prompt"] = asyncio.run(design_ids(folder, inputs, lambda i: []))

    a, b = results["A prompt_embeds"], results["B virtual tokens"]
    same = sum(x == y for x, y in zip(a["tokens"], b["tokens"], strict=True))
    virtual_picked = sum(t >= vocab for seq in b["tokens"] for t in seq)
    metrics = ["p50 s (c=1)", "tok/s (all at once)", "echo req/s"]
    print(
        f"\nmodel {folder.name}, bank {args.bank} (K={bank.k}, m={bank.m}), float32, {args.requests} requests of "
        f"{INPUT_TOKENS} tokens, {OUTPUT_TOKENS} output tokens\n"
    )
    print("| design | " + " | ".join(metrics) + " |")
    print("|---|" + "---|" * len(metrics))
    for name, result in results.items():
        print(f"| {name} | " + " | ".join(f"{result[k]:.2f}" for k in metrics) + " |")
    print("| ratio B / A | " + " | ".join(f"{b[k] / a[k]:.2f}x" for k in metrics) + " |")
    print(
        f"\nA and B decode the same {OUTPUT_TOKENS} greedy tokens for {same}/{args.requests} requests; "
        f"B generated a virtual token {virtual_picked} times"
    )


if __name__ == "__main__":
    main()
