//! Host tools for image building: which Debian packages a step needs, installing the
//! missing ones with `apt-get` (non-interactively, only when something is missing),
//! and asking dpkg for a package's version.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// How to tell whether a requirement is already met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// An executable found on `PATH`.
    Command(&'static str),
    /// A file that exists (headers, source tarballs).
    File(&'static str),
}

/// Something a build step needs and the Debian package that provides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirement {
    pub probe: Probe,
    pub package: &'static str,
}

const fn cmd(name: &'static str, package: &'static str) -> Requirement {
    Requirement {
        probe: Probe::Command(name),
        package,
    }
}

const fn file(path: &'static str, package: &'static str) -> Requirement {
    Requirement {
        probe: Probe::File(path),
        package,
    }
}

/// The Debian package that ships the guest kernel's source.
pub const KERNEL_SOURCE_PACKAGE: &str = "linux-source-6.12";
/// Where that package puts the source tarball.
pub const KERNEL_SOURCE_TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";

/// Everything `atoll-image kernel` needs on a Debian 12 host.
pub const KERNEL_BUILD_REQUIREMENTS: &[Requirement] = &[
    cmd("make", "make"),
    cmd("gcc", "gcc"),
    file("/usr/include/stdio.h", "libc6-dev"),
    cmd("bc", "bc"),
    cmd("flex", "flex"),
    cmd("bison", "bison"),
    cmd("perl", "perl"),
    cmd("tar", "tar"),
    cmd("xz", "xz-utils"),
    cmd("lz4", "lz4"),
    cmd("cpio", "cpio"),
    cmd("strip", "binutils"),
    file("/usr/include/libelf.h", "libelf-dev"),
    file("/usr/include/openssl/opensslv.h", "libssl-dev"),
    file(KERNEL_SOURCE_TARBALL, KERNEL_SOURCE_PACKAGE),
];

/// Errors while making sure host packages are installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallPackagesError {
    #[error("missing Debian packages {}; run as root or install them with: apt-get install {}", .packages.join(" "), .packages.join(" "))]
    NotRoot { packages: Vec<String> },
    #[error("could not run apt-get")]
    Spawn(#[source] io::Error),
    #[error("apt-get install {} failed ({status}); see its output above", .packages.join(" "))]
    AptFailed {
        packages: Vec<String>,
        status: std::process::ExitStatus,
    },
    #[error("still missing after installing {}: {}", .packages.join(" "), .missing.join(", "))]
    StillMissing {
        packages: Vec<String>,
        missing: Vec<String>,
    },
}

/// Errors while asking dpkg for a package version.
#[derive(Debug, thiserror::Error)]
pub enum PackageVersionError {
    #[error("could not run dpkg-query")]
    Spawn(#[source] io::Error),
    #[error("package {package} is not installed (dpkg-query: {stderr})")]
    NotInstalled { package: String, stderr: String },
}

/// Packages (sorted, without duplicates) whose requirement `is_met` rejects.
pub fn missing_packages(
    requirements: &[Requirement],
    is_met: impl Fn(&Probe) -> bool,
) -> Vec<String> {
    let mut pkgs: Vec<String> = requirements
        .iter()
        .filter(|r| !is_met(&r.probe))
        .map(|r| r.package.to_owned())
        .collect();
    pkgs.sort();
    pkgs.dedup();
    pkgs
}

/// Checks a probe against this host.
pub fn probe_host(probe: &Probe) -> bool {
    match probe {
        Probe::Command(name) => find_in_path(name).is_some(),
        Probe::File(path) => Path::new(path).exists(),
    }
}

/// The first executable called `name` on `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Installs the packages behind unmet `requirements` with apt-get. Does nothing when
/// all are met. `progress` receives one line per step.
pub fn ensure_installed(
    requirements: &[Requirement],
    progress: &dyn Fn(&str),
) -> Result<(), InstallPackagesError> {
    let packages = missing_packages(requirements, probe_host);
    if packages.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(InstallPackagesError::NotRoot { packages });
    }
    progress(&format!("installing {}", packages.join(" ")));
    let mut status = apt(&install_args(&packages))?;
    if !status.success() {
        // A fresh machine may have no package lists yet.
        progress("apt-get install failed; running apt-get update and retrying");
        apt(&["update", "-q"])?;
        status = apt(&install_args(&packages))?;
    }
    if !status.success() {
        return Err(InstallPackagesError::AptFailed { packages, status });
    }
    let missing: Vec<String> = requirements
        .iter()
        .filter(|r| !probe_host(&r.probe))
        .map(|r| format!("{:?}", r.probe))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(InstallPackagesError::StillMissing { packages, missing })
    }
}

fn install_args(packages: &[String]) -> Vec<&str> {
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(packages.iter().map(String::as_str));
    args
}

/// Runs apt-get with its output on our stderr (stdout stays clean for results).
fn apt(args: &[&str]) -> Result<std::process::ExitStatus, InstallPackagesError> {
    Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(stderr_stdio().map_err(InstallPackagesError::Spawn)?)
        .status()
        .map_err(InstallPackagesError::Spawn)
}

/// A `Stdio` that writes to this process's stderr.
pub fn stderr_stdio() -> io::Result<Stdio> {
    use std::os::fd::AsFd;
    Ok(Stdio::from(io::stderr().as_fd().try_clone_to_owned()?))
}

/// The installed version of a Debian package (`dpkg-query -W`).
pub fn package_version(package: &str) -> Result<String, PackageVersionError> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", package])
        .stdin(Stdio::null())
        .output()
        .map_err(PackageVersionError::Spawn)?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || version.is_empty() {
        return Err(PackageVersionError::NotInstalled {
            package: package.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_packages_all_met_is_empty() {
        assert!(missing_packages(KERNEL_BUILD_REQUIREMENTS, |_| true).is_empty());
    }

    #[test]
    fn missing_packages_sorted_and_deduplicated() {
        let reqs = [
            cmd("readelf", "binutils"),
            cmd("strip", "binutils"),
            cmd("bc", "bc"),
            cmd("make", "make"),
        ];
        let missing = missing_packages(&reqs, |p| *p == Probe::Command("make"));
        assert_eq!(missing, ["bc", "binutils"]);
    }

    #[test]
    fn kernel_requirements_include_source_and_headers() {
        let all = missing_packages(KERNEL_BUILD_REQUIREMENTS, |_| false);
        for pkg in [
            "linux-source-6.12",
            "libelf-dev",
            "libssl-dev",
            "flex",
            "bison",
            "bc",
        ] {
            assert!(all.iter().any(|p| p == pkg), "{pkg}");
        }
    }

    #[test]
    fn find_in_path_finds_sh_not_nonsense() {
        assert!(find_in_path("sh").is_some());
        assert!(find_in_path("atoll-no-such-tool-xyz").is_none());
    }
}
