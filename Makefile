# Two entry points: `make demo` and `make test`. Both build .venv from uv.lock first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: setup browser demo test lint bench clean

setup: $(VENV)/.synced browser

# Headless Chromium renders the HTML reports in the tests (Debian's package).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		{ echo "Install Chromium (Debian: apt-get install chromium) for the report tests."; exit 1; }

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
	$(BIN)/phenotyper simulate --preset confounded-treatment --n 20000 --seed 8 \
		--output data/simulated/confounded_treatment.parquet
	$(BIN)/phenotyper benchmark --cohort data/simulated/confounded_treatment.parquet \
		--outcome sofa_response --outcome death_28d --treatment treatment \
		--model models:/immunophenotyper@champion --noise-repeats 0 \
		--output reports/observational_benchmark
	$(BIN)/phenotyper model-card immunophenotyper --output models/immunophenotyper_champion.md
	$(BIN)/python -m phenotyper.serving --model models:/immunophenotyper@champion
	$(BIN)/phenotyper score --input data/simulated/immunosep_screening.parquet \
		--output reports/scored/immunosep_screening.parquet \
		--report reports/scored/immunosep_screening.html
	@echo "Rules benchmark: reports/rules_benchmark/benchmark.md"
	@echo "Policy values on an observational cohort (AIPW): reports/observational_benchmark/benchmark.md"
	@echo "Champion's model card: models/immunophenotyper_champion.md"
	@echo "Scored cohort and its report: reports/scored/"
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
	$(BIN)/python benchmarks/score_speed.py
	$(BIN)/python benchmarks/score_speed.py --candidate xgboost --rows 200000 --memory-rows 0
	$(BIN)/python benchmarks/shap_speed.py
