//! The `atoll` command line: `run`, `ps`, `stop`, `logs`. The binary
//! (`src/bin/atoll.rs`) only calls [`main`].

pub mod artifacts;
pub mod exec;
pub mod run;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::pod::image::VolumeSpec;
use crate::pod::state::{self, PodStatus};

#[derive(Parser, Debug)]
#[command(
    name = "atoll",
    version,
    about = "Run containers in their own KVM microVMs"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run IMAGE in a new pod VM; exits with the container's status.
    Run(Box<RunArgs>),
    /// List the pods of this machine (`$ATOLL_RUN_DIR`, default /run/atoll).
    Ps,
    /// Stop a pod: its container gets SIGTERM, SIGKILL after 5 s, then the VM ends.
    Stop {
        /// Pod id (or unique prefix) or name.
        pod: String,
    },
    /// Send a signal to a pod's main container (as `docker kill`): `atoll run`
    /// then exits with the container's status, 128 + N when the signal killed it.
    Kill {
        /// Signal name (KILL, TERM, SIGINT...) or number.
        #[arg(short, long, default_value = "KILL")]
        signal: String,
        /// Pod id (or unique prefix) or name.
        pod: String,
    },
    /// Run a command in a pod's running main container (as `docker exec`); exits
    /// with its status (126/127 when it cannot run).
    Exec(exec::ExecArgs),
    /// Print a pod's container output (also after it ended).
    Logs {
        /// Pod id (or unique prefix) or name.
        pod: String,
    },
}

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
IMAGE is a name in the atoll-image store ($ATOLL_STORE, default /var/lib/atoll/images);
`busybox` is built from the host's busybox on first use. Everything after IMAGE (or
after `--`) replaces the image's Cmd.

Exit status: the container's (128+N when killed by signal N); 143 or 130 when atoll
itself got SIGTERM or SIGINT; 125 when the pod could not be run.")]
pub struct RunArgs {
    /// Boot the guest kernel instead of restoring a clone of the pod template (the
    /// template for this shape is built on first use and kept in $ATOLL_CACHE).
    #[arg(long)]
    pub cold: bool,
    /// vCPUs of the pod VM.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Memory of the pod VM in MiB.
    #[arg(long, default_value_t = 256)]
    pub mem: u64,
    /// Set an environment variable (KEY=VALUE, or KEY for the host's value).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Mount a host directory: a READ-ONLY SNAPSHOT taken at start (an erofs image of
    /// it, made with mkfs.erofs); changes on either side are not seen by the other.
    /// HOST may also be an erofs image file, attached as it is.
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:ro]")]
    pub volumes: Vec<VolumeSpec>,
    /// Keep stdin open and forward it to the container (EOF closes its stdin).
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Give the container a terminal (this terminal goes to raw mode).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// A name for `atoll ps`, `stop` and `logs`.
    #[arg(long)]
    pub name: Option<String>,
    /// Connect the pod to this host: a tap `atl<id>` with 10.X.Y.1/30 here, the
    /// guest's eth0 10.X.Y.2/30 with a default route via .1 and the host's DNS servers
    /// (`atoll ps` shows the address). Needs root; the tap is deleted when the pod ends.
    #[arg(long)]
    pub net: bool,
    /// The pod's hostname (default with --net: the pod's name).
    #[arg(long, value_parser = parse_hostname)]
    pub hostname: Option<String>,
    /// Working directory inside the container.
    #[arg(short = 'w', long = "workdir")]
    pub workdir: Option<String>,
    /// User inside the container: uid, uid:gid, name or name:group.
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Replace the image's entrypoint (and its Cmd).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Memory limit of the container (cgroup), e.g. 64m, 1g, 1048576.
    #[arg(long, value_parser = parse_bytes, value_name = "BYTES")]
    pub memory_limit: Option<u64>,
    /// CPU limit of the container in CPUs, e.g. 0.5.
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<f64>,
    /// Process limit of the container (cgroup pids.max).
    #[arg(long, value_name = "N")]
    pub pids_limit: Option<u64>,
    /// A resource limit, as `docker run --ulimit`: NAME=SOFT[:HARD] (nofile, nproc,
    /// core, stack, memlock, ...; `unlimited` allowed). Repeatable.
    #[arg(long = "ulimit", value_parser = parse_ulimit, value_name = "NAME=SOFT[:HARD]")]
    pub ulimits: Vec<atoll_agent_proto::v1::Rlimit>,
    /// Add a capability to the default set (NET_ADMIN or CAP_NET_ADMIN). Repeatable.
    #[arg(long = "cap-add", value_parser = parse_capability, value_name = "CAP")]
    pub cap_add: Vec<String>,
    /// Drop a capability from the default set. Repeatable.
    #[arg(long = "cap-drop", value_parser = parse_capability, value_name = "CAP")]
    pub cap_drop: Vec<String>,
    /// All capabilities and no seccomp profile (still inside the pod's VM).
    #[arg(long)]
    pub privileged: bool,
    /// Processes of the container cannot gain privileges (setuid, file caps).
    #[arg(long)]
    pub no_new_privileges: bool,
    /// Mount the image read-only (no writable layer).
    #[arg(long)]
    pub read_only: bool,
    /// An empty tmpfs volume at DEST (emptyDir-style), shared with the pod's
    /// sidecars, which mount it at the same place. Repeatable.
    #[arg(long = "tmpfs", value_name = "DEST")]
    pub tmpfs: Vec<String>,
    /// A seccomp profile (OCI/Docker JSON) or `unconfined`; default: the runtime's.
    #[arg(long, value_name = "FILE|unconfined")]
    pub seccomp: Option<String>,
    /// Also run `/bin/sh -c CMD` as another container of the pod, from the same image
    /// (repeatable); the main container's exit ends the pod.
    #[arg(long, value_name = "CMD")]
    pub sidecar: Vec<String>,
    /// Write the phase timings as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub timings: Option<PathBuf>,
    /// Guest kernel (default: $ATOLL_KERNEL, `vmlinux` next to atoll, build/vmlinux).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Guest initramfs (default: $ATOLL_INITRAMFS, `initramfs.cpio` next to atoll,
    /// build/initramfs.cpio).
    #[arg(long)]
    pub initramfs: Option<PathBuf>,
    /// The VMM (default: $ATOLL_VMM, `atoll-vmm` next to atoll, the static target
    /// directory of the checkout).
    #[arg(long)]
    pub vmm: Option<PathBuf>,
    /// Seconds to wait for the VM's agent.
    #[arg(long, default_value_t = 60)]
    pub boot_timeout: u64,
    /// Seconds of silence after which a running guest is declared dead and its VM
    /// killed: its agent is asked something cheap every 1/15 of this, allowing
    /// 4/15 each time, and must miss three checks in a row. 0 turns it off.
    #[arg(long, default_value_t = 75, value_name = "SECS")]
    pub guest_timeout: u64,
    /// Attach the image's layer blobs as they are and let the guest unpack them
    /// into the container's memory (no erofs conversion, no mkfs.erofs needed; the
    /// default when mkfs.erofs is missing and the image was never converted).
    #[arg(long)]
    pub unpack_in_guest: bool,
    /// The image.
    pub image: String,
    /// The command (replaces the image's Cmd).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub cmd: Vec<String>,
}

/// `nofile=1024:2048`, `nproc=64`, `core=unlimited` (as `docker run --ulimit`).
pub fn parse_ulimit(s: &str) -> Result<atoll_agent_proto::v1::Rlimit, String> {
    const NAMES: [&str; 16] = [
        "as",
        "core",
        "cpu",
        "data",
        "fsize",
        "locks",
        "memlock",
        "msgqueue",
        "nice",
        "nofile",
        "nproc",
        "rss",
        "rtprio",
        "rttime",
        "sigpending",
        "stack",
    ];
    let (name, values) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=SOFT[:HARD], e.g. nofile=1024:2048"))?;
    let name = name.trim().to_ascii_lowercase();
    if !NAMES.contains(&name.as_str()) {
        return Err(format!(
            "unknown ulimit {name:?}: one of {}",
            NAMES.join(", ")
        ));
    }
    let value = |v: &str| -> Result<u64, String> {
        match v.trim() {
            "unlimited" | "-1" => Ok(u64::MAX),
            v => v
                .parse()
                .map_err(|_| format!("{s:?}: {v:?} is not a number or `unlimited`")),
        }
    };
    let (soft, hard) = match values.split_once(':') {
        Some((soft, hard)) => (value(soft)?, value(hard)?),
        None => (value(values)?, value(values)?),
    };
    if soft > hard {
        return Err(format!("{s:?}: the soft limit is above the hard limit"));
    }
    Ok(atoll_agent_proto::v1::Rlimit {
        r#type: format!("RLIMIT_{}", name.to_ascii_uppercase()),
        soft,
        hard,
    })
}

/// `NET_ADMIN`, `cap_net_admin`, `CAP_NET_ADMIN` -> `CAP_NET_ADMIN` (the guest checks
/// that the capability exists).
pub fn parse_capability(s: &str) -> Result<String, String> {
    let upper = s.trim().to_ascii_uppercase();
    let name = upper.strip_prefix("CAP_").unwrap_or(&upper);
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
        return Err(format!("{s:?} is not a capability name (e.g. NET_ADMIN)"));
    }
    Ok(format!("CAP_{name}"))
}

/// `512`, `64k`, `64m`, `1g` (also `kb`/`KiB`-style suffixes, case-insensitive).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t
        .strip_suffix("ib")
        .or_else(|| t.strip_suffix('b'))
        .unwrap_or(&t);
    let (num, shift) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 10),
        Some('m') => (&t[..t.len() - 1], 20),
        Some('g') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size: use a number with k, m or g"))?;
    n.checked_mul(1u64 << shift)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("{s:?} is zero or too large"))
}

fn parse_hostname(s: &str) -> Result<String, String> {
    if crate::pod::net::valid_hostname(s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?}: a hostname is 1 to 64 of a-z, A-Z, 0-9, '-' and '.', not starting with '-' or '.'"
        ))
    }
}

fn parse_cpus(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1024.0 => Ok(v),
        _ => Err(format!(
            "{s:?}: expected a positive number of CPUs, e.g. 0.5"
        )),
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ATOLL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => run::run(*args),
        Cmd::Ps => ps().map(|()| 0),
        Cmd::Stop { pod } => stop(&pod).map(|()| 0),
        Cmd::Kill { signal, pod } => kill(&signal, &pod).map(|()| 0),
        Cmd::Logs { pod } => logs(&pod).map(|()| 0),
        Cmd::Exec(args) => exec::exec(args),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(255)),
        Err(e) => {
            eprintln!("atoll: error: {e:#}");
            ExitCode::from(run::EXIT_RUN_FAILED)
        }
    }
}

fn ps() -> anyhow::Result<()> {
    let run_dir = state::run_dir();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<14} {:<16} {:<28} {:<9} {:<12} {:<15} CREATED",
        "POD ID", "NAME", "IMAGE", "STATUS", "PID", "ADDRESS"
    )?;
    let now = state::now_secs();
    for (_, s) in state::list(&run_dir) {
        let alive = state::pid_alive(s.owner_pid);
        let status = if alive || s.status == PodStatus::Exited {
            s.status.to_string()
        } else {
            "dead".to_owned()
        };
        let pid = format!("{}{}", s.owner_pid, if alive { "" } else { " (gone)" });
        let ago = now.saturating_sub(s.created);
        writeln!(
            out,
            "{:<14} {:<16} {:<28} {:<9} {:<12} {:<15} {}s ago",
            s.id,
            s.name,
            s.image,
            status,
            pid,
            s.address.as_deref().unwrap_or("-"),
            ago
        )?;
    }
    Ok(())
}

fn stop(what: &str) -> anyhow::Result<()> {
    let run_dir = state::run_dir();
    let (dir, s) = state::find(&run_dir, what)
        .with_context(|| format!("no running pod {what:?} (see `atoll ps`)"))?;
    let pid = i32::try_from(s.owner_pid).context("pid out of range")?;
    // SAFETY: kill(2) with a pid read from the state file; the worst a stale pid can
    // do is signal an unrelated process of ours, which `pid_alive` narrows further.
    if !state::pid_alive(s.owner_pid) || unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        anyhow::bail!(
            "the process that ran pod {} ({}) is gone; remove {} by hand",
            s.id,
            s.owner_pid,
            dir.display()
        );
    }
    // Wait for the owner to stop the container and remove the pod.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while dir.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if dir.exists() {
        anyhow::bail!("pod {} did not stop within 20 s", s.id);
    }
    println!("{}", s.id);
    Ok(())
}

/// A signal number from `KILL`, `SIGKILL`, `kill` or `9`.
pub fn parse_signal(s: &str) -> anyhow::Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        anyhow::bail!("signal {n} is out of range 1..=64");
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let n = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "WINCH" => libc::SIGWINCH,
        "ALRM" => libc::SIGALRM,
        _ => anyhow::bail!("unknown signal {s:?}: use a name such as KILL or TERM, or a number"),
    };
    Ok(n)
}

fn kill(signal: &str, what: &str) -> anyhow::Result<()> {
    let sig = parse_signal(signal)?;
    let run_dir = state::run_dir();
    let (dir, s) = state::find(&run_dir, what)
        .with_context(|| format!("no running pod {what:?} (see `atoll ps`)"))?;
    if s.status != PodStatus::Running {
        anyhow::bail!(
            "pod {} is {}, not running: its container can be signalled once it has started",
            s.id,
            s.status
        );
    }
    let handle = crate::pod::PodHandle::for_dir(&dir);
    handle
        .client()
        .and_then(|mut c| c.signal(run::MAIN, "", sig, false))
        .with_context(|| format!("cannot signal the container of pod {}", s.id))?;
    Ok(())
}

fn logs(what: &str) -> anyhow::Result<()> {
    let run_dir = state::run_dir();
    let path = match state::find(&run_dir, what) {
        Some((dir, _)) => dir.join("container.log"),
        None => ended_log(&run_dir, what)
            .with_context(|| format!("no pod {what:?}, running or ended (see `atoll ps`)"))?,
    };
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        // A pod that has not printed anything yet.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    std::io::copy(&mut f, &mut std::io::stdout().lock())?;
    Ok(())
}

/// The kept log of an ended pod, by id, id prefix or name (newest match).
fn ended_log(run_dir: &std::path::Path, what: &str) -> Option<PathBuf> {
    let logs = state::logs_dir(run_dir);
    if agent_id_ok(what) && logs.join(format!("{what}.log")).is_file() {
        return Some(logs.join(format!("{what}.log")));
    }
    let mut best: Option<(u64, PathBuf)> = None;
    for e in std::fs::read_dir(&logs).ok()?.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let Ok(s) = state::PodState::read(&p) else {
            continue;
        };
        if s.name == what || s.id.starts_with(what) {
            let log = logs.join(format!("{}.log", s.id));
            if log.is_file() && best.as_ref().is_none_or(|(t, _)| s.created >= *t) {
                best = Some((s.created, log));
            }
        }
    }
    best.map(|(_, p)| p)
}

fn agent_id_ok(s: &str) -> bool {
    atoll_agent_proto::validate_id(s).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> RunArgs {
        let mut v = vec!["atoll", "run"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v).unwrap().command {
            Cmd::Run(a) => *a,
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn ulimits_as_docker_writes_them() {
        let r = parse_ulimit("nofile=1024:2048").unwrap();
        assert_eq!(
            (r.r#type.as_str(), r.soft, r.hard),
            ("RLIMIT_NOFILE", 1024, 2048)
        );
        let r = parse_ulimit("NPROC=64").unwrap();
        assert_eq!(
            (r.r#type.as_str(), r.soft, r.hard),
            ("RLIMIT_NPROC", 64, 64)
        );
        assert_eq!(parse_ulimit("core=unlimited").unwrap().hard, u64::MAX);
        assert!(parse_ulimit("nofile=10:5").unwrap_err().contains("above"));
        assert!(parse_ulimit("bogus=1")
            .unwrap_err()
            .contains("unknown ulimit"));
        assert!(parse_ulimit("nofile").is_err());
        assert!(parse_ulimit("nofile=x").is_err());
    }

    #[test]
    fn capabilities_are_normalised() {
        assert_eq!(parse_capability("net_admin").unwrap(), "CAP_NET_ADMIN");
        assert_eq!(parse_capability("CAP_SYS_TIME").unwrap(), "CAP_SYS_TIME");
        assert!(parse_capability("CAP_").is_err());
        assert!(parse_capability("net-admin").is_err());
    }

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(parse_signal("KILL").unwrap(), 9);
        assert_eq!(parse_signal("sigterm").unwrap(), 15);
        assert_eq!(parse_signal("2").unwrap(), 2);
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("65").is_err());
        let e = parse_signal("BOGUS").unwrap_err().to_string();
        assert!(e.contains("unknown signal \"BOGUS\""), "{e}");
    }

    #[test]
    fn run_parses_options_image_and_command_after_dashes() {
        let a = parse(&[
            "--vcpus",
            "2",
            "--mem",
            "512",
            "-e",
            "A=1",
            "-e",
            "B=2",
            "-v",
            "/h:/g:ro",
            "-i",
            "-t",
            "--name",
            "web",
            "-w",
            "/tmp",
            "-u",
            "1000:1000",
            "--memory-limit",
            "64m",
            "--cpus",
            "0.5",
            "--sidecar",
            "sleep 9",
            "busybox",
            "--",
            "sh",
            "-c",
            "echo hi",
        ]);
        assert_eq!((a.vcpus, a.mem), (2, 512));
        assert_eq!(a.env, ["A=1", "B=2"]);
        assert_eq!(a.volumes[0].guest, "/g");
        assert!(a.interactive && a.tty);
        assert_eq!(a.memory_limit, Some(64 << 20));
        assert_eq!(a.cpus, Some(0.5));
        assert_eq!(a.sidecar, ["sleep 9"]);
        assert_eq!(a.image, "busybox");
        assert_eq!(a.cmd, ["sh", "-c", "echo hi"]);
    }

    #[test]
    fn run_command_without_dashes_keeps_its_own_flags() {
        let a = parse(&["busybox", "ls", "-l", "/"]);
        assert_eq!(a.cmd, ["ls", "-l", "/"]);
        assert!(!a.interactive);
        let a = parse(&["busybox"]);
        assert!(a.cmd.is_empty());
    }

    #[test]
    fn run_command_keeps_a_second_double_dash() {
        let a = parse(&["img", "--", "sh", "-c", "x", "--", "/data"]);
        assert_eq!(a.cmd, ["sh", "-c", "x", "--", "/data"]);
    }

    #[test]
    fn run_refuses_bad_sizes_and_volumes() {
        for bad in [
            vec!["--memory-limit", "lots", "busybox"],
            vec!["--cpus", "-1", "busybox"],
            vec!["-v", "/h:rel", "busybox"],
        ] {
            let mut v = vec!["atoll", "run"];
            v.extend(bad.iter());
            assert!(Cli::try_parse_from(&v).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parse_bytes_suffixes() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("64k"), Ok(64 << 10));
        assert_eq!(parse_bytes("64M"), Ok(64 << 20));
        assert_eq!(parse_bytes("2g"), Ok(2 << 30));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("512mb"), Ok(512 << 20));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("99999999999999g").is_err());
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("m").is_err());
    }

    #[test]
    fn logs_of_ended_pod_found_by_name() {
        let d = tempfile::tempdir().unwrap();
        let logs = state::logs_dir(d.path());
        std::fs::create_dir_all(&logs).unwrap();
        std::fs::write(logs.join("abc123.log"), "out\n").unwrap();
        state::PodState {
            id: "abc123".into(),
            name: "web".into(),
            image: "i".into(),
            status: PodStatus::Exited,
            owner_pid: 1,
            vmm_pid: None,
            created: 5,
            exit_status: Some(0),
            address: None,
        }
        .write(&logs.join("abc123.json"))
        .unwrap();
        assert_eq!(ended_log(d.path(), "web").unwrap(), logs.join("abc123.log"));
        assert_eq!(
            ended_log(d.path(), "abc123").unwrap(),
            logs.join("abc123.log")
        );
        assert!(ended_log(d.path(), "db").is_none());
    }
}
