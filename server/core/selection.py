"""Prompt selection: which soft prompt of a bank should repair this request (IDP's selection pass).

The algorithm is described in docs/idp-algorithm.md. For K prompts P_1..P_K of m virtual tokens and an input
x_1..x_n, the score of prompt k is the attention mass the input tokens put on P_k's tokens, averaged over the
selection layers, the heads and the input tokens, in the sequence [P_1 | ... | P_K | E(x)] where each prompt sits
at positions 0..m-1 and sees only itself, and the input sits at positions m..m+n-1 and sees every prompt. A bank's
`SelectionRule` (server/core/banks.py) may leave out each prompt's first token and subtract a per-prompt centre.

Two selectors compute the same scores:
- `ReferenceSelector` builds that sequence literally, with its 4-D mask, and reads the model's eager attention
  probabilities. One request at a time: slow and obviously right, it is the oracle the tests hold the other to.
- `CachedSelector` is the one we serve. Prompt tokens never see the input, so their keys and values are computed
  once per bank; a batch of requests then costs one prefill of the input tokens over the cached prompt KV, and
  the attention mass is accumulated inside the attention function itself, so no attention tensor is kept.

A selection model runs with `SELECTION_ATTENTION`, an attention function registered with transformers'
`AttentionInterface` (see `prepare_selection_model`): it is where the cached pass reads queries and keys after
RoPE, and without a selection pass in its keyword arguments it is the model's own eager attention, so ordinary
forwards (the bank's KV pass, the reference) are plain eager forwards. The reference also accepts an eager model.

Scores are computed under no_grad: training can route examples with them, but cannot backpropagate through them.

Nothing here knows about vLLM or HTTP; selectors are objects the caller creates and owns.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from server.core.banks import PromptBank, Score, SelectionRule

SELECTION_ATTENTION = "idp_selection"
"""Name of the attention implementation a selection model runs with (`model.config._attn_implementation`)."""

SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2"})
"""Architectures tested against the reference. Others may differ in ways the cached pass must know about
(sliding windows, logit soft-capping, per-layer rotary tables), so they are refused rather than guessed."""

_PASS_KWARG = "idp_selection_pass"


@dataclass(frozen=True)
class Selection:
    """The outcome of selection for one request.

    `index` is argmax of `scores` with ties going to the lowest index (so identical prompts are deterministic);
    `margin` is the best score minus the second best (0.0 for a one-prompt bank), a cheap confidence signal;
    `seconds` is the wall time of the whole batch the request was selected in, shared by its requests.
    """

    index: int
    scores: tuple[float, ...]
    margin: float
    seconds: float


QUERY_BLOCK = 128
"""Input queries attended together. Block by block, the logits stay small enough for the CPU caches, and a block
skips the keys of the input tokens after it (the masked upper triangle); on SmolLM2 with 512 input and 512 prompt
tokens this made the attention 2.6x faster than one [n, K*m + n] block."""


@dataclass
class _SelectionPass:
    """The state of one cached selection forward, handed to the attention function through keyword arguments.

    It lives for one `CachedSelector` pass, so concurrent selectors never share anything mutable. Per scored
    layer it adds up the mass on each prompt (`mass`, [B, L, K]) and, when a rule needs it, the part of that mass
    on each prompt's first token (`sink`); rules are applied to these sums afterwards (`_apply_rule`).
    """

    prompt_kv: Sequence[tuple[torch.Tensor, torch.Tensor]]
    slots: dict[int, int]
    num_prompts: int
    prompt_tokens: int
    lengths: torch.Tensor
    mask: torch.Tensor
    mass: torch.Tensor
    sink: torch.Tensor | None

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """Attention of the input tokens over [cached prompt KV | input KV]; on selection layers, add its score.

        Queries are grouped by KV head ([B, Hkv, G, n, dh]) instead of repeating K/V, which is how GQA shares a
        KV head between G query heads. Right padding needs no key mask: the causal mask already keeps real
        tokens off the pads, and pad queries are left out of the token mean.
        """
        batch, heads, n, head_dim = query.shape
        kv_heads = key.shape[1]
        prompt_keys, prompt_values = self.prompt_kv[layer]
        keys = torch.cat([prompt_keys.expand(batch, -1, -1, -1), key], dim=2)
        values = torch.cat([prompt_values.expand(batch, -1, -1, -1), value], dim=2)
        grouped = query.reshape(batch, kv_heads, heads // kv_heads, n, head_dim) * scaling
        blocks = [
            self._attend_block(layer, grouped[:, :, :, start : start + QUERY_BLOCK], keys, values, start)
            for start in range(0, n, QUERY_BLOCK)
        ]
        return torch.cat(blocks, dim=3).reshape(batch, heads, n, head_dim).transpose(1, 2).contiguous()

    def _attend_block(
        self, layer: int, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Attention of input queries start..start+size-1 ([B, Hkv, G, size, dh]) over the keys they may see."""
        batch, kv_heads, groups, size, head_dim = queries.shape
        visible = self.prompt_tokens + start + size
        logits = torch.matmul(queries.reshape(batch, kv_heads, groups * size, head_dim), keys[:, :, :visible].mT)
        logits.view(batch, kv_heads, groups, size, visible).add_(self.mask[start : start + size, :visible])
        probs = torch.softmax(logits, dim=-1)
        if layer in self.slots:
            self._add_block_score(self.slots[layer], probs.view(batch, kv_heads * groups, size, visible), start)
        return torch.matmul(probs, values[:, :, :visible]).view(batch, kv_heads, groups, size, head_dim)

    def _add_block_score(self, slot: int, probs: torch.Tensor, start: int) -> None:
        """Add a query block's share of a layer's sums: mass on each prompt (and on its first token), mean over
        heads and real tokens."""
        per_prompt = probs[..., : self.prompt_tokens].unflatten(-1, (self.num_prompts, -1))
        position = torch.arange(start, start + probs.shape[2], device=probs.device)
        real = (position[None, :] < self.lengths[:, None])[..., None]
        self.mass[:, slot] += (per_prompt.sum(-1).mean(1) * real).sum(1) / self.lengths[:, None]
        if self.sink is not None:
            self.sink[:, slot] += (per_prompt[..., 0].mean(1) * real).sum(1) / self.lengths[:, None]


def _selection_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The registered attention function: the cached selection pass when one is given, else the model's eager.

    Falling back to the modelling module's own `eager_attention_forward` keeps ordinary forwards exactly what
    transformers computes in eager mode, attention probabilities included (the reference reads them).
    """
    selection = kwargs.get(_PASS_KWARG)
    if isinstance(selection, _SelectionPass):
        return selection.attend(module.layer_idx, query, key, value, scaling), None
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


# transformers' documented extension point: a registry of pure functions, idempotent, holding no request state.
AttentionInterface.register(SELECTION_ATTENTION, _selection_attention)
AttentionMaskInterface.register(SELECTION_ATTENTION, eager_mask)


def prepare_selection_model(model: PreTrainedModel) -> PreTrainedModel:
    """Make `model` a selection model in place: float32, eval, no grad, attention = `SELECTION_ATTENTION`.

    float32 because selection math must match the reference to 1e-5 (and bf16 is far slower on our CPUs).
    """
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"selection supports {sorted(SUPPORTED_MODEL_TYPES)}, not model_type {config.model_type!r}")
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        raise ValueError("selection does not support sliding-window attention layers")
    model.to(torch.float32).eval().requires_grad_(False)
    model.set_attn_implementation(SELECTION_ATTENTION)
    return model


def load_selection_model(folder: Path, device: str = "cpu") -> PreTrainedModel:
    """Load a model folder (local files only) as a selection model on `device`; see `prepare_selection_model`.

    Every selector tensor follows the model's device, so on a GPU node the selection pass runs on the GPU next to
    vLLM (float32 SmolLM2-135M: about 0.6 GB) instead of on the host's CPU cores.
    """
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    return prepare_selection_model(model).to(device)


def _check_model(model: PreTrainedModel, allowed: tuple[str, ...]) -> PreTrainedModel:
    """The model, if its attention implementation is one of `allowed`: any other would silently skip our code."""
    implementation = model.config._attn_implementation
    if implementation not in allowed:
        raise ValueError(
            f"model attention implementation is {implementation!r}, expected one of {allowed}: "
            "load it with load_selection_model or pass it through prepare_selection_model"
        )
    return model


def _check_prompts(model: PreTrainedModel, prompts: torch.Tensor) -> torch.Tensor:
    """The bank as a contiguous float32 [K, m, d] tensor on the model's device, or ValueError."""
    if not isinstance(prompts, torch.Tensor) or not prompts.is_floating_point() or prompts.dim() != 3:
        raise ValueError("prompts must be a float tensor [K, m, hidden_size]")
    if prompts.shape[0] < 1 or prompts.shape[1] < 1:
        raise ValueError(f"prompts must hold at least one prompt of one token, got shape {tuple(prompts.shape)}")
    hidden = model.get_input_embeddings().embedding_dim
    if prompts.shape[2] != hidden:
        raise ValueError(f"prompts have hidden size {prompts.shape[2]}, the model's is {hidden}")
    return prompts.detach().to(device=model.device, dtype=torch.float32).contiguous()


def _check_layers(model: PreTrainedModel, layers: Sequence[int] | None) -> tuple[int, ...]:
    """Sorted distinct selection layers, all layers by default (the paper's "overall attention")."""
    count = model.config.num_hidden_layers
    if layers is None:
        return tuple(range(count))
    chosen = tuple(sorted(set(layers)))
    if not chosen or chosen[0] < 0 or chosen[-1] >= count:
        raise ValueError(f"selection layers must be a non-empty subset of 0..{count - 1}, got {list(layers)}")
    return chosen


def _check_rule(
    model: PreTrainedModel, prompts: torch.Tensor, layers: Sequence[int] | None, rule: SelectionRule | None
) -> tuple[SelectionRule, tuple[int, ...]]:
    """The rule to apply (`rule`, else the paper's on `layers`) and its layers, or ValueError.

    `layers` is the older way to name the paper's rule on a layer subset; naming both is ambiguous."""
    if rule is None:
        return SelectionRule(), _check_layers(model, layers)
    if layers is not None:
        raise ValueError("give selection layers or a selection rule, not both (a rule names its own layers)")
    rule.check_fits(prompts.shape[0], model.config.num_hidden_layers)
    return rule, _check_layers(model, rule.layers)


def _apply_rule(rule: SelectionRule, mass: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """Final scores [B, K] of a rule from per-layer sums [B, L, K] over exactly the rule's layers."""
    per_layer = mass - sink if rule.score == "mass_no_sink" else mass
    scores = per_layer.mean(1)
    if rule.centre is not None:
        scores = scores - torch.tensor(rule.centre, dtype=scores.dtype, device=scores.device)
    return scores


def _check_batch(model: PreTrainedModel, batch: Sequence[Sequence[int]], prompt_length: int) -> list[list[int]]:
    """The requests as lists of ints, or ValueError naming the request and the problem."""
    if len(batch) == 0:
        raise ValueError("batch is empty")
    vocab = model.get_input_embeddings().num_embeddings
    limit = model.config.max_position_embeddings - prompt_length
    requests = [list(map(int, ids)) for ids in batch]
    for i, ids in enumerate(requests):
        if not ids:
            raise ValueError(f"request {i}: input is empty (no token ids)")
        if min(ids) < 0 or max(ids) >= vocab:
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise ValueError(f"request {i}: token id {bad} out of range [0, {vocab})")
        if len(ids) > limit:
            raise ValueError(
                f"request {i}: {len(ids)} tokens plus {prompt_length} prompt tokens exceed the model's "
                f"{model.config.max_position_embeddings} positions"
            )
    return requests


def _selections(scores: torch.Tensor, seconds: float) -> list[Selection]:
    """One `Selection` per row of scores [B, K]; ties go to the lowest index."""
    result = []
    for row in scores.tolist():
        ranked = sorted(row, reverse=True)
        margin = ranked[0] - ranked[1] if len(row) > 1 else 0.0
        result.append(Selection(index=row.index(ranked[0]), scores=tuple(row), margin=margin, seconds=seconds))
    return result


class ReferenceSelector:
    """The oracle: the full [P_1 | ... | P_K | E(x)] sequence, its 4-D mask, one eager forward per request.

    It also accepts a plain eager model, so the oracle can run on a model this module never touched. Every
    `SelectionRule` is applied literally to the attention probabilities, apart from the cached selector's code.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        prompts: torch.Tensor,
        layers: Sequence[int] | None = None,
        *,
        rule: SelectionRule | None = None,
    ) -> None:
        self._model = _check_model(model, ("eager", SELECTION_ATTENTION))
        self._prompts = _check_prompts(model, prompts)
        self._rule, self._layers = _check_rule(model, self._prompts, layers, rule)

    @torch.no_grad()
    def scores(self, batch: Sequence[Sequence[int]]) -> torch.Tensor:
        """Scores [B, K] (float32) under the rule, one forward per request."""
        requests = _check_batch(self._model, batch, self._prompts.shape[1])
        return torch.stack([self._request_scores(ids) for ids in requests])

    def select(self, batch: Sequence[Sequence[int]]) -> list[Selection]:
        """One `Selection` per request; `seconds` is the wall time of the whole batch."""
        start = time.perf_counter()
        scores = self.scores(batch)
        return _selections(scores, time.perf_counter() - start)

    def _request_scores(self, ids: list[int]) -> torch.Tensor:
        """Scores [K] of one request, read off the eager attention probabilities of the full sequence."""
        num_prompts, m, hidden = self._prompts.shape
        prompt_tokens, n = num_prompts * m, len(ids)
        tokens = torch.tensor(ids, device=self._model.device)
        embedded = torch.cat([self._prompts.reshape(prompt_tokens, hidden), self._model.get_input_embeddings()(tokens)])
        positions = torch.cat([torch.arange(m).repeat(num_prompts), torch.arange(m, m + n)])
        mask = _reference_mask(num_prompts, m, n).to(self._model.device)
        out = self._model.get_decoder()(
            inputs_embeds=embedded[None],
            attention_mask=mask[None, None],
            position_ids=positions[None].to(self._model.device),
            output_attentions=True,
        )
        attentions = torch.stack([out.attentions[layer][0] for layer in self._layers])
        on_prompts = attentions[:, :, prompt_tokens:, :prompt_tokens].unflatten(-1, (num_prompts, m))
        counted = on_prompts[..., 1:] if self._rule.score == "mass_no_sink" else on_prompts
        scores = counted.sum(-1).mean((0, 1, 2))
        if self._rule.centre is not None:
            scores = scores - torch.tensor(self._rule.centre, device=scores.device)
        return scores


def _reference_mask(num_prompts: int, m: int, n: int) -> torch.Tensor:
    """Additive [L, L] mask, L = K*m + n: a prompt token sees its own prompt causally, an input token sees
    every prompt token and the input tokens up to itself."""
    prompt_tokens = num_prompts * m
    size = prompt_tokens + n
    index = torch.arange(size)
    causal = index[None, :] <= index[:, None]
    same_prompt = (index // m)[:, None] == (index // m)[None, :]
    is_input = index >= prompt_tokens
    allowed = causal & (same_prompt | is_input[:, None])
    return torch.zeros(size, size).masked_fill(~allowed, torch.finfo(torch.float32).min)


class CachedSelector:
    """The serving selector: prompt KV cached once per bank, one batched prefill of the inputs per selection.

    `rule` is the bank's `SelectionRule` (`layers` alone: the paper's score on those layers). The prompt KV of
    every layer is kept, so `layer_scores` can score all layers for the routing study with the same code.
    `stop_after_last_layer` (default) runs the decoder only up to the attention of the deepest selection layer,
    since nothing later can change the scores; False runs every layer, the cost of a full prefill, which is what
    the option is for (measuring that it changes nothing but time). The LM head never runs.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        prompts: torch.Tensor,
        layers: Sequence[int] | None = None,
        stop_after_last_layer: bool = True,
        *,
        rule: SelectionRule | None = None,
    ) -> None:
        self._model = _check_model(model, (SELECTION_ATTENTION,))
        self._prompts = _check_prompts(model, prompts)
        self._rule, self._layers = _check_rule(model, self._prompts, layers, rule)
        self._stop_after_last_layer = stop_after_last_layer
        self._prompt_kv = self._compute_prompt_kv()

    @property
    def rule(self) -> SelectionRule:
        return self._rule

    @torch.no_grad()
    def _compute_prompt_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the bank's keys and values as [1, Hkv, K*m, dh]: the K prompts side by side.

        One batched eager forward of the K prompts (K rows of m tokens, positions 0..m-1, causal), exactly what
        each prompt computes inside the full sequence, since there it sees nothing but itself.
        """
        out = self._model.get_decoder()(inputs_embeds=self._prompts, use_cache=True)
        return [(_side_by_side(layer.keys), _side_by_side(layer.values)) for layer in out.past_key_values.layers]

    @torch.no_grad()
    def scores(self, batch: Sequence[Sequence[int]]) -> torch.Tensor:
        """Scores [B, K] (float32) under the rule, of a batch of requests of any lengths, in one forward."""
        depth = self._layers[-1] + 1 if self._stop_after_last_layer else len(self._prompt_kv)
        selection = self._pass(batch, self._layers, with_sink=self._rule.score == "mass_no_sink", depth=depth)
        return _apply_rule(self._rule, selection.mass, selection.sink)

    @torch.no_grad()
    def layer_scores(self, batch: Sequence[Sequence[int]]) -> dict[Score, torch.Tensor]:
        """Per score and every layer of the model, the uncentred scores [B, L, K], in one forward of all layers.

        For choosing a rule (server/lab/routing.py): the scores of any rule are the mean of these over its layers
        minus its centre, so one pass per input serves every candidate rule.
        """
        every = tuple(range(len(self._prompt_kv)))
        selection = self._pass(batch, every, with_sink=True, depth=len(every))
        assert selection.sink is not None
        return {"mass": selection.mass, "mass_no_sink": selection.mass - selection.sink}

    def select(self, batch: Sequence[Sequence[int]]) -> list[Selection]:
        """One `Selection` per request; `seconds` is the wall time of the whole batch."""
        start = time.perf_counter()
        scores = self.scores(batch)
        return _selections(scores, time.perf_counter() - start)

    def _pass(
        self, batch: Sequence[Sequence[int]], layers: tuple[int, ...], with_sink: bool, depth: int
    ) -> _SelectionPass:
        """One cached forward of the batch (right-padded) through `depth` layers, summing scores on `layers`."""
        num_prompts, m, _ = self._prompts.shape
        requests = _check_batch(self._model, batch, m)
        lengths = torch.tensor([len(ids) for ids in requests])
        n = int(lengths.max())
        device = self._model.device
        ids = torch.tensor([ids + [0] * (n - len(ids)) for ids in requests], device=device)
        sums = torch.zeros(len(requests), len(layers), num_prompts, device=device)
        selection = _SelectionPass(
            prompt_kv=self._prompt_kv,
            slots={layer: slot for slot, layer in enumerate(layers)},
            num_prompts=num_prompts,
            prompt_tokens=num_prompts * m,
            lengths=lengths.to(device, torch.float32),
            mask=_input_mask(num_prompts * m, n).to(device),
            mass=sums,
            sink=torch.zeros_like(sums) if with_sink else None,
        )
        self._forward(ids, m, selection, depth)
        return selection

    def _forward(self, ids: torch.Tensor, m: int, selection: _SelectionPass, depth: int) -> None:
        """Run the first `depth` decoder layers on the input tokens at positions m..m+n-1.

        When stopping after the last selection layer, that layer runs its attention only: its MLP (three
        quarters of a layer's work) cannot change any score.
        """
        decoder = self._model.get_decoder()
        hidden = self._model.get_input_embeddings()(ids)
        positions = torch.arange(m, m + ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
        kwargs = {"position_embeddings": decoder.rotary_emb(hidden, positions), _PASS_KWARG: selection}
        *full, last = decoder.layers[:depth]
        for layer in full:
            hidden = layer(hidden, position_ids=positions, **kwargs)
        if self._stop_after_last_layer:
            last.self_attn(hidden_states=last.input_layernorm(hidden), attention_mask=None, **kwargs)
        else:
            last(hidden, position_ids=positions, **kwargs)


def bank_selector(model: PreTrainedModel, bank: PromptBank, layers: Sequence[int] | None = None) -> CachedSelector:
    """The serving selector of `bank`: its manifest's rule, the one place a server turns a bank into a selector.

    `layers` (the server's `selection_layers` setting) overrides the rule's layers for every bank; a centre is
    then dropped, since it was calibrated on the rule's own layers. A rule that does not fit the model (a layer it
    lacks) is a ValueError naming the manifest field.
    """
    rule = bank.selection_rule
    if layers is not None:
        rule = SelectionRule(score=rule.score, layers=tuple(layers), source="selection_layers setting")
    return CachedSelector(model, bank.embeddings, rule=rule)


def _side_by_side(states: torch.Tensor) -> torch.Tensor:
    """[K, Hkv, m, dh] -> [1, Hkv, K*m, dh]: prompt k's tokens at columns k*m..k*m+m-1."""
    num_prompts, kv_heads, m, head_dim = states.shape
    return states.transpose(0, 1).reshape(1, kv_heads, num_prompts * m, head_dim).contiguous()


def _input_mask(prompt_tokens: int, n: int) -> torch.Tensor:
    """Additive [n, K*m + n] mask of the input queries: every prompt token visible, input causal."""
    causal = torch.ones(n, n, dtype=torch.bool).triu(1)
    blocked = torch.cat([torch.zeros(n, prompt_tokens, dtype=torch.bool), causal], dim=1)
    return torch.zeros(blocked.shape).masked_fill(blocked, torch.finfo(torch.float32).min)


def offline_choices(
    model: Path,
    prompts: torch.Tensor,
    names: Sequence[str],
    texts: Sequence[str],
    rule: SelectionRule | None = None,
) -> list[str]:
    """The prompt name the served selection picks for each text (the model folder's own tokenizer; `rule`
    default: the paper's, all layers).

    What a server with this model and bank must report in dynamic mode: load tests and reliability tests check
    live answers against it, computed in a separate model instance so a shared bug cannot agree with itself.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    selector = CachedSelector(load_selection_model(model), prompts, rule=rule)
    chosen = selector.select([tokenizer.encode(text) for text in texts])
    return [names[c.index] for c in chosen]
