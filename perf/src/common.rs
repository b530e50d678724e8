//! Plumbing every benchmark shares: finding artefacts, building a guest initramfs
//! with an extra binary, reading the inner half's JSON line, saving results.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use atoll_node::{RunOutput, Where};
use serde_json::{json, Value};

/// The prefix of the one line of JSON an inner benchmark prints.
pub const JSON_PREFIX: &str = "ATOLL-BENCH-JSON ";

/// QEMU's microvm in its fastest configuration for a like-for-like peer: KVM, the
/// host CPU, no option ROMs and no RTC, the console on stdio, and isa-debug-exit on
/// port 0xf4 so the guest's exit status ends it as it ends atoll-vmm.
pub fn qemu_microvm(qemu: &str) -> Command {
    let mut c = Command::new(qemu);
    c.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off,isa-serial=on",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=1",
    ]);
    c
}

/// `dir/name`, which must exist.
pub fn need(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} is missing: run `make artifacts` (which builds the static binaries) first",
            p.display()
        );
    }
    Ok(p)
}

/// One line saying where the benchmark runs and why.
pub fn place_line(place: &Where) -> String {
    match place {
        Where::HostKvm => "running on the host's KVM".to_string(),
        Where::NestedNode(why) => why.clone(),
    }
}

/// Writes an initramfs like `make artifacts`' (atoll-init, busybox) plus `extra`
/// at `/bin/<guest_name>`, to `out`.
pub fn guest_initramfs(
    bin: &Path,
    extra: &Path,
    guest_name: &str,
    out: &Path,
) -> anyhow::Result<()> {
    let status = Command::new(need(bin, "atoll-image")?)
        .arg("initramfs")
        .arg("--init")
        .arg(need(bin, "atoll-init")?)
        .arg("--busybox")
        .arg("/bin/busybox")
        .arg("--add")
        .arg(format!("{}:/bin/{guest_name}", extra.display()))
        .arg("-o")
        .arg(out)
        .status()
        .context("cannot run atoll-image")?;
    if !status.success() {
        bail!("atoll-image initramfs failed ({status})");
    }
    Ok(())
}

/// The inner benchmark's JSON result, with where it ran added.
pub fn inner_result(out: &RunOutput, place: &Where) -> anyhow::Result<Value> {
    if out.status != 0 {
        bail!(
            "the benchmark failed (status {}):\n{}",
            out.status,
            out.output
        );
    }
    let line = out
        .output
        .lines()
        .find_map(|l| l.strip_prefix(JSON_PREFIX))
        .context("the benchmark printed no result")?;
    let mut result: Value = serde_json::from_str(line).context("bad benchmark JSON")?;
    result["where"] = json!(if place.is_nested() {
        "nested-node"
    } else {
        "host-kvm"
    });
    result["where_reason"] = json!(place_line(place));
    Ok(result)
}

/// Saves `result` as pretty JSON at `path`, creating its directory.
pub fn save(path: &Path, result: &Value) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(path, serde_json::to_vec_pretty(result)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("atoll-bench: saved {}", path.display());
    Ok(())
}
