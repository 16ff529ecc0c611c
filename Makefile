# turnout: `make serve` and `make test` set everything up from a bare Python.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8000

.PHONY: install serve test test-peer test-vllm lint bench loadtest pull clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch pinned first: the CPU build of 2.13.0 (an unpinned torch would pull a CUDA build)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

pull: $(STAMP)
	$(VENV)/bin/turnout models pull smollm2-135m-instruct

serve: pull
	$(VENV)/bin/turnout serve --port $(PORT)

test: pull
	$(PY) -m pytest -q

# engine: remote against llama.cpp's OpenAI server (llama-cpp-python[server], compiled from
# source here: minutes; not part of `make test`)
PEER_VENV ?= .venv-peer
$(PEER_VENV)/.installed:
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --quiet --upgrade pip
	$(PEER_VENV)/bin/pip install --progress-bar on "llama-cpp-python[server]==0.3.36"
	touch $@

test-peer: pull $(PEER_VENV)/.installed
	TURNOUT_PEER_PYTHON=$(abspath $(PEER_VENV))/bin/python $(PY) -m pytest -q -m peer tests/test_peer.py

# engine: vllm against vLLM itself: its own parser checks the command line turnout builds (any
# machine); the gateway serving through a real vLLM server runs where CUDA is. vLLM's
# torchvision/torchaudio wheels are CUDA builds that cannot load beside a CPU torch, and neither
# is needed to serve text, so a CPU torch goes without them.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet "torch==2.13.0"
	$(VLLM_VENV)/bin/pip install --progress-bar on -e ".[dev,vllm]"
	$(VLLM_VENV)/bin/python -c "import torch, sys; sys.exit(torch.version.cuda is not None)" \
		&& $(VLLM_VENV)/bin/pip uninstall --yes --quiet torchvision torchaudio torchcodec || true
	touch $@

test-vllm: pull $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/test_vllm.py

# guidellm, unchanged, against `turnout serve` (started here on a free port, default configuration;
# LOADTEST_ARGS="--url http://127.0.0.1:8000" loads a running `make serve` instead): synthetic
# chats, 256 prompt and 128 output tokens, at 1, 4 and 16 streams; report in benchmarks/results/.
# guidellm needs torch, so the CPU torch goes in first; it has its own venv (its pins are its own).
LOADTEST_VENV ?= .venv-loadtest
LOADTEST_ARGS ?=
$(LOADTEST_VENV)/.installed:
	$(PYTHON) -m venv $(LOADTEST_VENV)
	$(LOADTEST_VENV)/bin/pip install --quiet --upgrade pip
	$(LOADTEST_VENV)/bin/pip install --quiet "torch==2.13.0"
	$(LOADTEST_VENV)/bin/pip install --quiet "guidellm==0.8.*"
	touch $@

loadtest: pull $(LOADTEST_VENV)/.installed
	$(PY) benchmarks/loadtest.py --guidellm $(LOADTEST_VENV)/bin/guidellm $(LOADTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check server router engine kernels tests benchmarks deploy
	$(VENV)/bin/mypy server router engine kernels
	$(VENV)/bin/yamllint -s deploy docker-compose.yml turnout.example.yaml

bench: pull
	$(PY) benchmarks/speed.py
	$(PY) benchmarks/quality.py
	$(PY) benchmarks/quality.py --model tiny-scratch
	$(PY) benchmarks/speculative.py
	$(PY) benchmarks/speculative.py --draft head
	$(PY) benchmarks/structured.py
	$(PY) benchmarks/routing.py
	$(PY) benchmarks/routing_quality.py --fresh --write-map
	$(PY) benchmarks/footprint.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/r2r.py
	$(PY) benchmarks/kv_cache.py
	$(PY) benchmarks/load.py

clean:
	rm -rf $(VENV) $(PEER_VENV) $(VLLM_VENV) $(LOADTEST_VENV) *.egg-info
