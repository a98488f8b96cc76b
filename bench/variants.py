"""Accuracy of model variants on real multiple-choice tasks: how much compression costs before any repair.

    python bench/variants.py smollm2-135m-instruct smollm2-135m-instruct-gptq-w3g64-dense ... [--limit 100]

Prints one JSON line per model: accuracy on the first `limit` test examples of each task (log-likelihood
scoring, `server.lab.evaluate.scoring.mc_accuracy`). Held-out perplexity is in each model's card (`idp_model.json`).
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoTokenizer

from server.core.config import Settings
from server.core.identity import resolve
from server.lab.evaluate.scoring import mc_accuracy
from server.lab.loading import load_model, torch_device
from server.lab.tasks import task_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model folders or names under the models dir")
    parser.add_argument("--tasks", nargs="+", default=["unit_identification", "step_inference"])
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--device", default="auto", help="torch device (auto: the GPU when torch sees one)")
    args = parser.parse_args()
    settings = Settings()
    torch.set_num_threads(settings.torch_threads)
    examples = {task: task_split(task, "test", limit=args.limit) for task in args.tasks}
    for name in args.models:
        folder = resolve(name, settings.models_dir)
        model, tokenizer = load_model(folder, torch_device(args.device)), AutoTokenizer.from_pretrained(folder)
        row = {task: mc_accuracy(model, tokenizer, ex) for task, ex in examples.items()}
        print(json.dumps({"model": folder.name, **row}), flush=True)


if __name__ == "__main__":
    main()
