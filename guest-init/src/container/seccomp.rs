//! The seccomp profiles a container can get: the built-in runtime default (allow
//! everything except the syscalls no container needs), a caller-supplied OCI
//! `linux.seccomp` object, or none.
//!
//! The runtime default is deliberately a deny list: the VM is the isolation boundary,
//! the profile only removes the kernel's most dangerous doors (modules, kexec, bpf,
//! keyrings, the clock, mounts and namespaces) from the workload's reach.

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompBuilder, LinuxSyscallBuilder,
};

/// Syscalls refused with `EPERM` by the runtime default profile.
pub const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "adjtimex",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "delete_module",
    "finit_module",
    "init_module",
    "ioperm",
    "iopl",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "name_to_handle_at",
    "open_by_handle_at",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "syslog",
    "umount2",
    "unshare",
    "userfaultfd",
];

/// A custom profile could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SeccompProfileError {
    /// `seccomp_json` is not an OCI `linux.seccomp` object.
    #[error("security.seccomp_json is not a valid OCI linux.seccomp object: {0}")]
    Json(#[source] serde_json::Error),
    /// CUSTOM without a profile.
    #[error("security.seccomp is CUSTOM but security.seccomp_json is empty")]
    Empty,
    /// The profile needs a seccomp agent, which the guest does not run.
    #[error("security.seccomp_json uses SCMP_ACT_NOTIFY or a listener, which the guest does not support")]
    Notify,
}

/// The runtime default profile: allow by default, `EPERM` for [`DENIED_SYSCALLS`], on
/// all three x86 ABIs so that a 32-bit binary cannot take the other door.
pub fn runtime_default() -> LinuxSeccomp {
    let names: Vec<String> = DENIED_SYSCALLS.iter().map(|s| (*s).to_owned()).collect();
    let rule = LinuxSyscallBuilder::default()
        .names(names)
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(libc::EPERM as u32)
        .build()
        // The builder only fails on missing required fields; all are set.
        .unwrap_or_default();
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ])
        .syscalls(vec![rule])
        .build()
        .unwrap_or_default()
}

/// Parses a CUSTOM profile (the JSON of an OCI `linux.seccomp` object).
pub fn parse_custom(json: &str) -> Result<LinuxSeccomp, SeccompProfileError> {
    if json.trim().is_empty() {
        return Err(SeccompProfileError::Empty);
    }
    let profile: LinuxSeccomp = serde_json::from_str(json).map_err(SeccompProfileError::Json)?;
    let notifies = profile.default_action() == LinuxSeccompAction::ScmpActNotify
        || profile.listener_path().is_some()
        || profile
            .syscalls()
            .iter()
            .flatten()
            .any(|s| s.action() == LinuxSeccompAction::ScmpActNotify);
    if notifies {
        return Err(SeccompProfileError::Notify);
    }
    Ok(profile)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_default_allows_by_default_and_denies_with_eperm() {
        let profile = runtime_default();
        assert_eq!(profile.default_action(), LinuxSeccompAction::ScmpActAllow);
        let rules = profile.syscalls().as_ref().unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(rules[0].errno_ret(), Some(libc::EPERM as u32));
        for name in ["kexec_load", "bpf", "mount", "unshare", "ptrace", "keyctl"] {
            assert!(rules[0].names().iter().any(|n| n == name), "{name}");
        }
        assert!(!rules[0].names().iter().any(|n| n == "read"));
    }

    #[test]
    fn runtime_default_covers_the_32_bit_abis() {
        let archs = runtime_default().architectures().clone().unwrap();
        assert!(archs.contains(&Arch::ScmpArchX86));
        assert!(archs.contains(&Arch::ScmpArchX32));
        assert!(archs.contains(&Arch::ScmpArchX86_64));
    }

    #[test]
    fn runtime_default_serializes_as_oci_json() {
        let json = serde_json::to_value(runtime_default()).unwrap();
        assert_eq!(json["defaultAction"], "SCMP_ACT_ALLOW");
        assert_eq!(json["syscalls"][0]["action"], "SCMP_ACT_ERRNO");
    }

    #[test]
    fn parse_custom_docker_style_profile_is_accepted() {
        let profile = parse_custom(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":1,
                "architectures":["SCMP_ARCH_X86_64"],
                "syscalls":[{"names":["read","write","exit_group"],"action":"SCMP_ACT_ALLOW"}]}"#,
        )
        .unwrap();
        assert_eq!(profile.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(profile.syscalls().as_ref().unwrap()[0].names().len(), 3);
    }

    #[test]
    fn parse_custom_bad_json_says_which_field() {
        let err = parse_custom("{\"defaultAction\": 7}").unwrap_err();
        assert!(matches!(err, SeccompProfileError::Json(_)));
        assert!(
            err.to_string().starts_with("security.seccomp_json is not"),
            "{err}"
        );
    }

    #[test]
    fn parse_custom_empty_is_refused() {
        assert!(matches!(
            parse_custom("  "),
            Err(SeccompProfileError::Empty)
        ));
    }

    #[test]
    fn parse_custom_notify_is_refused() {
        let err = parse_custom(
            r#"{"defaultAction":"SCMP_ACT_ALLOW",
                "syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_NOTIFY"}]}"#,
        )
        .unwrap_err();
        assert!(matches!(err, SeccompProfileError::Notify));
    }
}
