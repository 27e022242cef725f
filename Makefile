# Two commands on a fresh machine:  make demo  and  make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: install data demo test test-all lint bench-speed clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist; elsewhere smi downloads it with torchvision
data:
	@if [ -f $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "note: $(FMNIST) missing and apt-get unavailable; smi will try a torchvision download"; \
	fi

install: $(STAMP) data

demo: install
	$(BIN)/smi demo --out demo_out

test: install
	$(BIN)/python -m pytest

# everything, slow tests included
test-all: install
	$(BIN)/python -m pytest -m ""

lint: install
	$(BIN)/ruff check src tests benchmarks

bench-speed: install
	$(BIN)/python benchmarks/inversion_speed.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
