//! `atoll-vmm`: boot one microVM and exit with the guest's exit status.

use std::io::{IsTerminal, LineWriter};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use atoll_vmm::builder::{self, DeviceConfig, Outcome, VmConfig};
use clap::Parser;

/// The command line every guest gets unless `--cmdline` replaces it.
const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet";

/// Exit status when the guest crashed or reset without reporting a status.
const EXIT_GUEST_CRASHED: u8 = 123;
/// Exit status when `--timeout` expired (as coreutils `timeout`).
const EXIT_TIMED_OUT: u8 = 124;

/// Boot a Linux kernel in a KVM microVM; exit with the status the guest reports.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    after_help = "\
Exit status: the guest's own status (0-255) as reported through the exit port;
1 when the VM cannot start; 123 when the guest crashed or reset without reporting;
124 when --timeout expired.

Arguments after `--` are passed to the guest's init as its argv (appended to the
kernel command line after `--`)."
)]
struct Args {
    /// Kernel image: an ELF vmlinux (booted through its PVH entry) or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk (cpio, optionally compressed).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem: u64,
    /// Stop the VM after this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
    /// Attach a virtio-rng device fed from the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// Write VM exit counts, boot stage times and peak RSS as JSON to this file.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Log filter (also RUST_LOG), e.g. `debug`.
    #[arg(long, default_value = "warn")]
    log: String,
    /// Arguments for the guest's init.
    #[arg(last = true)]
    init_args: Vec<String>,
}

fn cmdline_with_init_args(base: &str, args: &[String]) -> anyhow::Result<String> {
    if args.is_empty() {
        return Ok(base.to_string());
    }
    let mut s = format!("{base} --");
    for a in args {
        if a.contains('"') || a.contains('\n') {
            bail!("init argument {a:?} contains a double quote or newline, which the kernel command line cannot carry");
        }
        if a.is_empty() || a.contains(char::is_whitespace) {
            s.push_str(&format!(" \"{a}\""));
        } else {
            s.push(' ');
            s.push_str(a);
        }
    }
    Ok(s)
}

fn main() -> ExitCode {
    let start = Instant::now();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log)),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args, start) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("atoll-vmm: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args, start: Instant) -> anyhow::Result<u8> {
    let config = VmConfig {
        cmdline: cmdline_with_init_args(&args.cmdline, &args.init_args)?,
        kernel: args.kernel,
        initrd: args.initrd,
        vcpus: args.vcpus,
        mem_mib: args.mem,
        timeout: (args.timeout > 0).then(|| Duration::from_secs(args.timeout)),
        console_input: std::io::stdin().is_terminal() || !stdin_is_devnull(),
        devices: if args.rng {
            vec![DeviceConfig::Rng]
        } else {
            vec![]
        },
    };
    let console = Box::new(LineWriter::new(std::io::stdout()));
    let report = builder::run(&config, start, console)?;
    if let Some(path) = &args.metrics {
        let mut json = serde_json::to_value(&report.metrics)?;
        json["outcome"] = serde_json::Value::String(format!("{:?}", report.outcome));
        json["kernel_format"] = serde_json::Value::String(format!("{:?}", report.format));
        json["devices"] = serde_json::to_value(&report.devices)?;
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("cannot write metrics to {}", path.display()))?;
    }
    Ok(match report.outcome {
        Outcome::Exited(status) => status,
        Outcome::PoweredOff => {
            eprintln!("atoll-vmm: the guest powered off without reporting an exit status");
            0
        }
        Outcome::Crashed(why) => {
            eprintln!("atoll-vmm: error: {why}");
            EXIT_GUEST_CRASHED
        }
        Outcome::TimedOut(t) => {
            eprintln!(
                "atoll-vmm: error: the guest did not finish within {}s (--timeout); stopped it",
                t.as_secs()
            );
            EXIT_TIMED_OUT
        }
    })
}

/// True when stdin is /dev/null or closed: nothing to feed the console.
fn stdin_is_devnull() -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(stdin), Ok(null)) = (
        std::fs::metadata("/proc/self/fd/0"),
        std::fs::metadata("/dev/null"),
    ) else {
        return true;
    };
    stdin.rdev() == null.rdev() && stdin.ino() == null.ino()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_args_are_appended_and_quoted() {
        let c = cmdline_with_init_args(
            "console=ttyS0",
            &["sh".into(), "-c".into(), "exit 7".into()],
        )
        .unwrap();
        assert_eq!(c, "console=ttyS0 -- sh -c \"exit 7\"");
        assert_eq!(cmdline_with_init_args("a", &[]).unwrap(), "a");
        assert!(cmdline_with_init_args("a", &["say \"hi\"".into()]).is_err());
    }
}
