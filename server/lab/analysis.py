"""Where does a repair act? Per layer, how far the compressed model's attention is from the base model's.

The paper's reading of prompt repair is that a prompt *redirects* attention back towards what the uncompressed
model attended to, rather than re-learning what compression destroyed. That is checkable: on the same inputs,
compare each layer's attention distributions over the input tokens (prompt positions dropped, each row
renormalised) of the compressed model alone, behind a prompt, and with LoRA, against the base model's. If
prompts redirect, their rows sit closer to the base model's than the bare compressed model's do.

One confound is measured apart: most heads of the base model park attention on the first input token (an
"attention sink"). Behind a prompt, that mass can move onto the prompt's first token, which dropping the prompt
columns turns into a large deviation that says nothing about how the input tokens attend to each other. So each
distance is also reported with the first input token's row and column dropped (`*_nosink`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedModel

from server.core.selection import SELECTION_ATTENTION
from server.lab.evaluate.compare import Comparison
from server.lab.evaluate.examples import eval_examples
from server.lab.evaluate.methods import Method, load_methods
from server.lab.tasks import TASKS


def eager(model: PreTrainedModel) -> PreTrainedModel:
    """The model with an attention implementation that returns probabilities (selection models already do)."""
    if model.config._attn_implementation not in ("eager", SELECTION_ATTENTION):
        model.set_attn_implementation("eager")
    return model


@torch.no_grad()
def input_attention(
    model: PreTrainedModel, ids: list[int], prompt: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention among input tokens [L, H, n, n] (prompt columns dropped, rows renormalised) and the mass each
    input row put on the prompt, mean per layer [L] (zeros without a prompt)."""
    embeds = model.get_input_embeddings()(torch.tensor([ids], device=model.device))
    m = 0 if prompt is None else prompt.shape[0]
    if prompt is not None:
        embeds = torch.cat([prompt[None].to(embeds.dtype), embeds], dim=1)
    attentions = torch.stack([a[0] for a in model(inputs_embeds=embeds, output_attentions=True).attentions])
    rows = attentions[:, :, m:]
    inputs = rows[..., m:]
    return inputs / inputs.sum(-1, keepdim=True), rows[..., :m].sum(-1).mean((1, 2))


def without_first_token(attention: torch.Tensor) -> torch.Tensor:
    """Attention rows [..., n, n] without the first input token's row and column, rows renormalised."""
    rest = attention[..., 1:, 1:]
    return rest / rest.sum(-1, keepdim=True).clamp_min(1e-12)


def distances(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer [L]: mean total variation and mean Jensen-Shannon distance (base 2, in [0, 1]) of rows."""

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * (a.clamp_min(1e-12).log2() - b.clamp_min(1e-12).log2())).sum(-1)

    mix = (p + q) / 2
    js = (0.5 * kl(p, mix) + 0.5 * kl(q, mix)).clamp_min(0).sqrt()
    return 0.5 * (p - q).abs().sum(-1).mean((1, 2)), js.mean((1, 2))


def attention_deviation(base: PreTrainedModel, methods: Sequence[Method], inputs: Sequence[list[int]]) -> list[dict]:
    """One row per layer: for each method, mean TV / JS distance to the base model's attention, and the mean
    attention mass the input put on the prompt (`on_prompt`, prompt methods only), over `inputs`."""
    totals: dict[str, torch.Tensor] = {}
    for model in (base, *(m.model for m in methods)):
        eager(model)
    for ids in tqdm(inputs, desc="attention"):
        reference, _ = input_attention(base, ids, None)
        for method in methods:
            prompt, _, _ = method.choose(ids)
            attention, on_prompt = input_attention(method.model, ids, prompt)
            tv, js = distances(attention, reference)
            tv_nosink, js_nosink = distances(without_first_token(attention), without_first_token(reference))
            parts = {"tv": tv, "js": js, "tv_nosink": tv_nosink, "js_nosink": js_nosink}
            parts |= {"on_prompt": on_prompt} if prompt is not None else {}
            for key, value in parts.items():
                totals[f"{method.name}/{key}"] = totals.get(f"{method.name}/{key}", 0) + value
    layers = base.config.num_hidden_layers
    return [
        {"layer": layer, **{k: float(v[layer]) / len(inputs) for k, v in totals.items()}} for layer in range(layers)
    ]


def analyse(comparison: Comparison) -> list[dict]:
    """Attention deviation of compressed, single prompt, IDP and LoRA (the evaluate command's cached adapter)
    from the base model, on the contexts of the tasks' test examples."""
    c = comparison
    base, methods, _, single = load_methods(c.base_dir, c.compressed_dir, c.bank_dir, c.single_dir, c.device)
    methods = [m for m in methods if not m.name.startswith("forced:")]
    lora, _ = c.lora(base, single) or (None, None)
    methods += [lora] if lora is not None else []
    tokenizer = AutoTokenizer.from_pretrained(c.compressed_dir)
    inputs = [tokenizer(e.context)["input_ids"] for _, _, e in eval_examples(c.tasks or list(TASKS), c.limit)]
    return attention_deviation(base, methods, inputs)
