# One command each for the demo and the tests; both install what they need into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean bench-accuracy

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first and pinned: a bare requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[test,slicer]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/isdnet demo --out demo-output

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q Testing

clean:
	rm -rf $(VENV) demo-output .pytest_cache

# The paper's ablation (Table 3) on real MRI; DATASET=<folder> for another dataset, BENCH_ARGS=--quick for a smoke run.
bench-accuracy: $(STAMP)
	$(BIN)/isdnet-bench accuracy $(or $(DATASET),../shared/data/hippocampus) --out bench-output/accuracy $(BENCH_ARGS)

# The train-and-segment workflow in a browser (trame-slicer) on http://127.0.0.1:8080/; WEB_ARGS for more options.
.PHONY: web
web: $(STAMP)
	$(BIN)/isdnet-web --workspace $(or $(WORKSPACE),isdnet-workspace) $(WEB_ARGS)

.PHONY: bench-speed
bench-speed: $(STAMP)
	$(BIN)/isdnet-bench speed --out bench-speed.json
