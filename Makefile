# Cairn: the two commands a new user needs are `make run` and `make test`.
CARGO ?= cargo
ARGS ?=

.PHONY: run build release test lint fmt bench bench-report clean static image up down logs test-compose fuzz soak soak-nemeses

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
	$(CARGO) test --workspace --doc

## Hostile and damaged input against the parsers of untrusted bytes (HTTP/2
## frames, the HTTP gateway's requests, the peer protocol, the raft log, the
## store's snapshots, etcd's WAL and bbolt files): FUZZ_CASES random cases
## per target instead of make test's 256. Reported in docs/reliability.md.
FUZZ_CASES ?= 100000
fuzz:
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) nextest run --release -p cairn-net -p cairn-gateway \
	  -p cairn-consensus -p cairn-mvcc -p cairn-bbolt -p cairn-etcd-compat -E 'test(/never_panic/)'

## The soak: three members under a mixed load (puts, txns and gets of
## registers, watches of every key, short and kept-alive leases, compactions)
## with a member killed and restarted every minute, for SOAK_SECONDS instead
## of 10; at the end the registers' histories must be linearizable, every
## watcher must have seen every revision once, the leases must have done
## their work, and the never-restarted member's RSS and open descriptors must
## be flat after warm-up. `make soak-nemeses` runs each linearizability
## nemesis (kills and pauses, one-way partitions, a mute leader, packet loss
## and delay, dropped and reordered peer connections, clock jumps, slow
## disks, power loss of the whole cluster) as long. Reported in
## docs/reliability.md.
SOAK_SECONDS ?= 1800
soak:
	CAIRN_SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO) nextest run --release --test linearizability \
	  --no-capture -E 'test(/a_mixed_load/)'

soak-nemeses:
	CAIRN_SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO) nextest run --release --test linearizability \
	  --no-capture -E 'test(/registers_stay_linearizable/)'

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Cairn vs etcd 3.4 on this machine (needs Debian's etcd packages and Go).
bench: release
	../shared/bench/vs-etcd.sh -members 1 -modes "put range-l range-s txn" target/release/cairn

## Cairn vs etcd 3.4 with cairn-bench, 1 and 3 members, 1 to 1000 clients:
## docs/bench/results.json, results.md and PNG plots (see docs/performance.md).
## BENCH_ARGS passes knobs to scripts/bench-report.py (e.g. --scale 0.2).
BENCH_VENV ?= target/bench-venv
BENCH_ARGS ?=
bench-report:
	$(CARGO) build --release --bin cairn
	$(CARGO) build --release -p cairn-bench
	command -v etcd >/dev/null && command -v etcdctl >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq etcd-server etcd-client)
	test -x $(BENCH_VENV)/bin/python || python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -c 'import matplotlib' 2>/dev/null || $(BENCH_VENV)/bin/pip install -q matplotlib
	$(BENCH_VENV)/bin/python scripts/bench-report.py $(BENCH_ARGS)

## Container images, from static binaries built here (no base image):
## cairn:latest and cairn-grpc-proxy:latest.
IMAGE_TARGET ?= x86_64-unknown-linux-gnu
IMAGE_DIR := target/image
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
COMPOSE_FILE := deploy/compose.yaml
COMPOSE_PROJECT ?= cairn

# Its own target directory: other flags, and no wait on the main one's lock.
STATIC_TARGET_DIR ?= target/static

static:
	RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols \
	  $(CARGO) build --release --target $(IMAGE_TARGET) --target-dir $(STATIC_TARGET_DIR) --bin cairn --bin cairn-grpc-proxy

image: static
	rm -rf $(IMAGE_DIR) && mkdir -p $(IMAGE_DIR)
	cp $(STATIC_TARGET_DIR)/$(IMAGE_TARGET)/release/cairn $(STATIC_TARGET_DIR)/$(IMAGE_TARGET)/release/cairn-grpc-proxy $(IMAGE_DIR)/
	docker build -q -f deploy/Dockerfile.cairn -t cairn:latest $(IMAGE_DIR)
	docker build -q -f deploy/Dockerfile.proxy -t cairn-grpc-proxy:latest $(IMAGE_DIR)
	@docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^cairn(-grpc-proxy)?:latest '

## Three members behind the grpc-proxy on 127.0.0.1:$${CAIRN_PORT:-2379}.
up: image
	$(COMPOSE) -p $(COMPOSE_PROJECT) -f $(COMPOSE_FILE) up -d
	./deploy/wait-healthy.sh $(COMPOSE_PROJECT)

down:
	$(COMPOSE) -p $(COMPOSE_PROJECT) -f $(COMPOSE_FILE) down

logs:
	$(COMPOSE) -p $(COMPOSE_PROJECT) -f $(COMPOSE_FILE) logs --tail=200 -f

## The compose stack under faults: kills, partitions, rolling restarts.
test-compose: image
	$(CARGO) nextest run --test compose --run-ignored ignored-only --no-fail-fast

clean:
	$(CARGO) clean
	rm -rf default.etcd
