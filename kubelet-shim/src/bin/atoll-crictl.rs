//! `atoll-crictl`: a small CRI client in the spirit of crictl, for atoll-cri (or any
//! CRI v1 server). Configs are JSON in crictl's shape (snake_case CRI field names;
//! the fields atoll-cri acts on, all optional: `cri::client::spec`); answers print
//! as `key=value` lines, or whole with `--json`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use atoll_cri::cri::client::{spec, Client};
use atoll_cri::cri::stream::client::{self as streaming, Transport};
use atoll_cri::cri::stream::{Outcome, TerminalSize};
use clap::{Parser, Subcommand};
use k8s_cri::v1 as cri;

#[derive(Parser, Debug)]
#[command(name = "atoll-crictl", version, about = "A CRI v1 client")]
struct Args {
    /// The CRI socket.
    #[arg(long, short = 'r', default_value = "/run/atoll/atoll-cri.sock")]
    runtime_endpoint: PathBuf,
    /// Seconds a call may take.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Print whole answers as JSON.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Version.
    Version,
    /// GetContainerEvents: prints events until COUNT arrived or SECS passed.
    Events {
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long = "for", default_value_t = 10)]
        secs: u64,
    },
    /// Status (runtime and network conditions).
    Info,
    /// RunPodSandbox with a PodSandboxConfig JSON file.
    Runp {
        config: PathBuf,
        #[arg(long, default_value = "atoll")]
        runtime: String,
    },
    /// StopPodSandbox.
    Stopp { id: String },
    /// RemovePodSandbox.
    Rmp { id: String },
    /// PodSandboxStatus; `--verbose` adds the runtime's info (one `KEY=JSON` line each).
    Inspectp {
        id: String,
        #[arg(long)]
        verbose: bool,
    },
    /// ListPodSandbox.
    Pods {
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        label: Vec<String>,
    },
    /// CreateContainer: a ContainerConfig JSON and the pod's PodSandboxConfig JSON.
    Create {
        pod: String,
        config: PathBuf,
        pod_config: PathBuf,
    },
    /// StartContainer.
    Start { id: String },
    /// StopContainer (`-t` seconds of grace).
    Stop {
        id: String,
        #[arg(short = 't', long, default_value_t = 10)]
        timeout: i64,
    },
    /// RemoveContainer.
    Rm { id: String },
    /// ContainerStatus.
    Inspect { id: String },
    /// ListContainers.
    Ps {
        #[arg(long)]
        pod: Option<String>,
        #[arg(long)]
        state: Option<String>,
    },
    /// ExecSync: exits with the command's status.
    /// ExecSync; with -i, -t or --stream, Exec through the streaming server
    /// (stdin from ours with -i, a terminal with -t).
    Exec {
        #[arg(long, default_value_t = 0)]
        timeout: i64,
        /// Send our stdin to the command.
        #[arg(short = 'i', long)]
        stdin: bool,
        /// Give the command a terminal (its stdout and stderr are one stream).
        #[arg(short = 't', long)]
        tty: bool,
        /// Exec through the streaming server even without -i or -t.
        #[arg(long)]
        stream: bool,
        /// The framing of the streaming connection.
        #[arg(long, value_enum, default_value = "spdy")]
        transport: Transport,
        /// The terminal size sent with -t (default: ours, or 80x24).
        #[arg(long, value_name = "COLSxROWS")]
        size: Option<String>,
        /// Print the streaming URL instead of using it.
        #[arg(long)]
        print_url: bool,
        id: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Attach to a running container's stdio (stdin with -i).
    Attach {
        #[arg(short = 'i', long)]
        stdin: bool,
        #[arg(short = 't', long)]
        tty: bool,
        #[arg(long, value_enum, default_value = "spdy")]
        transport: Transport,
        #[arg(long, value_name = "COLSxROWS")]
        size: Option<String>,
        #[arg(long)]
        print_url: bool,
        id: String,
    },
    /// PortForward: listens on 127.0.0.1:LOCAL and carries every connection to
    /// REMOTE in the sandbox, until killed.
    PortForward {
        #[arg(long, value_enum, default_value = "spdy")]
        transport: Transport,
        #[arg(long)]
        print_url: bool,
        pod: String,
        /// LOCAL:REMOTE (LOCAL 0: any free port, printed as `listening=PORT`).
        ports: String,
    },
    /// ContainerStats.
    Stats { id: String },
    /// PodSandboxStats.
    Statsp { id: String },
    /// UpdateContainerResources (0: no limit).
    Update {
        id: String,
        #[arg(long, default_value_t = 0)]
        memory: i64,
        #[arg(long, default_value_t = 0)]
        cpu_quota: i64,
        #[arg(long, default_value_t = 0)]
        cpu_period: i64,
    },
    /// ReopenContainerLog.
    Reopen { id: String },
    /// PullImage (`--creds USER:PASSWORD`).
    Pull {
        image: String,
        #[arg(long)]
        creds: Option<String>,
    },
    /// ListImages.
    Images,
    /// ImageStatus.
    Inspecti { image: String },
    /// RemoveImage.
    Rmi { image: String },
    /// ImageFsInfo.
    Imagefsinfo,
    /// RuntimeConfig.
    RuntimeConfig,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("atoll-crictl: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("atoll-crictl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(p: &PathBuf) -> anyhow::Result<T> {
    let data = std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    serde_json::from_slice(&data).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
}

fn status_line(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

fn show<T: serde::Serialize>(json: bool, v: &T, lines: &[(&str, String)]) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        for (k, v) in lines {
            println!("{k}={v}");
        }
    }
}

/// Prints `url` (`--print-url`) or runs the session it leads to.
fn streaming_or_url(
    url: &str,
    print_url: bool,
    transport: Transport,
    stdin: bool,
    tty: bool,
    size: Option<&str>,
) -> anyhow::Result<u8> {
    if print_url {
        println!("{url}");
        return Ok(0);
    }
    remote_command(url, transport, stdin, tty, size)
}

/// Runs a remotecommand session with our stdio; the command's exit code is ours.
fn remote_command(
    url: &str,
    transport: Transport,
    stdin: bool,
    tty: bool,
    size: Option<&str>,
) -> anyhow::Result<u8> {
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let given = size
        .map(|s| {
            s.split_once('x')
                .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
                .map(|(width, height)| TerminalSize { width, height })
                .ok_or_else(|| anyhow::anyhow!("--size {s}: give COLSxROWS, as 120x40"))
        })
        .transpose()?;
    let size = tty.then(|| {
        rustix::termios::tcgetwinsize(std::io::stdin())
            .ok()
            .filter(|w| w.ws_col > 0)
            .map_or(
                TerminalSize {
                    width: 80,
                    height: 24,
                },
                |w| TerminalSize {
                    width: w.ws_col,
                    height: w.ws_row,
                },
            )
    });
    let size = given.or(size);
    let outcome = streaming::remote_command(
        url,
        transport,
        streaming::Stdio {
            stdin: stdin.then(|| Box::new(std::io::stdin()) as Box<dyn std::io::Read + Send>),
            stdout: Some(&mut out),
            stderr: (!tty).then_some(&mut err as &mut (dyn std::io::Write + Send)),
            tty,
            size,
        },
    )?;
    match outcome {
        Outcome::Success => Ok(0),
        Outcome::Exited(code) => Ok(u8::try_from(code.clamp(0, 255)).unwrap_or(255)),
        Outcome::Failed(m) => Err(anyhow::anyhow!("{m}")),
    }
}

fn container_state(s: i32) -> &'static str {
    cri::ContainerState::try_from(s).map_or("UNKNOWN", |s| s.as_str_name())
}

async fn run(args: Args) -> anyhow::Result<u8> {
    let mut c = Client::connect(&args.runtime_endpoint, Duration::from_secs(args.timeout)).await?;
    let json = args.json;
    match args.cmd {
        Cmd::Events { count, secs } => {
            let mut stream = c
                .runtime
                .get_container_events(cri::GetEventsRequest {})
                .await
                .map_err(status_line)?
                .into_inner();
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
            let mut seen = 0;
            while seen < count {
                let next = tokio::time::timeout_at(deadline, stream.message()).await;
                let ev = match next {
                    Err(_) => anyhow::bail!("{seen} of {count} events in {secs} s"),
                    Ok(Err(s)) => return Err(status_line(s)),
                    Ok(Ok(None)) => anyhow::bail!("the event stream ended"),
                    Ok(Ok(Some(ev))) => ev,
                };
                let kind = cri::ContainerEventType::try_from(ev.container_event_type)
                    .map_or("UNKNOWN", |k| k.as_str_name());
                println!(
                    "{kind} {} pod={} containers={}",
                    ev.container_id,
                    ev.pod_sandbox_status.map(|s| s.id).unwrap_or_default(),
                    ev.containers_statuses.len()
                );
                seen += 1;
            }
        }
        Cmd::Version => {
            let v = c
                .runtime
                .version(cri::VersionRequest {
                    version: "0.1.0".into(),
                })
                .await
                .map_err(status_line)?
                .into_inner();
            show(
                json,
                &v,
                &[
                    ("version", v.version.clone()),
                    ("runtime_name", v.runtime_name.clone()),
                    ("runtime_version", v.runtime_version.clone()),
                    ("runtime_api_version", v.runtime_api_version.clone()),
                ],
            );
        }
        Cmd::Info => {
            let s = c
                .runtime
                .status(cri::StatusRequest { verbose: false })
                .await
                .map_err(status_line)?
                .into_inner();
            let mut lines = Vec::new();
            for cond in s.status.iter().flat_map(|s| &s.conditions) {
                lines.push((
                    cond.r#type.as_str(),
                    format!("{} {} {}", cond.status, cond.reason, cond.message),
                ));
            }
            let handlers: Vec<String> = s
                .runtime_handlers
                .iter()
                .map(|h| format!("{:?}", h.name))
                .collect();
            let h = handlers.join(",");
            lines.push(("handlers", h));
            show(json, &s, &lines);
        }
        Cmd::Runp { config, runtime } => {
            let config = read_json::<spec::Pod>(&config)?
                .cri()
                .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
            let r = c
                .runtime
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(config),
                    runtime_handler: runtime,
                })
                .await
                .map_err(status_line)?
                .into_inner();
            println!("{}", r.pod_sandbox_id);
        }
        Cmd::Stopp { id } => {
            c.runtime
                .stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id })
                .await
                .map_err(status_line)?;
        }
        Cmd::Rmp { id } => {
            c.runtime
                .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
                .await
                .map_err(status_line)?;
        }
        Cmd::Inspectp { id, verbose } => {
            let r = c
                .runtime
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: id,
                    verbose,
                })
                .await
                .map_err(status_line)?
                .into_inner();
            let s = r.status.clone().unwrap_or_default();
            let md = s.metadata.clone().unwrap_or_default();
            if !json {
                let mut info: Vec<_> = r.info.iter().collect();
                info.sort();
                for (k, v) in info {
                    println!("info.{k}={v}");
                }
            }
            show(
                json,
                &r,
                &[
                    ("id", s.id.clone()),
                    ("name", md.name.clone()),
                    (
                        "state",
                        cri::PodSandboxState::try_from(s.state)
                            .map_or("UNKNOWN", |s| s.as_str_name())
                            .to_owned(),
                    ),
                    ("created_at", s.created_at.to_string()),
                    ("runtime_handler", s.runtime_handler.clone()),
                    (
                        "ip",
                        s.network.as_ref().map(|n| n.ip.clone()).unwrap_or_default(),
                    ),
                ],
            );
        }
        Cmd::Pods { id, label } => {
            let label_selector = label
                .iter()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            let r = c
                .runtime
                .list_pod_sandbox(cri::ListPodSandboxRequest {
                    filter: Some(cri::PodSandboxFilter {
                        id: id.unwrap_or_default(),
                        state: None,
                        label_selector,
                    }),
                })
                .await
                .map_err(status_line)?
                .into_inner();
            if json {
                show(true, &r, &[]);
            } else {
                for p in &r.items {
                    println!(
                        "{} {} {}",
                        p.id,
                        p.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or(""),
                        cri::PodSandboxState::try_from(p.state)
                            .map_or("UNKNOWN", |s| s.as_str_name())
                    );
                }
            }
        }
        Cmd::Create {
            pod,
            config,
            pod_config,
        } => {
            let config = read_json::<spec::Container>(&config)?
                .cri()
                .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
            let sandbox_config = read_json::<spec::Pod>(&pod_config)?
                .cri()
                .map_err(|e| anyhow::anyhow!("{}: {e}", pod_config.display()))?;
            let r = c
                .runtime
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: pod,
                    config: Some(config),
                    sandbox_config: Some(sandbox_config),
                })
                .await
                .map_err(status_line)?
                .into_inner();
            println!("{}", r.container_id);
        }
        Cmd::Start { id } => {
            c.runtime
                .start_container(cri::StartContainerRequest { container_id: id })
                .await
                .map_err(status_line)?;
        }
        Cmd::Stop { id, timeout } => {
            c.runtime
                .stop_container(cri::StopContainerRequest {
                    container_id: id,
                    timeout,
                })
                .await
                .map_err(status_line)?;
        }
        Cmd::Rm { id } => {
            c.runtime
                .remove_container(cri::RemoveContainerRequest { container_id: id })
                .await
                .map_err(status_line)?;
        }
        Cmd::Inspect { id } => {
            let r = c
                .runtime
                .container_status(cri::ContainerStatusRequest {
                    container_id: id,
                    verbose: false,
                })
                .await
                .map_err(status_line)?
                .into_inner();
            let s = r.status.clone().unwrap_or_default();
            show(
                json,
                &r,
                &[
                    ("id", s.id.clone()),
                    (
                        "name",
                        s.metadata
                            .as_ref()
                            .map(|m| m.name.clone())
                            .unwrap_or_default(),
                    ),
                    ("state", container_state(s.state).to_owned()),
                    ("created_at", s.created_at.to_string()),
                    ("started_at", s.started_at.to_string()),
                    ("finished_at", s.finished_at.to_string()),
                    ("exit_code", s.exit_code.to_string()),
                    ("reason", s.reason.clone()),
                    ("message", s.message.replace('\n', " ")),
                    (
                        "image",
                        s.image
                            .as_ref()
                            .map(|i| i.image.clone())
                            .unwrap_or_default(),
                    ),
                    ("image_ref", s.image_ref.clone()),
                    ("image_id", s.image_id.clone()),
                    ("log_path", s.log_path.clone()),
                    (
                        "mounts",
                        s.mounts
                            .iter()
                            .map(|m| {
                                let mode = if m.readonly { "ro" } else { "rw" };
                                let source = m
                                    .image
                                    .as_ref()
                                    .map_or(m.host_path.clone(), |i| format!("image={}", i.image));
                                format!("{}:{source}:{mode}", m.container_path)
                            })
                            .collect::<Vec<_>>()
                            .join(","),
                    ),
                ],
            );
        }
        Cmd::Ps { pod, state } => {
            let state = match state.as_deref() {
                None => None,
                Some(s) => Some(cri::ContainerStateValue {
                    state: cri::ContainerState::from_str_name(s).ok_or_else(|| {
                        anyhow::anyhow!(
                            "--state {s}: give CONTAINER_CREATED, _RUNNING, _EXITED or _UNKNOWN"
                        )
                    })? as i32,
                }),
            };
            let r = c
                .runtime
                .list_containers(cri::ListContainersRequest {
                    filter: Some(cri::ContainerFilter {
                        id: String::new(),
                        state,
                        pod_sandbox_id: pod.unwrap_or_default(),
                        label_selector: Default::default(),
                    }),
                })
                .await
                .map_err(status_line)?
                .into_inner();
            if json {
                show(true, &r, &[]);
            } else {
                for x in &r.containers {
                    println!(
                        "{} {} {} {}",
                        x.id,
                        x.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or(""),
                        container_state(x.state),
                        x.pod_sandbox_id
                    );
                }
            }
        }
        Cmd::Exec {
            timeout,
            stdin,
            tty,
            stream,
            transport,
            size,
            print_url,
            id,
            cmd,
        } if stdin || tty || stream || print_url => {
            let _ = timeout;
            let url = c
                .runtime
                .exec(cri::ExecRequest {
                    container_id: id,
                    cmd,
                    tty,
                    stdin,
                    stdout: true,
                    stderr: !tty,
                })
                .await
                .map_err(status_line)?
                .into_inner()
                .url;
            return streaming_or_url(&url, print_url, transport, stdin, tty, size.as_deref());
        }
        Cmd::Attach {
            stdin,
            tty,
            transport,
            size,
            print_url,
            id,
        } => {
            let url = c
                .runtime
                .attach(cri::AttachRequest {
                    container_id: id,
                    stdin,
                    tty,
                    stdout: true,
                    stderr: !tty,
                })
                .await
                .map_err(status_line)?
                .into_inner()
                .url;
            return streaming_or_url(&url, print_url, transport, stdin, tty, size.as_deref());
        }
        Cmd::PortForward {
            transport,
            print_url,
            pod,
            ports,
        } => {
            let (local, remote) = ports
                .split_once(':')
                .and_then(|(l, r)| Some((l.parse::<u16>().ok()?, r.parse::<u16>().ok()?)))
                .ok_or_else(|| anyhow::anyhow!("ports: give LOCAL:REMOTE, as 8080:80"))?;
            let request = cri::PortForwardRequest {
                pod_sandbox_id: pod,
                port: vec![i32::from(remote)],
            };
            if print_url {
                let r = c
                    .runtime
                    .port_forward(request)
                    .await
                    .map_err(status_line)?
                    .into_inner();
                println!("{}", r.url);
                return Ok(0);
            }
            let listener = std::net::TcpListener::bind(("127.0.0.1", local))?;
            let url = |r: cri::PortForwardResponse| r.url;
            let mut spdy = None;
            if transport == Transport::Spdy {
                let u = url(c
                    .runtime
                    .port_forward(request.clone())
                    .await
                    .map_err(status_line)?
                    .into_inner());
                spdy = Some(streaming::SpdyForwarder::connect(&u)?);
            }
            println!("listening={}", listener.local_addr()?.port());
            use std::io::Write;
            std::io::stdout().flush()?;
            for conn in listener.incoming() {
                let conn = conn?;
                match &spdy {
                    Some(f) => f.forward(conn, remote)?,
                    None => {
                        // A WebSocket carries one connection: a new URL for each.
                        let u = url(c
                            .runtime
                            .port_forward(request.clone())
                            .await
                            .map_err(status_line)?
                            .into_inner());
                        let u = format!("{u}?port={remote}");
                        std::thread::spawn(move || {
                            if let Err(e) = streaming::ws_forward(&u, conn) {
                                eprintln!("atoll-crictl: port-forward: {e}");
                            }
                        });
                    }
                }
            }
            return Ok(0);
        }
        Cmd::Exec {
            timeout, id, cmd, ..
        } => {
            let r = c
                .runtime
                .exec_sync(cri::ExecSyncRequest {
                    container_id: id,
                    cmd,
                    timeout,
                })
                .await
                .map_err(status_line)?
                .into_inner();
            use std::io::Write;
            std::io::stdout().write_all(&r.stdout)?;
            std::io::stderr().write_all(&r.stderr)?;
            return Ok(u8::try_from(r.exit_code.clamp(0, 255)).unwrap_or(255));
        }
        Cmd::Stats { id } => {
            let r = c
                .runtime
                .container_stats(cri::ContainerStatsRequest { container_id: id })
                .await
                .map_err(status_line)?
                .into_inner();
            let s = r.stats.clone().unwrap_or_default();
            show(
                json,
                &r,
                &[
                    (
                        "cpu_ns",
                        s.cpu
                            .as_ref()
                            .and_then(|c| c.usage_core_nano_seconds.as_ref())
                            .map(|v| v.value.to_string())
                            .unwrap_or_default(),
                    ),
                    (
                        "memory_working_set",
                        s.memory
                            .as_ref()
                            .and_then(|m| m.working_set_bytes.as_ref())
                            .map(|v| v.value.to_string())
                            .unwrap_or_default(),
                    ),
                ],
            );
        }
        Cmd::Update {
            id,
            memory,
            cpu_quota,
            cpu_period,
        } => {
            c.runtime
                .update_container_resources(cri::UpdateContainerResourcesRequest {
                    container_id: id,
                    linux: Some(cri::LinuxContainerResources {
                        memory_limit_in_bytes: memory,
                        cpu_quota,
                        cpu_period,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .map_err(status_line)?;
        }
        Cmd::Statsp { id } => {
            let r = c
                .runtime
                .pod_sandbox_stats(cri::PodSandboxStatsRequest { pod_sandbox_id: id })
                .await
                .map_err(status_line)?
                .into_inner();
            let l = r.stats.clone().and_then(|s| s.linux).unwrap_or_default();
            let v =
                |x: Option<&cri::UInt64Value>| x.map(|v| v.value.to_string()).unwrap_or_default();
            let net = l
                .network
                .as_ref()
                .and_then(|n| n.default_interface.as_ref());
            show(
                json,
                &r,
                &[
                    (
                        "cpu_ns",
                        v(l.cpu
                            .as_ref()
                            .and_then(|c| c.usage_core_nano_seconds.as_ref())),
                    ),
                    (
                        "memory_bytes",
                        v(l.memory.as_ref().and_then(|m| m.usage_bytes.as_ref())),
                    ),
                    (
                        "memory_working_set",
                        v(l.memory.as_ref().and_then(|m| m.working_set_bytes.as_ref())),
                    ),
                    (
                        "processes",
                        v(l.process.as_ref().and_then(|p| p.process_count.as_ref())),
                    ),
                    ("rx_bytes", v(net.and_then(|n| n.rx_bytes.as_ref()))),
                    ("tx_bytes", v(net.and_then(|n| n.tx_bytes.as_ref()))),
                    ("containers", l.containers.len().to_string()),
                ],
            );
        }
        Cmd::Reopen { id } => {
            c.runtime
                .reopen_container_log(cri::ReopenContainerLogRequest { container_id: id })
                .await
                .map_err(status_line)?;
        }
        Cmd::Pull { image, creds } => {
            let auth = creds.map(|c| {
                let (u, p) = c.split_once(':').unwrap_or((c.as_str(), ""));
                cri::AuthConfig {
                    username: u.to_owned(),
                    password: p.to_owned(),
                    ..Default::default()
                }
            });
            let r = c
                .images
                .pull_image(cri::PullImageRequest {
                    image: Some(cri::ImageSpec {
                        image,
                        ..Default::default()
                    }),
                    auth,
                    sandbox_config: None,
                })
                .await
                .map_err(status_line)?
                .into_inner();
            println!("{}", r.image_ref);
        }
        Cmd::Images => {
            let r = c
                .images
                .list_images(cri::ListImagesRequest { filter: None })
                .await
                .map_err(status_line)?
                .into_inner();
            if json {
                show(true, &r, &[]);
            } else {
                for i in &r.images {
                    println!("{} {} {}", i.id, i.repo_tags.join(","), i.size);
                }
            }
        }
        Cmd::Inspecti { image } => {
            let r = c
                .images
                .image_status(cri::ImageStatusRequest {
                    image: Some(cri::ImageSpec {
                        image,
                        ..Default::default()
                    }),
                    verbose: false,
                })
                .await
                .map_err(status_line)?
                .into_inner();
            match &r.image {
                None => show(json, &r, &[("image", "none".into())]),
                Some(i) => show(
                    json,
                    &r,
                    &[
                        ("id", i.id.clone()),
                        ("repo_tags", i.repo_tags.join(",")),
                        ("repo_digests", i.repo_digests.join(",")),
                        ("size", i.size.to_string()),
                    ],
                ),
            }
        }
        Cmd::Rmi { image } => {
            c.images
                .remove_image(cri::RemoveImageRequest {
                    image: Some(cri::ImageSpec {
                        image,
                        ..Default::default()
                    }),
                })
                .await
                .map_err(status_line)?;
        }
        Cmd::Imagefsinfo => {
            let r = c
                .images
                .image_fs_info(cri::ImageFsInfoRequest {})
                .await
                .map_err(status_line)?
                .into_inner();
            let f = r.image_filesystems.first().cloned().unwrap_or_default();
            show(
                json,
                &r,
                &[
                    (
                        "mountpoint",
                        f.fs_id.map(|i| i.mountpoint).unwrap_or_default(),
                    ),
                    (
                        "used_bytes",
                        f.used_bytes
                            .map(|v| v.value.to_string())
                            .unwrap_or_default(),
                    ),
                    (
                        "inodes_used",
                        f.inodes_used
                            .map(|v| v.value.to_string())
                            .unwrap_or_default(),
                    ),
                ],
            );
        }
        Cmd::RuntimeConfig => {
            let r = c
                .runtime
                .runtime_config(cri::RuntimeConfigRequest {})
                .await
                .map_err(status_line)?
                .into_inner();
            let d = r
                .linux
                .as_ref()
                .map(|l| {
                    cri::CgroupDriver::try_from(l.cgroup_driver)
                        .map_or("UNKNOWN", |d| d.as_str_name())
                })
                .unwrap_or("");
            show(json, &r, &[("cgroup_driver", d.to_owned())]);
        }
    }
    Ok(0)
}
