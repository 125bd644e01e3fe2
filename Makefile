# Two commands do all set-up on a fresh machine:
#   make demo   virtual environment + install + synthetic phantom + pipeline + executed notebook -> outputs/
#   make test   the test suite (what CI runs, with make test-xla)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
XLA_VENV ?= .venv-xla
XLA_PY := $(XLA_VENV)/bin/python

.PHONY: demo test test-xla lint bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# torch_xla 2.9.0 is the newest release; it needs exactly torch 2.9.0 / torchvision 0.24.0.
$(XLA_VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(XLA_PY) || $(PYTHON) -m venv $(XLA_VENV)
	$(XLA_PY) -m pip install --quiet --upgrade pip
	$(XLA_PY) -m pip install --quiet torch==2.9.0 torchvision==0.24.0 torch_xla==2.9.0 -r requirements-dev.txt
	$(XLA_PY) -m pip install --quiet --no-deps -e .
	touch $@

demo: $(VENV)/.installed
	$(PY) -m helpers.phantom --preset small --out data
	$(PY) pipeline.py --volume data/knee_small_ct.nii.gz --mask data/knee_small_mask.nii.gz --output outputs/results.csv --device auto
	@# The notebook, headless, same scan and settings: executed copy in outputs/, results + figures in outputs/notebook/.
	@# -k python3 with the env's kernelspec first = this virtual env's interpreter (it has helpers installed).
	mkdir -p outputs/notebook
	JUPYTER_PREFER_ENV_PATH=1 $(PY) -m papermill notebooks/knee_ct_pipeline.ipynb outputs/knee_ct_pipeline.ipynb \
		-k python3 -p device auto -p output_dir outputs/notebook
	@cmp -s outputs/results.csv outputs/notebook/results.csv || { \
		echo "error: outputs/notebook/results.csv (notebook) differs from outputs/results.csv (CLI); they must be byte-identical" >&2; \
		exit 1; }
	@echo "notebook results.csv is byte-identical to the CLI's"

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-xla: $(XLA_VENV)/.installed
	PJRT_DEVICE=CPU KNEE_REQUIRE_XLA=1 $(XLA_PY) -m pytest -q -m xla

lint: $(VENV)/.installed
	$(PY) -m ruff check .

# Whole-pipeline CPU benchmark on the full-size phantom (and the real masks when ../shared has them).
bench: $(VENV)/.installed
	$(PY) benchmarks/bench_pipeline.py

clean:
	find outputs -mindepth 1 ! -name README.md -exec rm -rf {} +
	rm -rf data/*.nii.gz .pytest_cache
