//! The OCI runtime spec of a container: a pure function of the request, the resolved
//! user and the runtime's paths, so every rule (defaults, capabilities, namespaces,
//! mounts, limits, seccomp) is tested without root.
//!
//! The namespaces are the pod's shape: each container gets its own `pid`, `mount`,
//! `cgroup` (and `uts` when it names a hostname) but shares the VM's network and IPC,
//! so the containers of a VM are one pod.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use atoll_agent_proto::v1;
use oci_spec::runtime::{
    BoxBuilder, Capabilities, Capability, LinuxCapabilities, LinuxCpuBuilder, LinuxMemoryBuilder,
    LinuxNamespace, LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, LinuxSeccomp,
    Mount, PosixRlimit, PosixRlimitBuilder, PosixRlimitType, Process, Root, Spec, User,
};

use super::seccomp;
use super::user::ResolvedUser;

/// `PATH` when the request has none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Docker's default capability set.
pub const DEFAULT_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Every capability of Linux 6.x (what `privileged` and `ALL` mean).
pub const ALL_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Docker's default masked paths.
pub const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Docker's default read-only paths.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Mount options a request may carry.
const ALLOWED_MOUNT_OPTIONS: &[&str] = &[
    "ro",
    "rw",
    "nosuid",
    "nodev",
    "noexec",
    "relatime",
    "norelatime",
    "noatime",
    "private",
    "rprivate",
    "slave",
    "rslave",
];

/// Pod files bind-mounted into every container at `/etc/<name>` when they exist.
pub const POD_FILES: &[&str] = &["resolv.conf", "hostname", "hosts"];

/// Longest path or argument accepted.
const MAX_PATH: usize = 4096;

/// The request cannot become a spec; the message names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {problem}")]
pub struct SpecError {
    /// The request field (`process.cwd`, `mounts[2].destination`...).
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Where a request mount's source lives in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountSource {
    /// A pod tmpfs volume, `<root>/volumes/<name>`.
    Volume(String),
    /// A read-only disk, mounted at `<root>/disks/<serial>`.
    Disk(String),
    /// A copied volume, `<root>/copies/<name>`, or one top-level entry of it.
    Copy {
        /// The volume.
        name: String,
        /// The entry bound instead of the whole volume.
        entry: Option<String>,
    },
}

/// One validated request mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestMount {
    /// Absolute, normalized path in the container.
    pub destination: String,
    /// What to bind there.
    pub source: MountSource,
    /// Extra options (`ro`, `nosuid`...).
    pub options: Vec<String>,
}

/// The runtime's paths a spec refers to.
#[derive(Debug, Clone)]
pub struct SpecPaths {
    /// The state root (`/run/atoll`).
    pub root: PathBuf,
    /// The container's prepared rootfs.
    pub rootfs: PathBuf,
    /// The [`POD_FILES`] that exist under `<root>/pod/`.
    pub pod_files: Vec<&'static str>,
    /// The pod's shared PID namespace (`/proc/<pid>/ns/pid`), for a container that
    /// asked for it; None: a namespace of its own.
    pub pid_ns: Option<PathBuf>,
}

impl SpecPaths {
    /// Where a pod volume lives.
    pub fn volume_dir(root: &Path, name: &str) -> PathBuf {
        root.join("volumes").join(name)
    }

    /// Where a data disk is mounted.
    pub fn disk_dir(root: &Path, serial: &str) -> PathBuf {
        root.join("disks").join(serial)
    }
}

/// Checks that `path` is absolute and normalized (no `.`, `..`, `//` or trailing `/`).
pub fn check_absolute(field: &str, path: &str) -> Result<(), SpecError> {
    if path.len() > MAX_PATH || path.contains('\0') {
        return Err(invalid(field, "too long or contains NUL"));
    }
    if !path.starts_with('/') {
        return Err(invalid(field, format!("{path:?} is not an absolute path")));
    }
    if path == "/" {
        return Ok(());
    }
    let normalized = path[1..]
        .split('/')
        .all(|c| !c.is_empty() && c != "." && c != "..");
    if !normalized {
        return Err(invalid(
            field,
            format!("{path:?} is not normalized (no \".\", \"..\", \"//\" or trailing \"/\")"),
        ));
    }
    Ok(())
}

fn check_text(field: &str, s: &str) -> Result<(), SpecError> {
    if s.contains('\0') {
        return Err(invalid(field, "contains a NUL byte"));
    }
    if s.len() > 128 * 1024 {
        return Err(invalid(field, "longer than 128 KiB"));
    }
    Ok(())
}

/// Parses a capability name: `CAP_NET_ADMIN`, `net_admin`.
pub fn parse_capability(field: &str, name: &str) -> Result<Capability, SpecError> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    Capability::from_str(bare).map_err(|_| invalid(field, format!("unknown capability {name:?}")))
}

fn cap_set(names: &[&str]) -> Capabilities {
    names
        .iter()
        .filter_map(|n| Capability::from_str(n).ok())
        .collect()
}

/// The capability sets of a process run as `uid`: Docker's rules (default set, drop,
/// then add; `ALL` in either; everything when privileged). A non-root process keeps
/// only the explicitly added capabilities in its effective, permitted, inheritable and
/// ambient sets, so that they survive `execve` as that user.
pub fn capabilities(sec: &v1::Security, uid: u32) -> Result<LinuxCapabilities, SpecError> {
    let is_all = |n: &String| n.trim().eq_ignore_ascii_case("ALL");
    let mut added = Capabilities::new();
    let mut add_all = false;
    for name in &sec.add_capabilities {
        if is_all(name) {
            add_all = true;
        } else {
            added.insert(parse_capability("security.add_capabilities", name)?);
        }
    }
    let mut set = if sec.privileged || add_all {
        cap_set(ALL_CAPS)
    } else if sec.drop_capabilities.iter().any(is_all) {
        Capabilities::new()
    } else {
        cap_set(DEFAULT_CAPS)
    };
    if !sec.privileged {
        for name in &sec.drop_capabilities {
            if !is_all(name) {
                let cap = parse_capability("security.drop_capabilities", name)?;
                if !added.contains(&cap) && !add_all {
                    set.remove(&cap);
                }
            }
        }
    }
    set.extend(added.iter().copied());
    let mut caps = LinuxCapabilities::default();
    caps.set_bounding(Some(set.clone()));
    if uid == 0 {
        caps.set_effective(Some(set.clone()));
        caps.set_permitted(Some(set));
        caps.set_inheritable(Some(Capabilities::new()));
        caps.set_ambient(Some(Capabilities::new()));
    } else {
        let explicit: Capabilities = if add_all { set } else { added };
        caps.set_effective(Some(explicit.clone()));
        caps.set_permitted(Some(explicit.clone()));
        caps.set_inheritable(Some(explicit.clone()));
        caps.set_ambient(Some(explicit));
    }
    Ok(caps)
}

/// The rlimits of a process: known names, soft <= hard, each once.
pub fn rlimits(limits: &[v1::Rlimit]) -> Result<Vec<PosixRlimit>, SpecError> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(limits.len().min(32));
    for (i, l) in limits.iter().enumerate() {
        let field = format!("process.rlimits[{i}]");
        let typ = PosixRlimitType::from_str(&l.r#type.trim().to_ascii_uppercase())
            .map_err(|_| invalid(&field, format!("unknown rlimit {:?}", l.r#type)))?;
        if l.soft > l.hard {
            return Err(invalid(
                &field,
                format!("soft limit {} is above the hard limit {}", l.soft, l.hard),
            ));
        }
        if !seen.insert(typ.to_string()) {
            return Err(invalid(&field, format!("{} is given twice", l.r#type)));
        }
        let r = PosixRlimitBuilder::default()
            .typ(typ)
            .soft(l.soft)
            .hard(l.hard)
            .build()
            .map_err(|e| invalid(&field, e.to_string()))?;
        out.push(r);
    }
    Ok(out)
}

/// The OCI process of `p` run as `user` under `sec` (used for the init process and
/// for exec).
pub fn build_process(
    p: &v1::Process,
    user: &ResolvedUser,
    sec: &v1::Security,
) -> Result<Process, SpecError> {
    if p.args.is_empty() {
        return Err(invalid(
            "process.args",
            "is empty: there is no command to run",
        ));
    }
    for a in &p.args {
        check_text("process.args", a)?;
    }
    let mut env = Vec::with_capacity(p.env.len() + 3);
    for e in &p.env {
        check_text("process.env", e)?;
        match e.split_once('=') {
            Some((k, _)) if !k.is_empty() => env.push(e.clone()),
            _ => return Err(invalid("process.env", format!("{e:?} is not KEY=VALUE"))),
        }
    }
    let has = |env: &[String], key: &str| env.iter().any(|e| e.split('=').next() == Some(key));
    if !has(&env, "PATH") {
        env.push(DEFAULT_PATH.to_owned());
    }
    if !has(&env, "HOME") {
        env.push(format!("HOME={}", user.home));
    }
    if p.terminal && !has(&env, "TERM") {
        env.push("TERM=xterm".to_owned());
    }
    let cwd = if p.cwd.is_empty() { "/" } else { &p.cwd };
    check_absolute("process.cwd", cwd)?;

    let mut oci_user = User::default();
    oci_user.set_uid(user.uid);
    oci_user.set_gid(user.gid);
    oci_user.set_additional_gids(if user.additional_gids.is_empty() {
        None
    } else {
        Some(user.additional_gids.clone())
    });

    let mut process = Process::default();
    process.set_terminal(Some(p.terminal));
    process.set_console_size(None);
    if p.terminal && p.rows > 0 && p.cols > 0 {
        let size = BoxBuilder::default()
            .height(u64::from(p.rows))
            .width(u64::from(p.cols))
            .build()
            .map_err(|e| invalid("process.rows", e.to_string()))?;
        process.set_console_size(Some(size));
    }
    process.set_user(oci_user);
    process.set_args(Some(p.args.clone()));
    process.set_env(Some(env));
    process.set_cwd(PathBuf::from(cwd));
    process.set_capabilities(Some(capabilities(sec, user.uid)?));
    process.set_rlimits(Some(rlimits(&p.rlimits)?));
    // `Some(false)` would make libcontainer load seccomp after dropping capabilities
    // without no_new_privs, which fails for a non-root user: absent means "off".
    process.set_no_new_privileges(sec.no_new_privileges.then_some(true));
    process.set_apparmor_profile(None);
    // The agent runs at -1000 (the OOM killer's last choice) and children inherit
    // it: a container's processes start at the default again.
    process.set_oom_score_adj(Some(0));
    process.set_selinux_label(None);
    Ok(process)
}

/// The seccomp profile `sec` asks for, `None` when unconfined or privileged.
pub fn seccomp_for(sec: &v1::Security) -> Result<Option<LinuxSeccomp>, SpecError> {
    if sec.privileged {
        return Ok(None);
    }
    match v1::security::Seccomp::try_from(sec.seccomp) {
        Ok(v1::security::Seccomp::RuntimeDefault) => Ok(Some(seccomp::runtime_default())),
        Ok(v1::security::Seccomp::Unconfined) => Ok(None),
        Ok(v1::security::Seccomp::Custom) => seccomp::parse_custom(&sec.seccomp_json)
            .map(Some)
            .map_err(|e| invalid("security.seccomp_json", e.to_string())),
        Err(_) => Err(invalid(
            "security.seccomp",
            format!("unknown profile kind {}", sec.seccomp),
        )),
    }
}

/// Validates and classifies the request's mounts.
pub fn plan_mounts(mounts: &[v1::Mount]) -> Result<Vec<RequestMount>, SpecError> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(mounts.len().min(64));
    for (i, m) in mounts.iter().enumerate() {
        let field = |name: &str| format!("mounts[{i}].{name}");
        check_absolute(&field("destination"), &m.destination)?;
        let d = m.destination.as_str();
        let reserved = ["/", "/proc", "/sys", "/dev", "/dev/pts"];
        if reserved.contains(&d) || d.starts_with("/proc/") || d.starts_with("/sys/") {
            return Err(invalid(
                field("destination"),
                format!("{d:?} is managed by the runtime"),
            ));
        }
        if !seen.insert(d) {
            return Err(invalid(
                field("destination"),
                format!("{d:?} is mounted twice"),
            ));
        }
        let name_ok = |s: &str| atoll_agent_proto::validate_id(s).is_ok();
        let source = match m.r#type.as_str() {
            "tmpfs" if name_ok(&m.source) => MountSource::Volume(m.source.clone()),
            "tmpfs" => {
                return Err(invalid(
                    field("source"),
                    format!(
                        "{:?} is not a volume name ([A-Za-z0-9_.-], up to 64)",
                        m.source
                    ),
                ))
            }
            "bind" => {
                let copy = m
                    .source
                    .strip_prefix("copy:")
                    .map(|c| match c.split_once('/') {
                        Some((name, entry)) => (name, Some(entry)),
                        None => (c, None),
                    });
                match (m.source.strip_prefix("disk:"), copy) {
                    (Some(serial), _) if name_ok(serial) => MountSource::Disk(serial.to_owned()),
                    (_, Some((name, entry)))
                        if name_ok(name) && entry.is_none_or(name_ok) =>
                    {
                        MountSource::Copy {
                            name: name.to_owned(),
                            entry: entry.map(str::to_owned),
                        }
                    }
                    _ => {
                        return Err(invalid(
                            field("source"),
                            format!(
                                "{:?}: only \"disk:<serial>\", \"copy:<name>\" and \"copy:<name>/<entry>\" can be bound",
                                m.source
                            ),
                        ))
                    }
                }
            }
            other => {
                return Err(invalid(
                    field("type"),
                    format!("{other:?} is not \"tmpfs\" or \"bind\""),
                ))
            }
        };
        for o in &m.options {
            if !ALLOWED_MOUNT_OPTIONS.contains(&o.as_str()) {
                return Err(invalid(
                    field("options"),
                    format!("{o:?} is not one of {}", ALLOWED_MOUNT_OPTIONS.join(", ")),
                ));
            }
        }
        out.push(RequestMount {
            destination: m.destination.clone(),
            source,
            options: m.options.clone(),
        });
    }
    Ok(out)
}

/// Checks a container hostname (RFC 1123 characters, up to 64).
pub fn check_hostname(name: &str) -> Result<(), SpecError> {
    let ok = name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "hostname",
            format!("{name:?} is not a host name (letters, digits, '-', '.', up to 64)"),
        ))
    }
}

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Mount {
    let mut m = Mount::default();
    m.set_destination(PathBuf::from(dest));
    m.set_typ(Some(typ.to_owned()));
    m.set_source(Some(PathBuf::from(source)));
    m.set_options(Some(options.iter().map(|s| (*s).to_owned()).collect()));
    m
}

fn system_mounts(privileged: bool) -> Vec<Mount> {
    let sys_ro: &[&str] = if privileged {
        &["nosuid", "noexec", "nodev"]
    } else {
        &["nosuid", "noexec", "nodev", "ro"]
    };
    let cg_ro: &[&str] = if privileged {
        &["nosuid", "noexec", "nodev", "relatime"]
    } else {
        &["nosuid", "noexec", "nodev", "relatime", "ro"]
    };
    vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount("/sys", "sysfs", "sysfs", sys_ro),
        mount("/sys/fs/cgroup", "cgroup", "cgroup", cg_ro),
    ]
}

fn namespace(typ: LinuxNamespaceType) -> LinuxNamespace {
    let mut ns = LinuxNamespace::default();
    ns.set_typ(typ);
    ns.set_path(None);
    ns
}

/// The cgroup (relative to the v2 root) of container `id`.
pub fn cgroup_path(id: &str) -> PathBuf {
    PathBuf::from("/atoll").join(id)
}

fn resources(r: Option<&v1::Resources>) -> Result<oci_spec::runtime::LinuxResources, SpecError> {
    let mut b = LinuxResourcesBuilder::default().devices(Vec::new());
    let Some(r) = r else {
        return b.build().map_err(|e| invalid("resources", e.to_string()));
    };
    if r.memory_limit_bytes > 0 {
        let limit = i64::try_from(r.memory_limit_bytes)
            .map_err(|_| invalid("resources.memory_limit_bytes", "is out of range"))?;
        let memory = LinuxMemoryBuilder::default()
            .limit(limit)
            .swap(limit)
            .build()
            .map_err(|e| invalid("resources.memory_limit_bytes", e.to_string()))?;
        b = b.memory(memory);
    }
    if r.cpu_quota_us > 0 {
        let period = if r.cpu_period_us == 0 {
            100_000
        } else {
            r.cpu_period_us
        };
        if !(1_000..=1_000_000).contains(&period) {
            return Err(invalid(
                "resources.cpu_period_us",
                format!("{period} is outside 1000..=1000000"),
            ));
        }
        let quota = i64::try_from(r.cpu_quota_us)
            .ok()
            .filter(|q| *q >= 1_000)
            .ok_or_else(|| invalid("resources.cpu_quota_us", "must be at least 1000"))?;
        let cpu = LinuxCpuBuilder::default()
            .quota(quota)
            .period(period)
            .build()
            .map_err(|e| invalid("resources.cpu_quota_us", e.to_string()))?;
        b = b.cpu(cpu);
    }
    if r.pids_limit > 0 {
        let limit = i64::try_from(r.pids_limit)
            .map_err(|_| invalid("resources.pids_limit", "is out of range"))?;
        let pids = LinuxPidsBuilder::default()
            .limit(limit)
            .build()
            .map_err(|e| invalid("resources.pids_limit", e.to_string()))?;
        b = b.pids(pids);
    }
    b.build().map_err(|e| invalid("resources", e.to_string()))
}

/// The cgroup v2 files (and values) that give a running container the limits
/// `r`, checked as at creation; 0 lifts a limit.
pub fn cgroup_limits(r: &v1::Resources) -> Result<Vec<(&'static str, String)>, SpecError> {
    // The same checks as a new container's.
    resources(Some(r))?;
    let max = |v: u64| {
        if v == 0 {
            "max".to_owned()
        } else {
            v.to_string()
        }
    };
    let period = if r.cpu_period_us == 0 {
        100_000
    } else {
        r.cpu_period_us
    };
    Ok(vec![
        ("memory.max", max(r.memory_limit_bytes)),
        // As at creation: memory and swap together are the limit (no swap).
        (
            "memory.swap.max",
            if r.memory_limit_bytes == 0 {
                "max".into()
            } else {
                "0".into()
            },
        ),
        ("cpu.max", format!("{} {period}", max(r.cpu_quota_us))),
        ("pids.max", max(r.pids_limit)),
    ])
}

/// The whole spec of the container `req`, its process run as `user`.
pub fn build_spec(
    req: &v1::CreateContainer,
    user: &ResolvedUser,
    paths: &SpecPaths,
) -> Result<Spec, SpecError> {
    let default_process = v1::Process::default();
    let process = req.process.as_ref().unwrap_or(&default_process);
    let default_security = v1::Security::default();
    let sec = req.security.as_ref().unwrap_or(&default_security);
    let readonly = req.rootfs.as_ref().is_some_and(|r| r.readonly);

    let mut spec = Spec::default();
    spec.set_version("1.0.2".to_owned());
    let mut root = Root::default();
    root.set_path(paths.rootfs.clone());
    root.set_readonly(Some(readonly));
    spec.set_root(Some(root));
    spec.set_process(Some(build_process(process, user, sec)?));
    spec.set_annotations(None);
    spec.set_hooks(None);

    let mut pid = namespace(LinuxNamespaceType::Pid);
    if sec.share_pod_pid {
        let path = paths.pid_ns.clone().ok_or_else(|| {
            invalid(
                "security.share_pod_pid",
                "the pod's PID namespace is not there",
            )
        })?;
        pid.set_path(Some(path));
    }
    let mut namespaces = vec![
        pid,
        namespace(LinuxNamespaceType::Mount),
        namespace(LinuxNamespaceType::Cgroup),
    ];
    if req.hostname.is_empty() {
        spec.set_hostname(None);
    } else {
        check_hostname(&req.hostname)?;
        spec.set_hostname(Some(req.hostname.clone()));
        namespaces.push(namespace(LinuxNamespaceType::Uts));
    }

    let mut mounts = system_mounts(sec.privileged);
    for name in &paths.pod_files {
        let source = paths.root.join("pod").join(name);
        let mut m = mount(
            &format!("/etc/{name}"),
            "bind",
            "",
            &["rbind", "rprivate", "ro"],
        );
        m.set_source(Some(source));
        mounts.push(m);
    }
    for rm in plan_mounts(&req.mounts)? {
        let (source, forced_ro) = match &rm.source {
            MountSource::Volume(name) => (SpecPaths::volume_dir(&paths.root, name), false),
            MountSource::Disk(serial) => (SpecPaths::disk_dir(&paths.root, serial), true),
            MountSource::Copy { name, entry } => {
                let dir = super::rootfs::Mounts::copy_dir(&paths.root, name);
                (
                    entry.as_ref().map_or_else(|| dir.clone(), |e| dir.join(e)),
                    true,
                )
            }
        };
        let mut options = vec!["rbind".to_owned()];
        if !rm
            .options
            .iter()
            .any(|o| o.ends_with("private") || o.ends_with("slave"))
        {
            options.push("rprivate".to_owned());
        }
        options.extend(
            rm.options
                .iter()
                .filter(|o| !(forced_ro && *o == "rw"))
                .cloned(),
        );
        if forced_ro && !options.iter().any(|o| o == "ro") {
            options.push("ro".to_owned());
        }
        let mut m = mount(&rm.destination, "bind", "", &[]);
        m.set_source(Some(source));
        m.set_options(Some(options));
        mounts.push(m);
    }
    spec.set_mounts(Some(mounts));

    let mut linux = oci_spec::runtime::Linux::default();
    linux.set_namespaces(Some(namespaces));
    linux.set_cgroups_path(Some(cgroup_path(&req.id)));
    linux.set_resources(Some(resources(req.resources.as_ref())?));
    linux.set_seccomp(seccomp_for(sec)?);
    linux.set_devices(None);
    linux.set_uid_mappings(None);
    linux.set_gid_mappings(None);
    linux.set_sysctl(None);
    let (masked, readonly) = hidden_paths(sec)?;
    linux.set_masked_paths(Some(masked));
    linux.set_readonly_paths(Some(readonly));
    spec.set_linux(Some(linux));
    Ok(spec)
}

/// Most masked or read-only paths one container may list.
pub const MAX_HIDDEN_PATHS: usize = 128;

/// The masked and read-only paths of a container: the request's lists, or when
/// a list is empty Docker's defaults; none for a privileged container (which
/// sees everything, as on a node).
fn hidden_paths(sec: &v1::Security) -> Result<(Vec<String>, Vec<String>), SpecError> {
    if sec.privileged {
        return Ok((Vec::new(), Vec::new()));
    }
    let pick = |field: &str, given: &[String], defaults: &[&str]| {
        if given.is_empty() {
            return Ok(defaults.iter().map(|p| (*p).to_owned()).collect());
        }
        if given.len() > MAX_HIDDEN_PATHS {
            return Err(invalid(
                field,
                format!("{} paths, at most {MAX_HIDDEN_PATHS}", given.len()),
            ));
        }
        for (i, path) in given.iter().enumerate() {
            check_absolute(&format!("{field}[{i}]"), path)?;
        }
        Ok(given.to_vec())
    };
    Ok((
        pick("security.masked_paths", &sec.masked_paths, MASKED_PATHS)?,
        pick(
            "security.readonly_paths",
            &sec.readonly_paths,
            READONLY_PATHS,
        )?,
    ))
}

/// Whether `path` is a plain relative name (no separators or dots), as ids are.
pub fn is_plain_name(path: &str) -> bool {
    let p = Path::new(path);
    matches!(
        p.components().collect::<Vec<_>>().as_slice(),
        [Component::Normal(_)]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxSeccompAction;

    fn user(uid: u32) -> ResolvedUser {
        ResolvedUser {
            uid,
            gid: uid,
            additional_gids: vec![],
            home: if uid == 0 {
                "/root".into()
            } else {
                "/home/u".into()
            },
        }
    }

    fn paths() -> SpecPaths {
        SpecPaths {
            root: PathBuf::from("/run/atoll"),
            rootfs: PathBuf::from("/run/atoll/containers/c1/rootfs"),
            pod_files: vec![],
            pid_ns: None,
        }
    }

    fn req() -> v1::CreateContainer {
        v1::CreateContainer {
            id: "c1".into(),
            process: Some(v1::Process {
                args: vec!["/bin/sh".into()],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn spec_of(r: &v1::CreateContainer) -> Spec {
        build_spec(r, &user(0), &paths()).unwrap()
    }

    fn env_of(s: &Spec) -> Vec<String> {
        s.process().as_ref().unwrap().env().clone().unwrap()
    }

    fn caps_of(s: &Spec) -> LinuxCapabilities {
        s.process()
            .as_ref()
            .unwrap()
            .capabilities()
            .clone()
            .unwrap()
    }

    fn cap(name: &str) -> Capability {
        Capability::from_str(name).unwrap()
    }

    fn sec(f: impl FnOnce(&mut v1::Security)) -> v1::Security {
        let mut s = v1::Security::default();
        f(&mut s);
        s
    }

    #[test]
    fn build_spec_defaults_path_home_and_cwd() {
        let s = spec_of(&req());
        let env = env_of(&s);
        assert!(env.contains(&DEFAULT_PATH.to_owned()));
        assert!(env.contains(&"HOME=/root".to_owned()));
        assert!(!env.iter().any(|e| e.starts_with("TERM=")));
        assert_eq!(s.process().as_ref().unwrap().cwd(), Path::new("/"));
        assert_eq!(s.root().as_ref().unwrap().readonly(), Some(false));
        assert_eq!(s.version(), "1.0.2");
    }

    #[test]
    fn build_spec_keeps_given_path_and_adds_term_with_tty() {
        let mut r = req();
        let p = r.process.as_mut().unwrap();
        p.env = vec!["PATH=/x".into(), "A=b=c".into()];
        p.terminal = true;
        p.rows = 40;
        p.cols = 100;
        let s = spec_of(&r);
        let env = env_of(&s);
        assert_eq!(env.iter().filter(|e| e.starts_with("PATH=")).count(), 1);
        assert!(env.contains(&"PATH=/x".to_owned()));
        assert!(env.contains(&"A=b=c".to_owned()));
        assert!(env.contains(&"TERM=xterm".to_owned()));
        let proc_ = s.process().as_ref().unwrap();
        assert_eq!(proc_.terminal(), Some(true));
        let size = proc_.console_size().unwrap();
        assert_eq!((size.height(), size.width()), (40, 100));
    }

    #[test]
    fn build_process_env_without_equals_is_refused() {
        let mut r = req();
        r.process.as_mut().unwrap().env = vec!["JUSTKEY".into()];
        let err = build_spec(&r, &user(0), &paths()).unwrap_err();
        assert_eq!(err.field, "process.env");
    }

    #[test]
    fn build_process_empty_args_is_refused() {
        let mut r = req();
        r.process.as_mut().unwrap().args.clear();
        assert_eq!(
            build_spec(&r, &user(0), &paths()).unwrap_err().field,
            "process.args"
        );
    }

    #[test]
    fn build_process_relative_or_dotted_cwd_is_refused() {
        for cwd in ["tmp", "/a/../b", "/a/./b", "/a//b", "/a/"] {
            let mut r = req();
            r.process.as_mut().unwrap().cwd = cwd.into();
            let err = build_spec(&r, &user(0), &paths()).unwrap_err();
            assert_eq!(err.field, "process.cwd", "{cwd}");
        }
    }

    #[test]
    fn build_process_user_ids_and_groups() {
        let u = ResolvedUser {
            uid: 1000,
            gid: 100,
            additional_gids: vec![29, 44],
            home: "/home/app".into(),
        };
        let s = build_spec(&req(), &u, &paths()).unwrap();
        let pu = s.process().as_ref().unwrap().user().clone();
        assert_eq!((pu.uid(), pu.gid()), (1000, 100));
        assert_eq!(pu.additional_gids().clone().unwrap(), [29, 44]);
        assert!(env_of(&s).contains(&"HOME=/home/app".to_owned()));
    }

    #[test]
    fn build_process_sets_the_oom_score_back_to_the_default() {
        // The agent runs at -1000; its containers must not inherit that.
        let s = spec_of(&req());
        assert_eq!(s.process().as_ref().unwrap().oom_score_adj(), Some(0));
    }

    #[test]
    fn capabilities_root_gets_docker_default_set() {
        let caps = caps_of(&spec_of(&req()));
        let want = cap_set(DEFAULT_CAPS);
        assert_eq!(want.len(), 14);
        assert_eq!(caps.bounding().clone().unwrap(), want);
        assert_eq!(caps.effective().clone().unwrap(), want);
        assert_eq!(caps.permitted().clone().unwrap(), want);
        assert!(caps.ambient().clone().unwrap().is_empty());
        assert!(!want.contains(&cap("SYS_ADMIN")));
    }

    #[test]
    fn capabilities_add_and_drop() {
        let s = sec(|s| {
            s.add_capabilities = vec!["CAP_NET_ADMIN".into()];
            s.drop_capabilities = vec!["mknod".into(), "CAP_NET_RAW".into()];
        });
        let caps = capabilities(&s, 0).unwrap();
        let eff = caps.effective().clone().unwrap();
        assert!(eff.contains(&cap("NET_ADMIN")));
        assert!(!eff.contains(&cap("MKNOD")));
        assert!(!eff.contains(&cap("NET_RAW")));
        assert!(eff.contains(&cap("CHOWN")));
    }

    #[test]
    fn capabilities_drop_all_then_add_keeps_only_added() {
        let s = sec(|s| {
            s.drop_capabilities = vec!["ALL".into()];
            s.add_capabilities = vec!["NET_BIND_SERVICE".into()];
        });
        let eff = capabilities(&s, 0).unwrap().effective().clone().unwrap();
        assert_eq!(eff, cap_set(&["NET_BIND_SERVICE"]));
    }

    #[test]
    fn capabilities_privileged_gets_all() {
        let s = sec(|s| s.privileged = true);
        let caps = capabilities(&s, 0).unwrap();
        assert_eq!(caps.effective().clone().unwrap().len(), ALL_CAPS.len());
        assert!(caps.bounding().clone().unwrap().contains(&cap("SYS_ADMIN")));
    }

    #[test]
    fn capabilities_all_names_are_known() {
        assert_eq!(cap_set(ALL_CAPS).len(), ALL_CAPS.len());
        assert_eq!(cap_set(DEFAULT_CAPS).len(), DEFAULT_CAPS.len());
    }

    #[test]
    fn capabilities_non_root_effective_empty_unless_added() {
        let caps = capabilities(&v1::Security::default(), 1000).unwrap();
        assert!(caps.effective().clone().unwrap().is_empty());
        assert!(caps.permitted().clone().unwrap().is_empty());
        assert_eq!(caps.bounding().clone().unwrap(), cap_set(DEFAULT_CAPS));
        let s = sec(|s| s.add_capabilities = vec!["NET_BIND_SERVICE".into()]);
        let caps = capabilities(&s, 1000).unwrap();
        let want = cap_set(&["NET_BIND_SERVICE"]);
        assert_eq!(caps.effective().clone().unwrap(), want);
        assert_eq!(caps.ambient().clone().unwrap(), want);
        assert_eq!(caps.inheritable().clone().unwrap(), want);
    }

    #[test]
    fn capabilities_unknown_name_is_refused() {
        let s = sec(|s| s.add_capabilities = vec!["CAP_FLY".into()]);
        let err = capabilities(&s, 0).unwrap_err();
        assert_eq!(err.field, "security.add_capabilities");
        assert!(err.problem.contains("CAP_FLY"));
    }

    #[test]
    fn rlimits_valid_and_invalid() {
        let ok = rlimits(&[v1::Rlimit {
            r#type: "RLIMIT_NOFILE".into(),
            soft: 1024,
            hard: 4096,
        }])
        .unwrap();
        assert_eq!(ok[0].typ(), PosixRlimitType::RlimitNofile);
        assert_eq!((ok[0].soft(), ok[0].hard()), (1024, 4096));
        let bad_name = rlimits(&[v1::Rlimit {
            r#type: "RLIMIT_WINGS".into(),
            soft: 1,
            hard: 1,
        }]);
        assert!(bad_name.unwrap_err().problem.contains("RLIMIT_WINGS"));
        let inverted = rlimits(&[v1::Rlimit {
            r#type: "RLIMIT_NPROC".into(),
            soft: 10,
            hard: 5,
        }]);
        assert!(inverted
            .unwrap_err()
            .problem
            .contains("above the hard limit"));
        let twice = vec![
            v1::Rlimit {
                r#type: "RLIMIT_CORE".into(),
                soft: 0,
                hard: 0,
            };
            2
        ];
        assert!(rlimits(&twice).unwrap_err().problem.contains("twice"));
    }

    #[test]
    fn namespaces_share_network_and_ipc() {
        let s = spec_of(&req());
        let types: Vec<_> = s
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .clone()
            .unwrap()
            .iter()
            .map(|n| n.typ())
            .collect();
        assert!(types.contains(&LinuxNamespaceType::Pid));
        assert!(types.contains(&LinuxNamespaceType::Mount));
        assert!(!types.contains(&LinuxNamespaceType::Network));
        assert!(!types.contains(&LinuxNamespaceType::Ipc));
        assert!(!types.contains(&LinuxNamespaceType::Uts));
        assert!(!types.contains(&LinuxNamespaceType::User));
        assert_eq!(s.hostname(), &None);
    }

    #[test]
    fn a_container_sharing_the_pods_pid_namespace_joins_it_by_path() {
        let mut r = req();
        r.security = Some(sec(|s| s.share_pod_pid = true));
        let mut p = paths();
        p.pid_ns = Some(PathBuf::from("/proc/77/ns/pid"));
        let s = build_spec(&r, &user(0), &p).unwrap();
        let ns = s.linux().as_ref().unwrap().namespaces().clone().unwrap();
        let pid = ns
            .iter()
            .find(|n| n.typ() == LinuxNamespaceType::Pid)
            .unwrap();
        assert_eq!(pid.path().as_deref(), Some(Path::new("/proc/77/ns/pid")));
        // Without the namespace there is nothing to join.
        let err = build_spec(&r, &user(0), &paths()).unwrap_err();
        assert_eq!(err.field, "security.share_pod_pid");
        // Not asked: a namespace of its own, whatever the pod has.
        let s = build_spec(&req(), &user(0), &p).unwrap();
        let ns = s.linux().as_ref().unwrap().namespaces().clone().unwrap();
        let pid = ns
            .iter()
            .find(|n| n.typ() == LinuxNamespaceType::Pid)
            .unwrap();
        assert_eq!(pid.path(), &None);
    }

    #[test]
    fn hostname_gets_its_own_uts_namespace() {
        let mut r = req();
        r.hostname = "web-0".into();
        let s = spec_of(&r);
        assert_eq!(s.hostname().as_deref(), Some("web-0"));
        let ns = s.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert!(ns.iter().any(|n| n.typ() == LinuxNamespaceType::Uts));
        r.hostname = "bad/host".into();
        assert_eq!(
            build_spec(&r, &user(0), &paths()).unwrap_err().field,
            "hostname"
        );
    }

    fn mount_at<'a>(s: &'a Spec, dest: &str) -> Option<&'a Mount> {
        s.mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == Path::new(dest))
    }

    #[test]
    fn system_mounts_are_present_and_sys_read_only() {
        let s = spec_of(&req());
        for d in [
            "/proc",
            "/dev",
            "/dev/pts",
            "/dev/shm",
            "/dev/mqueue",
            "/sys",
            "/sys/fs/cgroup",
        ] {
            assert!(mount_at(&s, d).is_some(), "{d}");
        }
        let sys = mount_at(&s, "/sys").unwrap().options().clone().unwrap();
        assert!(sys.contains(&"ro".to_owned()));
        let pts = mount_at(&s, "/dev/pts").unwrap().options().clone().unwrap();
        assert!(pts.contains(&"newinstance".to_owned()));
    }

    #[test]
    fn pod_files_are_bound_into_etc() {
        let mut p = paths();
        p.pod_files = vec!["resolv.conf", "hosts"];
        let s = build_spec(&req(), &user(0), &p).unwrap();
        let m = mount_at(&s, "/etc/resolv.conf").unwrap();
        assert_eq!(
            m.source().as_deref(),
            Some(Path::new("/run/atoll/pod/resolv.conf"))
        );
        assert!(mount_at(&s, "/etc/hosts").is_some());
        assert!(mount_at(&s, "/etc/hostname").is_none());
    }

    #[test]
    fn volume_and_disk_mounts_bind_their_sources() {
        let mut r = req();
        r.mounts = vec![
            v1::Mount {
                destination: "/cache".into(),
                r#type: "tmpfs".into(),
                source: "cache-vol".into(),
                options: vec!["nosuid".into()],
            },
            v1::Mount {
                destination: "/data".into(),
                r#type: "bind".into(),
                source: "disk:data1".into(),
                options: vec!["rw".into()],
            },
            v1::Mount {
                destination: "/etc/config".into(),
                r#type: "bind".into(),
                source: "copy:c-abc".into(),
                options: vec!["rw".into()],
            },
            v1::Mount {
                destination: "/etc/one.conf".into(),
                r#type: "bind".into(),
                source: "copy:c-def/file".into(),
                options: vec![],
            },
        ];
        let s = spec_of(&r);
        let copy = mount_at(&s, "/etc/config").unwrap();
        assert_eq!(
            copy.source().as_deref(),
            Some(Path::new("/run/atoll/copies/c-abc"))
        );
        let copts = copy.options().clone().unwrap();
        assert!(copts.contains(&"ro".to_owned()) && !copts.contains(&"rw".to_owned()));
        assert_eq!(
            mount_at(&s, "/etc/one.conf").unwrap().source().as_deref(),
            Some(Path::new("/run/atoll/copies/c-def/file"))
        );
        let vol = mount_at(&s, "/cache").unwrap();
        assert_eq!(
            vol.source().as_deref(),
            Some(Path::new("/run/atoll/volumes/cache-vol"))
        );
        let vo = vol.options().clone().unwrap();
        assert!(vo.contains(&"rbind".to_owned()) && vo.contains(&"nosuid".to_owned()));
        assert!(!vo.contains(&"ro".to_owned()));
        let disk = mount_at(&s, "/data").unwrap();
        assert_eq!(
            disk.source().as_deref(),
            Some(Path::new("/run/atoll/disks/data1"))
        );
        let dopts = disk.options().clone().unwrap();
        assert!(dopts.contains(&"ro".to_owned()));
        assert!(!dopts.contains(&"rw".to_owned()));
    }

    #[test]
    fn plan_mounts_refuses_bad_requests() {
        let m = |dest: &str, typ: &str, src: &str, opts: &[&str]| v1::Mount {
            destination: dest.into(),
            r#type: typ.into(),
            source: src.into(),
            options: opts.iter().map(|s| (*s).to_owned()).collect(),
        };
        let cases = [
            (m("rel", "tmpfs", "v", &[]), "mounts[0].destination"),
            (m("/a/../etc", "tmpfs", "v", &[]), "mounts[0].destination"),
            (m("/proc/sys", "tmpfs", "v", &[]), "mounts[0].destination"),
            (m("/x", "tmpfs", "../v", &[]), "mounts[0].source"),
            (m("/x", "bind", "/etc", &[]), "mounts[0].source"),
            (m("/x", "bind", "copy:../v", &[]), "mounts[0].source"),
            (m("/x", "bind", "copy:v/../../etc", &[]), "mounts[0].source"),
            (m("/x", "bind", "copy:v/a/b", &[]), "mounts[0].source"),
            (m("/x", "bind", "copy:", &[]), "mounts[0].source"),
            (m("/x", "nfs", "v", &[]), "mounts[0].type"),
            (m("/x", "tmpfs", "v", &["suid"]), "mounts[0].options"),
        ];
        for (mount, field) in cases {
            let err = plan_mounts(std::slice::from_ref(&mount)).unwrap_err();
            assert_eq!(err.field, field, "{mount:?}");
        }
        let twice = [m("/x", "tmpfs", "a", &[]), m("/x", "tmpfs", "b", &[])];
        assert!(plan_mounts(&twice).unwrap_err().problem.contains("twice"));
    }

    #[test]
    fn resources_become_cgroup_limits() {
        let mut r = req();
        r.resources = Some(v1::Resources {
            memory_limit_bytes: 64 << 20,
            cpu_quota_us: 50_000,
            cpu_period_us: 0,
            pids_limit: 100,
        });
        let s = spec_of(&r);
        let linux = s.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/atoll/c1"))
        );
        let res = linux.resources().as_ref().unwrap();
        let mem = res.memory().unwrap();
        assert_eq!((mem.limit(), mem.swap()), (Some(64 << 20), Some(64 << 20)));
        let cpu = res.cpu().as_ref().unwrap();
        assert_eq!((cpu.quota(), cpu.period()), (Some(50_000), Some(100_000)));
        assert_eq!(res.pids().unwrap().limit(), 100);
    }

    #[test]
    fn resources_zero_means_unlimited() {
        let mut r = req();
        r.resources = Some(v1::Resources::default());
        let s = spec_of(&r);
        let res = s.linux().as_ref().unwrap().resources().clone().unwrap();
        assert!(res.memory().is_none() && res.cpu().is_none() && res.pids().is_none());
    }

    #[test]
    fn resources_bad_cpu_period_is_refused() {
        let mut r = req();
        r.resources = Some(v1::Resources {
            cpu_quota_us: 50_000,
            cpu_period_us: 10,
            ..Default::default()
        });
        let err = build_spec(&r, &user(0), &paths()).unwrap_err();
        assert_eq!(err.field, "resources.cpu_period_us");
    }

    #[test]
    fn seccomp_default_custom_unconfined_privileged() {
        let s = spec_of(&req());
        let prof = s.linux().as_ref().unwrap().seccomp().clone().unwrap();
        assert_eq!(prof.default_action(), LinuxSeccompAction::ScmpActAllow);

        let mut r = req();
        r.security = Some(sec(|s| {
            s.seccomp = v1::security::Seccomp::Unconfined as i32
        }));
        assert!(spec_of(&r).linux().as_ref().unwrap().seccomp().is_none());

        r.security = Some(sec(|s| s.privileged = true));
        let s = spec_of(&r);
        assert!(s.linux().as_ref().unwrap().seccomp().is_none());
        assert!(s
            .linux()
            .as_ref()
            .unwrap()
            .masked_paths()
            .clone()
            .unwrap()
            .is_empty());

        r.security = Some(sec(|s| {
            s.seccomp = v1::security::Seccomp::Custom as i32;
            s.seccomp_json = r#"{"defaultAction":"SCMP_ACT_ERRNO"}"#.into();
        }));
        let prof = spec_of(&r)
            .linux()
            .as_ref()
            .unwrap()
            .seccomp()
            .clone()
            .unwrap();
        assert_eq!(prof.default_action(), LinuxSeccompAction::ScmpActErrno);

        r.security = Some(sec(|s| {
            s.seccomp = v1::security::Seccomp::Custom as i32;
            s.seccomp_json = "not json".into();
        }));
        let err = build_spec(&r, &user(0), &paths()).unwrap_err();
        assert_eq!(err.field, "security.seccomp_json");
    }

    #[test]
    fn no_new_privileges_is_absent_unless_asked() {
        let s = spec_of(&req());
        assert_eq!(s.process().as_ref().unwrap().no_new_privileges(), None);
        let mut r = req();
        r.security = Some(sec(|s| s.no_new_privileges = true));
        assert_eq!(
            spec_of(&r).process().as_ref().unwrap().no_new_privileges(),
            Some(true)
        );
    }

    #[test]
    fn masked_and_readonly_paths_like_docker() {
        let s = spec_of(&req());
        let linux = s.linux().as_ref().unwrap();
        assert!(linux
            .masked_paths()
            .clone()
            .unwrap()
            .contains(&"/proc/kcore".to_owned()));
        assert!(linux
            .readonly_paths()
            .clone()
            .unwrap()
            .contains(&"/proc/sys".to_owned()));
    }

    #[test]
    fn the_cri_masked_and_readonly_paths_replace_the_defaults_and_are_checked() {
        let mut r = req();
        r.security = Some(sec(|s| {
            s.masked_paths = vec!["/etc/hostname".into(), "/proc/kcore".into()];
            s.readonly_paths = vec!["/etc".into()];
        }));
        let s = spec_of(&r);
        let linux = s.linux().as_ref().unwrap();
        assert_eq!(
            linux.masked_paths().clone().unwrap(),
            ["/etc/hostname", "/proc/kcore"]
        );
        assert_eq!(linux.readonly_paths().clone().unwrap(), ["/etc"]);
        // Privileged: nothing hidden, whatever the lists say.
        r.security.as_mut().unwrap().privileged = true;
        let s = spec_of(&r);
        assert!(s
            .linux()
            .as_ref()
            .unwrap()
            .masked_paths()
            .clone()
            .unwrap()
            .is_empty());
        for bad in ["etc", "/etc/../proc", ""] {
            let mut r = req();
            r.security = Some(sec(|s| s.masked_paths = vec![bad.into()]));
            let err = build_spec(&r, &ResolvedUser::default(), &paths()).unwrap_err();
            assert_eq!(err.field, "security.masked_paths[0]", "{bad:?}: {err}");
        }
        let mut r = req();
        r.security = Some(sec(|s| {
            s.readonly_paths = vec!["/x".into(); MAX_HIDDEN_PATHS + 1]
        }));
        assert!(build_spec(&r, &ResolvedUser::default(), &paths()).is_err());
    }

    #[test]
    fn readonly_rootfs_is_marked() {
        let mut r = req();
        r.rootfs = Some(v1::Rootfs {
            readonly: true,
            ..Default::default()
        });
        assert_eq!(spec_of(&r).root().as_ref().unwrap().readonly(), Some(true));
    }

    #[test]
    fn spec_json_round_trips() {
        let s = spec_of(&req());
        let json = serde_json::to_string(&s).unwrap();
        let back: Spec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn is_plain_name_refuses_paths() {
        assert!(is_plain_name("abc"));
        assert!(!is_plain_name("a/b"));
        assert!(!is_plain_name(".."));
        assert!(!is_plain_name("/a"));
    }

    #[test]
    fn cgroup_limits_are_written_as_cgroup_v2_wants_them_and_checked() {
        let r = v1::Resources {
            memory_limit_bytes: 64 << 20,
            cpu_quota_us: 50_000,
            cpu_period_us: 0,
            pids_limit: 0,
        };
        assert_eq!(
            cgroup_limits(&r).unwrap(),
            vec![
                ("memory.max", (64u64 << 20).to_string()),
                ("memory.swap.max", "0".into()),
                ("cpu.max", "50000 100000".into()),
                ("pids.max", "max".into()),
            ]
        );
        let lifted = cgroup_limits(&v1::Resources::default()).unwrap();
        assert!(
            lifted.iter().all(|(_, v)| v.starts_with("max")),
            "{lifted:?}"
        );
        let bad = v1::Resources {
            cpu_quota_us: 10,
            ..v1::Resources::default()
        };
        assert!(cgroup_limits(&bad).is_err());
    }
}
