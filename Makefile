# The two commands of the README: `make test` and `make demo`, on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=

.PHONY: test test-fast lint-imports demo venv system-deps image-test image-lock clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[export,serve,demo,test]'
	touch $@

# `apt-get install` of the Debian packages a recipe collected in $$missing, when we are root with
# apt; otherwise (or when it fails) what needs them skips.
APT_INSTALL = if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "apt-get install$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	    || echo "warning: could not install$$missing; what needs them will skip"; \
	fi

# Debian packages the tests and the demo use: the Fashion-MNIST files, chromium for the
# browser test and promtool (prometheus) for the adapter rules' test.
system-deps:
	@missing=""; \
	[ -d $(FMNIST) ] || missing="$$missing dataset-fashion-mnist"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	$(APT_INSTALL)

# The serving image built from deploy/Dockerfile and started here (scripts/image_test.py): on a
# stand-in for NVIDIA's base, with podman and debootstrap, which are installed when we are root
# with apt; elsewhere it is skipped with one line. Ends with `image ok`.
image-test: $(STAMP)
	@missing=""; \
	command -v podman >/dev/null || missing="$$missing podman"; \
	command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	$(APT_INSTALL)
	$(PY) scripts/image_test.py

# deploy/requirements-image.lock: every package of the image, pinned with hashes, for the
# image's Python (3.10) and any other (universal markers); uv from PyPI in a throwaway venv.
image-lock:
	python3 -m venv .cache/uv && .cache/uv/bin/pip install -q uv==0.13.9
	.cache/uv/bin/uv pip compile --universal --python-version 3.10 --generate-hashes --no-header \
	  --quiet deploy/requirements-image.in -o deploy/requirements-image.lock

# One torch thread per process: the suite runs a Triton server beside the tests, and on two
# cores oversubscribed threads are many times slower than one.
test: $(STAMP) system-deps image-test
	$(MAKE) --no-print-directory lint-imports
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q $(PYTEST_ARGS)

# The layers and the torch-free serving as import-linter contracts (pyproject.toml). It reads a
# package as installed (fewstep.training, ...), so it runs on a copy of the sources in that layout.
LAYOUT := .cache/import-layout
lint-imports: $(STAMP)
	rm -rf $(LAYOUT) && mkdir -p $(LAYOUT)/fewstep
	find fewstep -name '*.py' -exec cp --parents {} $(LAYOUT)/ \;
	for d in training export serving demo; do find $$d -name '*.py' -exec cp --parents {} $(LAYOUT)/fewstep/ \; ; done
	cd $(LAYOUT) && PYTHONPATH=. $(abspath $(VENV))/bin/lint-imports --no-cache --config $(CURDIR)/pyproject.toml

# The fast lane while working: the unit tests and one real-server smoke test (the tests marked
# `slow` -- real servers, training runs, subprocesses -- are left to `make test`, which CI runs).
test-fast: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP) system-deps
	$(VENV)/bin/fewstep demo

clean:
	rm -rf $(VENV) .pytest_cache
