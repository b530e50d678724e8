//! Builds the Atoll guest kernel from Debian's `linux-source-6.12` package.
//!
//! Layout under the cache root (`${ATOLL_CACHE:-/var/cache/atoll}`):
//!
//! ```text
//! kernel/src-<version>/   the unpacked source tree, shared by every config
//! kernel/build-<hash>/    make O= directory of one config (kept: rebuilds are incremental)
//! kernel/<hash>/          the result: vmlinux (stripped, PVH note checked), bzImage, config
//! kernel/.lock            flock held while building, so concurrent runs do not collide
//! ```
//!
//! `<hash>` is [`config::config_hash`] of the fragment, the source package version and
//! the cache format. A present `kernel/<hash>/` is reused as is. The result directory
//! is staged next to its final name and renamed, so it is either complete or absent.

pub mod config;
pub mod elf_note;

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::host::{self, InstallPackagesError, PackageVersionError};
use config::{DroppedOption, ParseConfigError};
use elf_note::ElfNoteError;

/// Environment variable naming the cache root.
pub const CACHE_ENV: &str = "ATOLL_CACHE";
/// Cache root when [`CACHE_ENV`] is unset.
pub const DEFAULT_CACHE_ROOT: &str = "/var/cache/atoll";
/// The files of a built kernel, in the cache entry and in `--out`.
pub const ARTIFACTS: [&str; 3] = ["vmlinux", "bzImage", "config"];

/// How often a long make run reports that it is still going.
const HEARTBEAT: Duration = Duration::from_secs(30);

/// The cache root from `ATOLL_CACHE`, else `/var/cache/atoll`.
pub fn cache_root_from_env() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_CACHE_ROOT), PathBuf::from)
}

/// What to build and where.
#[derive(Debug, Clone)]
pub struct KernelBuildOptions {
    /// Cache root; the kernel lives under `<cache_root>/kernel/`.
    pub cache_root: PathBuf,
    /// Also copy the artifacts here.
    pub out_dir: Option<PathBuf>,
    /// The Kconfig fragment text (normally [`config::GUEST_FRAGMENT`]).
    pub fragment: String,
    /// Parallel make jobs.
    pub jobs: usize,
}

impl KernelBuildOptions {
    /// The project fragment, `nproc` jobs, no `--out`.
    pub fn new(cache_root: PathBuf) -> Self {
        Self {
            cache_root,
            out_dir: None,
            fragment: config::GUEST_FRAGMENT.to_owned(),
            jobs: std::thread::available_parallelism().map_or(1, usize::from),
        }
    }
}

/// A built (or reused) kernel.
#[derive(Debug, Clone)]
pub struct KernelArtifacts {
    pub hash: String,
    pub source_version: String,
    /// `<cache>/kernel/<hash>`.
    pub dir: PathBuf,
    pub vmlinux: PathBuf,
    pub bz_image: PathBuf,
    pub config: PathBuf,
    /// True when the cache entry already existed.
    pub reused: bool,
    /// The PVH 32-bit entry address from vmlinux's ELF note.
    pub pvh_entry: u64,
    /// Options set in the final `.config`.
    pub options_set: usize,
}

/// Why building the guest kernel failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildKernelError {
    #[error("invalid kernel config fragment")]
    Fragment(#[source] ParseConfigError),
    #[error("cannot install the kernel build dependencies")]
    Dependencies(#[source] InstallPackagesError),
    #[error("cannot determine the kernel source version")]
    SourceVersion(#[source] PackageVersionError),
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not run {program}")]
    Spawn {
        program: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("unpacking {tarball} failed ({status})")]
    Unpack {
        tarball: PathBuf,
        status: ExitStatus,
    },
    #[error("`make {target}` failed ({status}); full log: {log}; last lines:\n{tail}")]
    Make {
        target: &'static str,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error(
        "make allnoconfig dropped {} requested option(s) (unmet dependencies?): {}; \
         fix the fragment (generated config: {config})",
        .dropped.len(),
        .dropped.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    DroppedOptions {
        dropped: Vec<DroppedOption>,
        config: PathBuf,
    },
    #[error("{path} is not a usable vmlinux")]
    BadElf {
        path: PathBuf,
        #[source]
        source: ElfNoteError,
    },
    #[error("{path} has no PVH entry note (Xen note 0x12); is CONFIG_PVH=y in the fragment?")]
    NoPvhNote { path: PathBuf },
    #[error("`strip` failed on {path} ({status})")]
    Strip { path: PathBuf, status: ExitStatus },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BuildKernelError {
    let path = path.to_owned();
    move |source| BuildKernelError::Io {
        action,
        path,
        source,
    }
}

/// Builds the guest kernel, or reuses the cached build of the same fragment and
/// source version, then copies the artifacts to `out_dir` if given. `progress`
/// receives human-readable status lines.
pub fn build_kernel(
    opts: &KernelBuildOptions,
    progress: &dyn Fn(&str),
) -> Result<KernelArtifacts, BuildKernelError> {
    let fragment = config::parse_config(&opts.fragment).map_err(BuildKernelError::Fragment)?;
    host::ensure_installed(host::KERNEL_BUILD_REQUIREMENTS, progress)
        .map_err(BuildKernelError::Dependencies)?;
    let version = host::package_version(host::KERNEL_SOURCE_PACKAGE)
        .map_err(BuildKernelError::SourceVersion)?;
    let hash = config::config_hash(&opts.fragment, &version);
    let kernel_cache = opts.cache_root.join("kernel");
    fs::create_dir_all(&kernel_cache).map_err(io_err("create", &kernel_cache))?;
    let _lock = CacheLock::acquire(&kernel_cache.join(".lock"), progress)?;

    let dir = kernel_cache.join(&hash);
    let reused = ARTIFACTS.iter().all(|f| dir.join(f).is_file());
    if reused {
        progress(&format!(
            "reusing cached kernel {hash} ({} {version}) in {}",
            host::KERNEL_SOURCE_PACKAGE,
            dir.display()
        ));
    } else {
        progress(&format!(
            "building kernel {hash} from {} {version}",
            host::KERNEL_SOURCE_PACKAGE
        ));
        let src = unpack_source(&kernel_cache, &version, progress)?;
        let build = kernel_cache.join(format!("build-{hash}"));
        configure(&src, &build, &opts.fragment, &fragment, progress)?;
        let started = Instant::now();
        progress(&format!(
            "make -j{} bzImage in {} (log: {})",
            opts.jobs,
            build.display(),
            build.join("build.log").display()
        ));
        run_make(
            &src,
            &build,
            &[&format!("-j{}", opts.jobs), "bzImage"],
            "bzImage",
            progress,
        )?;
        progress(&format!("kernel built in {:.0?}", started.elapsed()));
        publish(&build, &kernel_cache, &dir)?;
        progress(&format!("kernel cached in {}", dir.display()));
    }

    let vmlinux = dir.join("vmlinux");
    let pvh_entry = check_pvh(&vmlinux)?;
    let config_path = dir.join("config");
    let config_text = fs::read_to_string(&config_path).map_err(io_err("read", &config_path))?;
    let generated = config::parse_config(&config_text).map_err(BuildKernelError::Fragment)?;
    let artifacts = KernelArtifacts {
        hash,
        source_version: version,
        bz_image: dir.join("bzImage"),
        config: config_path,
        vmlinux,
        dir,
        reused,
        pvh_entry,
        options_set: config::count_set(&generated),
    };
    if let Some(out) = &opts.out_dir {
        copy_artifacts(&artifacts.dir, out)?;
        progress(&format!(
            "copied {} to {}",
            ARTIFACTS.join(", "),
            out.display()
        ));
    }
    Ok(artifacts)
}

/// Unpacks the source tarball once per package version into `src-<version>`.
fn unpack_source(
    kernel_cache: &Path,
    version: &str,
    progress: &dyn Fn(&str),
) -> Result<PathBuf, BuildKernelError> {
    let name = format!("src-{}", path_safe(version));
    let src = kernel_cache.join(&name);
    if src.join("Makefile").is_file() {
        progress(&format!("reusing kernel source in {}", src.display()));
        return Ok(src);
    }
    let tarball = PathBuf::from(host::KERNEL_SOURCE_TARBALL);
    let partial = kernel_cache.join(format!(".{name}.partial"));
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io_err("remove", &partial))?;
    }
    fs::create_dir(&partial).map_err(io_err("create", &partial))?;
    progress(&format!(
        "unpacking {} into {}",
        tarball.display(),
        src.display()
    ));
    let status = Command::new("tar")
        .arg("-xJf")
        .arg(&tarball)
        .arg("--strip-components=1")
        .arg("-C")
        .arg(&partial)
        .stdin(Stdio::null())
        .status()
        .map_err(|source| BuildKernelError::Spawn {
            program: "tar",
            source,
        })?;
    if !status.success() {
        return Err(BuildKernelError::Unpack { tarball, status });
    }
    fs::rename(&partial, &src).map_err(io_err("rename into place", &src))?;
    Ok(src)
}

/// Debian versions contain `~` and `+`; keep directory names to a plain set.
fn path_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Runs `make allnoconfig` with the fragment and checks the result.
fn configure(
    src: &Path,
    build: &Path,
    fragment_text: &str,
    fragment: &std::collections::BTreeMap<String, config::OptionValue>,
    progress: &dyn Fn(&str),
) -> Result<(), BuildKernelError> {
    fs::create_dir_all(build).map_err(io_err("create", build))?;
    let fragment_path = build.join("atoll-guest.config");
    fs::write(&fragment_path, fragment_text).map_err(io_err("write", &fragment_path))?;
    progress("make allnoconfig with the config fragment");
    let allconfig = format!("KCONFIG_ALLCONFIG={}", fragment_path.display());
    run_make(
        src,
        build,
        &[&allconfig, "allnoconfig"],
        "allnoconfig",
        progress,
    )?;
    let dot_config = build.join(".config");
    let text = fs::read_to_string(&dot_config).map_err(io_err("read", &dot_config))?;
    let generated = config::parse_config(&text).map_err(BuildKernelError::Fragment)?;
    let dropped = config::dropped_options(fragment, &generated);
    if !dropped.is_empty() {
        return Err(BuildKernelError::DroppedOptions {
            dropped,
            config: dot_config,
        });
    }
    progress(&format!(
        "config ok: all {} requested options applied, {} options set",
        fragment.len(),
        config::count_set(&generated)
    ));
    Ok(())
}

/// Runs make in the source tree with `O=build`, output appended to `build/build.log`,
/// and a heartbeat line while it runs.
fn run_make(
    src: &Path,
    build: &Path,
    args: &[&str],
    target: &'static str,
    progress: &dyn Fn(&str),
) -> Result<(), BuildKernelError> {
    let log_path = build.join("build.log");
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io_err("open", &log_path))?;
    let log_err = log.try_clone().map_err(io_err("open", &log_path))?;
    let mut child = Command::new("make")
        .arg("-C")
        .arg(src)
        .arg(format!("O={}", build.display()))
        .arg("ARCH=x86")
        .args(args)
        // Reproducible version strings; no jobserver inherited from a parent make.
        .env("KBUILD_BUILD_USER", "atoll")
        .env("KBUILD_BUILD_HOST", "atoll")
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|source| BuildKernelError::Spawn {
            program: "make",
            source,
        })?;
    let started = Instant::now();
    let mut next_beat = HEARTBEAT;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|source| BuildKernelError::Spawn {
            program: "make",
            source,
        })? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(250));
        if started.elapsed() >= next_beat {
            next_beat += HEARTBEAT;
            let last = log_tail(&log_path, 1);
            progress(&format!("  ... {:.0?}: {}", started.elapsed(), last.trim()));
        }
    };
    if status.success() {
        Ok(())
    } else {
        Err(BuildKernelError::Make {
            target,
            status,
            tail: log_tail(&log_path, 25),
            log: log_path,
        })
    }
}

/// The last `lines` lines of a log file (best effort: empty on error).
fn log_tail(path: &Path, lines: usize) -> String {
    let read = || -> io::Result<String> {
        let mut f = fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = read().unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Stages stripped vmlinux, bzImage and config next to `dir`, then renames.
fn publish(build: &Path, kernel_cache: &Path, dir: &Path) -> Result<(), BuildKernelError> {
    let name = dir
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let stage = kernel_cache.join(format!(".{name}.partial"));
    if stage.exists() {
        fs::remove_dir_all(&stage).map_err(io_err("remove", &stage))?;
    }
    fs::create_dir(&stage).map_err(io_err("create", &stage))?;

    let built = build.join("vmlinux");
    check_pvh(&built)?;
    let stripped = stage.join("vmlinux");
    let status = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(&built)
        .stdin(Stdio::null())
        .status()
        .map_err(|source| BuildKernelError::Spawn {
            program: "strip",
            source,
        })?;
    if !status.success() {
        return Err(BuildKernelError::Strip {
            path: built,
            status,
        });
    }
    // The note must survive stripping: it is how the VMM finds the entry point.
    check_pvh(&stripped)?;
    for (from, to) in [
        (build.join("arch/x86/boot/bzImage"), "bzImage"),
        (build.join(".config"), "config"),
    ] {
        fs::copy(&from, stage.join(to)).map_err(io_err("copy", &from))?;
    }
    sync_dir(&stage)?;
    fs::rename(&stage, dir).map_err(io_err("rename into place", dir))?;
    sync_dir(kernel_cache)
}

fn sync_dir(dir: &Path) -> Result<(), BuildKernelError> {
    for entry in fs::read_dir(dir).map_err(io_err("read", dir))? {
        let path = entry.map_err(io_err("read", dir))?.path();
        if path.is_file() {
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_err("sync", &path))?;
        }
    }
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err("sync", dir))
}

/// Reads vmlinux and returns its PVH entry address.
pub fn check_pvh(vmlinux: &Path) -> Result<u64, BuildKernelError> {
    let image = fs::read(vmlinux).map_err(io_err("read", vmlinux))?;
    match elf_note::pvh_entry(&image) {
        Ok(Some(entry)) => Ok(entry),
        Ok(None) => Err(BuildKernelError::NoPvhNote {
            path: vmlinux.to_owned(),
        }),
        Err(source) => Err(BuildKernelError::BadElf {
            path: vmlinux.to_owned(),
            source,
        }),
    }
}

/// Copies the artifacts into `out`, each through a temporary name and a rename.
fn copy_artifacts(from: &Path, out: &Path) -> Result<(), BuildKernelError> {
    fs::create_dir_all(out).map_err(io_err("create", out))?;
    for name in ARTIFACTS {
        let tmp = out.join(format!(".{name}.tmp-{}", std::process::id()));
        let src = from.join(name);
        fs::copy(&src, &tmp).map_err(io_err("copy", &src))?;
        let dst = out.join(name);
        fs::rename(&tmp, &dst).map_err(io_err("rename into place", &dst))?;
    }
    Ok(())
}

/// An exclusive `flock` on the kernel cache, released on drop (with the file).
struct CacheLock {
    _file: fs::File,
}

impl CacheLock {
    fn acquire(path: &Path, progress: &dyn Fn(&str)) -> Result<Self, BuildKernelError> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err("open", path))?;
        let fd = file.as_raw_fd();
        // SAFETY: `fd` is an open descriptor owned by `file`, alive for the call.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            progress(&format!(
                "waiting for another build holding {}",
                path.display()
            ));
            // SAFETY: as above; a blocking lock on a valid descriptor.
            if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
                return Err(io_err("lock", path)(io::Error::last_os_error()));
            }
        }
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_safe_replaces_debian_version_punctuation() {
        assert_eq!(path_safe("6.12.117-1~deb12u1"), "6.12.117-1_deb12u1");
        assert_eq!(path_safe("1:2.3+b1"), "1_2.3_b1");
    }

    #[test]
    fn copy_artifacts_copies_all_three_and_leaves_no_temp_files() {
        let from = tempfile::tempdir().unwrap();
        for name in ARTIFACTS {
            fs::write(from.path().join(name), name).unwrap();
        }
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("nested/build");
        copy_artifacts(from.path(), &dest).unwrap();
        let mut names: Vec<String> = fs::read_dir(&dest)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["bzImage", "config", "vmlinux"]);
        assert_eq!(fs::read_to_string(dest.join("config")).unwrap(), "config");
    }

    #[test]
    fn log_tail_returns_last_nonempty_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        fs::write(&log, "a\nb\n\nc\n\n").unwrap();
        assert_eq!(log_tail(&log, 2), "b\nc");
        assert_eq!(log_tail(&dir.path().join("missing"), 2), "");
    }
}
