//! `atoll-image`: command-line front end of the `atoll_image` library.

use std::path::PathBuf;

use anyhow::Context;
use atoll_image::initramfs::{self, AddSpec, InitramfsSpec};
use atoll_image::kernel::{self, KernelBuildOptions};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "atoll-image",
    version,
    about = "Builds Atoll guest kernels and initramfs images"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build (or reuse from the cache) the guest kernel: vmlinux, bzImage, config.
    Kernel {
        /// Also copy vmlinux, bzImage and config into this directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Cache root; the kernel goes to <cache>/kernel/<hash>/.
        #[arg(long, env = kernel::CACHE_ENV, default_value = kernel::DEFAULT_CACHE_ROOT)]
        cache: PathBuf,
        /// Use this Kconfig fragment instead of the built-in atoll-guest.config.
        #[arg(long)]
        fragment: Option<PathBuf>,
        /// Parallel make jobs (default: number of CPUs).
        #[arg(long, short)]
        jobs: Option<usize>,
    },
    /// Write an uncompressed newc initramfs with /init and the base layout.
    Initramfs {
        /// The static atoll-init binary, stored as /init.
        #[arg(long)]
        init: PathBuf,
        /// Extra host file or directory tree, as HOST:GUEST (repeatable).
        #[arg(long = "add", value_name = "HOST:GUEST")]
        add: Vec<AddSpec>,
        /// A static busybox to add as /bin/busybox with its applet links in /bin.
        #[arg(long)]
        busybox: Option<PathBuf>,
        /// Output file (written atomically).
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn progress(line: &str) {
    eprintln!("atoll-image: {line}");
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole cause chain, no backtrace.
            eprintln!("atoll-image: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Kernel {
            out,
            cache,
            fragment,
            jobs,
        } => {
            let mut opts = KernelBuildOptions::new(cache);
            opts.out_dir = out;
            if let Some(path) = fragment {
                opts.fragment = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read fragment {}", path.display()))?;
            }
            if let Some(jobs) = jobs {
                opts.jobs = jobs.max(1);
            }
            let k = kernel::build_kernel(&opts, &progress)?;
            progress(&format!(
                "kernel {} ({} options, PVH entry {:#x}): {}",
                k.hash,
                k.options_set,
                k.pvh_entry,
                k.dir.display()
            ));
            println!("{}", k.dir.display());
        }
        Cmd::Initramfs {
            init,
            add,
            busybox,
            output,
        } => {
            let mut spec = InitramfsSpec::new(init, add);
            spec.busybox = busybox;
            let s = initramfs::write_initramfs(&spec, &output)?;
            progress(&format!(
                "wrote {} ({} entries, {} bytes)",
                output.display(),
                s.entries,
                s.bytes
            ));
        }
    }
    Ok(())
}
