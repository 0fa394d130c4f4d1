# Two entry points: `make demo` and `make test`. Both build .venv from uv.lock first.
#
# The interpreter: the newest Python >= 3.11 that actually runs, trying python3.13, python3.12,
# then python3. Each name is executed, not just looked up: a pyenv shim for a version that is
# installed but not selected exists and fails, so pyenv's own copies (`pyenv whence`, `pyenv
# prefix`) are tried next. PYTHON=/path/to/python overrides.
define FIND_PYTHON
for name in python3.13 python3.12 python3; do \
  for exe in "$$(command -v $$name 2>/dev/null)" $$(command -v pyenv >/dev/null 2>&1 && \
      pyenv whence $$name 2>/dev/null | sort -rV | while read -r v; do \
        echo "$$(pyenv prefix $$v)/bin/$$name"; done); do \
    [ -n "$$exe" ] && "$$exe" -c 'import sys; assert sys.version_info >= (3, 11)' \
      >/dev/null 2>&1 && { "$$exe" -c 'import sys; print(sys.executable)'; exit 0; }; \
  done; \
done
endef
PYTHON ?= $(shell $(FIND_PYTHON))
PYTHON_VERSION := $(shell "$(PYTHON)" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)
VENV ?= .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
export UV_PROJECT_ENVIRONMENT := $(VENV)
# The tests that talk to XGBoost, also run on the oldest supported Python (`test-oldest`),
# whose lock resolves an older XGBoost than the newest Python's.
XGBOOST_TESTS := tests/packaged/test_explain.py tests/packaged/test_packaged.py \
	tests/scoring/test_serving.py tests/scoring/test_score.py
OLDEST_PYTHON ?= 3.11
OLDEST_VENV := .venv-py$(OLDEST_PYTHON)

.PHONY: setup interpreter browser demo test test-oldest lint bench clean

setup: interpreter $(VENV)/.synced-$(PYTHON_VERSION) browser

interpreter:
	@test -n "$(PYTHON_VERSION)" || { echo "No Python >= 3.11 runs here (tried python3.13, \
	python3.12, python3, and pyenv's copies): install one, or give PYTHON=/path/to/python."; \
	exit 1; }
	@echo "Python $(PYTHON_VERSION): $(PYTHON) -> $(VENV)"

# Headless Chromium renders the HTML reports in the tests (Debian's package).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		{ echo "Install Chromium (Debian: apt-get install chromium) for the report tests."; exit 1; }

# One stamp per interpreter version: a .venv another Python built is rebuilt, not reused.
$(VENV)/.synced-$(PYTHON_VERSION): pyproject.toml uv.lock
	@built="$$($(BIN)/python -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)"; \
	if [ -n "$$built" ] && [ "$$built" != "$(PYTHON_VERSION)" ]; then \
		echo "Rebuilding $(VENV): it was built by Python $$built, not $(PYTHON_VERSION)."; \
		rm -rf $(VENV); fi
	test -x $(BIN)/python || "$(PYTHON)" -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"
	$(BIN)/uv sync --locked --inexact --extra spark --compile-bytecode --quiet
	touch $@

demo: setup
	$(BIN)/phenotyper simulate --preset immunosep-screening --n 20000 --seed 7 \
		--output data/simulated/immunosep_screening.parquet
	$(BIN)/phenotyper validate data/simulated/immunosep_screening.parquet
	$(BIN)/phenotyper benchmark --cohort data/simulated/immunosep_screening.parquet \
		--label phenotype_true --output reports/rules_benchmark
	for experiment in experiments/*.toml; do $(BIN)/phenotyper train $$experiment || exit 1; done
	COLUMNS=160 $(BIN)/phenotyper benchmark --cohort data/simulated/immunosep_screening.parquet \
		--label phenotype_true --model models:/immunophenotyper@champion \
		--model models:/immunophenotyper-label-free@challenger --noise-repeats 0 \
		--output reports/label_free_benchmark
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
	@echo "Learned without labels vs supervised, against the simulated truth: reports/label_free_benchmark/benchmark.md"
	@echo "Policy values on an observational cohort (AIPW): reports/observational_benchmark/benchmark.md"
	@echo "Champion's model card: models/immunophenotyper_champion.md"
	@echo "Scored cohort and its report: reports/scored/"
	@echo "Runs and registry: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db"

# Style, then the import layers (pyproject's [tool.importlinter]: a circle or an upward import
# fails).
lint: setup
	$(BIN)/ruff check phenotyper tests benchmarks
	$(BIN)/lint-imports

test: setup lint
	$(BIN)/python -m pytest

# The XGBoost-facing tests on the oldest supported Python, in its own environment.
test-oldest:
	$(MAKE) --no-print-directory VENV=$(OLDEST_VENV) \
		PYTHON="$$(PYENV_VERSION=$$(pyenv whence python$(OLDEST_PYTHON) 2>/dev/null | \
			sort -rV | head -1) pyenv which python$(OLDEST_PYTHON) 2>/dev/null || \
			command -v python$(OLDEST_PYTHON))" setup
	$(OLDEST_VENV)/bin/python -m pytest $(XGBOOST_TESTS)

clean:
	rm -rf $(VENV) $(OLDEST_VENV) data/simulated reports .pytest_cache

bench: setup
	$(BIN)/uv sync --locked --inexact --extra spark --group bench --compile-bytecode --quiet
	$(BIN)/python benchmarks/simulate_speed.py
	$(BIN)/python benchmarks/calibration_table.py
	$(BIN)/python benchmarks/benchmark_speed.py
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/serving_latency.py
	$(BIN)/python benchmarks/score_speed.py
	$(BIN)/python benchmarks/score_speed.py --candidate xgboost --rows 200000 --memory-rows 0
	$(BIN)/python benchmarks/shap_speed.py
	$(BIN)/python benchmarks/latent.py
	$(BIN)/python benchmarks/soak.py
	$(BIN)/python benchmarks/new_site.py
