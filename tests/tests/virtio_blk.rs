//! End-to-end: virtio-blk disks (`atoll-vmm --disk PATH[,ro][,id=ID]`) seen by our
//! guest kernel, on a real KVM (the host's, or the nested node's).
//!
//! The guest writes and reads `/dev/vdX` with busybox; the VMM's side of the disk is
//! checked after the VM has exited, in the same place the VMM ran. Needs the
//! artefacts `make artifacts` builds (see boot.rs).

mod common;

use common::on_kvm;

const VMM: &str = "./atoll-vmm --kernel vmlinux --initrd initramfs.cpio --timeout 120";

/// The value printed after `key=` on some line of `output`.
fn value<'a>(output: &'a str, key: &str) -> Option<&'a str> {
    output.lines().find_map(|l| {
        let i = l.find(&format!("{key}="))?;
        l[i + key.len() + 1..].split_whitespace().next()
    })
}

#[test]
fn guest_writes_a_pattern_that_the_host_reads_back() {
    // 1 MiB of a known pattern at offset 1 MiB of an 8 MiB disk, written with
    // O_DIRECT-free dd and fsync (a FLUSH), read back by the guest and by the host.
    let out = on_kvm(&format!(
        "dd if=/dev/zero of=disk.img bs=1M count=8 2>/dev/null; \
         echo expected=$(yes atoll-blk-pattern | head -c 1048576 | sha256sum | cut -d' ' -f1); \
         {VMM} --disk disk.img --metrics m.json -- /bin/sh -c \
           'yes atoll-blk-pattern | head -c 1048576 > /tmp/p; \
            dd if=/tmp/p of=/dev/vda bs=64k seek=16 conv=fsync 2>/dev/null; echo dd=$?; \
            echo 3 > /proc/sys/vm/drop_caches; \
            echo guest=$(dd if=/dev/vda bs=64k skip=16 count=16 2>/dev/null | sha256sum | cut -c1-64)'; \
         echo vmm=$?; \
         echo host=$(dd if=disk.img bs=64k skip=16 count=16 2>/dev/null | sha256sum | cut -d' ' -f1); \
         echo zeros=$(head -c 1048576 disk.img | tr -d '\\000' | wc -c); \
         grep -A6 '\"block\"' m.json"
    ));
    let o = &out.output;
    let expected = value(o, "expected").expect("expected hash");
    assert_eq!(expected.len(), 64, "{expected}");
    assert_eq!(value(o, "dd"), Some("0"), "the guest's dd succeeded");
    assert_eq!(
        value(o, "guest"),
        Some(expected),
        "guest read back its data"
    );
    assert_eq!(value(o, "host"), Some(expected), "the file holds the data");
    assert_eq!(
        value(o, "zeros"),
        Some("0"),
        "nothing written before the offset"
    );
    assert_eq!(value(o, "vmm"), Some("0"));
    assert!(o.contains("\"malformed\": 0"), "no malformed requests");
}

#[test]
fn read_only_disk_refuses_guest_writes() {
    let out = on_kvm(&format!(
        "yes ro-data | head -c 4194304 > ro.img; \
         echo before=$(sha256sum ro.img | cut -d' ' -f1); \
         {VMM} --disk ro.img,ro -- /bin/sh -c \
           'echo ro=$(cat /sys/block/vda/ro); \
            dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync; echo dd=$?; \
            echo read=$(head -c 7 /dev/vda)'; \
         echo vmm=$?; \
         echo after=$(sha256sum ro.img | cut -d' ' -f1)"
    ));
    let o = &out.output;
    assert_eq!(
        value(o, "ro"),
        Some("1"),
        "the kernel sees a read-only disk"
    );
    let dd = value(o, "dd").unwrap_or_else(|| panic!("dd never reported: {o}"));
    assert_ne!(dd, "0", "the write must fail");
    assert_eq!(value(o, "read"), Some("ro-data"), "reads still work");
    assert_eq!(value(o, "vmm"), Some("0"));
    let before = value(o, "before").expect("hash before");
    assert_eq!(value(o, "after"), Some(before), "the file is unchanged");
}

#[test]
fn two_disks_appear_as_vda_and_vdb_with_their_sizes_and_data() {
    let out = on_kvm(&format!(
        "dd if=/dev/zero of=a.img bs=1M count=4 2>/dev/null; \
         yes second-disk | head -c 16777216 > b.img; \
         {VMM} --disk a.img --disk b.img,ro -- /bin/sh -c \
           'echo sizes=$(cat /sys/block/vda/size),$(cat /sys/block/vdb/size); \
            echo vdb=$(head -c 11 /dev/vdb); \
            echo a-disk > /tmp/a; dd if=/tmp/a of=/dev/vda conv=fsync 2>/dev/null; echo dd=$?'; \
         echo vmm=$?; echo a=$(head -c 6 a.img)"
    ));
    let o = &out.output;
    assert_eq!(value(o, "sizes"), Some("8192,32768"), "4 MiB and 16 MiB");
    assert_eq!(value(o, "vdb"), Some("second-disk"));
    assert_eq!(value(o, "dd"), Some("0"));
    assert_eq!(value(o, "a"), Some("a-disk"));
    assert_eq!(value(o, "vmm"), Some("0"));
}

#[test]
fn disk_id_is_the_guest_serial() {
    let out = on_kvm(&format!(
        "dd if=/dev/zero of=d.img bs=1M count=1 2>/dev/null; \
         {VMM} --disk d.img,id=atoll-serial-42 -- /bin/sh -c 'echo serial=$(cat /sys/block/vda/serial)'; \
         echo vmm=$?"
    ));
    assert_eq!(value(&out.output, "serial"), Some("atoll-serial-42"));
    assert_eq!(value(&out.output, "vmm"), Some("0"));
}
