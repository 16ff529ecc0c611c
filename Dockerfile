# syntax=docker/dockerfile:1
# turnout's images. Targets:
#   cpu (default): the gateway with its embedded CPU engines and every zoo model baked in
#   gpu:           the gateway plus the `gpu` extra (Triton twins of the quantized kernels) on CUDA;
#                  serving big models on GPUs is vLLM's job (deploy/k8s/overlays/gpu-vllm points
#                  `engine: remote` experts at vLLM servers)
# Models are fetched at build time into their own layer: a pod or container then starts in seconds
# with no network access and every replica serves identical weights; the price is a bigger image
# (about 1.5 GB of models) that is rebuilt only when the zoo changes.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM ${PYTHON_IMAGE} AS base
# g++ stays: the C++ decode and 4-bit kernels are compiled by torch's extension loader, once
RUN apt-get update && apt-get install -y --no-install-recommends g++ curl \
    && rm -rf /var/lib/apt/lists/*
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    TURNOUT_CACHE=/opt/turnout-cache

FROM base AS build
ARG TORCH_INDEX
WORKDIR /app
RUN python -m venv /opt/venv && pip install --no-cache-dir --upgrade pip \
    && pip install --no-cache-dir --index-url ${TORCH_INDEX} "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY server server
COPY router router
COPY engine engine
COPY kernels kernels
COPY assets assets
# editable: the C++ sources and the trained assets are read from /app, which the image keeps
RUN pip install --no-cache-dir -e .

FROM build AS models
# every zoo model converted, the CoE embedder unpacked, the C++ kernels compiled: one cached layer
RUN turnout models pull \
    && python -c "from router.coe.embedder import fetch; fetch()" \
    && python -c "from kernels import cpu; [cpu.load(n) for n in ('decode', 'a8', 'nf4')]"

FROM base AS cpu
RUN useradd --create-home --uid 10001 turnout
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
COPY --from=models --chown=turnout:turnout /opt/turnout-cache /opt/turnout-cache
USER turnout
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/health || exit 1
# SIGTERM: uvicorn stops accepting, lets in-flight streams finish (up to 30 s), then exits
STOPSIGNAL SIGTERM
ENTRYPOINT ["turnout"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

FROM cpu AS gpu
USER root
RUN pip install --no-cache-dir "triton>=3.0"
USER turnout
