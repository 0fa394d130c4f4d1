# Two entry points: `make demo` and `make test`. Both build .venv from uv.lock first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.synced

$(VENV)/.synced: pyproject.toml uv.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"
	$(BIN)/uv sync --locked --inexact --extra spark --quiet
	touch $@

demo: setup
	$(BIN)/phenotyper simulate --preset immunosep-screening --n 20000 --seed 7 \
		--output data/simulated/immunosep_screening.parquet
	$(BIN)/phenotyper validate data/simulated/immunosep_screening.parquet
	$(BIN)/phenotyper benchmark --cohort data/simulated/immunosep_screening.parquet \
		--label phenotype_true --output reports/rules_benchmark
	for experiment in experiments/*.toml; do $(BIN)/phenotyper train $$experiment || exit 1; done
	$(BIN)/phenotyper model-card immunophenotyper --output models/immunophenotyper_champion.md
	$(BIN)/python -m phenotyper.serving --model models:/immunophenotyper@champion
	@echo "Rules benchmark: reports/rules_benchmark/benchmark.md"
	@echo "Champion's model card: models/immunophenotyper_champion.md"
	@echo "Runs and registry: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db"

lint: setup
	$(BIN)/ruff check phenotyper tests benchmarks

test: setup lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) data/simulated reports .pytest_cache

bench: setup
	$(BIN)/python benchmarks/simulate_speed.py
	$(BIN)/python benchmarks/calibration_table.py
	$(BIN)/python benchmarks/benchmark_speed.py
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/serving_latency.py
