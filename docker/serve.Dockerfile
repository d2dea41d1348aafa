# Serving image: onnxruntime + FastAPI only (the `serve` extra), no torch. Build from the repository root:
#   docker build -f docker/serve.Dockerfile -t detflow-serve:latest .
#   docker run --rm -p 8000:8000 -v "$PWD/models:/models:ro" detflow-serve:latest
# The model folder must hold model.onnx and model_card.json (what `detflow export` writes).
# onnxruntime-gpu runs on CPU here (the slim base has no CUDA libraries) and reports that in /v1/model and /metrics.
FROM python:3.11.9-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Only what the package needs to build: the serving code path never touches flows/, tests/ or data.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
RUN python -m pip install --no-cache-dir --upgrade "pip==26.3" \
 && python -m pip install --no-cache-dir ".[serve]" \
 && python -c "import importlib.util as u, sys; bad = [m for m in ('torch', 'torchvision', 'ultralytics') if u.find_spec(m)]; sys.exit(f'serve image must not contain {bad}' if bad else 0)" \
 && python -c "import pipeline.serve.app" \
 && rm -rf /src

RUN groupadd --system --gid 10001 detflow \
 && useradd --system --uid 10001 --gid detflow --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin detflow \
 && mkdir -p /models && chown detflow:detflow /models
WORKDIR /app
USER detflow:detflow

EXPOSE 8000
# Ready = model loaded and one warm-up inference ran (urllib: there is no curl in slim images).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=4).status == 200 else 1)"]

# Settings: DETFLOW_SERVE_* variables (DETFLOW_SERVE_TOKEN turns bearer auth on); extra arguments are appended.
ENTRYPOINT ["detflow", "serve", "--host", "0.0.0.0", "--port", "8000", "--model", "/models/model.onnx"]
