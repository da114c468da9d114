# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Test files run in parallel, each file in one worker (its module fixtures built once); 2 fits a 2-core machine.
TEST_WORKERS ?= 2

.PHONY: venv test lint demo tiny bench clean ros2-tooling

venv: $(STAMP)

$(STAMP): requirements.lock setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The ROS 2 launch and ros2cli wheels in ../shared/ros2-tooling, when that folder exists (skipped
# silently otherwise): the tests then run the real `ros2 launch`, `ros2 topic`, `ros2 service` and
# `ros2 param`. colcon gets a virtualenv of its own (it needs setuptools<80) and is run with the
# project's interpreter, with that virtualenv's site-packages on PYTHONPATH.
ROS2_TOOLING := ../shared/ros2-tooling
ROS2_WHEELS := $(wildcard $(ROS2_TOOLING)/wheels/*.whl)
ROS2_TOOLING_STAMP := $(VENV)/.ros2-tooling
COLCON_VENV := $(VENV)/colcon

ros2-tooling: $(if $(ROS2_WHEELS),$(ROS2_TOOLING_STAMP))

$(ROS2_TOOLING_STAMP): $(STAMP) $(ROS2_WHEELS) requirements-colcon.lock
	$(PY) -m pip install --quiet --no-deps $(ROS2_TOOLING)/wheels/*.whl
	test -x $(COLCON_VENV)/bin/python || $(PY) -m venv $(COLCON_VENV)
	$(COLCON_VENV)/bin/python -m pip install --quiet -r requirements-colcon.lock
	touch $(ROS2_TOOLING_STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint ros2-tooling
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS) test

tiny: $(STAMP)
	$(PY) -m openvla_ros.tiny artifacts/tiny

# The pretrained tiny base (built once, cached; an interrupted build resumes, a corrupt one is rebuilt).
# make pretrained [PRETRAIN_ARGS="--steps 1500 --episodes 300 --tasks reach"]
PRETRAIN_ARGS ?=
.PHONY: pretrained
pretrained: $(STAMP)
	$(PY) -m openvla_ros.tiny artifacts/tiny-pretrained --pretrain $(PRETRAIN_ARGS)

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
