# Training image: the full pipeline (train + serve + dev extras, exactly as `make setup`), CUDA runtime, git, dvc.
#   docker build -f docker/train.Dockerfile -t detflow-train:latest .
#   docker run --rm --gpus all -v "$PWD:/workspace" detflow-train:latest           # dvc repro in your checkout
#   docker run --rm --gpus all detflow-train:latest                                # dvc repro in the baked-in copy
# The image holds the checkout (with .git and .dvc/, without data, models or the DVC cache: `dvc pull` brings them)
# at /workspace, also reachable as /opt/detflow, where prefect.yaml's docker `gpu` pool runs its flows. Mounting a
# checkout on /workspace replaces it; the environment lives in /opt/venv so a mount never hides it, and the editable
# install points at /workspace, so the mounted code is what runs.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ARG UID=1000
ARG GID=1000
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DVC_NO_ANALYTICS=1 \
    YOLO_CONFIG_DIR=/opt/venv/ultralytics-config \
    DETFLOW_NO_PROGRESS=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv git ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv \
 && git config --system --add safe.directory /workspace \
 && git config --system --add safe.directory /opt/detflow \
 && ln -s /workspace /opt/detflow

WORKDIR /workspace
COPY . /workspace
# The Makefile's `setup` target, step by step (pip, not uv/poetry).
RUN python -m pip install --no-cache-dir --upgrade "pip==26.3" \
 && python -m pip install --no-cache-dir -e ".[train,serve,dev]" \
 && dvc --version && git --version \
 && groupadd --gid "$GID" detflow && useradd --uid "$UID" --gid "$GID" --create-home --shell /bin/bash detflow \
 && mkdir -p "$YOLO_CONFIG_DIR" && chown -R detflow:detflow /workspace "$YOLO_CONFIG_DIR"
USER detflow

CMD ["dvc", "repro"]
