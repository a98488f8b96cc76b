"""Greedy generation with the real vLLM engine in a child process (a fresh engine per test run).

Usage: python tests/vllm_generate.py PROMPT MAX_TOKENS FOLDER:DTYPE [FOLDER:DTYPE ...]; prints one JSON object
{folder: text}. A child process keeps vLLM's engine state out of the pytest process.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path


def generate(prompt: str, max_tokens: int, models: list[tuple[Path, str]]) -> dict[str, str]:
    """Run this file as a child and return {folder: greedy continuation}."""
    args = [f"{folder}:{dtype}" for folder, dtype in models]
    env = os.environ | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, prompt, str(max_tokens), *args], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main() -> None:
    from vllm import LLM, SamplingParams

    prompt, max_tokens, *specs = sys.argv[1:]
    texts = {}
    for spec in specs:
        folder, dtype = spec.rsplit(":", 1)
        llm = LLM(folder, dtype=dtype, enforce_eager=True, distributed_executor_backend="uni", max_model_len=512)
        out = llm.generate([prompt], SamplingParams(max_tokens=int(max_tokens), temperature=0))
        texts[folder] = out[0].outputs[0].text
        del llm
        gc.collect()
    print(json.dumps(texts))


if __name__ == "__main__":
    _main()
