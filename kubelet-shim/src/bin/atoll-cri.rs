//! `atoll-cri`: the Kubernetes CRI v1 server of Atoll. Point kubelet's
//! `--container-runtime-endpoint` at its socket (default
//! `unix:///run/atoll/atoll-cri.sock`); pods become microVMs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use atoll_cri::cli::artifacts;
use atoll_cri::cri::{self, config::Config, server};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "atoll-cri",
    version,
    about = "Kubernetes CRI v1 server: every pod a microVM"
)]
struct Args {
    /// The configuration file.
    #[arg(long, default_value = cri::config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// Listen here instead of the config's `socket`.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Keep state here instead of the config's `state_dir`.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Put pod directories here instead of the config's `run_dir`.
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("atoll-cri: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let explicit = args.config.as_os_str() != cri::config::DEFAULT_CONFIG;
    let mut cfg = Config::load(&args.config, explicit)?;
    if let Some(s) = args.socket {
        cfg.socket = s;
    }
    if let Some(d) = args.state_dir {
        cfg.state_dir = d;
    }
    if let Some(d) = args.run_dir {
        cfg.run_dir = d;
    }
    let artifacts = server::Artifacts {
        kernel: artifacts::find_here(artifacts::KERNEL, cfg.kernel.as_deref())?,
        initramfs: artifacts::find_here(artifacts::INITRAMFS, cfg.initramfs.as_deref())?,
        vmm: artifacts::find_here(artifacts::VMM, cfg.vmm.as_deref())?,
    };
    let store = cfg
        .image_store
        .clone()
        .unwrap_or_else(atoll_cri::pod::image::store_root);
    let socket = cfg.socket.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(256)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // The socket first: a second server fails here, before it touches the state.
        let listener = cri::bind(&socket)?;
        let server = match server::Server::new(cfg, artifacts, store) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                let _ = std::fs::remove_file(&socket);
                return Err(e.into());
            }
        };
        server.recover();
        server.spawn_watcher();
        server.spawn_volume_sync();
        let pool = Arc::clone(&server.pool);
        tracing::info!("serving CRI v1 on {}", socket.display());
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("stopping: running pods keep running");
        };
        let served = cri::serve(server, listener, shutdown).await;
        // The VMMs waiting for sandboxes go; the sandboxes' own keep running.
        pool.close();
        served?;
        let _ = std::fs::remove_file(&socket);
        Ok::<_, anyhow::Error>(())
    })
}
