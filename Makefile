# Sealroom: two commands on a fresh machine.
#   make demo   set everything up, then play the whole story end to end
#   make test   set everything up, then lint and run every test
# Set-up steps are idempotent: a second run reuses the venv, the engine and the image.

PY        ?= python3
VENV      := .venv
VPY       := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
PROTO_SRC := $(wildcard proto/sealroom/v1/*.proto)

.PHONY: all venv docker slurm image proto proto-check test test-unit demo bench bench-ci lint clean

all: test

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, from the CPU wheel on disk: a plain range would pull a CUDA build of several GB.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

docker:
	enclave/image/ensure-docker.sh

slurm:
	enclave/image/ensure-slurm.sh

image: venv docker
	enclave/image/build.sh $(abspath $(VPY))

proto: venv
	$(VPY) -m gateway._protogen

proto-check: venv
	$(VPY) -m gateway._protogen --check

test: image slurm lint
	CI=$${CI:-} $(VPY) -m pytest -q

test-unit: venv
	$(VPY) -m pytest -q tests/unit

demo: image
	$(VENV)/bin/sealroom demo

bench: image
	$(VPY) -m tests.bench

lint: venv
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .
	$(VPY) -m mypy enclave gateway policies trainers
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .image build *.egg-info
