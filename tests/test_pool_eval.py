"""`idp-serve evaluate-pool`: the protocol's numbers on constructed outcomes with known answers, and the command on
tiny models: IDP's looked-up outcome equals scoring IDP directly, a resumed and split run gives the records of one
run, and shards measured on other inputs are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from server.core.banks import load_bank, make_bank, save_bank
from server.core.config import Settings
from server.core.identity import fingerprint, verified_weights_digest
from server.core.selection import bank_selector, prepare_selection_model
from server.lab.evaluate import outcomes
from server.lab.evaluate.pool import PoolInputs, evaluate_pool
from server.lab.evaluate.protocol import Pools, markdown, report
from server.lab.evaluate.scoring import choice_logprobs
from server.lab.loading import freeze, load_model
from server.lab.lora_recipe import LoraSpec, lora_model
from server.lab.pooled import ratio_interval
from server.lab.recipe import state_key
from server.lab.tasks import task_split
from tests import helpers

RESAMPLES = 1_000

# ----- the protocol's numbers on constructed records -------------------------------------------------------


def records(n: int, picks: dict[str, list[int]], kl: dict[str, list[float]] | None, selected: list[str]) -> list[dict]:
    """Eval records of n two-choice examples whose right answer is always 0."""
    rows = []
    for i in range(n):
        row = {"index": i, "answer": 0, "picks": {m: p[i] for m, p in picks.items()}}
        row["picks_norm"] = dict(row["picks"])
        if kl is not None:
            row["kl"] = {m: v[i] for m, v in kl.items()}
        if selected:
            row["selected"], row["select_s"] = selected[i], 0.01
            for field in ("picks", "picks_norm", "kl"):
                if field in row:
                    row[field]["idp"] = row[field][f"forced:{selected[i]}"]
        rows.append(row)
    return rows


def task_records(n: int, a_right: bool, compressed_equals_base: bool = False) -> list[dict]:
    """Base always right, compressed right on even examples; prompt a is right everywhere when `a_right`
    (else the compressed model's picks), b the other way round; IDP selects the right one, as does the oracle
    (its KL is the lower); single equals compressed."""
    half = [0 if compressed_equals_base or i % 2 == 0 else 1 for i in range(n)]
    right = [0] * n
    picks = {"base": right, "compressed": half, "single": half}
    picks |= {"forced:a": right if a_right else half, "forced:b": half if a_right else right}
    low, high = [0.1] * n, [0.9] * n
    kl = {
        "compressed": high,
        "single": high,
        "forced:a": low if a_right else high,
        "forced:b": high if a_right else low,
    }
    return records(n, picks, kl, ["a" if a_right else "b"] * n)


def dev_records(n: int) -> list[dict]:
    """On dev, prompt b is right everywhere and a nowhere."""
    return records(n, {"forced:a": [1] * n, "forced:b": [0] * n}, None, [])


def general_records() -> list[dict]:
    """Two documents (one in two blocks): 30 tokens in all."""
    nll = {"base": 10.0, "compressed": 20.0, "single": 15.0, "forced:a": 12.0, "forced:b": 18.0, "idp": 12.0}
    kl = {"base": 0.0, "compressed": 3.0, "single": 1.5, "forced:a": 0.6, "forced:b": 2.4, "idp": 0.6}
    return [
        {"doc": doc, "tokens": 10, "nll": nll, "kl": kl, "selected": "a", "select_s": 0.01}
        for doc in ("owt/1", "owt/1", "enwiki/7")
    ]


def constructed(compressed_equals_base: bool = False, domains: dict[str, str] | None = None) -> dict:
    pools = Pools(("x", "y"), "t", ("z",))
    shards = {
        ("eval", "x"): task_records(40, True, compressed_equals_base),
        ("eval", "y"): task_records(10, False, compressed_equals_base),
        ("eval", "t"): task_records(20, True, compressed_equals_base),
        ("dev-choice", "x"): dev_records(5),
        ("dev-choice", "y"): dev_records(5),
        ("general", "general"): general_records(),
    }
    z = task_records(20, True, compressed_equals_base=True)
    for row in z:  # the single prompt breaks every example of the undamaged task; IDP does not
        row["picks"]["single"] = row["picks_norm"]["single"] = 1
    shards["eval", "z"] = z
    trainable = {"base": 0, "compressed": 0, "single": 64, "idp": 128, "forced:a": 64, "forced:b": 64}
    tokens = {"base": 0, "compressed": 0, "single": 4, "idp": 4, "forced:a": 4, "forced:b": 4}
    return report(pools, shards, dict.fromkeys("xytz", 0.5), trainable, tokens, RESAMPLES, domains)


def test_idp_that_picks_the_right_prompt_recovers_the_whole_gap_and_beats_single_and_both_forced_choices():
    summary = constructed()
    methods = summary["primary"]["methods"]
    assert summary["primary"]["n"] == 50
    assert methods["base"]["acc"]["mean"] == 1.0 and methods["compressed"]["acc"]["mean"] == 0.5
    assert methods["idp"]["fgr"]["fgr"] == 1.0 and methods["idp"]["fgr"]["ci"] == (1.0, 1.0)
    assert methods["single"]["fgr"]["fgr"] == 0.0
    assert methods["oracle"]["fgr"]["fgr"] == 1.0 and methods["any-correct"]["acc"]["mean"] == 1.0
    assert methods["any-correct"]["agreement"] is None  # an upper bound has no pick to agree with
    assert methods["idp"]["agreement"]["agreement"] == 1.0 and methods["compressed"]["agreement"]["agreement"] == 0.5
    # forced a: right on x (40), half of y (5) -> 0.9 on test; forced b is right on dev
    assert summary["primary"]["best_forced"] == {"test": "forced:a", "dev": "forced:b"}
    paired = summary["primary"]["paired"]
    assert paired["idp - best forced (test-chosen)"]["difference"] == pytest.approx(0.1)
    assert paired["idp - best forced (dev-chosen)"]["difference"] == pytest.approx(0.4)
    assert paired["idp - single"]["difference"] == pytest.approx(0.5) and paired["idp - single"]["ci"][0] > 0
    assert summary["targets"]["fgr"]["met"] and summary["targets"]["idp - single"]["better"]
    x = summary["per_task"]["x"]["methods"]
    assert x["idp"]["acc"] == 1.0 and x["idp"]["vs_compressed"]["difference"] == 0.5
    assert x["compressed"]["acc_ci"][0] < 0.5 < x["compressed"]["acc_ci"][1]  # Wilson around 20/40


def test_transfer_and_do_no_harm_are_reported_apart_and_harm_is_flagged_only_when_the_ci_is_below_zero():
    summary = constructed()
    assert "t" not in summary["primary"]["best_forced"] and summary["transfer"]["idp"]["fgr"]["fgr"] == 1.0
    line = next(x for x in markdown(summary, "c").splitlines() if x.startswith("Transfer task t"))
    assert "idp 100.0" in line and "single " in line and "FGR 100.0" in line
    harm = summary["do_no_harm"]
    assert harm["single"]["difference"] == -1.0 and harm["single"]["harm"]
    assert harm["idp"]["difference"] == 0.0 and not harm["idp"]["harm"]


def test_fgr_is_undefined_when_compression_costs_nothing():
    summary = constructed(compressed_equals_base=True)
    fgr = summary["primary"]["methods"]["idp"]["fgr"]
    assert not fgr["defined"] and fgr["fgr"] is None and not summary["targets"]["fgr"]["met"]
    assert "undefined (gap CI holds 0)" in markdown(summary, "idp-serve evaluate-pool")


def test_general_text_kl_and_perplexity_are_per_token_over_documents():
    general = constructed()["general"]
    assert general["documents"] == 2 and general["tokens"] == 30
    assert general["methods"]["compressed"]["kl"] == pytest.approx(0.3)
    assert general["methods"]["base"]["ppl"] == pytest.approx(np.exp(1.0))
    low, high = ratio_interval(np.array([1.0, 9.0]), np.array([1.0, 3.0]), RESAMPLES)
    assert low == pytest.approx(1.0) and high == pytest.approx(3.0)  # one document alone, or the other


def test_the_table_has_one_row_per_method_with_its_cost():
    table = markdown(constructed(), "idp-serve evaluate-pool")
    idp = next(line for line in table.splitlines() if line.startswith("| + IDP |"))
    # pooled acc with its CI, FGR, acc_norm, agreement, KL per token (1.8 / 30), ppl exp(36 / 30), bank size, the
    # prompt's tokens, selection
    assert idp.startswith(
        "| + IDP | 100.0 [100.0, 100.0] | 100.0 [100.0, 100.0] | 100.0 [100.0, 100.0] | 100.0 | 0.060 | 3.3 | 128 | 4 "
        "| 0.0100 |"
    )
    assert "| + best forced, dev-chosen (b) |" in table


def test_the_task_label_router_sends_each_task_to_the_prompt_trained_on_it_and_idp_elsewhere():
    # x's own prompt is a (right everywhere there), y's is a too (half right there); t has none: IDP's pick
    summary = constructed(domains={"x": "a", "y": "a"})
    own = summary["per_task"]
    assert own["x"]["methods"]["own-domain"]["acc"] == 1.0 and own["y"]["methods"]["own-domain"]["acc"] == 0.5
    assert own["t"]["methods"]["own-domain"]["acc"] == own["t"]["methods"]["idp"]["acc"]
    assert summary["primary"]["methods"]["own-domain"]["acc"]["mean"] == pytest.approx(45 / 50)
    assert summary["primary"]["paired"]["own-domain - single"]["difference"] == pytest.approx(0.4)
    assert "own-domain" not in constructed()["primary"]["methods"]  # no domains given, no router


def test_the_routing_table_shows_each_prompt_forced_per_task_and_where_idp_sends_the_task():
    summary = constructed()
    assert summary["routing"]["x"]["idp"] == {"forced:a": 1.0} and summary["routing"]["y"]["idp"] == {"forced:b": 1.0}
    assert summary["routing"]["x"]["idp_is_oracle"] == 1.0
    table = markdown(summary, "idp-serve evaluate-pool")
    # x: a forced is right everywhere and IDP always selects it; b forced is right on half and never selected
    assert "| x | 100.0 (100.0) | 50.0 (0.0) | 100.0 | 100.0 | 100.0 |" in table


# ----- the command on tiny models ------------------------------------------------------------------------

TRAINED = {"sources": ["howto"]}
POOLS = {"primary_pool": ["si_conversion", "unit_identification"], "transfer_task": "different_systems"}


def lora_run(compressed: Path, folder: Path) -> None:
    """A LoRA run folder as `lora_recipe` leaves it (spec.json, the best adapter in state.safetensors), with a
    random rank-2 adapter so that it changes the model."""
    spec = LoraSpec(rank=2)
    params = {n: p for n, p in lora_model(freeze(load_model(compressed)), spec).named_parameters() if p.requires_grad}
    folder.mkdir()
    best = {state_key("best", n, False): torch.randn_like(p) * 0.05 for n, p in params.items()}
    save_file(best, folder / "state.safetensors")
    record = {"method": "lora", "student_weights_sha256": verified_weights_digest(compressed)}
    (folder / "spec.json").write_text(json.dumps(record | {"spec": spec.model_dump(mode="json")}))


@pytest.fixture(scope="module")
def setup(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 'compressed' tiny model (another seed), its bank of 3 prompts and single prompt, a LoRA adapter, and a
    screening result naming four dev-split tasks."""
    root = tmp_path_factory.mktemp("pool")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    compressed = helpers.tiny_llama_folder(root / "compressed", tokenizer, seed=1)
    torch.manual_seed(0)
    bank = make_bank("b", torch.randn(3, 4, 128) * 0.05, ["p0", "p1", "p2"], fingerprint(compressed), TRAINED)
    single = make_bank("s", torch.randn(1, 4, 128) * 0.05, ["s"], fingerprint(compressed), TRAINED)
    lora_run(compressed, root / "lora-r2")
    screening = root / "screening.json"
    screening.write_text(json.dumps(POOLS | {"do_no_harm": ["chained_conversion"]}))
    return {
        "base": tiny_llama,
        "compressed": compressed,
        "bank": save_bank(bank, root / "bank"),
        "single": save_bank(single, root / "single"),
        "lora": root / "lora-r2",
        "screening": screening,
    }


def inputs(setup: dict, out: Path, settings: Settings, **changes) -> PoolInputs:
    fields = dict(
        screening=setup["screening"],
        base_dir=setup["base"],
        compressed_dir=setup["compressed"],
        bank_dir=setup["bank"],
        single_dir=setup["single"],
        lora_dirs=(setup["lora"],),
        data_dir=settings.data_dir,
        out=out,
        split="dev",
        cap=3,
        dev_cap=2,
        general_tokens=100,
        general_block=64,
        bootstrap=200,
    )
    return PoolInputs(**(fields | changes))


@pytest.fixture(scope="module")
def one_run(setup: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = evaluate_pool(inputs(setup, tmp_path_factory.mktemp("one"), Settings()), None, float("inf"))
    assert out is not None
    return json.loads(out.read_text())


def without_timing(shards: list[dict]) -> dict:
    return {
        (s["header"]["unit"], s["header"]["task"]): [
            {k: v for k, v in r.items() if k != "select_s"} for r in s["records"]
        ]
        for s in shards
    }


@torch.no_grad()
def test_idp_looked_up_equals_idp_scored_directly(setup: dict, one_run: dict):
    tokenizer = AutoTokenizer.from_pretrained(setup["compressed"])
    model = prepare_selection_model(load_model(setup["compressed"]))
    base = load_model(setup["base"])
    bank = load_bank(setup["bank"])
    selector = bank_selector(model, bank)
    shard = next(s for s in one_run["shards"] if s["header"]["unit"] == "eval")
    for record, example in zip(shard["records"], task_split(shard["header"]["task"], "dev", 3), strict=True):
        chosen = selector.select([tokenizer(example.context)["input_ids"]])[0].index
        assert record["selected"] == bank.prompt_names[chosen]
        idp = choice_logprobs(model, tokenizer, example, bank.embeddings[chosen])
        assert record["picks"]["idp"] == int(np.argmax(idp))
        assert record["picks"]["base"] == int(np.argmax(choice_logprobs(base, tokenizer, example)))
        # the oracle's KL: the prompted model against base over context + right answer, one full forward each
        ids = torch.tensor(
            [
                tokenizer(example.context)["input_ids"]
                + tokenizer(example.choices[example.answer], add_special_tokens=False)["input_ids"]
            ]
        )
        reference = base(input_ids=ids).logits[0, :-1].log_softmax(-1)
        embeds = torch.cat([bank.embeddings[chosen][None], model.get_input_embeddings()(ids)], dim=1)
        prompted = model(inputs_embeds=embeds).logits[0, 4:-1].log_softmax(-1)
        kl = float((reference.exp() * (reference - prompted)).sum(-1).mean())
        assert record["kl"]["idp"] == pytest.approx(kl, rel=1e-4)


def test_a_resumed_run_split_over_two_processes_gives_the_records_of_one_run(
    setup: dict, one_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    settings = Settings()
    pieces = inputs(setup, tmp_path, settings)
    ticks = iter(range(10**9))
    with monkeypatch.context() as patch:  # a clock that runs out after two examples of the first task
        patch.setattr(outcomes, "monotonic", lambda: next(ticks))
        assert evaluate_pool(pieces, ["si_conversion"], 2) is None
    first = json.loads((tmp_path / "shards" / "eval-dev" / "si_conversion.json").read_text())
    assert len(first["records"]) == 2
    assert evaluate_pool(pieces, ["si_conversion", "general"], float("inf")) is None  # others missing
    out = evaluate_pool(pieces, ["unit_identification", "different_systems", "chained_conversion"], float("inf"))
    assert out is not None
    merged = json.loads(out.read_text())
    assert without_timing(merged["shards"]) == without_timing(one_run["shards"])
    assert merged["summary"]["primary"]["methods"] == one_run["summary"]["primary"]["methods"]
    assert "lora:lora-r2" in merged["summary"]["primary"]["methods"]


def test_shards_measured_on_another_bank_are_refused(setup: dict, one_run: dict, tmp_path: Path):
    shard = next(s for s in one_run["shards"] if s["header"]["unit"] == "eval")
    path = tmp_path / "shards" / "eval-dev" / f"{shard['header']['task']}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(shard))
    other = make_bank("b", torch.zeros(3, 4, 128), ["p0", "p1", "p2"], fingerprint(setup["compressed"]), TRAINED)
    changed = inputs(setup, tmp_path, Settings(), bank_dir=save_bank(other, tmp_path / "other-bank"))
    with pytest.raises(ValueError, match=f"{path.name}: measured with fingerprints"):
        evaluate_pool(changed, [shard["header"]["task"]], float("inf"))


def test_an_adapter_trained_later_adds_its_own_shards_and_leaves_the_others_as_they_were(
    setup: dict, one_run: dict, tmp_path: Path
):
    without = evaluate_pool(inputs(setup, tmp_path, Settings(), lora_dirs=()), None, float("inf"))
    assert without is not None
    assert "lora:lora-r2" not in json.loads(without.read_text())["summary"]["primary"]["methods"]
    main = tmp_path / "shards" / "eval-dev"
    before = {p.name: p.read_bytes() for p in main.iterdir()}
    out = evaluate_pool(inputs(setup, tmp_path, Settings()), None, float("inf"))
    assert out is not None
    assert {p.name: p.read_bytes() for p in main.iterdir()} == before
    assert (tmp_path / "shards" / "lora-r2-dev").is_dir()
    assert json.loads(out.read_text())["summary"]["primary"]["methods"] == one_run["summary"]["primary"]["methods"]


def test_write_records_idp_and_single_results_in_their_manifests_and_the_shards_stay_valid(setup: dict, tmp_path: Path):
    bank_dir = save_bank(load_bank(setup["bank"]), tmp_path / "bank")
    single_dir = save_bank(load_bank(setup["single"]), tmp_path / "single")
    run = inputs(setup, tmp_path / "out", Settings(), bank_dir=bank_dir, single_dir=single_dir, lora_dirs=())
    out = evaluate_pool(run, None, float("inf"), write=True)
    assert out is not None
    summary = json.loads(out.read_text())["summary"]
    for folder, method in ((bank_dir, "idp"), (single_dir, "single")):
        recorded = load_bank(folder).manifest.measured
        assert recorded["dev_primary_acc"] == summary["primary"]["methods"][method]["acc"]["mean"]
        assert recorded["general_heldout_kl_to_base"] == summary["general"]["methods"][method]["kl"]
    assert torch.equal(load_bank(bank_dir).embeddings, load_bank(setup["bank"]).embeddings)
    assert evaluate_pool(run, None, float("inf"), score=False) is not None  # the manifests' results refuse nothing


def test_a_unit_that_is_not_evaluated_is_refused_by_name(setup: dict, tmp_path: Path):
    with pytest.raises(ValueError, match="--tasks: hyperbaton not evaluated here"):
        evaluate_pool(inputs(setup, tmp_path, Settings()), ["hyperbaton"], float("inf"))


def test_a_transfer_task_that_a_training_source_holds_is_refused(setup: dict, tmp_path: Path):
    screening = tmp_path / "screening.json"
    screening.write_text(json.dumps(POOLS | {"transfer_task": "step_inference", "do_no_harm": []}))
    with pytest.raises(ValueError, match="transfer task step_inference is in the training source"):
        evaluate_pool(inputs(setup, tmp_path, Settings(), screening=screening), None, float("inf"))


def test_a_test_question_another_task_trains_on_is_removed_before_scoring_and_the_cap_counts_the_rest():
    """BIG-bench's unit tasks share generated questions: one can be train in a task and test in another."""
    from server.lab.evaluate.leaks import clean_split, contaminated
    from server.lab.tasks import task_split

    split = task_split("unit_identification", "test", 6)
    training = "\n" + "\n".join(["some other text", split[2].rendered(), split[4].context.strip() + " 5 mm."])

    kept, removed = clean_split("unit_identification", "test", 4, training)

    assert removed == [2, 4] and kept == [split[0], split[1], split[3], split[5]]
    assert not any(contaminated(e, training) for e in kept)
    assert clean_split("unit_identification", "test", None, "\n")[0] == task_split("unit_identification", "test")
