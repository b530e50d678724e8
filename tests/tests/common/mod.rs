//! What every end-to-end test needs: where `make artifacts` put the static binaries
//! and guest artefacts, and a runner that carries atoll-vmm and the guest kernel to
//! wherever a real KVM is (the host's, or the nested node's).
//!
//! `make test` points `ATOLL_BUILD_DIR` / `ATOLL_STATIC_DIR` at the artefacts; run
//! alone, the tests look in the checkout's `build/` and static target directory.

#![allow(dead_code)] // each test file uses a different part

pub mod oci;

use std::path::{Path, PathBuf};
use std::time::Duration;

use atoll_node::{RunOutput, Runner};

fn dir(var: &str, default: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(default))
}

/// vmlinux, bzImage, initramfs.cpio.
pub fn build_dir() -> PathBuf {
    dir("ATOLL_BUILD_DIR", "build")
}

/// The static binaries (atoll-vmm, atoll-init, atoll-image, probes).
pub fn static_dir() -> PathBuf {
    dir(
        "ATOLL_STATIC_DIR",
        "target/x86_64-unknown-linux-gnu/release",
    )
}

/// `p`, which must exist: the test fails (never skips) with what to run otherwise.
pub fn artefact(p: PathBuf) -> PathBuf {
    assert!(
        p.exists(),
        "{} is missing: run `make artifacts` (or `make test`, which builds it)",
        p.display()
    );
    p
}

/// A runner carrying `atoll-vmm` and `vmlinux`, quiet, with a 300 s limit; add the
/// initramfs and anything else with `.file(...)`.
///
/// In the nested node, L1's `kvm_amd` runs the pod VMs with shadow paging
/// (`npt=0`): with nested paging, QEMU's emulation of VMRUN now and then turns an
/// interrupt injected into L2's user mode into a triple fault (1 in 20 runs of the
/// 10 MiB stream on 2026-12-06, 3 in 200 and 4 in about 230 before; README, "The
/// node's own kernel"), while 200 in a row passed with `npt=0`. The benchmarks keep
/// the node's default (nested paging), which is what a real host has.
pub fn kvm_runner<'a>() -> Runner<'a> {
    Runner::detect()
        .node_append("kvm_amd.npt=0")
        .file(artefact(static_dir().join("atoll-vmm")), "atoll-vmm")
        .unwrap()
        .file(artefact(build_dir().join("vmlinux")), "vmlinux")
        .unwrap()
        .timeout(Duration::from_secs(300))
        .stream_to_stderr(false)
}

/// Adds `host` (which must exist) as `name`.
pub fn with<'a>(runner: Runner<'a>, host: &Path, name: &str) -> Runner<'a> {
    runner.file(artefact(host.to_path_buf()), name).unwrap()
}

/// Runs `script` and prints what it printed, for the test log.
pub fn run(runner: Runner<'_>, script: &str) -> RunOutput {
    let out = runner.run(script).expect("the KVM runner failed");
    eprintln!(
        "--- output ---\n{}\n--- status {} ---",
        out.output, out.status
    );
    out
}

/// Runs `script` with atoll-vmm, vmlinux and the standard initramfs.
pub fn on_kvm(script: &str) -> RunOutput {
    let r = with(
        kvm_runner(),
        &build_dir().join("initramfs.cpio"),
        "initramfs.cpio",
    );
    run(r, script)
}

/// The node scripts' `scenario NAME COMMAND...`: prints `@@@ NAME`, runs the command
/// (a program or a shell function) and prints `@@@ NAME status=N`, which
/// [`scenario`] parses. A scenario still running after `$SCENARIO_LIMIT` seconds
/// (300; the slowest takes about 30) gets the end of every pod's console printed
/// into its output and its atoll clients stopped (SIGTERM, SIGKILL 10 s later): a
/// hang fails its own test with the evidence, and the scenarios after it still run,
/// instead of the node run ending at its limit with nothing but L1's console.
pub const SCENARIO_SH: &str = r#"
scenario() {
  name=$1; shift; echo "@@@ $name"
  ( limit=${SCENARIO_LIMIT:-300}; sleep "$limit" >/dev/null 2>&1
    echo "@@@ $name is still running after $limit s: the pods' consoles, then its atoll clients are stopped"
    for c in /run/atoll/pods/*/console.log /run/atoll/cri/pods/*/console.log; do
      [ -f "$c" ] && { echo "--- $c"; tail -n 60 "$c"; }
    done
    ps -o pid,ppid,stat,comm 2>/dev/null | grep -e atoll -e PID
    # Where each thread of the clients and VMMs waits, and what L1's kernel said.
    for pid in $(pidof atoll atoll-crictl atoll-vmm); do
      for t in /proc/$pid/task/*; do
        echo "thread $pid/${t##*/} $(cat $t/comm 2>/dev/null) $(cat $t/stat 2>/dev/null | cut -d' ' -f3) wchan=$(cat $t/wchan 2>/dev/null)"
      done
    done
    dmesg 2>/dev/null | tail -n 15
    # How much each VMM reads and writes for its guest, twice, 5 s apart: a guest
    # busy on its disk shows here without being touched (an exec into a container
    # stuck at its memory limit joins its cgroup and changes what it shows).
    for k in 1 2; do
      for pid in $(pidof atoll-vmm); do echo "vmm $pid io: $(tr '\n' ' ' < /proc/$pid/io 2>/dev/null)"; done
      [ $k = 2 ] || sleep 5 >/dev/null 2>&1
    done
    # The node's busybox has pidof, not pkill.
    for p in atoll atoll-crictl atoll-vmm-api; do kill -TERM $(pidof $p) 2>/dev/null; done
    sleep 10 >/dev/null 2>&1
    for p in atoll atoll-crictl atoll-vmm-api; do kill -KILL $(pidof $p) 2>/dev/null; done ) &
  scenario_watchdog=$!
  "$@"; scenario_status=$?
  kill "$scenario_watchdog" 2>/dev/null
  echo "@@@ $name status=$scenario_status"
}
"#;

/// The output of scenario `name` in `output`, and its status: node scripts print
/// `@@@ NAME` before and `@@@ NAME status=N` after each scenario, so several
/// scenarios share one node run and each test asserts on its own.
pub fn scenario<'a>(output: &'a str, name: &str) -> (&'a str, i32) {
    let start_marker = format!("@@@ {name}\n");
    let end_marker = format!("@@@ {name} status=");
    let start = output
        .find(&start_marker)
        .unwrap_or_else(|| panic!("scenario {name} did not run:\n{output}"))
        + start_marker.len();
    let end = output[start..]
        .find(&end_marker)
        .unwrap_or_else(|| panic!("scenario {name} did not end:\n{output}"))
        + start;
    let status = output[end + end_marker.len()..]
        .lines()
        .next()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("scenario {name}: no status"));
    (&output[start..end], status)
}

/// The value of the first whitespace-separated word `key=value` in `out` (exactly:
/// `a=1` is not `a=12`, nor `xa=1`); `None` when no word has that key.
pub fn word<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("{key}=");
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
}

/// The value after `key=` on the first line that starts with it (exactly: `a=1`
/// is not found as `a=12`'s prefix, the whole rest of the line is the value).
pub fn value_of<'a>(out: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    out.lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no line {key}=... in:\n{out}"))
}
