"""The methods the report compares, as objects: a model, the prompts it may put in front of an input, and how one
is chosen (none, always the same, or IDP's selection pass)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from server.core.banks import PromptBank, load_bank
from server.core.identity import fingerprint
from server.core.selection import CachedSelector, prepare_selection_model
from server.lab.loading import freeze, load_model


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
    all-layer rule runs too (`idp:all-layers`), so the report shows what the calibration changed. Prompts go to
    the model's device.
    """
    prompts, params, names = bank.embeddings.to(model.device), bank.embeddings.numel(), tuple(bank.prompt_names)
    methods = (
        [
            Method(
                "single",
                model,
                single.embeddings.to(model.device),
                tuple(single.prompt_names),
                trainable=single.embeddings.numel(),
            )
        ]
        if single is not None
        else []
    )
    selector = CachedSelector(model, prompts, bank.selection_layers)
    methods.append(Method("idp", model, prompts, names, selector, params))
    if bank.selection_layers is not None:
        methods.append(Method("idp:all-layers", model, prompts, names, CachedSelector(model, prompts), params))
    methods += [
        Method(f"forced:{name}", model, prompts[k : k + 1], (name,), trainable=params)
        for k, name in enumerate(bank.prompt_names)
    ]
    return methods


def load_methods(
    base_dir: Path, compressed_dir: Path, bank_dir: Path, single_dir: Path | None, device: torch.device | str = "cpu"
) -> tuple[PreTrainedModel, list[Method], PromptBank, PromptBank | None]:
    """The base model and the methods on the compressed model (one shared selection model), banks verified, all on
    `device`."""
    model_print = fingerprint(compressed_dir)
    bank = load_bank(bank_dir, expect=model_print)
    single = load_bank(single_dir, expect=model_print) if single_dir else None
    base = freeze(load_model(base_dir, device))
    compressed = prepare_selection_model(load_model(compressed_dir, device))
    return base, [Method("compressed", compressed), *bank_methods(compressed, bank, single)], bank, single
