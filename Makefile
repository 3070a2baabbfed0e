# One set-up path for both quick-start commands: a local virtualenv with the CPU build of torch.
# GPU users: install your own CUDA torch first, then `pip install -e ".[test,triton]"`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: setup setup-frameworks demo test bench clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,triton,plot]"
	touch $@

setup: $(VENV)/.installed

# The real frameworks behind the adapter tests (about 1 GB more); CI runs this before `make test`.
# verl needs transformers<5.11; OpenRLHF pins a conflicting stack, so it goes in with --no-deps
# next to deepspeed, the one dependency its modules import on a CPU machine.
$(VENV)/.frameworks: $(VENV)/.installed
	$(PY) -m pip install -q "$(TORCH_PIN)" -e ".[test,triton,plot,verl,trl]"
	$(PY) -m pip install -q "$(TORCH_PIN)" "deepspeed==0.19.6"
	$(PY) -m pip install -q --no-deps "openrlhf==0.11.2"
	touch $@

setup-frameworks: $(VENV)/.frameworks

demo: setup
	$(VENV)/bin/rspo-kernels demo

test: setup
	$(PY) -m pytest

bench: setup
	$(VENV)/bin/rspo-kernels bench

clean:
	rm -rf $(VENV) build *.egg-info rspo_kernels/*.so
