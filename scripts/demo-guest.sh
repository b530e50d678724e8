#!/bin/sh
# Runs where a real KVM is (the host's, or inside the nested node): boots the pod VM
# once and prints the guest's output and the boot time the VMM measured.
./atoll-vmm --kernel vmlinux --initrd initramfs.cpio --vcpus 2 --timeout 120 --metrics m.json \
  -- /bin/sh -c 'echo hello from an Atoll microVM: $(uname -sr), $(nproc) vCPUs, $(grep MemTotal /proc/meminfo)'
status=$?
ready_us=$(sed -n 's/.*"ready": \([0-9]*\).*/\1/p' m.json)
exits=$(sed -n 's/.*"exits_total": \([0-9]*\).*/\1/p' m.json)
echo "atoll-vmm: launch -> guest ready (ATOLL-READY) in $((ready_us / 1000)) ms; $exits VM exits to userspace; guest exit status $status"
exit $status
