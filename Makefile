# The two commands of the README: `make run` and `make test`.
# Both set everything up from the lock files on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test quick lint lock bench bench-scale clean

$(VENV)/.installed: requirements-lock.txt requirements-dev-lock.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --require-hashes -r requirements-lock.txt -r requirements-dev-lock.txt
	touch $@

# Proxies a small demo origin on 127.0.0.1 (no next-hop needed): open http://127.0.0.1:8080/
run: $(VENV)/.installed
	$(PY) -m proxy.demo

# The log tests run Debian's logrotate, as the older platform does.
LOGROTATE := command -v logrotate >/dev/null || (apt-get update -qq && apt-get install -y -qq logrotate >/dev/null)

# ruff, and mypy --strict on proxy/ (its settings: pyproject.toml).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m mypy

test: lint
	@$(LOGROTATE)
	$(PY) -m pytest $(PYTEST_ARGS)

# The edit-test loop: lint and every test but the slow ones (1 GiB transfers, load, soak).
quick: lint
	@$(LOGROTATE)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lock:
	$(VENV)/bin/pip install --quiet pip-tools
	$(VENV)/bin/pip-compile --quiet --generate-hashes --no-emit-index-url --no-emit-find-links --allow-unsafe --strip-extras -o requirements-lock.txt requirements.txt
	$(VENV)/bin/pip-compile --quiet --generate-hashes --no-emit-index-url --no-emit-find-links --allow-unsafe --strip-extras -o requirements-dev-lock.txt requirements-dev.txt

# Not part of the tests: see bench/README.md. Needs an otherwise idle machine.
bench: $(VENV)/.installed
	$(PY) bench/run.py $(BENCH_ARGS)

# Memory per streamed GiB and per idle connection, and 1 vs N workers: bench/README.md.
bench-scale: $(VENV)/.installed
	$(PY) bench/scale.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV)
