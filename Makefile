# One set-up path for both quick-start commands: a local virtualenv with the CPU build of torch.
# GPU users: install your own CUDA torch first, then `pip install -e ".[test,triton]"`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,triton,plot]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/rspo-kernels demo

test: setup
	$(PY) -m pytest

bench: setup
	$(VENV)/bin/rspo-kernels bench

clean:
	rm -rf $(VENV) build *.egg-info rspo_kernels/*.so
