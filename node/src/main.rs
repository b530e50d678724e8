//! `atoll-node`: run a shell command where a real KVM is (the host, or the nested KVM
//! node), or prepare the node's cache.
//!
//! ```text
//! atoll-node where
//! atoll-node prepare
//! atoll-node run [--with-qemu] [--file HOST:NAME]... [--timeout SECS] [--cpus N] [--memory MIB]
//!                [--console] [-v] -- CMD...
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use atoll_node::kernel::{self, Refresh};
use atoll_node::runner::parse_file_arg;
use atoll_node::{Runner, Source, Where};

#[derive(Parser)]
#[command(
    name = "atoll-node",
    about = "Run commands on a real KVM: the host's, or the nested KVM node's"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Say where KVM workloads run on this machine, and why.
    Where,
    /// Install host packages and fetch/cache the node kernel and modules.
    Prepare,
    /// Run CMD (joined with spaces, run by `sh`); print its output; exit with its status.
    Run {
        /// Carry QEMU (binary, libraries, firmware) into the node.
        #[arg(long)]
        with_qemu: bool,
        /// Carry this host program (absolute path) and its libraries (repeatable).
        #[arg(long = "host-program", value_name = "PATH")]
        host_programs: Vec<PathBuf>,
        /// Make HOST available as $ATOLL_ARTIFACTS/NAME (NAME relative; repeatable).
        #[arg(long = "file", value_name = "HOST:NAME", value_parser = parse_file_arg)]
        files: Vec<(PathBuf, PathBuf)>,
        /// Kill the run after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// The node's vCPUs (QEMU TCG runs one host thread per vCPU).
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// The node's memory in MiB.
        #[arg(long, default_value_t = 2048)]
        memory: u32,
        /// Also stream L1's serial console to stderr.
        #[arg(long)]
        console: bool,
        /// Print where it ran and timings to stderr.
        #[arg(short, long)]
        verbose: bool,
        /// Run here even if the host KVM is not usable (`host`), or force the node (`node`).
        #[arg(long, value_parser = ["auto", "host", "node"], default_value = "auto")]
        place: String,
        /// The command.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("atoll-node: {e:#}");
            ExitCode::from(125)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Where => {
            let w = Where::detect();
            println!("{}: {w}", if w.is_nested() { "node" } else { "host" });
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Prepare => {
            let k = kernel::prepare(Refresh::Resolve).context("preparing the nested node")?;
            println!("package  {} {}", k.package, k.version);
            println!("cache    {}", k.dir.display());
            println!("kernel   {}", k.vmlinuz.display());
            println!("boots    {}", k.boot_image.display());
            for m in &k.modules {
                println!("module   {}", m.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            with_qemu,
            host_programs,
            files,
            timeout,
            cpus,
            memory,
            console,
            verbose,
            place,
            command,
        } => {
            let place = match place.as_str() {
                "host" => Where::HostKvm,
                "node" => Where::NestedNode("forced with --place node".into()),
                _ => Where::detect(),
            };
            if verbose {
                eprintln!("atoll-node: {place}");
            }
            let mut runner = Runner::new(place)
                .with_qemu(with_qemu)
                .node_size(memory, cpus)
                .timeout(Duration::from_secs(timeout))
                .on_line(move |src, line| match src {
                    // Output goes to stdout as it arrives; nothing is printed twice.
                    Source::Output => println!("{line}"),
                    Source::Runner => eprintln!("atoll-node: {line}"),
                    Source::Console if console => eprintln!("[console] {line}"),
                    // Retries are on stderr already.
                    Source::Console | Source::Retry => {}
                });
            for (host, name) in files {
                runner = runner.file(host, name)?;
            }
            for program in host_programs {
                runner = runner.host_program(program);
            }
            let out = runner.run(&command.join(" "))?;
            if verbose {
                eprintln!("atoll-node: status {} in {} ms", out.status, out.total_ms);
                if let Some(n) = &out.node {
                    eprintln!("atoll-node: {n:?}");
                }
            }
            Ok(ExitCode::from(u8::try_from(out.status).unwrap_or(255)))
        }
    }
}
