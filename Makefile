# Cairn: the two commands a new user needs are `make run` and `make test`.
CARGO ?= cargo
ARGS ?=

.PHONY: run build release test lint fmt bench clean

## Build and run one member: clients on 127.0.0.1:2379, data in ./default.etcd.
run:
	$(CARGO) run --release --bin cairn -- $(ARGS)

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --release --bin cairn

## Unit tests of every crate and the tests/ that start real members.
test:
	$(CARGO) nextest run --workspace --no-fail-fast

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Cairn vs etcd 3.4 on this machine (needs Debian's etcd packages and Go).
bench: release
	../shared/bench/vs-etcd.sh -members 1 -modes "put range-l range-s txn" target/release/cairn

clean:
	$(CARGO) clean
	rm -rf default.etcd
