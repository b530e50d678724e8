//! End-to-end: virtio-net over a tap. The guest configures eth0, pings the host end
//! of the tap and moves 10 MiB each way through busybox `nc`, checked with md5.
//!
//! Everything happens inside a network namespace the test creates (`unshare -n`),
//! on the host's KVM or inside the nested node alike: the tap, 10.0.0.1/24 (host
//! end) and 10.0.0.2/24 (guest) exist only there, and no traffic leaves it.
//!
//! Needs the static binaries and guest artefacts that `make artifacts` builds, and a
//! node that loads `tun` (atoll-node does).

mod common;

use common::on_kvm;

/// The value after `key ` on the first line that starts with it.
fn value<'a>(output: &'a str, key: &str) -> Option<&'a str> {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix(' '))
        .map(str::trim)
}

/// The guest's side, joined into one line: it travels on the kernel command line
/// (`-- /bin/sh -c "..."`), which carries neither newlines nor double quotes, and
/// inside a single-quoted host string. Upload: 10 MiB from /dev/urandom to the host's
/// port 5001. Download: whatever the host sends on port 5002. The receiving nc reads
/// stdin from a FIFO held open, so it never half-closes the connection (busybox nc
/// then quits) before the sender is done.
const GUEST: [&str; 16] = [
    "ip link set lo up; ip addr add 10.0.0.2/24 dev eth0; ip link set eth0 up",
    "echo guest-mac $(cat /sys/class/net/eth0/address)",
    "i=0; until ping -c 1 -W 1 10.0.0.1 >/dev/null 2>&1; do i=$((i+1)); [ $i -ge 30 ] && break; done",
    "ping -c 3 -W 5 10.0.0.1 >/dev/null && echo guest-ping ok",
    "dd if=/dev/urandom of=/tmp/up bs=64k count=160 2>/dev/null",
    "set -- $(md5sum /tmp/up); echo guest-up-md5 $1",
    "read t0 x </proc/uptime",
    "nc 10.0.0.1 5001 </tmp/up; echo guest-up-nc $?",
    "read t1 x </proc/uptime",
    "mkfifo /tmp/hold",
    "nc 10.0.0.1 5002 <>/tmp/hold >/tmp/down; echo guest-down-nc $?",
    "read t2 x </proc/uptime",
    "set -- $(md5sum /tmp/down); echo guest-down-md5 $1",
    "echo guest-down-bytes $(wc -c </tmp/down)",
    "echo guest-seconds up $t0 $t1 down $t2",
    "exit 0",
];

/// The host's side, run inside `unshare -n`. The VMM creates the tap; the script
/// waits for it, addresses it and listens.
const HOST: &str = r#"
set -u
ip link set lo up
dd if=/dev/urandom of=down.bin bs=64k count=160 2>/dev/null
echo "host-down-md5 $(busybox md5sum down.bin | cut -d " " -f 1)"
./atoll-vmm --kernel vmlinux --initrd initramfs.cpio --mem 256 --timeout 400 --metrics m.json \
  --net tap=atollnet0,mac=02:00:0a:00:00:02 -- /bin/sh -c "$GUEST" >vm.log 2>&1 &
vm=$!
i=0
until ip link show atollnet0 >/dev/null 2>&1; do
  i=$((i+1)); [ $i -ge 600 ] && { echo "no tap appeared"; cat vm.log; exit 90; }
  sleep 0.05
done
ip addr add 10.0.0.1/24 dev atollnet0 && ip link set atollnet0 up || exit 91
busybox mkfifo hold
busybox nc -l -p 5001 <>hold >up.bin &
busybox nc -l -p 5002 <down.bin &
wait $vm
echo "vmm-status $?"
cat vm.log
echo "host-up-md5 $(busybox md5sum up.bin | cut -d " " -f 1)"
echo "host-up-bytes $(wc -c <up.bin)"
echo "net-metrics $(tr -d ' \n' <m.json | grep -o '{"bytes":[0-9]*,[^}]*"kind":"net"[^}]*}')"
"#;

#[test]
fn virtio_net_guest_pings_host_and_moves_10_mib_each_way_intact() {
    let script = format!(
        "cat >net-host.sh <<'EOS'\nGUEST='{}'\n{HOST}\nEOS\nunshare -n sh net-host.sh",
        GUEST.join("; ")
    );
    let out = on_kvm(&script);
    let o = &out.output;
    assert_eq!(
        value(o, "vmm-status"),
        Some("0"),
        "the guest exited cleanly"
    );
    assert_eq!(
        value(o, "guest-mac"),
        Some("02:00:0a:00:00:02"),
        "the MAC from --net reached the guest"
    );
    assert_eq!(
        value(o, "guest-ping"),
        Some("ok"),
        "the host end answers ping"
    );
    assert_eq!(value(o, "guest-up-nc"), Some("0"));
    assert_eq!(
        value(o, "host-up-bytes"),
        Some("10485760"),
        "all 10 MiB arrived"
    );
    let up = value(o, "guest-up-md5").expect("the guest's upload checksum");
    assert_eq!(value(o, "host-up-md5"), Some(up), "guest -> host intact");
    assert_eq!(value(o, "guest-down-nc"), Some("0"));
    assert_eq!(value(o, "guest-down-bytes"), Some("10485760"));
    let down = value(o, "host-down-md5").expect("the host's download checksum");
    assert_eq!(
        value(o, "guest-down-md5"),
        Some(down),
        "host -> guest intact"
    );
    let metrics = value(o, "net-metrics").expect("the VMM's net device metrics");
    assert!(
        metrics.contains("\"errors\":0") && metrics.contains("\"malformed\":0"),
        "no frame was dropped or refused: {metrics}"
    );
    assert_eq!(out.status, 0);
}

#[test]
fn virtio_net_invalid_tap_name_fails_with_one_clear_line() {
    let out = on_kvm(
        "./atoll-vmm --kernel vmlinux --initrd initramfs.cpio --timeout 60 \
         --net tap=no/slash -- /bin/true 2>err.txt; echo \"vmm-status $?\"; cat err.txt",
    );
    assert_eq!(value(&out.output, "vmm-status"), Some("1"));
    assert!(
        out.output.contains("tap name \"no/slash\" is invalid"),
        "the error names the problem"
    );
}
