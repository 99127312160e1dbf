# blip-ops: the two commands of the README are `make run` and `make test`.
# Each installs what is missing first (uv, the locked environment, the DVC CLI, Chromium).

SHELL := /bin/bash
PY ?= python3
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
DATA ?= data
RECIPE ?= default  # default: blip_core/recipe.py (about 9 minutes on 2 cores); quick, long: recipes/*.yaml
PORT ?= 3000
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export DAGSTER_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: setup run test test-fast lint bench ui clean

setup:  ## install uv, the locked environment, the DVC CLI (its own tool env) and Chromium
	@command -v uv >/dev/null 2>&1 || [ -x "$(UV)" ] || $(PY) -m pip install --quiet --user 'uv>=0.5' \
		|| $(PY) -m pip install --quiet 'uv>=0.5'
	$(eval UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv))
	$(UV) sync --locked --compile-bytecode --quiet
	@$(UV) tool list 2>/dev/null | grep -q '^dvc ' || $(UV) tool install --quiet 'dvc[s3]>=3.50'
	@$(UV) tool list 2>/dev/null | grep -q '^img2dataset ' || $(UV) tool install --quiet 'img2dataset==1.47.0'
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
		{ (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		  >/dev/null 2>&1 || echo "note: could not install chromium; the UI browser test will fail"; }

run: setup  ## the whole lineage on the embedded shapes world
	$(UV) run --locked python -m orchestration.main --data $(DATA) \
		$(if $(filter default,$(strip $(RECIPE))),,--recipe recipes/$(strip $(RECIPE)).yaml)

test: setup  ## the whole test suite: the fast tier and the slow one (lineages, subprocess trainings, servers, UI, recipe)
	$(UV) run --locked pytest -q

test-fast: setup  ## unit and small integration tests only (deselects the `slow` marker)
	$(UV) run --locked pytest -q -m "not slow"

lint:
	$(UV) run --locked ruff check .

bench: setup
	$(UV) run --locked python bench/bench_throughput.py

ui: setup  ## the Dagster UI on http://127.0.0.1:$(PORT), sharing the main command's instance
	$(UV) run --locked python -m orchestration.ui --data $(DATA) --port $(PORT)

clean:
	rm -rf $(DATA) runs .pytest_cache
