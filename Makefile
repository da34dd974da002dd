# The two commands a newcomer needs; each installs what it needs first (seconds when up to date).
PY := .venv/bin/python
DEMO_ARGS ?=
TEST_ARGS ?=
# The torch 2.1 lane (.ci/run's second lane): one venv per machine, shared by every clone, which
# runs its tests with PYTHONPATH=<clone> (nothing of a clone is installed into it).
TORCH21_VENV ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/daft-mm/venv-py311-torch2.1.2
# install-here: the interpreter of the environment to install into (yours, with its torch).
PYTHON ?= python3

.PHONY: install demo test bench clean install-torch21 test-torch21 install-here check-env
install:
	bash tools/install.sh

demo: install
	$(PY) tools/demo.py $(DEMO_ARGS)

test: install
	$(PY) -m pytest $(TEST_ARGS)

install-torch21:
	DAFT_MM_TORCH=2.1.2 VENV=$(TORCH21_VENV) bash tools/install.sh

test-torch21: install-torch21
	PYTHONPATH=$(CURDIR) $(TORCH21_VENV)/bin/python -m pytest $(TEST_ARGS)

# Into the current environment (your torch and mmcv stay): check them, install daft-mm editable
# with its pure-Python dependencies, then check everything.
install-here:
	$(PYTHON) tools/check_env.py --before-pip
	$(PYTHON) -m pip install -e .
	$(PYTHON) tools/check_env.py
	$(PYTHON) -c "import daft_mm, mmseg.models, mmdet.models; print('daft_mm', daft_mm.__version__, 'imports with the OpenMMLab layer')"

check-env:
	$(PYTHON) tools/check_env.py

bench: install
	$(PY) benchmarks/bench_conversion.py
	$(PY) benchmarks/bench_train_step.py

clean:
	rm -rf work_dirs .pytest_cache
