# syntax=docker/dockerfile:1
# turnout's images. Targets:
#   cpu (default): the gateway with its embedded CPU engines and every zoo model baked in
#   gpu:           the same on CUDA: torch's CUDA build, the `gpu` extra (Triton twins of the
#                  quantized kernels) and the `vllm` extra, for experts with `engine: vllm`
#                  (turnout starts `vllm serve` beside itself); run with the NVIDIA runtime
# Models are fetched at build time into their own layer: a pod or container then starts in seconds
# with no network access and every replica serves identical weights; the price is a bigger image
# (about 1.5 GB of models) that is rebuilt only when the zoo changes. Models an `engine: vllm`
# expert names by Hugging Face id are vLLM's to fetch at start (mount a volume at HF_HOME).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM ${PYTHON_IMAGE} AS base
# g++ stays: the C++ decode and 4-bit kernels are compiled by torch's extension loader, once
RUN apt-get update && apt-get install -y --no-install-recommends g++ curl \
    && rm -rf /var/lib/apt/lists/*
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    TURNOUT_CACHE=/opt/turnout-cache

FROM base AS source
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server server
COPY router router
COPY engine engine
COPY kernels kernels
COPY assets assets

FROM base AS build
ARG TORCH_INDEX
RUN python -m venv /opt/venv && pip install --no-cache-dir --upgrade pip \
    && pip install --no-cache-dir --index-url ${TORCH_INDEX} "torch==2.13.0"
COPY --from=source /app /app
WORKDIR /app
# editable: the C++ sources and the trained assets are read from /app, which the image keeps
RUN pip install --no-cache-dir -e .

FROM base AS build-gpu
# PyPI's torch 2.13.0 is the CUDA build; vllm 0.32.0 pins that same torch
RUN python -m venv /opt/venv && pip install --no-cache-dir --upgrade pip \
    && pip install --no-cache-dir "torch==2.13.0"
COPY --from=source /app /app
WORKDIR /app
RUN pip install --no-cache-dir -e ".[gpu,vllm]"

FROM build AS models
# every zoo model converted, the CoE embedder unpacked, the C++ kernels compiled for every
# instruction-set variant (a node loads the one its CPU runs, so no SIGILL): one cached layer
RUN turnout models pull \
    && python -c "from router.coe.embedder import fetch; fetch()" \
    && python -c "from kernels import cpu; [cpu.build(n, i) for i in cpu.ISAS for n in cpu.KERNELS]"

FROM base AS runtime
RUN useradd --create-home --uid 10001 turnout
WORKDIR /app
COPY --from=models --chown=turnout:turnout /opt/turnout-cache /opt/turnout-cache
USER turnout
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/health || exit 1
# SIGTERM: uvicorn stops accepting, lets in-flight streams finish (up to 30 s), then exits; an
# `engine: vllm` expert's server gets SIGTERM too and is waited for
STOPSIGNAL SIGTERM
ENTRYPOINT ["turnout"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

FROM runtime AS gpu
COPY --from=build-gpu /opt/venv /opt/venv
COPY --from=build-gpu /app /app

FROM runtime AS cpu
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
