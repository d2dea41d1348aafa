# syntax=docker/dockerfile:1
# Serving image: onnxruntime + FastAPI only (the `serve` extra), no torch. Built offline from the wheelhouse
# (`make wheelhouse`), given as the build context `wheels`; `make images` runs this with docker or buildah:
#   docker build --build-context wheels=build/wheelhouse -f docker/serve.Dockerfile -t detflow-serve:latest .
#   docker run --rm -p 8000:8000 -v "$PWD/models:/models:ro" detflow-serve:latest
# The model folder must hold model.onnx and model_card.json (what `detflow export` writes), readable by uid 10001.
# onnxruntime-gpu runs on CPU here (no CUDA libraries in the base) and reports that in /v1/model and /metrics.
# BASE_IMAGE: any Debian-like image with python3.11 and its venv module (make images: a debootstrap base offline).
ARG BASE_IMAGE=python:3.11.9-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Dependencies first: this layer changes only when pyproject.toml's pins change. The lock names every wheel with
# its sha256, so a different wheelhouse is a different layer (buildah does not hash bind-mounted files).
# `wheels` is a named build context (--build-context wheels=build/wheelhouse), not a stage: hence DL3022.
# hadolint ignore=DL3022
COPY --from=wheels serve/requirements.txt /opt/detflow/requirements.txt
RUN --mount=type=bind,from=wheels,source=serve,target=/wheels \
    python3 -m venv /opt/venv \
 && python -m pip install --no-index --find-links /wheels --require-hashes -r /opt/detflow/requirements.txt \
 && groupadd --system --gid 10001 detflow \
 && useradd --system --uid 10001 --gid detflow --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin detflow \
 && mkdir -p /models

# The project last: a code change rebuilds only these two layers (a 1 KB lock and the ~1 MB package).
# DL3022: `wheels` is the named build context again.
# hadolint ignore=DL3022
COPY --from=wheels project/requirements.txt /opt/detflow/project.txt
RUN --mount=type=bind,from=wheels,source=project,target=/wheels \
    python -m pip install --no-index --find-links /wheels --require-hashes --no-deps -r /opt/detflow/project.txt \
 && python -m pip check \
 && python -c "import importlib.util as u, sys; bad = [m for m in ('torch', 'torchvision', 'ultralytics') if u.find_spec(m)]; sys.exit(f'serve image must not contain {bad}' if bad else 0)" \
 && python -c "import pipeline.serve.app"

WORKDIR /app
# numeric, so `runAsNonRoot` checks (Kubernetes) can verify it without reading /etc/passwd
USER 10001:10001

EXPOSE 8000
# Ready = model loaded and one warm-up inference ran (urllib: there is no curl in the image).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=4).status == 200 else 1)"]

# Settings: DETFLOW_SERVE_* variables (DETFLOW_SERVE_TOKEN turns bearer auth on); extra arguments are appended
# (a repeated --host or --port overrides these).
ENTRYPOINT ["detflow", "serve", "--host", "0.0.0.0", "--port", "8000", "--model", "/models/model.onnx"]
