# The two commands a newcomer needs; each installs what it needs first (seconds when up to date).
PY := .venv/bin/python
DEMO_ARGS ?=
TEST_ARGS ?=

.PHONY: install demo test bench clean
install:
	bash tools/install.sh

demo: install
	$(PY) tools/demo.py $(DEMO_ARGS)

test: install
	$(PY) -m pytest $(TEST_ARGS)

bench: install
	$(PY) benchmarks/bench_conversion.py
	$(PY) benchmarks/bench_train_step.py

clean:
	rm -rf work_dirs .pytest_cache
