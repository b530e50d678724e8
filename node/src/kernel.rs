//! Fetching and caching what the node boots: Debian's cloud kernel (without installing
//! it on the host) and the modules the node loads (KVM, tun), decompressed.
//!
//! Layout of the cache (`${ATOLL_CACHE:-/var/cache/atoll}/node/`):
//! - `<pkg-version>/root/`: the `.deb` extracted with `dpkg-deb -x`
//!   (`boot/vmlinuz-*`, `lib/modules/<release>/...`);
//! - `<pkg-version>/modules/{irqbypass,kvm,kvm-amd,tun,vhost*,vsock*}.ko`: decompressed copies
//!   (a module added to [`NODE_MODULES`] later is decompressed from `root/` on the
//!   next use, so an existing cache needs no new download);
//! - `<pkg-version>/vmlinux`: the uncompressed kernel for a PVH boot (see
//!   [`NodeKernel::boot_image`]);
//! - `<pkg-version>/package`: the package name and version;
//! - `current`: the version used when nobody asks apt again.
//!
//! A version directory is built under a temporary name and renamed into place, so
//! its existence means it is complete (a concurrent preparer simply loses the race).
//!
//! The kernel comes from `linux-image-6.12-cloud-amd64`'s dependency (the 6.12 cloud
//! kernel that platform.md verified for the node), made `-unsigned`. Set
//! `ATOLL_NODE_KERNEL_META` to another meta package (e.g. `linux-image-cloud-amd64`,
//! 6.1 on bookworm) to try a different one.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Cache root override.
pub const CACHE_ENV: &str = "ATOLL_CACHE";
/// Default cache root.
pub const DEFAULT_CACHE: &str = "/var/cache/atoll";
/// Meta-package override.
pub const META_ENV: &str = "ATOLL_NODE_KERNEL_META";
/// Meta package whose dependency names the cloud kernel image package.
pub const DEFAULT_META: &str = "linux-image-6.12-cloud-amd64";

/// The modules L1 loads, in load order, with their place below `kernel/`: KVM, and
/// `tun` (a module in the cloud kernel) so that tests can give VMs tap devices.
pub const NODE_MODULES: [(&str, &str); 4] = [
    ("irqbypass", "virt/lib/irqbypass.ko.xz"),
    ("kvm", "arch/x86/kvm/kvm.ko.xz"),
    ("kvm-amd", "arch/x86/kvm/kvm-amd.ko.xz"),
    ("tun", "drivers/net/tun.ko.xz"),
];

/// Modules L1 loads only for runs that ask for them ([`crate::Runner::extra_modules`]),
/// in load order: vhost-vsock (`/dev/vhost-vsock`, the host side of QEMU's
/// `vhost-vsock-device`) with its dependencies, and what CNI pods need (a bridge,
/// veth pairs, tc ingress redirects). Decompressed like [`NODE_MODULES`].
pub const EXTRA_MODULES: [(&str, &str); 29] = [
    ("vhost_iotlb", "drivers/vhost/vhost_iotlb.ko.xz"),
    ("vhost", "drivers/vhost/vhost.ko.xz"),
    ("vsock", "net/vmw_vsock/vsock.ko.xz"),
    (
        "vmw_vsock_virtio_transport_common",
        "net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz",
    ),
    ("vhost_vsock", "drivers/vhost/vhost_vsock.ko.xz"),
    ("llc", "net/llc/llc.ko.xz"),
    ("stp", "net/802/stp.ko.xz"),
    ("bridge", "net/bridge/bridge.ko.xz"),
    ("veth", "drivers/net/veth.ko.xz"),
    ("sch_ingress", "net/sched/sch_ingress.ko.xz"),
    ("cls_u32", "net/sched/cls_u32.ko.xz"),
    ("act_mirred", "net/sched/act_mirred.ko.xz"),
    ("libcrc32c", "lib/libcrc32c.ko.xz"),
    ("nf_defrag_ipv4", "net/ipv4/netfilter/nf_defrag_ipv4.ko.xz"),
    ("nf_defrag_ipv6", "net/ipv6/netfilter/nf_defrag_ipv6.ko.xz"),
    ("nf_conntrack", "net/netfilter/nf_conntrack.ko.xz"),
    ("nf_nat", "net/netfilter/nf_nat.ko.xz"),
    ("x_tables", "net/netfilter/x_tables.ko.xz"),
    ("ip_tables", "net/ipv4/netfilter/ip_tables.ko.xz"),
    ("iptable_filter", "net/ipv4/netfilter/iptable_filter.ko.xz"),
    ("iptable_nat", "net/ipv4/netfilter/iptable_nat.ko.xz"),
    ("xt_tcpudp", "net/netfilter/xt_tcpudp.ko.xz"),
    ("xt_nat", "net/netfilter/xt_nat.ko.xz"),
    ("xt_MASQUERADE", "net/netfilter/xt_MASQUERADE.ko.xz"),
    ("xt_comment", "net/netfilter/xt_comment.ko.xz"),
    ("xt_multiport", "net/netfilter/xt_multiport.ko.xz"),
    ("xt_mark", "net/netfilter/xt_mark.ko.xz"),
    ("xt_addrtype", "net/netfilter/xt_addrtype.ko.xz"),
    ("xt_conntrack", "net/netfilter/xt_conntrack.ko.xz"),
];

/// What [`crate::Runner::extra_modules`] loads for CNI pod networks (the bridge
/// plugin, veth pairs, atoll-cri's tc redirects), in load order.
pub const CNI_NET: [&str; 7] = [
    "llc",
    "stp",
    "bridge",
    "veth",
    "sch_ingress",
    "cls_u32",
    "act_mirred",
];

/// What the CNI `portmap` plugin needs (iptables' NAT table with the matches and
/// targets its rules use), in load order; after [`CNI_NET`].
pub const CNI_PORTMAP: [&str; 17] = [
    "libcrc32c",
    "nf_defrag_ipv4",
    "nf_defrag_ipv6",
    "nf_conntrack",
    "nf_nat",
    "x_tables",
    "ip_tables",
    "iptable_filter",
    "iptable_nat",
    "xt_tcpudp",
    "xt_nat",
    "xt_MASQUERADE",
    "xt_comment",
    "xt_multiport",
    "xt_mark",
    "xt_addrtype",
    "xt_conntrack",
];

/// What [`crate::Runner::extra_modules`] loads for vhost-vsock, in load order.
pub const VHOST_VSOCK: [&str; 5] = [
    "vhost_iotlb",
    "vhost",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vhost_vsock",
];

/// Host packages the node needs: (a file the package installs, package name).
const HOST_PACKAGES: [(&str, &str); 4] = [
    ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
    ("/bin/busybox", "busybox-static"),
    ("/usr/bin/xz", "xz-utils"),
    ("/usr/bin/zstd", "zstd"),
];

/// Preparing the node's kernel or host packages failed.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// A helper program could not be started.
    #[error("could not run {program}")]
    Spawn {
        /// Program name.
        program: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A helper program failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// apt does not know a package that names the kernel.
    #[error("apt cannot resolve the node kernel from {meta}: {detail}")]
    Resolve {
        /// The meta package asked about.
        meta: String,
        /// What was missing.
        detail: String,
    },
    /// The extracted package lacks a file the node needs.
    #[error("the kernel package has no {what} (looked in {path})")]
    Missing {
        /// What was looked for.
        what: String,
        /// Where.
        path: PathBuf,
    },
    /// A file operation in the cache failed.
    #[error("{action} {path} failed")]
    Io {
        /// What was done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn io_err<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> PrepareError + 'p {
    move |source| PrepareError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// A prepared node kernel.
#[derive(Debug, Clone)]
pub struct NodeKernel {
    /// The cache directory of this version.
    pub dir: PathBuf,
    /// Debian package version (e.g. `6.12.117-1~deb12u1`).
    pub version: String,
    /// Package name (e.g. `linux-image-6.12.117+deb12-cloud-amd64-unsigned`).
    pub package: String,
    /// The compressed kernel image from the package.
    pub vmlinuz: PathBuf,
    /// What the node boots: `vmlinux` (the uncompressed ELF, booted through PVH,
    /// which saves the ~0.6-1 s its decompression costs under TCG) when the kernel
    /// has `CONFIG_PVH=y`, else `vmlinuz`.
    pub boot_image: PathBuf,
    /// Decompressed modules in load order.
    pub modules: Vec<PathBuf>,
}

impl NodeKernel {
    /// The decompressed [`EXTRA_MODULES`] entry `name`, if the package has it.
    pub fn extra_module(&self, name: &str) -> Result<PathBuf, PrepareError> {
        let path = self.dir.join("modules").join(format!("{name}.ko"));
        if EXTRA_MODULES.iter().any(|(n, _)| *n == name) && path.is_file() {
            Ok(path)
        } else {
            Err(PrepareError::Missing {
                what: format!("{name} module (one of EXTRA_MODULES)"),
                path,
            })
        }
    }
}

/// The cache root: `$ATOLL_CACHE` or `/var/cache/atoll`.
pub fn cache_root() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE))
}

/// The node's part of the cache.
pub fn node_cache() -> PathBuf {
    cache_root().join("node")
}

/// Runs a command, returning its output if it succeeded.
fn run(cmd: &mut Command) -> Result<Output, PrepareError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| PrepareError::Spawn {
            program: program.clone(),
            source,
        })?;
    if out.status.success() {
        return Ok(out);
    }
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
    Err(PrepareError::Command {
        command: format!("{program} {}", args.join(" ")),
        status: out.status.to_string(),
        stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
    })
}

fn apt_get() -> Command {
    let mut c = Command::new("apt-get");
    c.env("DEBIAN_FRONTEND", "noninteractive");
    c
}

fn package_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs `qemu-system-x86`, `busybox-static` and `xz-utils` if they are missing.
pub fn ensure_host_packages() -> Result<(), PrepareError> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .filter(|(file, pkg)| !Path::new(file).exists() || !package_installed(pkg))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let install = |c: &mut Command| {
        run(c
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing))
    };
    if install(&mut apt_get()).is_err() {
        // Usually empty or stale package lists: refresh once.
        run(apt_get().arg("update"))?;
        install(&mut apt_get())?;
    }
    Ok(())
}

/// The value of `field` in apt-cache's `Field: value` output.
fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// Parses `apt-cache depends` output: the first `Depends:` that names a kernel image.
fn image_dependency(depends: &str) -> Option<String> {
    depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(|d| d.trim().trim_start_matches('<').trim_end_matches('>'))
        .find(|d| d.starts_with("linux-image-"))
        .map(str::to_owned)
}

/// Asks apt which image package and version the meta package points at.
fn resolve(meta: &str) -> Result<(String, String), PrepareError> {
    let ask = || -> Result<(String, String), PrepareError> {
        let deps = run(Command::new("apt-cache").args(["depends", meta]))?;
        let dep = image_dependency(&String::from_utf8_lossy(&deps.stdout)).ok_or_else(|| {
            PrepareError::Resolve {
                meta: meta.to_owned(),
                detail: "no linux-image dependency".into(),
            }
        })?;
        let pkg = if dep.ends_with("-unsigned") {
            dep
        } else {
            format!("{dep}-unsigned")
        };
        let show = run(Command::new("apt-cache").args(["show", "--no-all-versions", &pkg]))?;
        let show = String::from_utf8_lossy(&show.stdout);
        let version = field(&show, "Version").ok_or_else(|| PrepareError::Resolve {
            meta: meta.to_owned(),
            detail: format!("{pkg} has no Version"),
        })?;
        Ok((pkg, version.to_owned()))
    };
    match ask() {
        Ok(found) => Ok(found),
        Err(_) => {
            // Empty package lists (fresh container): update once and ask again.
            run(apt_get().arg("update"))?;
            ask()
        }
    }
}

/// Loads a complete version directory.
fn load(dir: &Path) -> Option<NodeKernel> {
    let info = fs::read_to_string(dir.join("package")).ok()?;
    let mut words = info.split_whitespace();
    let package = words.next()?.to_owned();
    let version = words.next()?.to_owned();
    let vmlinuz = find_vmlinuz(&dir.join("root")).ok()?;
    let modules: Vec<PathBuf> = NODE_MODULES
        .iter()
        .map(|(name, _)| dir.join("modules").join(format!("{name}.ko")))
        .collect();
    if !modules.iter().all(|m| m.is_file()) {
        return None;
    }
    let vmlinux = dir.join("vmlinux");
    let boot_image = if vmlinux.is_file() {
        vmlinux
    } else {
        vmlinuz.clone()
    };
    Some(NodeKernel {
        dir: dir.to_owned(),
        version,
        package,
        vmlinuz,
        boot_image,
        modules,
    })
}

fn find_vmlinuz(root: &Path) -> Result<PathBuf, PrepareError> {
    let boot = root.join("boot");
    let entries = fs::read_dir(&boot).map_err(io_err("reading", &boot))?;
    for e in entries {
        let e = e.map_err(io_err("reading", &boot))?;
        if e.file_name().to_string_lossy().starts_with("vmlinuz-") {
            return Ok(e.path());
        }
    }
    Err(PrepareError::Missing {
        what: "vmlinuz".into(),
        path: boot,
    })
}

/// The compressed payload inside a bzImage, from its setup header.
///
/// Boot protocol 2.08 and later: `payload_offset` at 0x248 and `payload_length` at
/// 0x24c, relative to the protected-mode code after the `setup_sects + 1` setup
/// sectors. The kernel build appends the decompressed size (le32) to the payload;
/// it is cut off here.
fn bzimage_payload(image: &[u8]) -> Option<&[u8]> {
    let u32_at = |o: usize| -> Option<usize> {
        let b: [u8; 4] = image.get(o..o + 4)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(b)).ok()
    };
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let setup_sects = match *image.get(0x1f1)? {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)?;
    let len = u32_at(0x24c)?;
    let payload = image.get(start..start.checked_add(len)?)?;
    payload.get(..payload.len().checked_sub(4)?)
}

/// Writes `<dir>/vmlinux` (uncompressed, for a PVH boot) if the kernel supports PVH
/// and it is not there yet. Failing to make it is not an error: `vmlinuz` still boots.
fn ensure_vmlinux(dir: &Path, vmlinuz: &Path) -> Result<(), PrepareError> {
    let out = dir.join("vmlinux");
    if out.is_file() {
        return Ok(());
    }
    let boot = vmlinuz.parent().unwrap_or(dir);
    let pvh = fs::read_dir(boot)
        .map_err(io_err("reading", boot))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("config-"))
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .any(|config| config.lines().any(|l| l == "CONFIG_PVH=y"));
    if !pvh {
        return Ok(());
    }
    let image = fs::read(vmlinuz).map_err(io_err("reading", vmlinuz))?;
    let Some(payload) = bzimage_payload(&image) else {
        return Ok(());
    };
    let tool = match payload.get(..4) {
        Some([0x28, 0xb5, 0x2f, 0xfd]) => "zstd",
        Some([0xfd, b'7', b'z', b'X']) => "xz",
        _ => return Ok(()),
    };
    let tmp = temp_name(dir, "vmlinux");
    let packed = tmp.with_extension("in");
    fs::write(&packed, payload).map_err(io_err("writing", &packed))?;
    let file = fs::File::create(&tmp).map_err(io_err("creating", &tmp))?;
    let status = Command::new(tool)
        .args(["-d", "-c", "-q"])
        .arg(&packed)
        .stdin(Stdio::null())
        .stdout(file)
        .status();
    let _ = fs::remove_file(&packed);
    match status {
        Ok(s) if s.success() => fs::rename(&tmp, &out).map_err(io_err("renaming into", &out)),
        _ => {
            let _ = fs::remove_file(&tmp);
            Ok(())
        }
    }
}

/// A directory name that no concurrent preparer will pick.
fn temp_name(base: &Path, tag: &str) -> PathBuf {
    let nonce = crate::protocol::new_nonce().unwrap_or_else(|_| "0".into());
    base.join(format!(".{tag}-{}-{}", std::process::id(), &nonce[..8]))
}

/// Downloads, extracts and decompresses into `<node cache>/<version>`.
fn fetch(base: &Path, package: &str, version: &str) -> Result<PathBuf, PrepareError> {
    let final_dir = base.join(version);
    if final_dir.exists() {
        return Ok(final_dir);
    }
    let tmp = temp_name(base, "tmp");
    fs::create_dir_all(&tmp).map_err(io_err("creating", &tmp))?;
    let result = fill(&tmp, package, version).and_then(|()| {
        match fs::rename(&tmp, &final_dir) {
            Ok(()) => Ok(()),
            // Someone else finished first: theirs is as good as ours.
            Err(_) if final_dir.join("package").is_file() => {
                let _ = fs::remove_dir_all(&tmp);
                Ok(())
            }
            Err(e) => Err(io_err("renaming into", &final_dir)(e)),
        }
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result.map(|()| final_dir)
}

fn fill(tmp: &Path, package: &str, version: &str) -> Result<(), PrepareError> {
    run(apt_get()
        .current_dir(tmp)
        // The `_apt` user cannot write to a root-owned cache directory.
        .args(["-o", "APT::Sandbox::User=root", "download"])
        .arg(format!("{package}={version}")))?;
    let deb = fs::read_dir(tmp)
        .map_err(io_err("reading", tmp))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension() == Some(OsStr::new("deb")))
        .ok_or_else(|| PrepareError::Missing {
            what: format!("downloaded .deb of {package}"),
            path: tmp.to_owned(),
        })?;
    let root = tmp.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    fs::remove_file(&deb).map_err(io_err("removing", &deb))?;
    find_vmlinuz(&root)?;

    decompress_modules(&root, &tmp.join("modules"))?;
    let info = tmp.join("package");
    fs::write(&info, format!("{package} {version}\n")).map_err(io_err("writing", &info))
}

/// Decompresses every [`NODE_MODULES`] entry missing from `out_dir` out of the
/// extracted package at `root`, and every [`EXTRA_MODULES`] entry the package has.
/// Each file is written under a temporary name and renamed, so a present module is
/// always complete.
fn decompress_modules(root: &Path, out_dir: &Path) -> Result<(), PrepareError> {
    let lib_modules = root.join("lib/modules");
    let release = fs::read_dir(&lib_modules)
        .map_err(io_err("reading", &lib_modules))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .ok_or_else(|| PrepareError::Missing {
            what: "lib/modules/<release>".into(),
            path: lib_modules.clone(),
        })?;
    fs::create_dir_all(out_dir).map_err(io_err("creating", out_dir))?;
    let required = NODE_MODULES.iter().map(|m| (m, true));
    for ((name, rel), needed) in required.chain(EXTRA_MODULES.iter().map(|m| (m, false))) {
        let dst = out_dir.join(format!("{name}.ko"));
        if dst.is_file() {
            continue;
        }
        let src = release.join("kernel").join(rel);
        if !src.is_file() {
            if !needed {
                continue;
            }
            return Err(PrepareError::Missing {
                what: format!("{name} module"),
                path: src,
            });
        }
        let tmp = temp_name(out_dir, name);
        let file = fs::File::create(&tmp).map_err(io_err("creating", &tmp))?;
        let status = Command::new("xz")
            .arg("-dc")
            .arg(&src)
            .stdout(file)
            .status()
            .map_err(|source| PrepareError::Spawn {
                program: "xz".into(),
                source,
            })?;
        if !status.success() {
            let _ = fs::remove_file(&tmp);
            return Err(PrepareError::Command {
                command: format!("xz -dc {}", src.display()),
                status: status.to_string(),
                stderr: String::new(),
            });
        }
        fs::rename(&tmp, &dst).map_err(io_err("renaming into", &dst))?;
    }
    Ok(())
}

fn write_current(base: &Path, version: &str) -> Result<(), PrepareError> {
    let tmp = temp_name(base, "current");
    fs::write(&tmp, format!("{version}\n")).map_err(io_err("writing", &tmp))?;
    let current = base.join("current");
    fs::rename(&tmp, &current).map_err(io_err("renaming into", &current))
}

/// How much work [`prepare`] may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// Use the cached `current` version if it is complete; ask apt only otherwise.
    IfMissing,
    /// Ask apt for the current version (fetching it if it is new).
    Resolve,
}

/// Makes sure host packages and the node kernel are present; returns the kernel.
pub fn prepare(refresh: Refresh) -> Result<NodeKernel, PrepareError> {
    ensure_host_packages()?;
    let base = node_cache();
    if refresh == Refresh::IfMissing {
        if let Ok(v) = fs::read_to_string(base.join("current")) {
            let dir = base.join(v.trim());
            if dir.join("package").is_file() {
                decompress_modules(&dir.join("root"), &dir.join("modules"))?;
            }
            if let Some(k) = load(&dir) {
                ensure_vmlinux(&dir, &k.vmlinuz)?;
                return load(&dir).ok_or_else(|| PrepareError::Missing {
                    what: "complete kernel and modules".into(),
                    path: dir.clone(),
                });
            }
        }
    }
    fs::create_dir_all(&base).map_err(io_err("creating", &base))?;
    let meta = std::env::var(META_ENV)
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| DEFAULT_META.to_owned());
    let (package, version) = resolve(&meta)?;
    let dir = fetch(&base, &package, &version)?;
    decompress_modules(&dir.join("root"), &dir.join("modules"))?;
    if let Some(k) = load(&dir) {
        ensure_vmlinux(&dir, &k.vmlinuz)?;
    }
    let kernel = load(&dir).ok_or_else(|| PrepareError::Missing {
        what: "complete kernel and modules".into(),
        path: dir.clone(),
    })?;
    write_current(&base, &version)?;
    Ok(kernel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhost_vsock_modules_are_extra_modules_in_load_order() {
        let names: Vec<&str> = EXTRA_MODULES.iter().map(|(n, _)| *n).collect();
        assert_eq!(names[..5], VHOST_VSOCK);
        assert_eq!(names[5..12], CNI_NET);
        assert_eq!(names[12..], CNI_PORTMAP);
        let k = NodeKernel {
            dir: PathBuf::from("/nonexistent"),
            version: String::new(),
            package: String::new(),
            vmlinuz: PathBuf::new(),
            boot_image: PathBuf::new(),
            modules: Vec::new(),
        };
        assert!(k.extra_module("vhost_vsock").is_err());
        assert!(k.extra_module("kvm").is_err());
    }

    #[test]
    fn depends_output_yields_image_package() {
        let out =
            "linux-image-6.12-cloud-amd64\n  Depends: linux-image-6.12.117+deb12-cloud-amd64\n";
        assert_eq!(
            image_dependency(out).as_deref(),
            Some("linux-image-6.12.117+deb12-cloud-amd64")
        );
        assert_eq!(image_dependency("foo\n  Depends: kmod\n"), None);
    }

    #[test]
    fn bzimage_payload_is_located_from_the_setup_header() {
        let mut img = vec![0u8; 0x1000];
        img[0x1f1] = 1; // setup_sects: code starts at (1 + 1) * 512 = 0x400
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x248..0x24c].copy_from_slice(&0x10u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&8u32.to_le_bytes());
        img[0x410..0x418].copy_from_slice(&[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3, 4]);
        assert_eq!(bzimage_payload(&img), Some(&[0x28, 0xb5, 0x2f, 0xfd][..]));
        img[0x202] = b'X';
        assert_eq!(bzimage_payload(&img), None);
    }

    #[test]
    fn show_output_field_is_found() {
        let show = "Package: x\nVersion: 6.12.117-1~deb12u1\nSize: 1\n";
        assert_eq!(field(show, "Version"), Some("6.12.117-1~deb12u1"));
        assert_eq!(field(show, "Depends"), None);
    }
}
