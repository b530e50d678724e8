//! `atoll-bench`: Atoll's benchmarks. Each subcommand prints a short table and saves
//! its numbers as JSON. Benchmarks that need a real KVM run on the host when its KVM
//! can run a standard guest, and inside the nested KVM node otherwise (the same
//! binary runs there, as `*-inner`).

mod boot;
mod common;
mod confine;
mod cri;
mod io;
mod proc;
mod restore;
mod run;
mod stats;
mod vsock;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(version, about = "Atoll benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot the same vmlinux + initramfs N times with atoll-vmm and with QEMU microvm,
    /// alternating, in one node run; time process launch -> the guest's ready marker.
    Boot {
        /// Measured boots per VMM (after one warm-up each).
        #[arg(long, default_value_t = 10)]
        runs: u32,
        /// Where to save the JSON.
        #[arg(long, default_value = "perf/results/boot.json")]
        json: PathBuf,
        /// Directory with vmlinux and initramfs.cpio.
        #[arg(long, default_value = "build")]
        artifacts: PathBuf,
        /// Directory with the static atoll-vmm and atoll-bench.
        #[arg(long, default_value = "target/x86_64-unknown-linux-gnu/release")]
        bin: PathBuf,
        /// vCPUs of each guest.
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// Memory of each guest in MiB.
        #[arg(long, default_value_t = 128)]
        mem: u32,
    },
    /// The measuring half of `boot`, run where the KVM is (inside the node or on the host).
    #[command(hide = true)]
    BootInner(boot::InnerArgs),
    /// virtio-blk throughput: sequential read MiB/s and 4 KiB random-read IOPS in the
    /// guest (O_DIRECT), atoll-vmm against QEMU microvm's virtio-blk, plus VM exits
    /// per I/O from atoll-vmm's metrics.
    Io {
        /// Rounds per VMM (alternating).
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// 4 KiB random reads per guest.
        #[arg(long, default_value_t = 2000)]
        rand_ios: u32,
        /// Where to save the JSON.
        #[arg(long, default_value = "perf/results/io.json")]
        json: PathBuf,
        /// Directory with vmlinux.
        #[arg(long, default_value = "build")]
        artifacts: PathBuf,
        /// Directory with the static atoll-vmm, atoll-init, atoll-image and atoll-bench.
        #[arg(long, default_value = "target/x86_64-unknown-linux-gnu/release")]
        bin: PathBuf,
    },
    /// The measuring half of `io`, run where the KVM is.
    #[command(hide = true)]
    IoInner(io::InnerArgs),
    /// The guest half of `io`: timed O_DIRECT reads of a disk.
    #[command(hide = true)]
    IoGuest(io::GuestArgs),
    /// virtio-vsock: 64-byte round-trip latency and echo throughput between a host
    /// program and the guest through atoll-vmm's Unix-socket backend.
    Vsock(vsock::Args),
    /// Pod start: `atoll run IMAGE -- echo` against `runc run` of the same image's
    /// bundle, alternating, launch -> first output line, with atoll's phases.
    Run(run::Args),
    /// Pod VM to "agent answers": cold boot vs restore of the pod template, alternating
    /// in one node run, with guest RAM touched and VM exits at that moment.
    Restore(restore::Args),
    #[command(hide = true)]
    RestoreInner(restore::InnerArgs),
    /// N idle clones of one pod template: creation rate and memory per clone.
    Density(restore::Args),
    #[command(hide = true)]
    DensityInner(restore::InnerArgs),
    /// The measuring half of `run`, run where the KVM is.
    #[command(hide = true)]
    RunInner(run::InnerArgs),
    /// CRI pod start (RunPodSandbox + CreateContainer + StartContainer): atoll-cri
    /// against containerd with runc, alternating in one node run; and N pods at once.
    Cri(cri::Args),
    #[command(hide = true)]
    CriInner(cri::InnerArgs),
    /// The cost of confinement: atoll-vmm jailed and filtered against `--no-jail
    /// --no-seccomp`, cold boot and restore, alternating in one node run.
    Confine(confine::Args),
    #[command(hide = true)]
    ConfineInner(confine::InnerArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Boot {
            runs,
            json,
            artifacts,
            bin,
            vcpus,
            mem,
        } => boot::outer(&boot::OuterArgs {
            runs,
            json,
            artifacts,
            bin,
            vcpus,
            mem,
        }),
        Cmd::BootInner(args) => boot::inner(&args),
        Cmd::Io {
            runs,
            rand_ios,
            json,
            artifacts,
            bin,
        } => io::outer(&io::OuterArgs {
            runs,
            rand_ios,
            json,
            artifacts,
            bin,
        }),
        Cmd::IoInner(args) => io::inner(&args),
        Cmd::IoGuest(args) => io::guest(&args),
        Cmd::Vsock(args) => vsock::outer(&args),
        Cmd::Run(args) => run::outer(&args),
        Cmd::RunInner(args) => run::inner(&args),
        Cmd::Cri(args) => cri::outer(&args),
        Cmd::CriInner(args) => cri::inner(&args),
        Cmd::Confine(args) => confine::outer(&args),
        Cmd::ConfineInner(args) => confine::inner(&args),
        Cmd::Restore(args) => restore::outer(restore::Kind::Restore, &args),
        Cmd::RestoreInner(args) => restore::restore_inner(&args),
        Cmd::Density(args) => restore::outer(restore::Kind::Density, &args),
        Cmd::DensityInner(args) => restore::density_inner(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("atoll-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
