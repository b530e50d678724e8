# Atoll: `make demo` runs a container in a pod microVM, `make test` runs every test.
# Both do all the set-up a fresh Debian 12 machine needs.

SHELL := /bin/bash
TARGET := x86_64-unknown-linux-gnu
STATIC := target/$(TARGET)/release
BUILD := build
export ATOLL_CACHE ?= /var/cache/atoll

# Static binaries: they run in the guest and inside the nested node, which have no libc.
STATIC_ENV := RUSTFLAGS='-C target-feature=+crt-static' LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu
STATIC_PKGS := -p atoll-vmm -p atoll-init -p atoll-image -p atoll-node -p atoll-tests -p atoll-bench -p atoll-cri

.PHONY: fuzz-smoke all deps static kernel initramfs artifacts go-peers demo test unit e2e bench bench-image clean

all: artifacts

deps:
	@scripts/install-deps.sh

static: deps
	$(STATIC_ENV) cargo build --release --locked --target $(TARGET) $(STATIC_PKGS)

# The guest kernel is cached under $(ATOLL_CACHE)/kernel/<hash of config + source>.
kernel: static
	$(STATIC)/atoll-image kernel --out $(BUILD)

initramfs: static
	@mkdir -p $(BUILD)
	$(STATIC)/atoll-image initramfs --init $(STATIC)/atoll-init --busybox /bin/busybox -o $(BUILD)/initramfs.cpio

artifacts: kernel initramfs

# The Go peer of the streaming server's tests: kubelet's SPDY library (spdystream)
# from Debian's packages, built offline (GOPATH mode, no module downloads).
go-peers: deps
	@mkdir -p target/go
	GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE=$(CURDIR)/target/go/cache GOFLAGS=-buildvcs=false \
	  CGO_ENABLED=0 go build -o target/go/spdy-peer ./tests/go/spdy-peer/main.go

# Runs the built-in busybox image with `atoll run` where a real KVM is (the host's, or
# the nested node's: the first line says which and why) and prints the container's
# output and the time from the command to the container's start. The image store is
# $(DEMO_STORE); the default image is built into it from Debian's busybox-static.
DEMO_STORE := $(ATOLL_CACHE)/demo-store
demo: artifacts
	@$(STATIC)/atoll-image --store $(DEMO_STORE) builtin >/dev/null
	@$(STATIC)/atoll-image --store $(DEMO_STORE) convert atoll/busybox:latest -o $(BUILD)/busybox.erofs >/dev/null
	@$(STATIC)/atoll-node where
	@$(STATIC)/atoll-node run --file $(STATIC)/atoll:atoll --file $(STATIC)/atoll-vmm:atoll-vmm \
	  --file $(BUILD)/vmlinux:vmlinux --file $(BUILD)/initramfs.cpio:initramfs.cpio \
	  --file $(DEMO_STORE):store --file scripts/demo-pod.sh:demo.sh -- ./demo.sh

# The VMM's fuzz targets, built and run a few seconds each (part of `make test`).
fuzz-smoke:
	scripts/fuzz-smoke.sh

unit: deps go-peers
	cargo test --workspace --locked --lib --bins

e2e: artifacts
	ATOLL_BUILD_DIR=$(CURDIR)/$(BUILD) ATOLL_STATIC_DIR=$(CURDIR)/$(STATIC) \
	  cargo test --locked -p atoll-tests --test '*' -- --test-threads=1

test: artifacts go-peers
	cargo test --workspace --locked --lib --bins
	scripts/fuzz-smoke.sh
	cargo test --locked -p atoll-image --test '*' -- --test-threads=2
	ATOLL_BUILD_DIR=$(CURDIR)/$(BUILD) ATOLL_STATIC_DIR=$(CURDIR)/$(STATIC) \
	  cargo test --locked -p atoll-tests --test '*' -- --test-threads=1

# Benchmarks print a table and save JSON under perf/results/ (quoted in the README).
bench: artifacts
	$(STATIC)/atoll-bench run --runs 10 --json perf/results/run.json
	$(STATIC)/atoll-bench cri --runs 10 --parallel 10 --json perf/results/cri.json
	$(STATIC)/atoll-bench restore --runs 10 --json perf/results/restore.json
	$(STATIC)/atoll-bench density --runs 100 --json perf/results/density.json
	$(STATIC)/atoll-bench boot --runs 10 --json perf/results/boot.json
	$(STATIC)/atoll-bench confine --runs 10 --json perf/results/confine.json
	$(STATIC)/atoll-bench io --json perf/results/io.json
	$(STATIC)/atoll-bench vsock --json perf/results/vsock.json

# OCI layout of a debootstrap'd Debian (~200 MB) -> erofs, against umoci + mkfs.erofs.
BENCH_ROOTFS := $(ATOLL_CACHE)/bench/rootfs
bench-image: static
	@test -d $(BENCH_ROOTFS)/usr || { mkdir -p $(ATOLL_CACHE)/bench && rm -rf $(BENCH_ROOTFS).tmp && \
	  debootstrap --variant=minbase bookworm $(BENCH_ROOTFS).tmp && mv $(BENCH_ROOTFS).tmp $(BENCH_ROOTFS); }
	$(STATIC)/atoll-image bench --layout $(ATOLL_CACHE)/bench/layout --from-rootfs $(BENCH_ROOTFS) \
	  --tag bookworm --runs 3 --json perf/results/image.json

clean:
	rm -rf $(BUILD) target
