//! Where `atoll run` finds the guest kernel, the initramfs and the VMM: the flag,
//! else an environment variable, else next to the `atoll` executable, else the
//! checkout's `build/` and static target directory.

use std::path::{Path, PathBuf};

/// The static target directory of a checkout, relative to its root.
pub const STATIC_TARGET_DIR: &str = "target/x86_64-unknown-linux-gnu/release";

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{what} {path} (from {source_of}) does not exist")]
    Missing {
        what: &'static str,
        path: PathBuf,
        source_of: &'static str,
    },
    #[error(
        "cannot find the {what} ({file}): looked in {looked}; build it with `make artifacts` \
         or pass {flag}"
    )]
    NotFound {
        what: &'static str,
        file: &'static str,
        looked: String,
        flag: &'static str,
    },
}

/// One artifact to look for.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    pub what: &'static str,
    pub file: &'static str,
    pub env: &'static str,
    pub flag: &'static str,
    /// Relative to a checkout root.
    pub in_checkout: &'static str,
}

pub const KERNEL: Kind = Kind {
    what: "guest kernel",
    file: "vmlinux",
    env: "ATOLL_KERNEL",
    flag: "--kernel",
    in_checkout: "build/vmlinux",
};
pub const INITRAMFS: Kind = Kind {
    what: "guest initramfs",
    file: "initramfs.cpio",
    env: "ATOLL_INITRAMFS",
    flag: "--initramfs",
    in_checkout: "build/initramfs.cpio",
};
pub const VMM: Kind = Kind {
    what: "VMM",
    file: "atoll-vmm",
    env: "ATOLL_VMM",
    flag: "--vmm",
    in_checkout: "target/x86_64-unknown-linux-gnu/release/atoll-vmm",
};

/// Finds `kind`: `flag`, else `$env`, else `<exe_dir>/<file>`, else
/// `<checkout>/<in_checkout>` for each checkout root.
pub fn find(
    kind: Kind,
    flag: Option<&Path>,
    env: Option<PathBuf>,
    exe_dir: Option<&Path>,
    checkouts: &[PathBuf],
) -> Result<PathBuf, ArtifactError> {
    if let Some(p) = flag {
        return exists(kind, p.to_owned(), "the command line");
    }
    if let Some(p) = env.filter(|p| !p.as_os_str().is_empty()) {
        return exists(kind, p, kind.env);
    }
    let mut looked = Vec::new();
    let candidates = exe_dir
        .map(|d| d.join(kind.file))
        .into_iter()
        .chain(checkouts.iter().map(|c| c.join(kind.in_checkout)));
    for c in candidates {
        if c.is_file() {
            return Ok(c);
        }
        looked.push(c.display().to_string());
    }
    Err(ArtifactError::NotFound {
        what: kind.what,
        file: kind.file,
        looked: if looked.is_empty() {
            "nowhere".into()
        } else {
            looked.join(", ")
        },
        flag: kind.flag,
    })
}

fn exists(kind: Kind, p: PathBuf, source_of: &'static str) -> Result<PathBuf, ArtifactError> {
    if p.is_file() {
        Ok(p)
    } else {
        Err(ArtifactError::Missing {
            what: kind.what,
            path: p,
            source_of,
        })
    }
}

/// [`find`] with this process's environment, executable and checkouts (the current
/// directory and the checkout `atoll` was built from).
pub fn find_here(kind: Kind, flag: Option<&Path>) -> Result<PathBuf, ArtifactError> {
    let exe = std::env::current_exe().ok();
    let exe_dir = exe.as_deref().and_then(Path::parent);
    let mut checkouts = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        checkouts.push(cwd);
    }
    if let Some(root) = Path::new(env!("CARGO_MANIFEST_DIR")).parent() {
        checkouts.push(root.to_owned());
    }
    find(
        kind,
        flag,
        std::env::var_os(kind.env).map(PathBuf::from),
        exe_dir,
        &checkouts,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_prefers_flag_then_env_then_exe_dir_then_checkout() {
        let d = tempfile::tempdir().unwrap();
        let exe_dir = d.path().join("bin");
        let checkout = d.path().join("co");
        std::fs::create_dir_all(&exe_dir).unwrap();
        std::fs::create_dir_all(checkout.join("build")).unwrap();
        std::fs::write(checkout.join("build/vmlinux"), "k").unwrap();
        let co = [checkout.clone()];
        assert_eq!(
            find(KERNEL, None, None, Some(&exe_dir), &co).unwrap(),
            checkout.join("build/vmlinux")
        );
        std::fs::write(exe_dir.join("vmlinux"), "k").unwrap();
        assert_eq!(
            find(KERNEL, None, None, Some(&exe_dir), &co).unwrap(),
            exe_dir.join("vmlinux")
        );
        let envk = d.path().join("envk");
        std::fs::write(&envk, "k").unwrap();
        assert_eq!(
            find(KERNEL, None, Some(envk.clone()), Some(&exe_dir), &co).unwrap(),
            envk
        );
        let flagk = d.path().join("flagk");
        assert!(matches!(
            find(KERNEL, Some(&flagk), Some(envk), Some(&exe_dir), &co),
            Err(ArtifactError::Missing { .. })
        ));
    }

    #[test]
    fn find_nothing_says_make_artifacts() {
        let d = tempfile::tempdir().unwrap();
        let err = find(VMM, None, None, Some(d.path()), &[d.path().to_owned()]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("make artifacts"), "{msg}");
        assert!(msg.contains("--vmm"), "{msg}");
        assert!(msg.contains(&d.path().join("atoll-vmm").display().to_string()));
    }
}
