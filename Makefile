# The README's two commands are `make demo` and `make test`; both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# A CPU wheel of torch 2.13.0 lies on disk here; an unpinned `torch` would pull a multi-GB CUDA build.
# Override for another machine, e.g. `make test TORCH="torch==2.6.0"`; an installed torch is kept.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
LINT_PATHS := moekit kernels tests bench

.PHONY: setup demo examples test lint bench clean

# The plain set-up is what the demo needs; the test extras (triton, about 1 GB) come only with `make test`.
# One stamp per extra, so `make demo` then `make test` (or the reverse) installs each once.
setup: $(VENV)/.installed-demo

define venv_with_torch
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
endef

$(VENV)/.installed-demo: pyproject.toml
	$(venv_with_torch)
	$(BIN)/python -m pip install -q -e ".[demo]"
	touch $@

$(VENV)/.installed-test: pyproject.toml
	$(venv_with_torch)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/python -m moekit.demo

# Every config in merge_configs/, on the tiny models `moekit example-models` writes beside them; outputs go to
# out/examples/NAME. The demo_*.yaml configs need the demo's models under $$MOEKIT_CACHE: run `make demo` first.
DEMO_MODELS = $${MOEKIT_CACHE:-$$HOME/.cache/moekit}/demo/models/smollm2-base
examples: setup
	$(BIN)/moekit example-models merge_configs
	@set -e; for config in merge_configs/*.yaml; do \
	  name=$$(basename $$config .yaml); \
	  case $$name in demo_*) if [ ! -e "$(DEMO_MODELS)" ]; then \
	    echo "not run: $$config (its models come from \`make demo\`)"; continue; fi;; esac; \
	  echo "$$ moekit merge $$config -o out/examples/$$name --force -q"; \
	  $(BIN)/moekit merge $$config -o out/examples/$$name --force -q; \
	done

lint: $(VENV)/.installed-test
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=20

bench: setup
	$(BIN)/python bench/merge_memory.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
