# vhost-net-batch: `make demo` runs the main job, `make test` runs every test, `make fuzz` runs
# every fuzz target for 10^6 inputs (FUZZ_RUNS to change; ci/fuzz.sh).
# Both install what they need (ci/setup.sh, idempotent, needs root).
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all setup build image demo test lint unit clean soak fuzz migration

all: build

setup:
	bash ci/setup.sh

build:
	$(CARGO) build --release --workspace

image:
	bash ci/guest/build-image.sh

demo: setup build image
	bash ci/demo.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: setup image
	$(CARGO) build --workspace --all-targets
	$(CARGO) test --workspace --no-fail-fast
	$(MAKE) lint

# Half an hour of four VMs (VNB_SOAK_MINUTES to change it); samples in target/soak.
soak: setup image
	$(CARGO) test -p vhost-net-batch --test soak -- --nocapture

# Live migration there and back between two QEMU 10 processes (also part of `make test`).
migration: setup image
	$(CARGO) test -p vhost-net-batch --test e2e_migration -- --nocapture

fuzz: setup
	bash ci/fuzz.sh

clean:
	$(CARGO) clean
