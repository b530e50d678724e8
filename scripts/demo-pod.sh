#!/bin/sh
# Runs where a real KVM is (the host's, or inside the nested node), with the files
# `make demo` carries in $ATOLL_ARTIFACTS: runs the built-in busybox image as a
# container in its own microVM with `atoll run`, first booting the guest kernel
# (--cold), then as a restored clone of the pod template (built once, on first use),
# and prints each one's output and where the time went up to the container's start.
export ATOLL_STORE="$ATOLL_ARTIFACTS/store" ATOLL_KERNEL="$ATOLL_ARTIFACTS/vmlinux" \
  ATOLL_INITRAMFS="$ATOLL_ARTIFACTS/initramfs.cpio" ATOLL_VMM="$ATOLL_ARTIFACTS/atoll-vmm" \
  ATOLL_RUN_DIR=/run/atoll
CMD='echo "hello from a container: $(uname -sr), pid $$, uid $(id -u), $(nproc) vCPUs, $(grep MemTotal /proc/meminfo | tr -s " ")"'
field() { sed -n "s/.*\"$1\": *\([0-9.]*\).*/\1/p" timings.json | cut -d. -f1; }
report() {
  echo "atoll run: exit status $1; $2: VM spawned $(field vmm_spawned_ms) ms," \
    "agent up $(field agent_connected_ms) ms, container created $(field created_ms) ms," \
    "started $(field started_ms) ms, first output $(field first_output_ms) ms"
}
status=0
echo '$ atoll run --cold busybox -- sh -c "..."     # boots the guest kernel'
./atoll run --cold --timings timings.json busybox -- sh -c "$CMD" || status=$?
report "$status" "cold boot"
# The first pod of this shape builds the template (boot, quiesce, snapshot) once.
./atoll run busybox -- true >/dev/null 2>&1 || status=$?
echo '$ atoll run busybox -- sh -c "..."            # a restored clone of the pod template'
./atoll run --timings timings.json busybox -- sh -c "$CMD" || status=$?
report "$status" "restored clone"
exit $status
