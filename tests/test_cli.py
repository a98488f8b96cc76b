"""The `idp-serve` command line: one entry point, every subcommand's flags and defaults from one settings model,
flags over `IDP_*` environment over defaults, and vLLM flags passed through to the engine."""

from __future__ import annotations

import subprocess
import sys

import pytest

from server.cli import COMMANDS, main, parse, settings_model
from server.lab.compress import CompressionSpec
from server.lab.train import BankPlan, TrainSpec
from server.online.engine import engine_options_from_cli
from server.online.settings import ServeSettings


def test_help_lists_every_subcommand() -> None:
    out = subprocess.run([sys.executable, "-m", "server.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("prepare", "compress", "train", "evaluate", "attention", "serve"):
        assert command in out.stdout


def _help_lines(command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """`idp-serve <command> --help`: each flag's entry on one line (a wide terminal, so nothing wraps inside)."""
    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit) as done:
        parse(command, ["--help"])
    assert done.value.code == 0
    entries: dict[str, str] = {}
    options = capsys.readouterr().out.split("options:")[1]
    for line in options.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line.strip()
        elif line.strip():
            entries[flag] += " " + line.strip()
    return entries


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_shows_every_field_with_its_models_default_and_variable(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = _help_lines(command, capsys, monkeypatch)
    model = settings_model(command)
    for name, field in model.model_fields.items():
        line = lines[f"--{name.replace('_', '-')}"]
        assert f"[env: IDP_{name.upper()}]" in line
        if field.is_required():
            assert "(required)" in line
        elif field.default is not None and field.default_factory is None:
            assert f"(default: {field.default})" in line


def test_training_defaults_are_the_recipes_own() -> None:
    """No flag given, `train` trains exactly `TrainSpec()` and `BankPlan`'s sources: one place for each default."""
    settings = parse("train", [])
    assert settings.spec() == TrainSpec() and settings.plan() == BankPlan(mode="curated")
    assert (TrainSpec().steps, TrainSpec().seq_len) == (40, 64), "what the shipped banks were trained with"
    compress = parse("compress", ["--method", "gptq", "--bits", "3", "--no-measure"])
    assert compress.spec() == CompressionSpec(method="gptq", bits=3) and compress.measure is False


def test_flags_override_the_environment_which_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDP_STEPS", "7")
    monkeypatch.setenv("IDP_SEQ_LEN", "32")
    monkeypatch.setenv("IDP_DEVICE", "cpu")
    settings = parse("train", ["--steps", "9", "-m", "8", "--sources", "news,units"])
    assert (settings.steps, settings.seq_len, settings.device) == (9, 32, "cpu")
    assert (settings.num_virtual_tokens, settings.sources, settings.lr) == (8, ("news", "units"), TrainSpec().lr)
    evaluate = parse("evaluate", ["--tasks", "odd_one_out,unit_identification", "--limit", "3"])
    assert (evaluate.tasks, evaluate.limit, evaluate.device) == (["odd_one_out", "unit_identification"], 3, "cpu")
    assert parse("attention", []).limit == 5 and parse("evaluate", []).limit == 40


def test_refused_settings_name_the_command_and_the_field() -> None:
    with pytest.raises(SystemExit, match="idp-serve train: error: steps: Input should be greater than or equal to 1"):
        main(["train", "--steps", "0"])
    with pytest.raises(SystemExit, match="idp-serve compress: error: .*gptq needs bits"):
        main(["compress", "--method", "gptq"])
    with pytest.raises(SystemExit, match="idp-serve evaluate: error: device 'tpu:9' is not usable here"):
        main(["evaluate", "--device", "tpu:9"])


def test_device_auto_is_the_gpu_when_torch_sees_one() -> None:
    import torch

    from server.lab.loading import torch_device

    assert torch_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert torch_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' is not usable here"):
            torch_device("cuda")


def test_vllm_flags_after_the_separator_are_parsed_by_vllm() -> None:
    assert engine_options_from_cli(["--max-num-seqs", "8", "--enable-chunked-prefill"]) == {
        "max_num_seqs": 8,
        "enable_chunked_prefill": True,
    }


def test_serve_runs_with_its_flags_and_passes_the_rest_to_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[ServeSettings] = []
    monkeypatch.setattr("server.online.app.run", served.append)
    main(["serve", "--port", "9100", "--", "--max-num-seqs", "8"])
    assert served[0].port == 9100 and served[0].engine_options == {"max_num_seqs": 8}


def test_vllm_flags_that_idp_serve_owns_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="dtype"):
        engine_options_from_cli(["--dtype", "float16"])


def test_serve_settings_come_from_flags_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDP_PORT", "9000")
    monkeypatch.setenv("IDP_DEFAULT_BANK", "from-env")
    settings = parse("serve", ["--port", "9100", "--selection-layers", "[0,3]"])
    assert isinstance(settings, ServeSettings)
    assert (settings.port, settings.default_bank, settings.selection_layers) == (9100, "from-env", [0, 3])


def test_selection_device_auto_follows_torch_and_an_unusable_one_is_refused_at_start() -> None:
    import torch

    from server.online.placement import selection_device

    assert selection_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert selection_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="selection_device 'tpu:9' is not usable here"):
        selection_device("tpu:9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="selection_device 'cuda' is not usable here"):
            selection_device("cuda")


def test_selection_batches_one_input_on_cpu_and_sixteen_on_a_gpu_unless_set() -> None:
    from server.online.placement import selection_batch_size

    assert ServeSettings().selection_batch_size is None
    assert selection_batch_size(None, "cpu") == 1, "compute-bound: a batch only delays its first inputs"
    assert selection_batch_size(None, "cuda") == selection_batch_size(None, "cuda:1") == 16
    assert selection_batch_size(4, "cpu") == 4


def test_a_lab_command_without_the_lab_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The serving images hold no lab packages; a lab command run there names the extra, not a bare ImportError."""

    def missing_lab(settings: object) -> None:
        raise ImportError("No module named 'llmcompressor'")

    monkeypatch.setitem(COMMANDS, "prepare", COMMANDS["prepare"].__class__(missing_lab, COMMANDS["prepare"].help))
    with pytest.raises(SystemExit) as exit_:
        main(["prepare"])
    message = str(exit_.value.code)
    assert message.startswith("idp-serve prepare: error: No module named 'llmcompressor'")
    assert "IDP_EXTRAS=lab scripts/install.sh" in message and "-lab image" in message
