# `make demo` and `make test` work on a fresh clone: each creates or reuses .venv by itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.stamp

.PHONY: demo test bench bench-vit clean-demo

# Reinstall only when requirements.txt changes (the stamp is a copy of it).
$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	cp requirements.txt $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) demo.py

bench: $(STAMP)
	$(PY) benchmarks/bench_eval.py
	$(PY) benchmarks/bench_pruner.py
	$(PY) benchmarks/bench_small.py
	$(PY) benchmarks/bench_rerank.py

# ViT-B at 256x128 on the CPU: about 5 minutes each on 2 cores
bench-vit: $(STAMP)
	$(PY) benchmarks/bench_vit.py
	$(PY) benchmarks/bench_amg.py --onnx
	$(PY) benchmarks/bench_amg.py --int8

clean-demo:
	rm -rf datasets/synthetic/Market results/ft_resnet18/demo_bafd results/ft_resnet18/demo_untrained results/summary
