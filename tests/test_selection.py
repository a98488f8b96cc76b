"""The selection pass (docs/idp-algorithm.md): the cached serving selector equals the reference oracle.

Tiny random models stand in for real ones: a Llama (the SmolLM2 family) and a Qwen2 (another architecture vLLM
serves). Their weights are drawn wider than usual so attention is peaked and a wrong mask, position or padding
shows up far above float noise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from server.core.banks import SelectionRule, make_bank
from server.core.identity import Fingerprint
from server.core.selection import (
    QUERY_BLOCK,
    CachedSelector,
    ReferenceSelector,
    Selection,
    bank_selector,
    load_selection_model,
    prepare_selection_model,
)

VOCAB, HIDDEN, LAYERS = 256, 64, 3
LENGTHS = (3, 17, 40)
ATOL = 1e-5


def tiny_model(arch: str) -> PreTrainedModel:
    """A random 3-layer model with GQA (4 query heads over 2 KV heads), made a selection model."""
    shape = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "initializer_range": 0.2,
    }
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**shape))
    return prepare_selection_model(model)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    return tiny_model(request.param)


def bank(num_prompts: int, m: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(num_prompts, m, HIDDEN, generator=torch.Generator().manual_seed(seed))


def requests(lengths: tuple[int, ...] = LENGTHS) -> list[list[int]]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randint(VOCAB, (n,), generator=generator).tolist() for n in lengths]


def assert_same_selection(got: list[Selection], want: list[Selection]) -> None:
    assert [s.index for s in got] == [s.index for s in want]
    torch.testing.assert_close(
        torch.tensor([s.scores for s in got]), torch.tensor([s.scores for s in want]), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("num_prompts", [1, 3, 5])
@pytest.mark.parametrize("m", [2, 8])
def test_cached_selector_equals_reference_on_a_mixed_length_batch(model, num_prompts, m):
    prompts, batch = bank(num_prompts, m), requests()
    want = ReferenceSelector(model, prompts).select(batch)
    assert_same_selection(CachedSelector(model, prompts).select(batch), want)
    if num_prompts > 1:
        assert max(s.margin for s in want) > 100 * ATOL, "scores too flat for the choice to mean anything"


def test_inputs_longer_than_a_query_block_equal_reference(model):
    prompts, batch = bank(3, 8), requests((QUERY_BLOCK + 2, 2 * QUERY_BLOCK + 44, 5))
    want = ReferenceSelector(model, prompts).select(batch)
    assert_same_selection(CachedSelector(model, prompts).select(batch), want)


@pytest.mark.parametrize("layers", [[0], [1], [0, 2], [2, 0, 1]])
def test_a_subset_of_selection_layers_equals_reference(model, layers):
    prompts, batch = bank(4, 4), requests()
    want = ReferenceSelector(model, prompts, layers=layers).select(batch)
    assert_same_selection(CachedSelector(model, prompts, layers=layers).select(batch), want)


def test_layer_subsets_give_different_scores(model):
    prompts, batch = bank(4, 4), requests()
    first = CachedSelector(model, prompts, layers=[0]).scores(batch)
    every = CachedSelector(model, prompts).scores(batch)
    assert not torch.allclose(first, every, atol=100 * ATOL)


@pytest.mark.parametrize("layers", [[0], [1], None])
def test_stopping_after_the_last_selection_layer_changes_nothing(model, layers):
    prompts, batch = bank(3, 8), requests()
    stopped = CachedSelector(model, prompts, layers=layers, stop_after_last_layer=True).scores(batch)
    full = CachedSelector(model, prompts, layers=layers, stop_after_last_layer=False).scores(batch)
    torch.testing.assert_close(stopped, full, atol=1e-6, rtol=0)


def test_padding_does_not_change_a_requests_scores(model):
    selector = CachedSelector(model, bank(5, 8))
    batch = requests()
    together = selector.scores(batch)
    alone = torch.cat([selector.scores([ids]) for ids in batch])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)
    reordered = selector.scores(batch[::-1])
    torch.testing.assert_close(reordered.flip(0), together, atol=1e-6, rtol=0)


@pytest.mark.parametrize("selector_class", [ReferenceSelector, CachedSelector])
def test_identical_prompts_tie_and_the_lowest_index_wins(model, selector_class):
    prompts = bank(1, 8).repeat(3, 1, 1)
    for selection in selector_class(model, prompts).select(requests()):
        assert selection.index == 0
        assert selection.margin == 0.0
        assert len(set(selection.scores)) == 1


@pytest.mark.parametrize("selector_class", [ReferenceSelector, CachedSelector])
def test_a_tie_for_first_place_goes_to_the_lower_index(model, selector_class):
    """Bank [X, Y, Y] with the copies of Y ahead of X: the first copy (index 1) wins, never the second.

    A copy shares the attention mass with its twin, so we look for an X that the pair still beats.
    """
    ids, top = requests((17,)), bank(1, 4)
    for seed in range(2, 50):
        selection = selector_class(model, torch.cat([bank(1, 4, seed), top, top])).select(ids)[0]
        if selection.scores[1] > selection.scores[0]:
            break
    assert selection.scores[1] == selection.scores[2] > selection.scores[0]
    assert selection.index == 1


@pytest.mark.parametrize("selector_class", [ReferenceSelector, CachedSelector])
def test_a_single_prompt_is_chosen_with_zero_margin(model, selector_class):
    for selection in selector_class(model, bank(1, 8)).select(requests()):
        assert selection.index == 0
        assert selection.margin == 0.0
        assert len(selection.scores) == 1 and 0.0 < selection.scores[0] < 1.0


def test_selection_reports_scores_margin_and_the_batch_time(model):
    selections = CachedSelector(model, bank(5, 2)).select(requests())
    assert len(selections) == len(LENGTHS)
    assert len({s.seconds for s in selections}) == 1 and selections[0].seconds > 0
    for selection in selections:
        ranked = sorted(selection.scores, reverse=True)
        assert len(selection.scores) == 5
        assert selection.scores[selection.index] == ranked[0]
        assert selection.margin == pytest.approx(ranked[0] - ranked[1])
        assert 0.0 < sum(selection.scores) < 1.0, "mass on prompts; the rest is on the input tokens"


def test_scores_tensor_has_one_row_per_request(model):
    scores = CachedSelector(model, bank(3, 2)).scores(requests())
    assert scores.shape == (len(LENGTHS), 3) and scores.dtype == torch.float32


def test_the_reference_with_one_prompt_is_an_ordinary_causal_forward(model):
    """Independent check of the oracle's mask and positions: for K=1, [P | E(x)] is an ordinary causal sequence."""
    prompt, ids = bank(1, 8), requests((17,))[0]
    sequence = torch.cat([prompt[0], model.get_input_embeddings()(torch.tensor(ids))])
    with torch.no_grad():
        out = model.get_decoder()(inputs_embeds=sequence[None], output_attentions=True)
    mass = torch.stack(out.attentions)[:, 0, :, 8:, :8].sum(-1).mean()
    reference = ReferenceSelector(model, prompt).scores([ids])
    torch.testing.assert_close(reference, mass.reshape(1, 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("selector_class", [ReferenceSelector, CachedSelector])
@pytest.mark.parametrize(
    ("batch", "problem"),
    [
        ([], "batch is empty"),
        ([[1, 2], []], "request 1: input is empty"),
        ([[1, VOCAB]], f"token id {VOCAB} out of range"),
        ([[-1, 3]], "token id -1 out of range"),
        ([[1] * 600], "exceed the model's 512 positions"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_problem(model, selector_class, batch, problem):
    with pytest.raises(ValueError, match=problem):
        selector_class(model, bank(2, 4)).select(batch)


@pytest.mark.parametrize("selector_class", [ReferenceSelector, CachedSelector])
@pytest.mark.parametrize(
    ("prompts", "problem"),
    [
        (torch.randn(2, 4, HIDDEN + 1), f"hidden size {HIDDEN + 1}, the model's is {HIDDEN}"),
        (torch.randn(4, HIDDEN), r"float tensor \[K, m, hidden_size\]"),
        (torch.zeros(2, 4, HIDDEN, dtype=torch.long), r"float tensor \[K, m, hidden_size\]"),
        (torch.randn(0, 4, HIDDEN), "at least one prompt"),
    ],
)
def test_a_bad_bank_is_a_value_error(model, selector_class, prompts, problem):
    with pytest.raises(ValueError, match=problem):
        selector_class(model, prompts)


@pytest.mark.parametrize("layers", [[], [LAYERS], [-1]])
def test_selection_layers_must_exist(model, layers):
    with pytest.raises(ValueError, match="selection layers"):
        CachedSelector(model, bank(2, 4), layers=layers)


def test_the_cached_selector_needs_a_selection_model():
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128
        )
    )
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="prepare_selection_model"):
        CachedSelector(model, bank(2, 4))


def test_unsupported_architectures_are_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="not model_type 'gpt2'"):
        prepare_selection_model(gpt2)
    sliding = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=1,
    )
    with pytest.raises(ValueError, match="sliding-window"):
        prepare_selection_model(Qwen2ForCausalLM(sliding))


SENTENCES = (
    "The capital of France is Paris.",
    "Write a short poem about the sea and the wind that crosses it at night.",
    "def add(a, b):\n    return a + b",
)


@pytest.mark.slow
def test_cached_selector_equals_reference_on_smollm2(base_model: Path):
    folder = base_model
    torch.set_num_threads(1)
    model = load_selection_model(folder)
    batch = [AutoTokenizer.from_pretrained(folder)(text)["input_ids"] for text in SENTENCES]
    embeddings = model.get_input_embeddings().weight
    rows = torch.randint(embeddings.shape[0], (4, 8), generator=torch.Generator().manual_seed(0))
    prompts = embeddings[rows]
    want = ReferenceSelector(model, prompts).select(batch)
    assert_same_selection(CachedSelector(model, prompts).select(batch), want)
    assert_same_selection(
        CachedSelector(model, prompts, layers=[3, 17]).select(batch),
        ReferenceSelector(model, prompts, layers=[3, 17]).select(batch),
    )
    rule = SelectionRule(score="mass_no_sink", layers=(20, 21, 22), centre=(0.01, 0.0, -0.01, 0.0))
    assert_same_selection(
        CachedSelector(model, prompts, rule=rule).select(batch),
        ReferenceSelector(model, prompts, rule=rule).select(batch),
    )


# --- selection rules (server.core.banks.SelectionRule): the served selector equals the reference for each ------

RULES = {
    "mass": SelectionRule(),
    "mass-no-sink": SelectionRule(score="mass_no_sink"),
    "mass-centred": SelectionRule(centre=(0.05, -0.02, 0.0, 0.01)),
    "no-sink-layer-subset": SelectionRule(score="mass_no_sink", layers=(0, 2)),
    "no-sink-centred-one-layer": SelectionRule(score="mass_no_sink", layers=(1,), centre=(0.0, 0.1, -0.1, 0.02)),
}


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
def test_cached_selector_equals_reference_for_every_rule(model, rule):
    prompts, batch = bank(4, 4), requests((3, 17, QUERY_BLOCK + 9))
    want = ReferenceSelector(model, prompts, rule=rule).select(batch)
    assert_same_selection(CachedSelector(model, prompts, rule=rule).select(batch), want)
    for got in CachedSelector(model, prompts, rule=rule).select(batch):
        ranked = sorted(got.scores, reverse=True)
        assert got.margin == pytest.approx(ranked[0] - ranked[1]), "margin of the final (centred) scores"


def test_leaving_out_the_sink_lowers_every_score_by_the_first_tokens_mass(model):
    prompts, batch = bank(4, 4), requests()
    mass = CachedSelector(model, prompts).scores(batch)
    no_sink = CachedSelector(model, prompts, rule=SelectionRule(score="mass_no_sink")).scores(batch)
    assert (no_sink < mass).all() and (no_sink > 0).all()


def test_a_centre_is_subtracted_from_the_scores_before_the_choice(model):
    prompts, batch = bank(4, 4), requests()
    plain = CachedSelector(model, prompts).scores(batch)
    centre = plain.mean(0)
    centred = CachedSelector(model, prompts, rule=SelectionRule(centre=tuple(centre.tolist())))
    torch.testing.assert_close(centred.scores(batch), plain - centre, atol=1e-6, rtol=0)
    assert [s.index for s in centred.select(batch)] == (plain - centre).argmax(1).tolist()


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
def test_layer_scores_give_every_rules_scores(model, rule):
    prompts, batch = bank(4, 4), requests()
    per_layer = CachedSelector(model, prompts).layer_scores(batch)
    assert set(per_layer) == {"mass", "mass_no_sink"}
    assert per_layer["mass"].shape == (len(LENGTHS), LAYERS, 4)
    layers = list(rule.layers) if rule.layers is not None else list(range(LAYERS))
    derived = per_layer[rule.score][:, layers].mean(1) - torch.tensor(rule.centre or (0.0,) * 4)
    torch.testing.assert_close(derived, CachedSelector(model, prompts, rule=rule).scores(batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        (SelectionRule(layers=(LAYERS,)), "field 'selection.layers'"),
        (SelectionRule(centre=(0.0, 0.0)), "field 'selection.centre' has 2 values but the bank has 4 prompts"),
    ],
)
@pytest.mark.parametrize("selector_class", [ReferenceSelector, CachedSelector])
def test_a_rule_that_does_not_fit_the_bank_or_model_is_refused(model, selector_class, rule, problem):
    with pytest.raises(ValueError, match=problem):
        selector_class(model, bank(4, 4), rule=rule)


def test_layers_and_a_rule_together_are_refused(model):
    with pytest.raises(ValueError, match="not both"):
        CachedSelector(model, bank(4, 4), [0], rule=SelectionRule())


def test_a_banks_selector_follows_its_manifest_rule_and_the_layers_setting_overrides_it(model):
    fingerprint_ = Fingerprint(
        config_sha256="c", embedding_sha256="e", hidden_size=HIDDEN, vocab_size=VOCAB, weights="tiny"
    )
    rule = SelectionRule(score="mass_no_sink", layers=(1,), centre=(0.1, 0.0, 0.0, 0.0))
    prompt_bank = make_bank("b", bank(4, 4), ["a", "b", "c", "d"], fingerprint_, selection=rule)
    batch = requests()
    served = bank_selector(model, prompt_bank)
    assert served.rule == rule
    torch.testing.assert_close(served.scores(batch), ReferenceSelector(model, bank(4, 4), rule=rule).scores(batch))
    overridden = bank_selector(model, prompt_bank, layers=[0, 2])
    assert (overridden.rule.score, overridden.rule.layers, overridden.rule.centre) == ("mass_no_sink", (0, 2), None)
