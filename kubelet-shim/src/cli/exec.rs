//! `atoll exec`: another process in a pod's running main container, as `docker
//! exec`. It starts from the main container's environment, working directory and
//! user (`process.json`, written by `atoll run`), with `-e`, `-w` and `-u` on top.
//!
//! The agent starts an exec process at once and keeps its output in pipes until the
//! streams are attached, so attaching right after ExecProcess loses nothing. Our
//! SIGINT, SIGTERM and SIGHUP go to the process; SIGWINCH resizes its terminal.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::Instant;

use anyhow::Context;
use atoll_agent_proto::v1;
use atoll_image::oci::convert::GuestConfig;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGWINCH};

use super::run::{self, Sink, MAIN};
use crate::pod::image::{self, ProcessOverrides};
use crate::pod::state::{self, ExecDefaults, PodStatus};
use crate::pod::PodHandle;

/// The PATH of a process whose container's environment is not known.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
Exit status: the command's (128+N when killed by signal N); 126 or 127 when it cannot
be run (as docker exec); 125 when atoll could not run it.")]
pub struct ExecArgs {
    /// Keep stdin open and forward it to the process (EOF closes its stdin).
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Give the process a terminal (this terminal goes to raw mode with -i).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Set an environment variable (KEY=VALUE, or KEY for the host's value).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory (default: the container's).
    #[arg(short = 'w', long = "workdir")]
    pub workdir: Option<String>,
    /// User: uid, uid:gid, name or name:group (default: the container's).
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Pod id (or unique prefix) or name.
    pub pod: String,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub cmd: Vec<String>,
}

/// The process to start: the container's defaults with the options on top.
pub fn exec_process(args: &ExecArgs, defaults: &ExecDefaults) -> anyhow::Result<v1::Process> {
    let mut env = defaults.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.into());
    }
    let base = GuestConfig {
        manifest_digest: String::new(),
        config_digest: String::new(),
        entrypoint: Vec::new(),
        cmd: Vec::new(),
        env,
        user: defaults.user.clone(),
        working_dir: defaults.cwd.clone(),
    };
    let merged = image::merge(
        "exec",
        &base,
        &ProcessOverrides {
            cmd: args.cmd.clone(),
            entrypoint: None,
            env: args.env.clone(),
            workdir: args.workdir.clone(),
            user: args.user.clone(),
        },
    )?;
    let (rows, cols) = if args.tty {
        run::window_size().unwrap_or((24, 80))
    } else {
        (0, 0)
    };
    Ok(v1::Process {
        args: merged.args,
        env: merged.env,
        cwd: merged.cwd,
        user: merged.user,
        terminal: args.tty,
        stdin: args.interactive,
        rows,
        cols,
        rlimits: Vec::new(),
        additional_gids: Vec::new(),
    })
}

/// Forwards stop signals to the exec process and terminal size changes to its tty,
/// once the process exists (a signal before that is forwarded when it does).
struct Forwarder {
    pending: Arc<AtomicI32>,
    target: Arc<Mutex<Option<(PodHandle, String)>>>,
}

impl Forwarder {
    fn install(tty: bool) -> anyhow::Result<Self> {
        let mut sigs = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGWINCH])
            .context("cannot install signal handlers")?;
        let pending = Arc::new(AtomicI32::new(0));
        let target: Arc<Mutex<Option<(PodHandle, String)>>> = Arc::new(Mutex::new(None));
        let (pending2, target2) = (Arc::clone(&pending), Arc::clone(&target));
        thread::spawn(move || {
            for sig in sigs.forever() {
                let t = target2.lock().ok().and_then(|t| t.clone());
                match (sig, t) {
                    (SIGWINCH, Some((h, exec_id))) if tty => {
                        if let (Some((rows, cols)), Ok(mut c)) = (run::window_size(), h.client()) {
                            let _ = c.resize(MAIN, &exec_id, rows, cols);
                        }
                    }
                    (SIGWINCH, _) => {}
                    (sig, Some((h, exec_id))) => {
                        if let Ok(mut c) = h.client() {
                            let _ = c.signal(MAIN, &exec_id, sig, false);
                        }
                    }
                    (sig, None) => pending2.store(sig, Ordering::SeqCst),
                }
            }
        });
        Ok(Self { pending, target })
    }

    /// The process exists: forward from now on, and a signal that came before.
    fn started(&self, h: PodHandle, exec_id: &str) {
        if let Ok(mut t) = self.target.lock() {
            *t = Some((h.clone(), exec_id.to_owned()));
        }
        let sig = self.pending.swap(0, Ordering::SeqCst);
        if sig != 0 {
            if let Ok(mut c) = h.client() {
                let _ = c.signal(MAIN, exec_id, sig, false);
            }
        }
    }
}

/// Runs `atoll exec`; returns the process's exit status.
pub fn exec(args: ExecArgs) -> anyhow::Result<i32> {
    let t0 = Instant::now();
    let run_dir = state::run_dir();
    let (dir, s) = state::find(&run_dir, &args.pod)
        .with_context(|| format!("no running pod {:?} (see `atoll ps`)", args.pod))?;
    if s.status != PodStatus::Running || !state::pid_alive(s.owner_pid) {
        anyhow::bail!(
            "pod {} is {}, not running: commands can be run in it once its container has started",
            s.id,
            if state::pid_alive(s.owner_pid) {
                s.status.to_string()
            } else {
                "dead".into()
            }
        );
    }
    let defaults = ExecDefaults::read(&dir).unwrap_or_else(|e| {
        tracing::warn!("{e}: the command gets a default PATH and runs as root in /");
        ExecDefaults::default()
    });
    let process = exec_process(&args, &defaults)?;
    let exec_id = format!("exec-{}", run::new_pod_id());
    let forwarder = Forwarder::install(args.tty)?;
    let handle = PodHandle::for_dir(&dir);
    let mut control = handle
        .client()
        .with_context(|| format!("cannot reach the agent of pod {}", s.id))?;
    let sent = control.exec(v1::ExecProcess {
        container_id: MAIN.into(),
        exec_id: exec_id.clone(),
        process: Some(process),
    });
    if let Err(e) = sent {
        if let Some(status) = run::exec_failure_status(&e) {
            eprintln!("atoll: {e}");
            return Ok(status);
        }
        return Err(e).with_context(|| format!("cannot run the command in pod {}", s.id));
    }
    forwarder.started(handle.clone(), &exec_id);

    // No container log for exec output: it goes to our stdout and stderr only.
    let no_log: run::SharedLog = Arc::new(Mutex::new(None));
    let first = Arc::new(OnceLock::new());
    let (done_tx, done_rx) = mpsc::channel();
    let mut pumps = 0usize;
    let mut spawn_out = |st: std::os::unix::net::UnixStream, sink: Sink| {
        let (log, first, done) = (Arc::clone(&no_log), Arc::clone(&first), done_tx.clone());
        thread::spawn(move || run::pump_out(st, sink, log, first, t0, done));
        pumps += 1;
    };
    let mut raw = None;
    if args.tty {
        let tty = handle.attach(MAIN, &exec_id, v1::attach::Stream::Tty)?;
        if args.interactive {
            let input = tty.try_clone().context("cloning the tty stream")?;
            thread::spawn(move || run::pump_in(input));
            raw = run::RawMode::enter();
        }
        spawn_out(tty, Sink::Stdout);
    } else {
        spawn_out(
            handle.attach(MAIN, &exec_id, v1::attach::Stream::Stdout)?,
            Sink::Stdout,
        );
        spawn_out(
            handle.attach(MAIN, &exec_id, v1::attach::Stream::Stderr)?,
            Sink::Stderr,
        );
        if args.interactive {
            let input = handle.attach(MAIN, &exec_id, v1::attach::Stream::Stdin)?;
            thread::spawn(move || run::pump_in(input));
        }
    }
    drop(done_tx);

    let waited = control.wait(MAIN, &exec_id);
    let deadline = Instant::now() + run::DRAIN_TIMEOUT;
    for _ in 0..pumps {
        let left = deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    drop(raw);
    let w = waited.with_context(|| {
        format!(
            "lost the command in pod {} (did the pod stop while it ran?)",
            s.id
        )
    })?;
    Ok(w.status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> ExecArgs {
        let mut v = vec!["atoll", "exec"];
        v.extend_from_slice(args);
        match super::super::Cli::try_parse_from(v).unwrap().command {
            super::super::Cmd::Exec(a) => a,
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn exec_parses_options_pod_and_command() {
        let a = parse(&[
            "-i", "-t", "-e", "A=1", "-w", "/tmp", "-u", "nobody", "web", "--", "sh", "-c", "x",
        ]);
        assert!(a.interactive && a.tty);
        assert_eq!(a.env, ["A=1"]);
        assert_eq!(a.workdir.as_deref(), Some("/tmp"));
        assert_eq!(a.user.as_deref(), Some("nobody"));
        assert_eq!(a.pod, "web");
        assert_eq!(a.cmd, ["sh", "-c", "x"]);
        // Without `--`, the command keeps its own flags.
        let a = parse(&["web", "ls", "-l"]);
        assert_eq!(a.cmd, ["ls", "-l"]);
    }

    #[test]
    fn exec_without_command_is_refused() {
        assert!(super::super::Cli::try_parse_from(["atoll", "exec", "web"]).is_err());
    }

    #[test]
    fn exec_process_starts_from_the_containers_defaults() {
        let defaults = ExecDefaults {
            env: vec!["PATH=/bin".into(), "GREETING=hi".into()],
            cwd: "/work".into(),
            user: "nobody".into(),
        };
        let a = parse(&["p", "env"]);
        let p = exec_process(&a, &defaults).unwrap();
        assert_eq!(p.args, ["env"]);
        assert_eq!(p.env, ["PATH=/bin", "GREETING=hi"]);
        assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/work", "nobody"));
        assert!(!p.terminal && !p.stdin);
        assert_eq!((p.rows, p.cols), (0, 0));

        let a = parse(&[
            "-i",
            "-e",
            "GREETING=yo",
            "-w",
            "/tmp",
            "-u",
            "0",
            "p",
            "sh",
        ]);
        let p = exec_process(&a, &defaults).unwrap();
        assert_eq!(p.env, ["PATH=/bin", "GREETING=yo"]);
        assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/tmp", "0"));
        assert!(p.stdin);
    }

    #[test]
    fn exec_process_without_defaults_gets_a_path_and_root() {
        let p = exec_process(&parse(&["-t", "p", "sh"]), &ExecDefaults::default()).unwrap();
        assert_eq!(p.env, [DEFAULT_PATH]);
        assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/", ""));
        assert!(p.terminal);
        assert!(p.rows > 0 && p.cols > 0, "a terminal has a size");
    }
}
