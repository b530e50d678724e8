//! Deciding where a KVM test runs: on the host's own `/dev/kvm`, or inside the nested
//! KVM node (see `shared/notes/platform.md`).
//!
//! The host's KVM can run a standard Linux guest only when `/dev/kvm` exists, it is not
//! KVM-PVM (`/sys/module/kvm_pvm` absent: PVM cannot run unpatched guest kernels) and
//! the CPU advertises hardware virtualisation (`vmx` or `svm` in `/proc/cpuinfo`).
//! `ATOLL_WHERE=host|node` overrides the decision (`node` is handy to exercise the
//! nested path on a real KVM host).

use std::fmt;
use std::path::Path;

/// Environment variable that forces the decision: `host` or `node`.
pub const WHERE_ENV: &str = "ATOLL_WHERE";

const NODE_SUFFIX: &str = "using the nested KVM node (L1 under QEMU TCG with emulated AMD SVM)";

/// Where KVM workloads run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Where {
    /// The host's `/dev/kvm` is a real hardware KVM.
    HostKvm,
    /// The nested node is needed; the string says why, in one line.
    NestedNode(String),
}

/// What the decision is based on, gathered from the host (or made up by a test).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// `/dev/kvm` exists.
    pub dev_kvm: bool,
    /// `/sys/module/kvm_pvm` exists.
    pub kvm_pvm: bool,
    /// `/proc/cpuinfo` flags include `vmx` or `svm`.
    pub virt_flags: bool,
    /// Value of `ATOLL_WHERE`, if set.
    pub forced: Option<String>,
}

impl HostFacts {
    /// Reads the facts from this machine.
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self {
            dev_kvm: Path::new("/dev/kvm").exists(),
            kvm_pvm: Path::new("/sys/module/kvm_pvm").exists(),
            virt_flags: cpuinfo_has_virt(&cpuinfo),
            forced: std::env::var(WHERE_ENV).ok().filter(|v| !v.is_empty()),
        }
    }
}

/// True if any `flags` line of a cpuinfo text lists `vmx` or `svm`.
pub fn cpuinfo_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .filter_map(|l| l.split_once(':'))
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

impl Where {
    /// Decides for this machine.
    pub fn detect() -> Where {
        Where::decide(&HostFacts::probe())
    }

    /// Decides from given facts.
    pub fn decide(f: &HostFacts) -> Where {
        match f.forced.as_deref() {
            Some("host") => return Where::HostKvm,
            Some("node") => {
                return Where::NestedNode(format!("{WHERE_ENV}=node: {NODE_SUFFIX}"));
            }
            _ => {}
        }
        if !f.dev_kvm {
            Where::NestedNode(format!("host has no /dev/kvm: {NODE_SUFFIX}"))
        } else if f.kvm_pvm {
            Where::NestedNode(format!(
                "host /dev/kvm is KVM-PVM, which cannot run a standard guest kernel: {NODE_SUFFIX}"
            ))
        } else if !f.virt_flags {
            Where::NestedNode(format!(
                "host CPU shows no vmx/svm, so /dev/kvm is not hardware KVM: {NODE_SUFFIX}"
            ))
        } else {
            Where::HostKvm
        }
    }

    /// True for [`Where::NestedNode`].
    pub fn is_nested(&self) -> bool {
        matches!(self, Where::NestedNode(_))
    }
}

impl fmt::Display for Where {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Where::HostKvm => f.write_str("host /dev/kvm is hardware KVM: running on the host"),
            Where::NestedNode(reason) => f.write_str(reason),
        }
    }
}

/// Where this machine runs KVM workloads (see [`Where::detect`]).
pub fn host_kvm_usable() -> Where {
    Where::detect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(dev_kvm: bool, kvm_pvm: bool, virt_flags: bool) -> HostFacts {
        HostFacts {
            dev_kvm,
            kvm_pvm,
            virt_flags,
            forced: None,
        }
    }

    #[test]
    fn where_real_kvm_with_svm_is_host() {
        assert_eq!(Where::decide(&facts(true, false, true)), Where::HostKvm);
    }

    #[test]
    fn where_pvm_host_is_nested_with_reason() {
        let w = Where::decide(&facts(true, true, false));
        assert!(w.is_nested());
        assert!(w.to_string().starts_with("host /dev/kvm is KVM-PVM"));
    }

    #[test]
    fn where_no_dev_kvm_is_nested() {
        let w = Where::decide(&facts(false, false, true));
        assert!(w.to_string().starts_with("host has no /dev/kvm"));
    }

    #[test]
    fn where_no_virt_flags_is_nested() {
        assert!(Where::decide(&facts(true, false, false)).is_nested());
    }

    #[test]
    fn where_env_override_wins() {
        let mut f = facts(true, false, true);
        f.forced = Some("node".into());
        assert!(Where::decide(&f).is_nested());
        let mut f = facts(false, true, false);
        f.forced = Some("host".into());
        assert_eq!(Where::decide(&f), Where::HostKvm);
    }

    #[test]
    fn cpuinfo_flags_are_matched_as_words() {
        assert!(cpuinfo_has_virt(
            "processor: 0\nflags\t\t: fpu vme svm lm\n"
        ));
        assert!(!cpuinfo_has_virt("flags\t\t: fpu vmx_ept svmx\n"));
        assert!(!cpuinfo_has_virt("model name: svm vmx\n"));
    }
}
