//! Opening `/dev/kvm` and deciding whether it can run a standard Linux guest.
//!
//! KVM-PVM ("pagetable-based virtual machine") exposes `/dev/kvm` on hosts without
//! hardware virtualisation, but it only runs PVM-patched guest kernels: a standard
//! kernel dies in an emulation failure. We detect it up front and say so in one line.

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// Why KVM cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// No /dev/kvm.
    #[error(
        "/dev/kvm does not exist: this machine offers no KVM; run on a host with hardware \
         virtualisation (or nested virtualisation enabled), or inside the nested test node \
         (`atoll-node run -- ...`)"
    )]
    NoDevice,
    /// No permission.
    #[error("cannot open /dev/kvm: permission denied; run as root or join the `kvm` group")]
    PermissionDenied,
    /// Any other open failure.
    #[error("cannot open /dev/kvm")]
    Open(#[source] std::io::Error),
    /// KVM-PVM.
    #[error(
        "/dev/kvm is KVM-PVM (module kvm_pvm): it runs only PVM-patched guest kernels, and a \
         standard Linux guest cannot boot on it; run on a host with hardware KVM (vmx/svm), or \
         inside the nested test node (`atoll-node run -- ...`), which `make demo` and `make \
         test` use automatically"
    )]
    Pvm,
    /// Unexpected API version.
    #[error("/dev/kvm speaks API version {0}, expected 12")]
    ApiVersion(i32),
    /// A capability we rely on is missing.
    #[error("KVM lacks the capability {0}, which atoll-vmm needs")]
    MissingCap(&'static str),
}

/// Where the KVM module of this host comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmFlavor {
    /// Hardware virtualisation (kvm_intel / kvm_amd).
    Hardware,
    /// KVM-PVM.
    Pvm,
}

/// Tells the flavour from sysfs (`/sys/module/kvm_pvm` present means PVM), looking
/// below `sys_root` so tests can point it at a fake tree.
pub fn flavor_at(sys_root: &Path) -> KvmFlavor {
    if sys_root.join("module/kvm_pvm").exists() {
        KvmFlavor::Pvm
    } else {
        KvmFlavor::Hardware
    }
}

/// Opens /dev/kvm after checking that it is a KVM a standard guest can run on, and
/// that it has what we need.
pub fn open() -> Result<Kvm, KvmError> {
    if !Path::new("/dev/kvm").exists() {
        return Err(KvmError::NoDevice);
    }
    if flavor_at(Path::new("/sys")) == KvmFlavor::Pvm {
        return Err(KvmError::Pvm);
    }
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::EACCES | libc::EPERM => KvmError::PermissionDenied,
        libc::ENOENT => KvmError::NoDevice,
        _ => KvmError::Open(std::io::Error::from_raw_os_error(e.errno())),
    })?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(KvmError::ApiVersion(v));
    }
    for (cap, name) in [
        (Cap::Irqchip, "IRQCHIP"),
        (Cap::Irqfd, "IRQFD"),
        (Cap::Ioeventfd, "IOEVENTFD"),
        (Cap::Pit2, "PIT2"),
        (Cap::UserMemory, "USER_MEMORY"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// Another handle on the same `/dev/kvm` open file: how a VMM that waits for a
/// snapshot (jailed, so it cannot open `/dev/kvm` again) tries a second load after
/// a first one failed.
pub fn duplicate(kvm: &Kvm) -> std::io::Result<Kvm> {
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
    // SAFETY: `kvm` owns an open fd for the duration of the call; dup does not
    // touch memory.
    let fd = unsafe { libc::dup(kvm.as_raw_fd()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by dup, is open on /dev/kvm and owned by
    // nothing else; the OwnedFd takes it.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: the fd is an open /dev/kvm file whose ownership passes to the Kvm,
    // which closes it when dropped.
    Ok(unsafe { Kvm::from_raw_fd(owned.into_raw_fd()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_flavor_pvm_when_module_present() {
        let dir = std::env::temp_dir().join(format!("atoll-sys-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("module/kvm")).unwrap();
        assert_eq!(flavor_at(&dir), KvmFlavor::Hardware);
        std::fs::create_dir_all(dir.join("module/kvm_pvm")).unwrap();
        assert_eq!(flavor_at(&dir), KvmFlavor::Pvm);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kvm_pvm_message_says_what_to_do() {
        let msg = KvmError::Pvm.to_string();
        assert!(msg.contains("KVM-PVM"));
        assert!(msg.contains("standard Linux guest cannot boot"));
        assert!(msg.contains("nested"));
    }
}
