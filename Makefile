# Two commands do all set-up on a fresh machine:
#   make train   # create .venv, install, run the main job
#   make test    # create .venv, install, run the default test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.14.1 + torchvision 0.29.1: the pair that works together here (see README.md, Set-up).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-all test-load train llava-demo bench docs lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" -q

test-all: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not load" -q

# 1,000 training steps and a 10,000-sample evaluation at flat memory (about 8 minutes on 2 cores).
test-load: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m load -q -s

# The main job: train the default experiment (LIMoE-tiny on the embedded digits captions), then evaluate
# the exported model with mome-eval (zero-shot accuracy, routing report under logs/eval/runs/).
train: install
	rm -rf logs/train/default
	HF_HUB_OFFLINE=1 $(VENV)/bin/mome-train hydra.run.dir=logs/train/default
	HF_HUB_OFFLINE=1 $(VENV)/bin/mome-eval model=local-dir:logs/train/default/model

# MoE-LLaVA's three MoE-tuning stages on the synthetic shapes VQA set (each stage starts from the last).
llava-demo: install
	rm -rf logs/moe_llava_shapes
	HF_HUB_OFFLINE=1 $(VENV)/bin/mome-train experiment=moe_llava_shapes_stage1
	HF_HUB_OFFLINE=1 $(VENV)/bin/mome-train experiment=moe_llava_shapes_stage2
	HF_HUB_OFFLINE=1 $(VENV)/bin/mome-train experiment=moe_llava_shapes_stage3

# The performance suite (MoE layers vs dense and peers, models, peak memory; about 20 minutes on 2 cores):
# prints the tables and regenerates docs/benchmarks.md (docs/performance.md, the analysis, is written by hand).
# `make bench BENCH_ARGS=--quick` for a smoke test.
bench: install
	$(PY) -m pip install --quiet -e ".[bench]"
	HF_HUB_OFFLINE=1 $(PY) tools/bench.py --json logs/bench.json --markdown docs/benchmarks.md $(BENCH_ARGS)

# The documentation site (mkdocs, API reference from the docstrings; docs/mkdocs.yml) into site/, with every
# warning an error. `.venv/bin/mkdocs serve -f docs/mkdocs.yml` to read it while editing.
docs: install
	$(PY) -m pip install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet -f docs/mkdocs.yml

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build dist site *.egg-info
