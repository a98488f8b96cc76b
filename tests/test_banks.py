"""Prompt banks: what a bank folder holds, what `load_bank` refuses, and how prompts move to and from PEFT.

Every refusal test asserts that the message names the file and the field at fault, because that message is
all an operator sees when a server refuses to start with a bank.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from server.core.banks import (
    MANIFEST_FILE,
    TENSOR_FILE,
    BankError,
    PromptBank,
    SelectionRule,
    bank_dir,
    list_banks,
    load_bank,
    make_bank,
    save_bank,
)
from server.core.identity import Fingerprint, fingerprint
from server.lab.peft_interop import export_peft, import_peft

HIDDEN = 64
REAL_MODEL = Path.home() / ".cache" / "idp-serve" / "models" / "smollm2-135m-instruct"


def tiny_llama(folder: Path, seed: int, hidden: int = HIDDEN) -> Path:
    """A random 2-layer Llama saved like a real model folder, so `fingerprint` works on it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load_tiny(folder: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """'a' is the bank's model; 'a-copy' the same weights under another name; 'a-q' a variant with the same
    embeddings and one layer changed (as compression does); 'b' another model; 'narrow' hidden 32."""
    root = tmp_path_factory.mktemp("models")
    a = tiny_llama(root / "tiny-a", seed=0)
    shutil.copytree(a, root / "tiny-a-copy")
    variant = load_tiny(a)
    with torch.no_grad():
        variant.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    variant.save_pretrained(root / "tiny-a-q")
    return {
        "a": a,
        "a-copy": root / "tiny-a-copy",
        "a-q": root / "tiny-a-q",
        "b": tiny_llama(root / "tiny-b", seed=1),
        "narrow": tiny_llama(root / "tiny-narrow", seed=0, hidden=32),
    }


@pytest.fixture(scope="session")
def fp(models: dict[str, Path]) -> Fingerprint:
    return fingerprint(models["a"])


@pytest.fixture
def bank(fp: Fingerprint) -> PromptBank:
    torch.manual_seed(1)
    return make_bank(
        "demo",
        torch.randn(3, 4, HIDDEN),
        ["terse", "math", "code"],
        fp,
        trained={"data": "wikitext", "steps": 10, "seed": 1, "objective": "kl"},
        measured={"ppl/base": 20.5, "ppl/terse": 18.25},
    )


@pytest.fixture
def saved(bank: PromptBank, tmp_path: Path) -> Path:
    return save_bank(bank, bank_dir(tmp_path / "banks", bank.name))


def edit_manifest(folder: Path, **changes) -> Path:
    """Rewrite fields of bank.json (None deletes the field); return the manifest path."""
    path = folder / MANIFEST_FILE
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return path


def replace_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write a different tensor file AND re-vouch for it in the manifest, as a buggy trainer would."""
    data = save_safetensors(tensors)
    (folder / TENSOR_FILE).write_bytes(data)
    edit_manifest(folder, sha256=hashlib.sha256(data).hexdigest())
    return folder / TENSOR_FILE


def refused(folder: Path, *fragments: str, expect: Fingerprint | None = None) -> str:
    """Assert load_bank refuses and that the message contains every fragment (file, field, problem)."""
    with pytest.raises(BankError) as info:
        load_bank(folder, expect=expect)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --- format and round trip -------------------------------------------------------------------------------------


def test_save_load_round_trips_bit_exactly(bank: PromptBank, saved: Path, fp: Fingerprint) -> None:
    loaded = load_bank(saved, expect=fp)
    assert torch.equal(loaded.embeddings, bank.embeddings)
    assert loaded.embeddings.dtype == torch.float32
    assert loaded.prompt_names == ["terse", "math", "code"]
    assert loaded.manifest == bank.manifest
    assert (loaded.name, loaded.k, loaded.m, loaded.hidden_size) == ("demo", 3, 4, HIDDEN)
    assert loaded.index("math") == 1


def test_bank_folder_holds_a_manifest_and_a_safetensors_file(saved: Path, fp: Fingerprint) -> None:
    assert sorted(p.name for p in saved.iterdir()) == [MANIFEST_FILE, TENSOR_FILE]
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == 1
    assert manifest["sha256"] == hashlib.sha256((saved / TENSOR_FILE).read_bytes()).hexdigest()
    assert manifest["model"] == fp.model_dump()
    assert (manifest["k"], manifest["m"], manifest["hidden_size"], manifest["dtype"]) == (3, 4, HIDDEN, "float32")
    assert manifest["trained"]["objective"] == "kl" and manifest["measured"]["ppl/terse"] == 18.25


def test_unknown_prompt_name_lists_known_ones(bank: PromptBank) -> None:
    with pytest.raises(KeyError, match=r"nope.*\['terse', 'math', 'code'\]"):
        bank.index("nope")


def test_save_replaces_a_bank_and_leaves_no_temporary_folders(bank: PromptBank, saved: Path, fp: Fingerprint) -> None:
    newer = make_bank("demo", bank.embeddings * 2, bank.prompt_names, fp)
    save_bank(newer, saved)
    assert torch.equal(load_bank(saved).embeddings, bank.embeddings * 2)
    assert [p.name for p in saved.parent.iterdir()] == ["demo"]


def test_list_banks_lists_only_bank_folders(saved: Path) -> None:
    banks = saved.parent
    (banks / "empty").mkdir()
    shutil.copytree(saved, banks / ".demo.tmp-1")
    shutil.copytree(saved, banks / "second")
    assert list_banks(banks) == ["demo", "second"]
    assert list_banks(banks / "missing") == []


@pytest.mark.parametrize("name", ["../x", "..", ".hidden", "a/b", "a\\b", "", "x y", "/abs"])
def test_names_that_could_escape_the_banks_dir_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(BankError, match="bank name"):
        bank_dir(tmp_path, name)


def test_safe_names_are_accepted(tmp_path: Path) -> None:
    assert bank_dir(tmp_path, "smollm2_q4-v1.2") == tmp_path / "smollm2_q4-v1.2"


def test_the_same_weights_under_another_name_load_silently(saved: Path, models: dict[str, Path]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_bank(saved, expect=fingerprint(models["a-copy"])).k == 3


def test_other_weights_of_the_same_model_are_refused_naming_both_digests(
    saved: Path, models: dict[str, Path], fp: Fingerprint
) -> None:
    variant = fingerprint(models["a-q"])
    assert variant.embedding_sha256 == fp.embedding_sha256 and variant.weights_sha256 != fp.weights_sha256
    refused(
        saved,
        str(saved / MANIFEST_FILE),
        fp.weights_sha256,
        variant.weights_sha256,
        "--allow-bank-weights-mismatch",
        expect=variant,
    )


def test_other_weights_load_with_a_warning_when_explicitly_allowed(
    saved: Path, models: dict[str, Path], fp: Fingerprint
) -> None:
    variant = fingerprint(models["a-q"])
    with pytest.warns(UserWarning, match=rf"{fp.weights_sha256}.*'tiny-a-q'.*{variant.weights_sha256}"):
        loaded = load_bank(saved, expect=variant, allow_weights_mismatch=True)
    assert loaded.k == 3


def test_a_bank_without_a_weights_digest_is_refused(saved: Path, fp: Fingerprint) -> None:
    """Banks made before weights digests existed cannot vouch for their weights: retrain them."""
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    edit_manifest(saved, model=manifest["model"] | {"weights_sha256": None})
    refused(saved, "(not recorded)", fp.weights_sha256, expect=fp)


def test_the_weights_digest_ignores_storage_dtype_but_not_values(models: dict[str, Path], tmp_path: Path) -> None:
    """bf16 values stored as float32 or as bf16 are one model; rounding float32 weights to bf16 makes another."""
    model = load_tiny(models["a"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    model.to(torch.float32).save_pretrained(tmp_path / "bf16-as-f32")
    digests = {name: fingerprint(tmp_path / name).weights_sha256 for name in ("bf16", "bf16-as-f32")}
    assert digests["bf16"] == digests["bf16-as-f32"] != fingerprint(models["a"]).weights_sha256


# --- refusals: what is missing or malformed --------------------------------------------------------------------


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    refused(tmp_path / "nope", str(tmp_path / "nope"), "no such bank folder")


def test_missing_manifest_is_refused(saved: Path) -> None:
    (saved / MANIFEST_FILE).unlink()
    refused(saved, str(saved / MANIFEST_FILE), "manifest missing")


def test_manifest_that_is_not_json_is_refused(saved: Path) -> None:
    (saved / MANIFEST_FILE).write_text("{not json")
    refused(saved, str(saved / MANIFEST_FILE), "JSON")


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"m": None}, ["field 'm'", "Field required"]),
        ({"m": "four"}, ["field 'm'"]),
        ({"k": 0}, ["field 'k'"]),
        ({"dtype": "int8"}, ["field 'dtype'"]),
        ({"sha256": "abc"}, ["field 'sha256'"]),
        ({"format_version": 2}, ["field 'format_version'"]),
        ({"name": "../x"}, ["field 'name'", "'../x'"]),
        ({"model": {"config_sha256": "x"}}, ["field 'model.embedding_sha256'"]),
        ({"measured": {"ppl": "high"}}, ["field 'measured.ppl'"]),
        ({"surprise": 1}, ["field 'surprise'"]),
    ],
)
def test_missing_or_invalid_manifest_field_is_named(saved: Path, changes: dict, fragments: list[str]) -> None:
    path = edit_manifest(saved, **changes)
    refused(saved, str(path), *fragments)


def test_duplicate_prompt_names_are_refused(saved: Path) -> None:
    path = edit_manifest(saved, prompt_names=["terse", "math", "terse"])
    refused(saved, str(path), "field 'prompt_names'", "duplicate", "terse")


def test_wrong_number_of_prompt_names_is_refused(saved: Path) -> None:
    path = edit_manifest(saved, prompt_names=["terse", "math"])
    refused(saved, str(path), "field 'prompt_names' has 2 names but field 'k' is 3")


def test_more_prompts_in_manifest_than_in_tensor_file_is_refused(saved: Path) -> None:
    edit_manifest(saved, k=4, prompt_names=["terse", "math", "code", "extra"])
    refused(saved, str(saved / TENSOR_FILE), "field 'k' differs")


def test_manifest_prompt_length_differs_from_tensor_file(saved: Path) -> None:
    edit_manifest(saved, m=5)
    refused(saved, str(saved / TENSOR_FILE), "field 'm' differs", "[3, 4, 64]")


def test_manifest_hidden_size_differs_from_its_model(saved: Path) -> None:
    path = edit_manifest(saved, hidden_size=32)
    refused(saved, str(path), "field 'hidden_size' is 32", "field 'model.hidden_size' is 64")


def test_manifest_hidden_size_differs_from_tensor_file(saved: Path, fp: Fingerprint) -> None:
    edit_manifest(saved, hidden_size=32, model=fp.model_copy(update={"hidden_size": 32}).model_dump())
    refused(saved, str(saved / TENSOR_FILE), "field 'hidden_size' differs")


def test_unequal_prompt_lengths_are_refused(fp: Fingerprint) -> None:
    with pytest.raises(BankError, match=r"equal lengths.*\('short', 3\).*\('long', 4\)"):
        make_bank("demo", [torch.zeros(3, HIDDEN), torch.zeros(4, HIDDEN)], ["short", "long"], fp)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_refused_naming_the_prompt(bank: PromptBank, saved: Path, bad: float) -> None:
    embeddings = bank.embeddings.clone()
    embeddings[2, 1, 5] = bad
    path = replace_tensors(saved, {"prompts": embeddings})
    refused(saved, str(path), "prompt 'code'", "NaN or Inf")


def test_truncated_tensor_file_is_refused(saved: Path) -> None:
    path = saved / TENSOR_FILE
    path.write_bytes(path.read_bytes()[:-7])
    refused(saved, str(path), "truncated or corrupt")


def test_tampered_tensor_file_is_refused(saved: Path) -> None:
    path = saved / TENSOR_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    refused(saved, str(path), "does not match manifest field 'sha256'")


def test_unparseable_tensor_file_is_refused_even_with_a_matching_sha(saved: Path) -> None:
    path = saved / TENSOR_FILE
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    edit_manifest(saved, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    refused(saved, str(path), "not a readable safetensors file")


def test_missing_tensor_file_is_refused(saved: Path) -> None:
    (saved / TENSOR_FILE).unlink()
    refused(saved, str(saved / TENSOR_FILE), "tensor file missing")


def test_tensor_file_with_other_dtype_is_refused(bank: PromptBank, saved: Path) -> None:
    path = replace_tensors(saved, {"prompts": bank.embeddings.half()})
    refused(saved, str(path), "float16", "field 'dtype'")


def test_tensor_file_with_other_tensors_is_refused(bank: PromptBank, saved: Path) -> None:
    path = replace_tensors(saved, {"prompts": bank.embeddings, "extra": torch.zeros(1)})
    refused(saved, str(path), "'extra'")


# --- refusals: a bank for another model --------------------------------------------------------------------------


def test_bank_for_a_model_with_other_embeddings_is_refused(saved: Path, models: dict[str, Path]) -> None:
    message = refused(
        saved,
        str(saved / MANIFEST_FILE),
        "field 'model.embedding_sha256'",
        "'tiny-a'",
        "'tiny-b'",
        expect=fingerprint(models["b"]),
    )
    assert "config_sha256" not in message  # same architecture: only the embeddings differ


def test_bank_for_a_model_of_other_width_is_refused(saved: Path, models: dict[str, Path]) -> None:
    refused(
        saved,
        str(saved / MANIFEST_FILE),
        "field 'model.config_sha256'",
        "field 'model.hidden_size': bank has 64, model has 32",
        expect=fingerprint(models["narrow"]),
    )


# --- PEFT interop ------------------------------------------------------------------------------------------------


def test_peft_export_then_import_round_trips(bank: PromptBank, fp: Fingerprint, tmp_path: Path) -> None:
    folders = [export_peft(bank, name, tmp_path / name) for name in bank.prompt_names]
    again = import_peft(folders, bank.prompt_names, "again", fp)
    assert torch.equal(again.embeddings, bank.embeddings)
    assert again.prompt_names == bank.prompt_names and again.manifest.model == fp
    assert again.manifest.trained["source"] == "peft"


def test_exported_adapter_loads_in_peft(bank: PromptBank, models: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel, PromptTuningConfig

    folder = export_peft(bank, "math", tmp_path / "math", str(models["a"]))
    config = PromptTuningConfig.from_pretrained(str(folder))
    assert (config.peft_type, config.task_type) == ("PROMPT_TUNING", "CAUSAL_LM")
    assert (config.num_virtual_tokens, config.token_dim, config.num_transformer_submodules) == (4, HIDDEN, 1)
    assert (config.num_attention_heads, config.num_layers) == (4, 2)
    peft_model = PeftModel.from_pretrained(load_tiny(models["a"]), str(folder))
    assert torch.equal(peft_model.get_prompt_embedding_to_save("default"), bank.embeddings[1])


def test_prompt_trained_with_peft_imports_exactly(models: dict[str, Path], fp: Fingerprint, tmp_path: Path) -> None:
    from peft import PromptTuningConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(load_tiny(models["a"]), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    before = peft_model.get_prompt_embedding_to_save("default")
    ids = torch.randint(0, 256, (2, 8))
    for _ in range(3):
        optimizer.zero_grad()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    peft_model.save_pretrained(tmp_path / "trained")
    trained = peft_model.get_prompt_embedding_to_save("default")
    assert not torch.equal(trained, before)
    imported = import_peft([tmp_path / "trained"], ["trained"], "peft-bank", fp, trained={"steps": 3})
    assert torch.equal(imported.embeddings[0], trained)
    assert imported.manifest.trained["steps"] == 3


def test_import_refuses_non_prompt_tuning_adapters(models: dict[str, Path], fp: Fingerprint, tmp_path: Path) -> None:
    from peft import LoraConfig

    LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]).save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(BankError, match=r"lora/adapter_config\.json: field 'peft_type' is LORA"):
        import_peft([tmp_path / "lora"], ["x"], "b", fp)


def test_import_refuses_adapter_for_another_width(bank: PromptBank, models: dict[str, Path], tmp_path: Path) -> None:
    folder = export_peft(bank, "math", tmp_path / "math")
    with pytest.raises(BankError, match=r"math/adapter_config\.json: field 'token_dim' is 64.* 32"):
        import_peft([folder], ["math"], "b", fingerprint(models["narrow"]))


def test_import_refuses_unequal_prompt_lengths(bank: PromptBank, fp: Fingerprint, tmp_path: Path) -> None:
    short = make_bank("short", bank.embeddings[:, :2], bank.prompt_names, fp)
    folders = [export_peft(bank, "math", tmp_path / "long"), export_peft(short, "math", tmp_path / "short")]
    with pytest.raises(BankError, match=r"unequal num_virtual_tokens.*long/adapter_model.safetensors': 4.*: 2"):
        import_peft(folders, ["long", "short"], "b", fp)


def test_import_refuses_weights_that_disagree_with_config(bank: PromptBank, fp: Fingerprint, tmp_path: Path) -> None:
    folder = export_peft(bank, "math", tmp_path / "math")
    (folder / "adapter_model.safetensors").write_bytes(save_safetensors({"prompt_embeddings": torch.zeros(5, HIDDEN)}))
    with pytest.raises(BankError, match=r"math/adapter_model\.safetensors: 'prompt_embeddings' has shape \[5, 64\]"):
        import_peft([folder], ["math"], "b", fp)


def test_import_refuses_a_folder_without_adapter_config(fp: Fingerprint, tmp_path: Path) -> None:
    with pytest.raises(BankError, match=r"adapter_config\.json: adapter config missing"):
        import_peft([tmp_path], ["x"], "b", fp)


def test_import_refuses_unknown_peft_type(fp: Fingerprint, tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "MYSTERY"}))
    with pytest.raises(BankError, match=r"adapter_config\.json: not a valid PEFT adapter config"):
        import_peft([tmp_path], ["x"], "b", fp)


# --- the real model ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not REAL_MODEL.is_dir(), reason="run `idp-serve prepare` first")
def test_bank_for_the_real_model(models: dict[str, Path], tmp_path: Path) -> None:
    real = fingerprint(REAL_MODEL)
    bank = make_bank("smol", torch.randn(2, 8, real.hidden_size), ["a", "b"], real)
    folder = save_bank(bank, tmp_path / "smol")
    assert torch.equal(load_bank(folder, expect=real).embeddings, bank.embeddings)
    refused(folder, "field 'model.hidden_size': bank has 576, model has 64", expect=fingerprint(models["a"]))


# --- the selection rule ----------------------------------------------------------------------------------------


def test_a_selection_rule_round_trips_through_the_manifest(bank: PromptBank, fp: Fingerprint, tmp_path: Path) -> None:
    rule = SelectionRule(score="mass_no_sink", layers=(1, 0), centre=(0.1, -0.2, 0.0), source="routing study")
    ruled = make_bank("ruled", bank.embeddings, bank.prompt_names, fp, selection=rule)
    loaded = load_bank(save_bank(ruled, tmp_path / "ruled"), expect=fp)
    assert loaded.selection_rule == rule
    assert loaded.selection_rule.layers == (0, 1) and loaded.selection_layers == [0, 1]
    assert json.loads((tmp_path / "ruled" / MANIFEST_FILE).read_text())["selection"]["score"] == "mass_no_sink"


def test_a_bank_without_a_rule_selects_by_the_papers_mass_on_all_layers(bank: PromptBank) -> None:
    assert bank.selection_rule == SelectionRule(score="mass", layers=None, centre=None)
    assert bank.selection_layers is None


def test_an_older_manifest_means_mass_on_its_calibrated_layers(saved: Path) -> None:
    """Manifests written before rules existed name only `trained.selection_layers`; they keep selecting as before."""
    data = json.loads((saved / MANIFEST_FILE).read_text())
    data.pop("selection")
    data["trained"]["selection_layers"] = [1]
    (saved / MANIFEST_FILE).write_text(json.dumps(data))
    assert load_bank(saved).selection_rule == SelectionRule(score="mass", layers=(1,))


@pytest.mark.parametrize(
    ("selection", "fragments"),
    [
        ({"score": "entropy"}, ["field 'selection.score'", "mass_no_sink"]),
        ({"layers": [-1]}, ["field 'selection.layers'", ">= 0"]),
        ({"layers": []}, ["field 'selection.layers'"]),
        ({"centre": [0.1, 0.2]}, ["field 'selection.centre' has 2 values but field 'k' is 3"]),
        ({"centre": [0.1, "nan", 0.0]}, ["field 'selection.centre'", "finite"]),
        ({"weights": [1, 2]}, ["field 'selection.weights'"]),
    ],
)
def test_a_bad_selection_rule_is_refused_naming_the_field(saved: Path, selection: dict, fragments: list[str]) -> None:
    path = edit_manifest(saved, selection=selection)
    refused(saved, str(path), *fragments)


def test_a_rule_with_a_layer_the_served_model_lacks_is_refused_at_load(
    bank: PromptBank, fp: Fingerprint, models: dict[str, Path], tmp_path: Path
) -> None:
    """The manifest cannot know the model's depth; the server refuses the bank when it builds the selector."""
    from server.online.bank_registry import BankLoader

    save_bank(
        make_bank("deep", bank.embeddings, bank.prompt_names, fp, selection=SelectionRule(layers=(2,))),
        tmp_path / "deep",
    )
    with pytest.raises(BankError) as info:
        BankLoader(models["a"], tmp_path, None, None, "cpu", allow_weights_mismatch=True)()
    for fragment in (str(tmp_path / "deep" / MANIFEST_FILE), "field 'selection.layers'", "0..1"):
        assert fragment in str(info.value)
