#!/bin/sh
# Runs where a real KVM is (the host's, or inside the nested node), with the files
# `make demo` carries in $ATOLL_ARTIFACTS: runs the built-in busybox image as a
# container in its own microVM with `atoll run`, and prints its output and where the
# time went from the command to the container's start.
export ATOLL_STORE="$ATOLL_ARTIFACTS/store" ATOLL_KERNEL="$ATOLL_ARTIFACTS/vmlinux" \
  ATOLL_INITRAMFS="$ATOLL_ARTIFACTS/initramfs.cpio" ATOLL_VMM="$ATOLL_ARTIFACTS/atoll-vmm" \
  ATOLL_RUN_DIR=/run/atoll
echo '$ atoll run busybox -- sh -c "..."'
./atoll run --timings timings.json busybox -- sh -c \
  'echo "hello from a container: $(uname -sr), pid $$, uid $(id -u), $(nproc) vCPUs, $(grep MemTotal /proc/meminfo | tr -s " ")"'
status=$?
field() { sed -n "s/.*\"$1\": *\([0-9.]*\).*/\1/p" timings.json | cut -d. -f1; }
echo "atoll run: exit status $status; from the command: VM spawned $(field vmm_spawned_ms) ms," \
  "agent up $(field agent_connected_ms) ms, container created $(field created_ms) ms," \
  "started $(field started_ms) ms, first output $(field first_output_ms) ms"
exit $status
