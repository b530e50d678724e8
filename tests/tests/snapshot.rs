//! End-to-end: the VM lifecycle of atoll-vmm on a real KVM — pause, resume, full
//! snapshot over the control API, stop, restore from the files — and every way a
//! snapshot can be bad.
//!
//! One node run serves every scenario (a `OnceLock`); each `#[test]` asserts on its
//! own scenario's output, framed by `@@@ NAME` and `@@@ NAME status=N`.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::{artefact, build_dir, kvm_runner, run, static_dir, value_of, with, SCENARIO_SH};

/// A guest that proves memory and registers survive: it fills a tmpfs file with
/// random bytes and prints its md5, counts (one counter per vCPU when `N` is 2,
/// both CPUs busy), then prints the md5 again and exits 9. One line without double
/// quotes: it travels on the kernel command line.
const GUEST: &str = "head -c 8388608 /dev/urandom > /tmp/blob; echo sum0 $(md5sum < /tmp/blob); \
    count() { i=0; while [ $i -lt 40 ]; do i=$((i+1)); echo tick$1 $i; sleep 0.2; done; }; \
    if [ $N = 2 ]; then count a & count b & wait; else count a; fi; \
    echo sum1 $(md5sum < /tmp/blob); exit 9";

/// The node script: helpers, then the scenarios.
const SCRIPT: &str = r#"
api() { ./atoll-vmm-api "$@"; }
# Boots the counting guest with N vCPUs and an API socket; waits for its 5th tick.
boot() {
  rm -f a.sock out1.txt
  ./atoll-vmm --kernel vmlinux --initrd initramfs.cpio --mem 128 --vcpus "$1" \
    --api-sock a.sock --timeout 120 -- /bin/sh -c "N=$1; $(cat guest.sh)" > out1.txt 2>&1 &
  vmm=$!
  for _ in $(seq 1 600); do grep -q "ticka 5" out1.txt 2>/dev/null && return 0; sleep 0.1; done
  echo "the guest never counted to 5"; cat out1.txt; return 1
}
# Pause, snapshot into $1.state/$1.mem, stop.
snap() {
  api a.sock PATCH /vm '{"state":"Paused"}' &&
  api a.sock PUT /snapshot/create "{\"snapshot_path\":\"$1.state\",\"mem_file_path\":\"$1.mem\"}" &&
  api a.sock PUT /actions '{"action_type":"Stop"}'
  wait $vmm; echo "first=$?"
}
continue_after_restore() {
  boot "$1" || return 1
  snap "s$1" || return 1
  echo "last-before=$(grep -c '^ticka' out1.txt)"
  grep '^sum0' out1.txt
  ./atoll-vmm --restore "s$1.state" --mem-file "s$1.mem" --timeout 120 > out2.txt 2>&1
  echo "second=$?"
  echo "first-after=$(grep -m1 '^ticka' out2.txt)"
  grep '^sum1\|^tickb 40\|^ticka 40' out2.txt
  true
}
pause_resume_and_refusals() {
  boot 1 || return 1
  api a.sock PUT /snapshot/create '{"snapshot_path":"x.state","mem_file_path":"x.mem"}'; echo "running-snapshot=$?"
  api a.sock PATCH /vm '{"state":"Paused"}' >/dev/null
  a=$(grep -c '^ticka' out1.txt); sleep 2; b=$(grep -c '^ticka' out1.txt)
  echo "paused-ticks=$((b - a))"
  api a.sock PUT /snapshot/create '{"snapshot_path":"/nonexistent/dir/x.state","mem_file_path":"/nonexistent/dir/x.mem"}'; echo "bad-path=$?"
  api a.sock PATCH /vm '{"state":"Resumed"}'
  sleep 2; c=$(grep -c '^ticka' out1.txt); echo "resumed-ticks=$((c - b))"
  api a.sock GET /metrics > metrics.json; echo "metrics=$?"
  grep -o '"exits_total":[0-9]*' metrics.json
  api a.sock PUT /actions '{"action_type":"Stop"}' >/dev/null
  wait $vmm; echo "stopped=$?"
  ls x.state x.mem *.tmp-* 2>/dev/null | sed 's/^/left: /'
  true
}
# Every bad snapshot gives one line on stderr and exit 1, and leaves nothing.
bad_snapshots() {
  try() { t=$1; shift; ./atoll-vmm "$@" --timeout 30 >/dev/null 2>err.txt; echo "$t=$? lines=$(wc -l < err.txt)"; cat err.txt; }
  cp s1.state t.state; head -c 100 s1.state > trunc.state
  cp s1.state flip.state; printf '\377' | dd of=flip.state bs=1 seek=200 conv=notrunc 2>/dev/null
  cp s1.state ver.state; printf '\007' | dd of=ver.state bs=1 seek=8 conv=notrunc 2>/dev/null
  head -c 1000 s1.mem > short.mem
  try truncated --restore trunc.state --mem-file s1.mem
  try bitflip --restore flip.state --mem-file s1.mem
  try version --restore ver.state --mem-file s1.mem
  try shortmem --restore t.state --mem-file short.mem
  try othermem --restore s1.state --mem-file s2.mem
  try nomem --restore s1.state --mem-file missing.mem
  try garbage --restore s1.mem --mem-file s1.mem
  try withapi --restore trunc.state --mem-file s1.mem --api-sock bad.sock
  ls *.tmp-* bad.sock 2>/dev/null | sed 's/^/left: /'
  true
}
# A VMM started with --standby (jailed, no VM) takes the snapshot over the API.
standby_load() {
  waitsock() { for _ in $(seq 1 100); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "no socket $1"; return 1; }
  call() { k=$1; shift; api "$@"; r=$?; echo; echo "$k=$r"; }
  ./atoll-vmm --standby --api-sock sb.sock --timeout 120 > out3.txt 2>&1 &
  sb=$!
  waitsock sb.sock || return 1
  call describe sb.sock GET /vm
  call pause-before-load sb.sock PATCH /vm '{"state":"Paused"}'
  call bad-load sb.sock PUT /snapshot/load '{"snapshot_path":"trunc.state","mem_file_path":"s1.mem"}'
  call mismatched-load sb.sock PUT /snapshot/load '{"snapshot_path":"s1.state","mem_file_path":"s2.mem"}'
  call load sb.sock PUT /snapshot/load '{"snapshot_path":"s1.state","mem_file_path":"s1.mem","resume_vm":true}'
  call second-load sb.sock PUT /snapshot/load '{"snapshot_path":"s1.state","mem_file_path":"s1.mem"}'
  wait $sb; echo "standby-exit=$?"
  grep '^sum1\|^ticka 40' out3.txt
  ./atoll-vmm --standby --api-sock sb2.sock > out4.txt 2>&1 &
  sb2=$!
  waitsock sb2.sock || return 1
  call stop-answer sb2.sock PUT /actions '{"action_type":"Stop"}'
  wait $sb2; echo "stopped-exit=$?"
  true
}
# A standby VMM prepared for one snapshot (PUT /snapshot/preload): a load of those
# files finishes the prepared restore; a load of others, or of the same files
# changed since, restores in full. The guest counts on in every case.
standby_preload() {
  waitsock() { for _ in $(seq 1 100); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "no socket $1"; return 1; }
  call() { k=$1; shift; api "$@"; r=$?; echo; echo "$k=$r"; }
  phases() { api "$1" GET /metrics | grep -o '\["[a-z_]*",[0-9]*\]' | cut -d'"' -f2 | tr '\n' ' '; }
  one() { echo "{\"snapshot_path\":\"$1.state\",\"mem_file_path\":\"$1.mem\"$2}"; }
  ./atoll-vmm --standby --api-sock p1.sock --timeout 120 > out5.txt 2>&1 &
  p1=$!
  waitsock p1.sock || return 1
  call bad-preload p1.sock PUT /snapshot/preload '{"snapshot_path":"trunc.state","mem_file_path":"s1.mem"}'
  call preload-other p1.sock PUT /snapshot/preload "$(one s2)"
  call preload p1.sock PUT /snapshot/preload "$(one s1)"
  call preloaded-load p1.sock PUT /snapshot/load "$(one s1 ',"resume_vm":true')"
  echo "preloaded-phases=$(phases p1.sock)"
  wait $p1; echo "preloaded-exit=$?"
  grep '^sum1\|^ticka 40' out5.txt | sed 's/^/preloaded: /'
  ./atoll-vmm --standby --api-sock p2.sock --timeout 120 > out6.txt 2>&1 &
  p2=$!
  waitsock p2.sock || return 1
  call preload-a p2.sock PUT /snapshot/preload "$(one s1)"
  call other-load p2.sock PUT /snapshot/load "$(one s2 ',"resume_vm":true')"
  echo "other-phases=$(phases p2.sock)"
  wait $p2; echo "other-exit=$?"
  grep '^sum1\|^tickb 40' out6.txt | sed 's/^/other: /'
  cp s1.state c.state; cp s1.mem c.mem
  ./atoll-vmm --standby --api-sock p3.sock --timeout 120 > out7.txt 2>&1 &
  p3=$!
  waitsock p3.sock || return 1
  call preload-c p3.sock PUT /snapshot/preload "$(one c)"
  touch -d '2001-01-01' c.state
  call changed-load p3.sock PUT /snapshot/load "$(one c ',"resume_vm":true')"
  echo "changed-phases=$(phases p3.sock)"
  wait $p3; echo "changed-exit=$?"
  grep '^sum1\|^ticka 40' out7.txt | sed 's/^/changed: /'
  true
}
# The two-vCPU snapshot restored with its memory brought in by a userfaultfd page
# server, jailed under a uid of its own (the server thread, started before the
# jail, goes into it too): the guest counts on, and its faults were answered.
uffd_restore() {
  ./atoll-vmm --restore s2.state --mem-file s2.mem --mem-backend uffd --jail-uid 4242 \
    --metrics u.json --timeout 120 > out8.txt 2>&1
  echo "uffd-exit=$?"
  grep '^sum1\|^tickb 40\|^ticka 40' out8.txt | sed 's/^/uffd: /'
  tr -d ' \n' < u.json | grep -o '"uffd_pages":{[^}]*}'; echo
  true
}
printf '%s' "$GUEST" > guest.sh
scenario one_vcpu continue_after_restore 1
scenario two_vcpus continue_after_restore 2
scenario pause_resume pause_resume_and_refusals
scenario bad bad_snapshots
scenario standby standby_load
scenario preload standby_preload
scenario uffd uffd_restore
"#;

fn node_output() -> &'static str {
    static OUT: OnceLock<String> = OnceLock::new();
    OUT.get_or_init(|| {
        let runner = with(
            kvm_runner(),
            &build_dir().join("initramfs.cpio"),
            "initramfs.cpio",
        )
        .file(
            artefact(static_dir().join("atoll-vmm-api")),
            "atoll-vmm-api",
        )
        .unwrap()
        .timeout(Duration::from_secs(900));
        let script = format!(
            "GUEST='{}'\n{SCENARIO_SH}{SCRIPT}",
            GUEST.replace('\'', "'\\''")
        );
        run(runner, &script).output
    })
}

/// The output of scenario `name` and its status.
fn scenario(name: &str) -> (&'static str, i32) {
    common::scenario(node_output(), name)
}

fn checksum(out: &str, which: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(which))
        .unwrap_or_else(|| panic!("no {which} line in:\n{out}"))
        .trim()
        .to_string()
}

fn assert_continues(name: &str, vcpus: usize) {
    let (out, status) = scenario(name);
    assert_eq!(status, 0, "{out}");
    assert_eq!(
        value_of(out, "first"),
        "0",
        "stopping through the API exits 0"
    );
    assert_eq!(
        value_of(out, "second"),
        "9",
        "the restored guest ran its script to the end and reported 9"
    );
    let last: u32 = value_of(out, "last-before").parse().unwrap();
    assert!(last >= 5, "{out}");
    assert_eq!(
        value_of(out, "first-after"),
        format!("ticka {}", last + 1),
        "the counter continues where the snapshot left it"
    );
    let (before, after) = (checksum(out, "sum0 "), checksum(out, "sum1 "));
    assert_eq!(before.len(), 34, "an md5 line: {before:?}");
    assert_eq!(before, after, "8 MiB of guest memory came back intact");
    assert!(out.contains("ticka 40"));
    if vcpus == 2 {
        assert!(
            out.contains("tickb 40"),
            "the second vCPU's counter finished"
        );
    }
}

#[test]
fn snapshot_restore_continues_a_computation_with_one_vcpu() {
    assert_continues("one_vcpu", 1);
}

#[test]
fn snapshot_restore_continues_a_computation_with_two_vcpus() {
    assert_continues("two_vcpus", 2);
}

#[test]
fn pause_stops_the_guest_resume_continues_and_bad_requests_change_nothing() {
    let (out, status) = scenario("pause_resume");
    assert_eq!(status, 0, "{out}");
    assert_eq!(
        value_of(out, "running-snapshot"),
        "1",
        "a running VM is not snapshotted"
    );
    assert!(
        out.contains("pause the VM before taking a snapshot"),
        "{out}"
    );
    assert_eq!(value_of(out, "paused-ticks"), "0", "no tick while paused");
    assert_eq!(value_of(out, "bad-path"), "1");
    assert!(
        out.contains("cannot create /nonexistent/dir/x.mem"),
        "the client, which opens the files for the jailed VMM, says which: {out}"
    );
    let resumed: u32 = value_of(out, "resumed-ticks").parse().unwrap();
    assert!(
        resumed >= 2,
        "the guest counts again after resume: {resumed}"
    );
    assert_eq!(value_of(out, "metrics"), "0");
    assert!(out.contains("\"exits_total\":"), "{out}");
    assert_eq!(value_of(out, "stopped"), "0");
    assert!(
        !out.contains("left: "),
        "no snapshot file or temporary left: {out}"
    );
}

#[test]
fn bad_snapshots_are_refused_with_one_line_and_leave_nothing() {
    let (out, status) = scenario("bad");
    assert_eq!(status, 0, "{out}");
    for (name, says) in [
        ("truncated", "not a usable Atoll snapshot state file"),
        ("bitflip", "checksum does not match"),
        ("version", "format version"),
        ("shortmem", "does not belong to this snapshot"),
        ("othermem", "written for another snapshot"),
        ("nomem", "cannot open the snapshot memory file"),
        ("garbage", "does not start with the ATOLLSNP magic"),
        ("withapi", "not a usable Atoll snapshot state file"),
    ] {
        assert_eq!(
            value_of(out, name),
            "1 lines=1",
            "{name}: exit 1, one line\n{out}"
        );
        assert!(out.contains(says), "{name}: expected {says:?} in\n{out}");
    }
    assert!(!out.contains("left: "), "{out}");
}

#[test]
fn a_preloaded_standby_vmm_finishes_the_restore_it_prepared_and_restores_others_in_full() {
    let (out, status) = scenario("preload");
    assert_eq!(status, 0, "{out}");
    // A bad preload is refused with why; the VMM still takes the next one.
    assert_eq!(value_of(out, "bad-preload"), "1", "{out}");
    assert!(
        out.contains("not a usable Atoll snapshot state file"),
        "{out}"
    );
    assert!(out.contains("this VMM still waits for a snapshot"), "{out}");
    for k in ["preload-other", "preload", "preload-a", "preload-c"] {
        assert_eq!(value_of(out, k), "0", "{k}\n{out}");
    }
    let sum = checksum(scenario("one_vcpu").0, "sum0");
    let sum2 = checksum(scenario("two_vcpus").0, "sum0");
    // Loading what was preloaded (the second preload replaced the first):
    // only the clone's part ran, and the guest went on where it was.
    assert_eq!(value_of(out, "preloaded-load"), "0", "{out}");
    let phases = value_of(out, "preloaded-phases");
    assert!(phases.contains("template_preloaded"), "{out}");
    assert!(!phases.contains("state_read"), "{out}");
    assert_eq!(value_of(out, "preloaded-exit"), "9", "{out}");
    assert_eq!(checksum(out, "preloaded: sum1"), sum, "{out}");
    assert!(out.contains("preloaded: ticka 40"), "{out}");
    // Another snapshot than the preloaded one: restored in full, and right (two
    // vCPUs where one was prepared).
    assert_eq!(value_of(out, "other-load"), "0", "{out}");
    let phases = value_of(out, "other-phases");
    assert!(!phases.contains("template_preloaded"), "{out}");
    assert!(phases.contains("state_read"), "{out}");
    assert_eq!(value_of(out, "other-exit"), "9", "{out}");
    assert_eq!(checksum(out, "other: sum1"), sum2, "{out}");
    assert!(out.contains("other: tickb 40"), "{out}");
    // The same path, changed since the preload: restored in full from the file
    // as it is now.
    assert_eq!(value_of(out, "changed-load"), "0", "{out}");
    let phases = value_of(out, "changed-phases");
    assert!(!phases.contains("template_preloaded"), "{out}");
    assert!(phases.contains("state_read"), "{out}");
    assert_eq!(value_of(out, "changed-exit"), "9", "{out}");
    assert_eq!(checksum(out, "changed: sum1"), sum, "{out}");
}

#[test]
fn a_restore_whose_memory_a_userfaultfd_page_server_brings_in_continues_jailed() {
    let (out, status) = scenario("uffd");
    assert_eq!(status, 0, "{out}");
    assert_eq!(
        value_of(out, "uffd-exit"),
        "9",
        "the guest's own status\n{out}"
    );
    let sum = checksum(scenario("two_vcpus").0, "sum0");
    assert_eq!(
        checksum(out, "uffd: sum1"),
        sum,
        "memory came in whole\n{out}"
    );
    assert!(
        out.contains("uffd: ticka 40") && out.contains("uffd: tickb 40"),
        "{out}"
    );
    // No working set was given: every page the guest touched was a fault the
    // server answered (the 8 MiB blob the guest summed among them).
    let counts = out
        .lines()
        .find_map(|l| l.strip_prefix("\"uffd_pages\":"))
        .unwrap_or_else(|| panic!("no page counts in\n{out}"));
    let counts: serde_json::Value = serde_json::from_str(counts).unwrap();
    assert_eq!(counts["prefetched"], 0, "{out}");
    let copied = counts["copied"].as_u64().unwrap();
    assert!(
        copied > 2048,
        "at least the 8 MiB blob: {copied} pages\n{out}"
    );
}

#[test]
fn a_standby_vmm_loads_a_snapshot_over_the_api_and_survives_bad_ones() {
    let (out, status) = scenario("standby");
    assert_eq!(status, 0, "{out}");
    assert!(out.contains(r#"{"state":"Standby"}"#), "{out}");
    assert_eq!(value_of(out, "describe"), "0", "{out}");
    // Before a load nothing but a load, a description and a stop is served.
    assert_eq!(value_of(out, "pause-before-load"), "1", "{out}");
    assert!(out.contains("no VM yet"), "{out}");
    // Bad snapshots are refused with why, and the VMM keeps waiting.
    assert_eq!(value_of(out, "bad-load"), "1", "{out}");
    assert!(
        out.contains("not a usable Atoll snapshot state file"),
        "{out}"
    );
    assert_eq!(value_of(out, "mismatched-load"), "1", "{out}");
    assert!(out.contains("written for another snapshot"), "{out}");
    assert!(out.contains("this VMM still waits for a snapshot"), "{out}");
    // The good one runs the guest on from where the snapshot left it.
    assert_eq!(value_of(out, "load"), "0", "{out}");
    assert!(out.contains(r#""state":"Running""#), "{out}");
    assert_eq!(value_of(out, "second-load"), "1", "{out}");
    assert!(out.contains("runs a VM already"), "{out}");
    assert_eq!(
        value_of(out, "standby-exit"),
        "9",
        "the guest's own status\n{out}"
    );
    let (one, _) = scenario("one_vcpu");
    let sum = checksum(one, "sum0");
    assert_eq!(
        checksum(out, "sum1"),
        sum,
        "memory survived the load\n{out}"
    );
    assert!(out.contains("ticka 40"), "{out}");
    // Stopped before any load: the answer arrives, the VMM exits 0.
    assert_eq!(value_of(out, "stop-answer"), "0", "{out}");
    assert!(out.contains(r#"{"state":"Stopped"}"#), "{out}");
    assert_eq!(value_of(out, "stopped-exit"), "0", "{out}");
}
