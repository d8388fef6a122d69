# `make test` and `make demo` create .venv from a Python >= 3.12 (jax >= 0.11 needs it) and install.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

# First Python >= 3.12 among $PYTHON, python3, python3.12, python3.13 and pyenv's 3.12.1.
FIND_PYTHON = for p in "$$PYTHON" python3 python3.12 python3.13 "$$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12"; do \
  [ -n "$$p" ] && "$$p" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1 && { echo "$$p"; exit 0; }; \
  done; exit 1

.PHONY: setup test demo demo-models clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	@python=$$($(FIND_PYTHON)) || { echo "error: no Python >= 3.12 found (jax >= 0.11 needs it). Install one (e.g. 'pyenv install 3.12.1') or run 'make PYTHON=/path/to/python3.12 ...'." >&2; exit 1; }; \
	echo "creating $(VENV) with $$python ($$($$python --version))"; \
	"$$python" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

test: setup  # two worker processes (pytest-xdist): CI's 2 cores, 8.6 min instead of 13.1 there
	$(PY) -m pytest -q -n 2 tests

demo: setup  # the committed demo model (synthetic orbiting-camera world): the camera comes back after 6 chunks; writes outputs/demo.mp4 and outputs/demo.json
	$(PY) experiments/generate.py

# Trains the demo's codec and its three DiTs (omnimem, window, dense) on the pixel world into assets/demo/ (one
# GPU; the budgets below take about 35 minutes on an H100). omnimem's teacher forcing at 16 chunks needs ~35 GB.
demo-models: setup
	$(PY) experiments/train_codec.py --time_budget_s=600 --steps=100000 --export=assets/demo/vae
	for mode in omnimem window dense; do \
	  fraction=$$([ $$mode = omnimem ] && echo .55 || echo .2); \
	  XLA_PYTHON_CLIENT_MEM_FRACTION=$$fraction $(PY) experiments/train.py --mode=$$mode --codec=assets/demo/vae \
	    --num_chunks=16 --run_dir=runs/demo_$$mode --steps=100000 --save_every=1000000 --time_budget_s=1500 \
	    --learning_rate=5e-4 --sigma_shift=3 --export=assets/demo/$$mode & \
	done; wait

clean:
	rm -rf $(VENV) .pytest_cache
