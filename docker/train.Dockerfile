# syntax=docker/dockerfile:1
# Training image: the full pipeline (train + serve + dev extras, exactly as `make setup`), CUDA runtime, git, dvc.
# Built offline from the wheelhouse (`make wheelhouse IMAGES=train`), given as the build context `wheels`:
#   make images IMAGES=train      # or: docker build --build-context wheels=build/wheelhouse -f docker/train.Dockerfile -t detflow-train:latest .
#   docker run --rm --gpus all -v "$PWD:/workspace" detflow-train:latest           # dvc repro in your checkout
#   docker run --rm --gpus all detflow-train:latest                                # dvc repro in the baked-in copy
# The image holds the checkout (with .git and .dvc/, without data, models or the DVC cache: `dvc pull` brings them)
# at /workspace, also reachable as /opt/detflow, where prefect.yaml's docker `gpu` pool runs its flows. Mounting a
# checkout on /workspace replaces it; the environment lives in /opt/venv so a mount never hides it, and the editable
# install points at /workspace, so the mounted code is what runs.
# BASE_IMAGE: any Debian/Ubuntu image; make images uses a local debootstrap base (CPU only) when this one is absent.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${BASE_IMAGE}

ARG UID=1000
ARG GID=1000
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DVC_NO_ANALYTICS=1 \
    YOLO_CONFIG_DIR=/opt/venv/ultralytics-config \
    DETFLOW_NO_PROGRESS=1

# System packages: apt runs only when the base lacks one (the local debootstrap base holds them all, so an offline
# build never reaches apt). Versions come with the base's distribution release and its security updates: DL3008;
# $pkgs is split into package names on purpose: SC2086.
# hadolint ignore=DL3008,SC2086
RUN pkgs="python3.11 python3.11-venv git ca-certificates"; \
    if ! dpkg -s $pkgs >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends $pkgs && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3.11 -m venv /opt/venv \
 && git config --system --add safe.directory /workspace \
 && git config --system --add safe.directory /opt/detflow \
 && ln -s /workspace /opt/detflow \
 && groupadd --gid "$GID" detflow \
 && useradd --uid "$UID" --gid "$GID" --create-home --shell /bin/bash detflow

# Dependencies before the checkout: this layer changes only when pyproject.toml's pins change. The lock names every
# wheel (torch, the CUDA libraries, pip and the build backend included) with its sha256.
# `wheels` is a named build context (--build-context wheels=build/wheelhouse), not a stage: hence DL3022.
# hadolint ignore=DL3022
COPY --from=wheels train/requirements.txt /opt/venv/requirements.lock
RUN --mount=type=bind,from=wheels,source=train,target=/wheels \
    python -m pip install --no-index --find-links /wheels --require-hashes -r /opt/venv/requirements.lock \
 && dvc --version && git --version

WORKDIR /workspace
COPY . /workspace
# The Makefile's `setup` target: the project editable with its extras; every requirement is already in the venv
# (--no-index: a requirement the lock missed fails here instead of downloading).
RUN python -m pip install --no-index --no-build-isolation -e ".[train,serve,dev]" \
 && python -m pip check \
 && mkdir -p "$YOLO_CONFIG_DIR" && chown -R detflow:detflow /workspace "$YOLO_CONFIG_DIR"
USER ${UID}:${GID}

CMD ["dvc", "repro"]
