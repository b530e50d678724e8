//! End-to-end: virtio-vsock between a guest (AF_VSOCK) and host programs on
//! atoll-vmm's Unix sockets, on a real KVM (the host's, or the nested node's).
//!
//! Needs `make artifacts` plus the static `atoll-vsock-probe` (`make static`); the
//! test builds an initramfs with the probe in it as `/bin/atoll-vsock-probe`.

use std::process::Command;

mod common;

use atoll_node::RunOutput;
use common::{artefact, kvm_runner, run, static_dir, with, word};

/// Runs `script` where a real KVM is, with atoll-vmm, the probe, vmlinux and an
/// initramfs holding the probe (`initramfs.cpio`) in its working directory.
fn on_kvm(script: &str) -> RunOutput {
    let tmp = tempfile::tempdir().unwrap();
    let initramfs = tmp.path().join("initramfs-vsock.cpio");
    let probe = artefact(static_dir().join("atoll-vsock-probe"));
    let status = Command::new(artefact(static_dir().join("atoll-image")))
        .arg("initramfs")
        .arg("--init")
        .arg(artefact(static_dir().join("atoll-init")))
        .arg("--busybox")
        .arg("/bin/busybox")
        .arg("--add")
        .arg(format!("{}:/bin/atoll-vsock-probe", probe.display()))
        .arg("-o")
        .arg(&initramfs)
        .status()
        .expect("atoll-image runs");
    assert!(status.success(), "building the test initramfs failed");
    let r = with(kvm_runner(), &probe, "atoll-vsock-probe");
    run(with(r, &initramfs, "initramfs.cpio"), script)
}

const VMM: &str =
    "./atoll-vmm --kernel vmlinux --initrd initramfs.cpio --timeout 90 --vsock cid=3,uds=./v.sock";

/// The number after `key` in the output.
fn number_after(output: &str, key: &str) -> u64 {
    let at = output
        .find(key)
        .unwrap_or_else(|| panic!("{key:?} not in the output"));
    output[at + key.len()..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {key:?}"))
}

#[test]
fn vsock_echo_host_to_guest_and_guest_to_host() {
    // Host-initiated: the guest echoes on port 5000, a host client dials it through
    // `CONNECT 5000`. Guest-initiated: the guest dials CID 2 port 6000, which the
    // VMM connects to ./v.sock_6000, an echo server on the host.
    let out = on_kvm(&format!(
        "./atoll-vsock-probe serve ./v.sock_6000 & \
         {VMM} --metrics m.json -- /bin/sh -c '/bin/atoll-vsock-probe listen 5000 --exit-after 1 & \
           sleep 1; /bin/atoll-vsock-probe connect 6000 from-guest; wait' > vmm.log 2>&1 & \
         VMM=$!; \
         ./atoll-vsock-probe host-connect ./v.sock 5000 from-host; \
         wait $VMM; echo \"vmm=$?\"; cat vmm.log; cat m.json"
    ));
    assert!(
        out.output.contains("probe: host-echo-ok 1"),
        "host -> guest echo"
    );
    assert!(
        out.output.contains("probe: guest-echo-ok 1"),
        "guest -> host echo"
    );
    assert_eq!(word(&out.output, "vmm"), Some("0"));
    assert!(
        out.output.contains("\"kind\": \"vsock\""),
        "vsock metrics reported"
    );
    assert!(
        out.output.contains("\"malformed\": 0"),
        "Linux's driver sends only valid packets"
    );
}

#[test]
fn vsock_32_concurrent_connections_each_way() {
    let out = on_kvm(&format!(
        "./atoll-vsock-probe serve ./v.sock_6000 & \
         {VMM} -- /bin/sh -c '/bin/atoll-vsock-probe listen 5000 --exit-after 32 & \
           sleep 1; /bin/atoll-vsock-probe connect 6000 g --count 32; wait' > vmm.log 2>&1 & \
         VMM=$!; \
         ./atoll-vsock-probe host-connect ./v.sock 5000 h --count 32; \
         wait $VMM; echo \"vmm=$?\"; cat vmm.log"
    ));
    assert!(out.output.contains("probe: host-echo-ok 32"));
    assert!(out.output.contains("probe: guest-echo-ok 32"));
    assert!(out.output.contains("probe: served 32"));
    assert_eq!(word(&out.output, "vmm"), Some("0"));
}

#[test]
fn vsock_guest_that_stops_reading_leaves_the_vmm_bounded_and_responsive() {
    // The guest accepts on port 7000 and never reads; the host writes into it for
    // 8 s. The device must stop at the guest's credit (no buffering in the VMM), and
    // another connection must still echo meanwhile.
    let out = on_kvm(&format!(
        "./atoll-vmm --kernel vmlinux --initrd initramfs.cpio --timeout 90 --metrics base.json -- /bin/true; \
         echo \"base_rss_kib=$(grep -o '\"vmm_rss_kib\": [0-9]*' base.json | grep -o '[0-9]*$')\"; \
         {VMM} --metrics m.json -- /bin/sh -c '/bin/atoll-vsock-probe stall 7000 --seconds 14 & \
           /bin/atoll-vsock-probe listen 5000 --exit-after 1 & wait' > vmm.log 2>&1 & \
         VMM=$!; \
         ./atoll-vsock-probe flood ./v.sock 7000 --seconds 8 & FLOOD=$!; \
         sleep 4; ./atoll-vsock-probe host-connect ./v.sock 5000 alive; \
         wait $FLOOD; wait $VMM; echo \"vmm=$?\"; cat vmm.log; \
         echo \"flood_rss_kib=$(grep -o '\"vmm_rss_kib\": [0-9]*' m.json | grep -o '[0-9]*$')\"; cat m.json"
    ));
    assert!(
        out.output.contains("probe: host-echo-ok 1"),
        "the VMM kept serving another connection"
    );
    assert_eq!(word(&out.output, "vmm"), Some("0"));
    let flooded = number_after(&out.output, "probe: flood-bytes");
    // Guest credit (256 KiB) plus the two socket buffers on the way; an unbounded
    // VMM would take hundreds of MiB in 8 s.
    assert!(
        flooded >= 256 << 10,
        "the flood filled the guest's credit (256 KiB) at least: {flooded} bytes"
    );
    assert!(
        flooded < 4 << 20,
        "the host could push {flooded} bytes into a guest that does not read"
    );
    let base = number_after(&out.output, "base_rss_kib=");
    let rss = number_after(&out.output, "flood_rss_kib=");
    assert!(
        rss < base + 32 * 1024,
        "VMM peak RSS {rss} KiB vs {base} KiB for a VM without vsock traffic"
    );
}
