"""The `idp-serve` command line: one entry point, its subcommands, and vLLM flags passed through to the engine."""

from __future__ import annotations

import subprocess
import sys

import pytest

from server.online.engine import engine_options_from_cli
from server.online.settings import ServeSettings


def test_help_lists_every_subcommand() -> None:
    out = subprocess.run([sys.executable, "-m", "server.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("prepare", "compress", "train", "serve"):
        assert command in out.stdout


def test_vllm_flags_after_the_separator_are_parsed_by_vllm() -> None:
    assert engine_options_from_cli(["--max-num-seqs", "8", "--enable-chunked-prefill"]) == {
        "max_num_seqs": 8, "enable_chunked_prefill": True,
    }


def test_vllm_flags_that_idp_serve_owns_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="dtype"):
        engine_options_from_cli(["--dtype", "float16"])


def test_serve_settings_come_from_flags_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDP_PORT", "9000")
    monkeypatch.setenv("IDP_DEFAULT_BANK", "from-env")
    settings = ServeSettings(_cli_parse_args=["--port", "9100", "--selection-layers", "[0,3]"], _cli_kebab_case=True)
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
