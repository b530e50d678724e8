#!/usr/bin/env bash
# Installs the Debian packages Atoll builds and tests with, only those missing.
# Idempotent; runs `apt-get update` once when something must be installed.
set -euo pipefail

packages=(
  # guest kernel build (atoll-image kernel)
  linux-source-6.12 bc flex bison libelf-dev libssl-dev xz-utils lz4 make gcc binutils
  # guest userland for tests and the nested node
  busybox-static cpio
  # containers in the guest: libcontainer's seccomp (linked statically) and a reference runtime
  libseccomp-dev runc
  # the nested KVM node and the benchmark peer
  qemu-system-x86
  # OCI images (atoll-image convert; its tests and benchmark peers)
  erofs-utils e2fsprogs umoci skopeo docker-registry debootstrap
  # atoll-cri: the CRI API bindings (k8s-cri) are generated at build time by protoc;
  # containerd is the CRI peer of its benchmark, the CNI plugins its pod network
  protobuf-compiler containerd containernetworking-plugins
  # the streaming server's test peer: kubelet's SPDY library, built with Debian's Go
  golang-go golang-github-docker-spdystream-dev
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
