"""The default model is one model everywhere: its compression gives the same weights, bit for bit, whatever the
machine's thread count and instruction set, and they are the weights the repo and the shipped banks record.

Machines differ here the way they differ in the field: the compression is started from a process with other
torch threads and with the CPU kernels capped to AVX2 (torch's ATEN_CPU_CAPABILITY, MKL's
MKL_ENABLE_INSTRUCTIONS, oneDNN's ONEDNN_MAX_CPU_ISA), as on a CPU without AVX-512. Without the fixed numeric
environment of `server.lab.compress.REPRODUCIBLE_ENV` these conditions change the digest (measured in
docs/default-model.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.core.banks import MANIFEST_FILE, list_banks
from server.core.config import Settings
from server.core.identity import DEFAULT_BASE_WEIGHTS_SHA256, DEFAULT_WEIGHTS_SHA256, fingerprint, weights_digest
from server.lab.compress import DEFAULT_SPEC, served_name

REPO_BANKS = Path(__file__).resolve().parents[1] / "prompt_banks"

AVX2_MACHINE = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}

_COMPRESS = """
import sys, torch
from pathlib import Path
from server.lab.compress import DEFAULT_SPEC, compress
torch.set_num_threads(int(sys.argv[4]))
print(compress(Path(sys.argv[1]), DEFAULT_SPEC, Path(sys.argv[2]), Path(sys.argv[3]), "test"))
"""


@pytest.mark.slow
def test_the_prepared_default_model_has_the_recorded_weights(base_model: Path, served_model: Path) -> None:
    """What `idp-serve prepare` made on this machine, hashed again from its tensors."""
    assert fingerprint(base_model).weights_sha256 == DEFAULT_BASE_WEIGHTS_SHA256
    assert fingerprint(served_model).weights_sha256 == DEFAULT_WEIGHTS_SHA256


@pytest.mark.slow
def test_compression_from_two_threads_on_avx2_kernels_gives_the_recorded_weights(
    base_model: Path, settings: Settings, tmp_path: Path
) -> None:
    """`prepare` compressed from one thread with this CPU's own kernels; this run differs in both (about 2 minutes
    on 2 cores)."""
    models = tmp_path / "models"
    models.mkdir()
    (models / base_model.name).symlink_to(base_model)
    env = os.environ | AVX2_MACHINE | {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    args = [sys.executable, "-c", _COMPRESS, str(models / base_model.name), str(models), str(settings.data_dir), "2"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = models / served_name(base_model.name, DEFAULT_SPEC)
    assert Path(proc.stdout.strip().splitlines()[-1]) == served
    assert weights_digest(served) == DEFAULT_WEIGHTS_SHA256


@pytest.mark.parametrize("bank", list_banks(REPO_BANKS))
def test_shipped_banks_are_bound_to_the_recorded_default_weights(bank: str) -> None:
    manifest = json.loads((REPO_BANKS / bank / MANIFEST_FILE).read_text())
    assert manifest["model"]["weights_sha256"] == DEFAULT_WEIGHTS_SHA256
