//! End-to-end: atoll-vmm boots our guest kernel into atoll-init on a real KVM (the
//! host's when it can run a standard guest, the nested node's otherwise).
//!
//! Needs the static binaries and guest artefacts that `make artifacts` builds; `make
//! test` builds them first and points `ATOLL_BUILD_DIR` / `ATOLL_STATIC_DIR` at them.

use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use atoll_node::{RunOutput, Where};
use common::{artefact, build_dir, kvm_runner, run, static_dir, with, word};

/// Runs `script` where a real KVM is, with atoll-vmm, vmlinux, bzImage and the
/// initramfs in its working directory.
fn on_kvm(script: &str) -> RunOutput {
    let r = with(kvm_runner(), &build_dir().join("bzImage"), "bzImage");
    run(
        with(r, &build_dir().join("initramfs.cpio"), "initramfs.cpio"),
        script,
    )
}

const VMM: &str = "./atoll-vmm --kernel vmlinux --initrd initramfs.cpio --timeout 120";

#[test]
fn boot_reaches_ready_marker_and_reports_status_zero() {
    let out = on_kvm(&format!(
        "{VMM} --metrics m.json; echo \"vmm=$?\"; cat m.json"
    ));
    assert!(out.output.contains("ATOLL-READY"), "no ready marker");
    assert_eq!(
        word(&out.output, "vmm"),
        Some("0"),
        "exit status 0 expected"
    );
    assert!(
        out.output.contains("\"ready\""),
        "the VMM timestamped the ready stage"
    );
    assert_eq!(out.status, 0);
}

#[test]
fn guest_command_exit_status_becomes_vmm_exit_status() {
    let out = on_kvm(&format!(
        "{VMM} -- /bin/sh -c 'echo from-guest; exit 7'; echo \"vmm=$?\""
    ));
    assert!(out.output.contains("from-guest"));
    assert_eq!(
        word(&out.output, "vmm"),
        Some("7"),
        "guest status 7 must come back"
    );
}

#[test]
fn missing_command_and_signal_deaths_map_to_shell_statuses() {
    let out = on_kvm(&format!(
        "{VMM} -- /bin/no-such-command; echo \"a=$?\"; \
         {VMM} -- /bin/sh -c 'kill -9 $$'; echo \"b=$?\""
    ));
    assert_eq!(
        word(&out.output, "a"),
        Some("127"),
        "command not found is 127"
    );
    assert!(out.output.contains("No such file or directory"));
    assert_eq!(word(&out.output, "b"), Some("137"), "SIGKILL is 128 + 9");
}

#[test]
fn guest_with_two_vcpus_sees_two_cpus() {
    let out = on_kvm(&format!(
        "{VMM} --vcpus 2 -- /bin/sh -c 'echo cpus=$(grep -c ^processor /proc/cpuinfo) online=$(cat /sys/devices/system/cpu/online)'; echo \"vmm=$?\""
    ));
    assert_eq!(
        word(&out.output, "cpus"),
        Some("2"),
        "guest must see 2 CPUs"
    );
    assert_eq!(word(&out.output, "online"), Some("0-1"));
    assert_eq!(word(&out.output, "vmm"), Some("0"));
}

#[test]
fn command_line_reaches_pid1_both_ways() {
    let out = on_kvm(
        "./atoll-vmm --kernel vmlinux --initrd initramfs.cpio --timeout 120 \
         --cmdline 'console=ttyS0 reboot=k panic=-1 pci=off quiet atoll.cmd=/bin/true atoll.marker=q42' \
         ; echo \"vmm-a=$?\"; \
         ./atoll-vmm --kernel vmlinux --initrd initramfs.cpio --timeout 120 \
         --cmdline 'console=ttyS0 reboot=k panic=-1 pci=off quiet atoll.marker=z99' -- /bin/cat /proc/cmdline \
         ; echo \"vmm-b=$?\"",
    );
    assert_eq!(
        word(&out.output, "vmm-a"),
        Some("0"),
        "atoll.cmd=/bin/true ran and exited 0"
    );
    assert!(
        out.output.contains("atoll.marker=z99"),
        "PID 1's command printed the cmdline"
    );
    assert_eq!(word(&out.output, "vmm-b"), Some("0"));
}

#[test]
fn bzimage_boots_through_the_64bit_entry() {
    let out = on_kvm(
        "./atoll-vmm --kernel bzImage --initrd initramfs.cpio --timeout 120 -- /bin/sh -c 'exit 5'; echo \"vmm=$?\"",
    );
    assert!(out.output.contains("ATOLL-READY"));
    assert_eq!(word(&out.output, "vmm"), Some("5"));
}

#[test]
fn guest_kernel_panic_ends_with_an_error_not_a_hang() {
    // No init at that path: the kernel panics, panic=-1 reboots, the VMM reports.
    let start = Instant::now();
    let out = on_kvm(
        "./atoll-vmm --kernel vmlinux --initrd initramfs.cpio --timeout 120 \
         --cmdline 'console=ttyS0 reboot=k panic=-1 rdinit=/nonexistent init=/nonexistent' 2>err.txt; \
         echo \"vmm=$?\"; cat err.txt",
    );
    assert_eq!(
        word(&out.output, "vmm"),
        Some("123"),
        "crash status 123 expected"
    );
    assert!(out.output.contains("before reporting an exit status"));
    assert!(start.elapsed() < Duration::from_secs(200));
}

#[test]
fn timeout_stops_a_guest_that_runs_too_long() {
    let out = on_kvm(
        "./atoll-vmm --kernel vmlinux --initrd initramfs.cpio --timeout 8 -- /bin/sleep 1000 2>err.txt; \
         echo \"vmm=$?\"; cat err.txt",
    );
    assert_eq!(word(&out.output, "vmm"), Some("124"));
    assert!(out.output.contains("did not finish within 8s"));
}

#[test]
fn garbage_kernel_and_too_little_memory_give_clear_errors() {
    let out = on_kvm(
        "head -c 100000 /dev/urandom > garbage; \
         ./atoll-vmm --kernel garbage 2>e1.txt; echo \"a=$?\"; cat e1.txt; \
         ./atoll-vmm --kernel vmlinux --initrd initramfs.cpio --mem 8 2>e2.txt; echo \"b=$?\"; cat e2.txt; \
         ./atoll-vmm --kernel vmlinux --initrd initramfs.cpio --mem 20 2>e3.txt; echo \"c=$?\"; cat e3.txt",
    );
    assert_eq!(word(&out.output, "a"), Some("1"));
    assert!(out.output.contains("neither an ELF vmlinux nor a bzImage"));
    assert_eq!(word(&out.output, "b"), Some("1"));
    assert!(out.output.contains("too little"));
    assert_eq!(
        word(&out.output, "c"),
        Some("1"),
        "the initrd does not fit in 20 MiB"
    );
    assert!(out.output.contains("give --mem"));
}

/// On the host itself: atoll-vmm must say at once why it cannot run here (no KVM,
/// KVM-PVM), or, on a host with hardware KVM, get as far as judging the kernel.
#[test]
fn host_kvm_is_judged_at_once_with_one_clear_line() {
    let vmm = artefact(static_dir().join("atoll-vmm"));
    let garbage = std::env::temp_dir().join(format!("atoll-garbage-{}", std::process::id()));
    std::fs::write(&garbage, vec![0x5a; 4096]).unwrap();
    let start = Instant::now();
    let out = Command::new(vmm)
        .arg("--kernel")
        .arg(&garbage)
        .output()
        .unwrap();
    let elapsed = start.elapsed();
    std::fs::remove_file(&garbage).ok();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert_eq!(out.status.code(), Some(1));
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    match Where::detect() {
        _ if pvm => assert!(
            err.contains("KVM-PVM") && err.contains("cannot boot"),
            "{err}"
        ),
        _ if !std::path::Path::new("/dev/kvm").exists() => assert!(err.contains("does not exist")),
        _ => assert!(
            err.contains("neither an ELF vmlinux nor a bzImage"),
            "{err}"
        ),
    }
}

#[test]
fn virtio_rng_feeds_the_guest_hwrng_via_acpi_and_via_the_command_line() {
    // Each guest prints what it bound and how many bytes it read (a `wc` in `$(...)`
    // whose count is checked, not a pipeline's status); the device's own byte count
    // must cover what the guest read. The second guest has no ACPI: it can only find
    // the device through the command line the VMM writes.
    let out = on_kvm(&format!(
        "{VMM} --rng --metrics m.json -- /bin/sh -c \
           'echo cur=$(cat /sys/class/misc/hw_random/rng_current) n=$(head -c 4096 /dev/hwrng | wc -c)'; \
         echo \"a=$?\"; \
         echo rng_bytes=$(tr -d ' \\n' < m.json | tr '}}' '\\n' | grep '\"kind\":\"rng\"' | grep -o '\"bytes\":[0-9]*' | grep -o '[0-9]*$'); \
         ./atoll-vmm --kernel vmlinux --initrd initramfs.cpio --timeout 120 --rng \
           --cmdline 'console=ttyS0 reboot=k panic=-1 pci=off quiet acpi=off' \
           -- /bin/sh -c 'echo cur2=$(cat /sys/class/misc/hw_random/rng_current) n2=$(head -c 16 /dev/hwrng | wc -c)'; \
         echo \"b=$?\""
    ));
    let o = &out.output;
    assert_eq!(word(o, "cur"), Some("virtio_rng.0"), "bound via ACPI: {o}");
    assert_eq!(word(o, "n"), Some("4096"), "4 KiB of entropy read: {o}");
    assert_eq!(word(o, "a"), Some("0"), "{o}");
    let moved: u64 = word(o, "rng_bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no rng byte count in the metrics: {o}"));
    assert!(
        moved >= 4096,
        "the device served the guest's reads: {moved}"
    );
    assert_eq!(
        word(o, "cur2"),
        Some("virtio_rng.0"),
        "bound via the command line: {o}"
    );
    assert_eq!(word(o, "n2"), Some("16"), "{o}");
    assert_eq!(word(o, "b"), Some("0"), "{o}");
}

#[test]
fn a_vmm_thread_outside_its_seccomp_filter_ends_the_vmm_with_one_line() {
    // --test-seccomp-trip makes the vCPU thread call getppid when the guest's
    // command starts; no thread's filter allows it. Without filters the same run
    // completes, so the trip is the only difference.
    let out = on_kvm(&format!(
        "{VMM} --test-seccomp-trip -- /bin/sh -c 'echo command-ran; exit 3' 2>err.txt; \
         echo \"tripped=$?\"; cat err.txt; \
         {VMM} --no-seccomp --test-seccomp-trip -- /bin/sh -c 'exit 3' 2>err2.txt; \
         echo \"unfiltered=$?\"; cat err2.txt; \
         echo \"left=$(pidof atoll-vmm | wc -w)\""
    ));
    let o = &out.output;
    assert_eq!(word(o, "tripped"), Some("159"), "128 + SIGSYS: {o}");
    let line = o
        .lines()
        .find(|l| l.starts_with("atoll-vmm: error: the vcpu thread made system call"))
        .unwrap_or_else(|| panic!("no seccomp line: {o}"));
    assert!(
        line.contains(&format!("system call {} (arguments", libc::SYS_getppid)),
        "{line}"
    );
    assert!(line.contains("seccomp filter does not allow"), "{line}");
    assert_eq!(word(o, "unfiltered"), Some("3"), "{o}");
    assert!(
        o.contains("WITHOUT seccomp filters"),
        "--no-seccomp is loud: {o}"
    );
    assert_eq!(word(o, "left"), Some("0"), "{o}");
}

#[test]
fn a_burst_of_buffers_freed_under_the_devices_filter_does_not_kill_the_vmm() {
    // glibc reads /proc/sys/vm/overcommit_memory the first time it trims a thread
    // arena: an openat no filter allows. It killed the VMM by SIGSYS in the middle
    // of big guest output (the devices thread freeing what it had buffered for a
    // slow host socket). The probe does that in a fresh process, on the host.
    let vmm = artefact(static_dir().join("atoll-vmm"));
    let out = std::process::Command::new(&vmm)
        .arg("--test-malloc-trim")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "159 is death by SIGSYS: {err}");
    assert!(
        err.contains("malloc trim probe: 40960000 bytes allocated and freed"),
        "{err}"
    );
}

#[test]
fn the_vmm_runs_jailed_without_capabilities_host_files_network_or_core_dumps() {
    // Two VMMs at once: a jailed one under a uid of its own, its vsock socket in
    // a/, and an unjailed one (another "pod") with its API socket and a file in b/.
    // The jailed one is seen from outside through /proc (capabilities, uid,
    // namespaces, interfaces, limits) and reports from inside what each path gives
    // it (--test-jail-probe); the unjailed one is the contrast.
    let probe = r#"
look() {
  vmm=$1
  for _ in $(seq 1 300); do grep -q "tick 3" $3 2>/dev/null && break; sleep 0.1; done
  echo "$2capeff=$(awk '/^CapEff/ {print $2}' /proc/$vmm/status)" \
    "$2capbnd=$(awk '/^CapBnd/ {print $2}' /proc/$vmm/status)" \
    "$2nnp=$(awk '/^NoNewPrivs/ {print $2}' /proc/$vmm/status)" \
    "$2seccomp=$(awk '/^Seccomp:/ {print $2}' /proc/$vmm/status)" \
    "$2uid=$(awk '/^Uid:/ {print $2","$3","$4","$5}' /proc/$vmm/status)" \
    "$2gid=$(awk '/^Gid:/ {print $2","$3","$4","$5}' /proc/$vmm/status)" \
    "$2groups=$(awk '/^Groups:/ {print NF - 1}' /proc/$vmm/status)"
  for ns in net mnt ipc uts; do
    if [ "$(readlink /proc/$vmm/ns/$ns)" = "$(readlink /proc/self/ns/$ns)" ]; then
      echo "$2ns_$ns=shared"; else echo "$2ns_$ns=own"; fi
  done
  echo "$2root=[$(ls -A /proc/$vmm/root/ | tr '\n' ' ')]"
  echo "$2ifaces=$(tail -n +3 /proc/$vmm/net/dev | wc -l)"
  echo "$2core=$(awk '/Max core file size/ {print $5"/"$6}' /proc/$vmm/limits)"
  echo "$2files_hard=$(awk '/Max open files/ {print $5}' /proc/$vmm/limits)"
}
GUEST='i=0; while [ $i -lt 25 ]; do i=$((i+1)); echo tick $i; sleep 0.2; done; exit 4'
mkdir -p a b; echo secret > b/file; rm -f o.txt o2.txt b/api.sock
"#;
    let out = on_kvm(&format!(
        "{probe}\
         {VMM} --no-jail --api-sock $PWD/b/api.sock -- /bin/sh -c \"$GUEST\" > o2.txt 2>&1 & other=$!; \
         for _ in $(seq 1 300); do [ -S b/api.sock ] && break; sleep 0.1; done; \
         {VMM} --jail-uid 2000000042 --vsock cid=3,uds=$PWD/a/v.sock \
           --test-jail-probe / --test-jail-probe /run/0 --test-jail-probe /etc/passwd \
           --test-jail-probe /proc/$other/environ --test-jail-probe $PWD/b/api.sock \
           --test-jail-probe $PWD/b/file --test-jail-probe $PWD/a/v.sock \
           -- /bin/sh -c \"$GUEST\" > o.txt 2>&1 & jailed=$!; \
         look $jailed '' o.txt; look $other free_ o2.txt; \
         wait $jailed; echo \"vmm=$?\"; wait $other; echo \"free_vmm=$?\"; \
         grep 'jail probe' o.txt | sed \"s|$PWD|PWD|g; s|/proc/$other/|/proc/OTHER/|\""
    ));
    let o = &out.output;
    let w = |k: &str| word(o, k).unwrap_or_else(|| panic!("no {k}= in {o}"));
    assert_eq!(w("capeff"), "0000000000000000", "{o}");
    assert_eq!(w("capbnd"), "0000000000000000", "{o}");
    assert_eq!(w("nnp"), "1", "{o}");
    assert_eq!(w("seccomp"), "2", "the main thread is filtered: {o}");
    let own = "2000000042,2000000042,2000000042,2000000042";
    assert_eq!(w("uid"), own, "real, effective, saved and fs uid: {o}");
    assert_eq!(w("gid"), own, "{o}");
    assert_eq!(w("groups"), "0", "no supplementary groups: {o}");
    for ns in ["net", "mnt", "ipc", "uts"] {
        assert_eq!(w(&format!("ns_{ns}")), "own", "{ns}: {o}");
    }
    assert!(o.contains("root=[run ]"), "its root holds only run/: {o}");
    assert_eq!(w("ifaces"), "1", "only the new namespace's loopback: {o}");
    assert_eq!(w("core"), "0/0", "{o}");
    let files: u64 = w("files_hard").parse().unwrap();
    assert!(files <= 4096, "{o}");
    assert_eq!(w("vmm"), "4", "the jailed guest ran to its end: {o}");
    // From inside: its own socket directory, read-only at /run/0; nothing else.
    for line in [
        "jail probe /: directory [run]",
        "jail probe /run/0: directory [v.sock]",
        "jail probe /etc/passwd: unreachable",
        "jail probe /proc/OTHER/environ: unreachable",
        "jail probe PWD/b/api.sock: unreachable",
        "jail probe PWD/b/file: unreachable",
        "jail probe PWD/a/v.sock: unreachable",
    ] {
        assert!(o.contains(line), "expected {line:?} in {o}");
    }
    // Unjailed, the other VMM keeps root, its capabilities and the host's network.
    assert_ne!(w("free_capeff"), "0000000000000000", "{o}");
    assert_eq!(w("free_uid"), "0,0,0,0", "{o}");
    assert_eq!(w("free_ns_net"), "shared", "{o}");
    assert_eq!(w("free_vmm"), "4", "{o}");
}
