# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test lint demo tiny bench clean

venv: $(STAMP)

$(STAMP): requirements.lock setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS) test

tiny: $(STAMP)
	$(PY) -m openvla_ros.tiny artifacts/tiny

# make demo [MODEL=checkpoint-dir-or-hub-id] [DEMO_ARGS="--duration 10 --task pick"]
demo: $(STAMP)
	$(PY) -m openvla_ros.demo $(if $(MODEL),--model "$(MODEL)") $(DEMO_ARGS)

# make pipeline [PIPELINE_ARGS="--episodes 40 --steps 150 --eval-episodes 10"]  (--quick: a smoke test)
PIPELINE_ARGS ?=
.PHONY: pipeline
pipeline: $(STAMP)
	$(PY) -m openvla_ros.pipeline $(PIPELINE_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/inference.py

clean:
	rm -rf $(VENV) artifacts build *.egg-info
