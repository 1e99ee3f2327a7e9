# One command sets everything up and runs the job: `make demo` (train + sample) or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0

.PHONY: setup demo test lint bench gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# Trains a small model on data.txt (a few minutes on 2 CPU cores), then prints a sample from it.
demo: setup
	mkdir -p runs
	$(PY) train.py --text_file data.txt --epochs 4 --batch_size 16 --seq_len 64 --model_dim 128 --n_layers 4 \
		--n_heads 4 --ilt_dim 64 --lr 2e-3 --out_dir runs/demo --overwrite
	$(PY) inference.py --model_path runs/demo/best_model.pt --prompt "ROMEO:" --max_len 60 \
		--temperature 0.8 --top_k 40 --use_cache --seed 0

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# HILT against Hugging Face GPT-2: the Training and Batch-1 generation tables of docs/performance.md (~8 min on
# 2 cores). The rest of the suite: the table in docs/performance.md, "The benchmark suite".
bench: setup
	$(PY) benchmarks/bench.py --ilt_kind depth,x0

# Checks the CUDA side end to end and times it (about 4 minutes on one H100, estimated); without a GPU it says so
# and exits 0.
# `make gpu-check PY=python3` uses a Python that already has CUDA torch (a GPU image) instead of setting up .venv.
gpu-check: $(if $(filter command line,$(origin PY)),,setup)
	PYTHONPATH=src $(PY) benchmarks/gpu_check.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
