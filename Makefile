# Every target creates or reuses the project virtualenv; it is reinstalled only when
# pyproject.toml changes (the stamp file records the last install).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/quickstart
TEST_WORKERS ?= 2
# Flags for the benchmark, e.g. make bench BENCH_ARGS="--dtype=bfloat16 --out=results.jsonl"
BENCH_ARGS ?=
# Flags for the faults suite, e.g. make faults FAULTS_ARGS="--kills=20 --seed=1"
FAULTS_ARGS ?=

.PHONY: quickstart test bench bench-device faults clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(PY) -m distill.quickstart --workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15 tests

bench: $(STAMP)
	$(PY) -m distill.bench $(BENCH_ARGS)

# The one-shot accelerator check (experiments/bench/README.md, "bench-device"): the benchmark in
# bf16 and a Qwen3-1.7B-like -> 0.6B-like pair at 2k tokens; JSON lines, then a table.
bench-device: $(STAMP)
	$(PY) -m distill.bench.device --out=experiments/bench/results-device.jsonl $(BENCH_ARGS)

# Every data regime SIGKILLed at random points and restarted, then torn checkpoints, caches and
# sweep records (experiments/faults/README.md): the figures, also in experiments/faults/results.md;
# then the fuzz cases' outcomes counted (experiments/faults/results-fuzz.md).
faults: $(STAMP)
	$(PY) -m experiments.faults.run --out=experiments/faults/results.md $(FAULTS_ARGS)
	$(PY) -m experiments.faults.fuzz --out=experiments/faults/results-fuzz.md

clean-venv:
	rm -rf $(VENV)
