//! Resolving an image-config user ("", "uid", "uid:gid", "name", "name:group", ...) to
//! numeric ids, from the container's own `/etc/passwd` and `/etc/group`.
//!
//! The rootfs is hostile: its `/etc/passwd` may be a symlink aimed at the guest's files,
//! or a huge file. [`read_in_root`] resolves every component inside the rootfs
//! (`openat2(RESOLVE_IN_ROOT)`) and caps the size; the parsers never panic on any input.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Largest `/etc/passwd` or `/etc/group` read from a rootfs.
pub const MAX_ETC_FILE: u64 = 4 << 20;

/// The ids a process runs with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResolvedUser {
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
    /// Supplementary groups (from `/etc/group` membership), without `gid`.
    pub additional_gids: Vec<u32>,
    /// The home directory from `/etc/passwd`, `/` when there is no entry.
    pub home: String,
}

/// Most supplementary groups a process may be given.
pub const MAX_GROUPS: usize = 256;

impl ResolvedUser {
    /// These ids and `extra` groups as well (Kubernetes' "Merge" policy for
    /// supplemental groups): each once, the user's own first.
    pub fn with_groups(mut self, extra: &[u32]) -> Result<Self, UserError> {
        for &gid in extra {
            if gid == u32::MAX {
                return Err(UserError::BadGroupId(gid));
            }
            if gid != self.gid && !self.additional_gids.contains(&gid) {
                self.additional_gids.push(gid);
            }
        }
        if self.additional_gids.len() > MAX_GROUPS {
            return Err(UserError::TooManyGroups(self.additional_gids.len()));
        }
        Ok(self)
    }
}

/// The user string names something the container does not have.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    /// No such user in the container's /etc/passwd.
    #[error("process.user: no user {0:?} in the container's /etc/passwd")]
    NoUser(String),
    /// No such group in the container's /etc/group.
    #[error("process.user: no group {0:?} in the container's /etc/group")]
    NoGroup(String),
    /// An id out of range or an empty part ("1000:", ":").
    #[error("process.user {0:?} is not \"user\", \"user:group\" or numeric ids below 2^32-1")]
    Malformed(String),
    /// A supplementary group id of -1 (as u32).
    #[error("process.additional_gids: {0} is not a group id")]
    BadGroupId(u32),
    /// More groups than a process is given.
    #[error("process.additional_gids: {0} groups in all, at most {MAX_GROUPS}")]
    TooManyGroups(usize),
}

/// One `/etc/passwd` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: String,
}

/// One `/etc/group` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    /// Group name.
    pub name: String,
    /// Group id.
    pub gid: u32,
    /// Member login names.
    pub members: Vec<String>,
}

/// Parses `/etc/passwd`; malformed lines and comments are skipped.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(':');
            let name = f.next()?;
            let _password = f.next()?;
            let uid = f.next()?.parse().ok()?;
            let gid = f.next()?.parse().ok()?;
            let _gecos = f.next()?;
            let home = f.next()?;
            if name.is_empty() || name.starts_with('#') {
                return None;
            }
            Some(PasswdEntry {
                name: name.to_owned(),
                uid,
                gid,
                home: home.to_owned(),
            })
        })
        .collect()
}

/// Parses `/etc/group`; malformed lines and comments are skipped.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(':');
            let name = f.next()?;
            let _password = f.next()?;
            let gid = f.next()?.parse().ok()?;
            let members = f.next().unwrap_or("");
            if name.is_empty() || name.starts_with('#') {
                return None;
            }
            Some(GroupEntry {
                name: name.to_owned(),
                gid,
                members: members
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect(),
            })
        })
        .collect()
}

fn parse_id(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // u32::MAX is (uid_t)-1, "no change" to the kernel.
    s.parse::<u32>().ok().filter(|&id| id != u32::MAX)
}

/// Resolves `spec` against the parsed files (absent files: empty).
pub fn resolve(
    spec: &str,
    passwd: &[PasswdEntry],
    groups: &[GroupEntry],
) -> Result<ResolvedUser, UserError> {
    let malformed = || UserError::Malformed(spec.to_owned());
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => {
            if u.is_empty() || g.is_empty() {
                return Err(malformed());
            }
            (u, Some(g))
        }
        None if spec.is_empty() => ("0", None),
        None => (spec, None),
    };

    let entry = if user_part.bytes().all(|b| b.is_ascii_digit()) {
        let uid = parse_id(user_part).ok_or_else(malformed)?;
        passwd
            .iter()
            .find(|e| e.uid == uid)
            .cloned()
            .or(Some(PasswdEntry {
                name: String::new(),
                uid,
                gid: 0,
                home: "/".to_owned(),
            }))
    } else {
        passwd.iter().find(|e| e.name == user_part).cloned()
    }
    .ok_or_else(|| UserError::NoUser(user_part.to_owned()))?;

    let gid = match group_part {
        None => entry.gid,
        Some(g) if g.bytes().all(|b| b.is_ascii_digit()) => parse_id(g).ok_or_else(malformed)?,
        Some(g) => {
            groups
                .iter()
                .find(|e| e.name == g)
                .ok_or_else(|| UserError::NoGroup(g.to_owned()))?
                .gid
        }
    };

    let mut additional_gids = Vec::new();
    if !entry.name.is_empty() {
        for g in groups {
            if g.gid != gid && g.members.contains(&entry.name) && !additional_gids.contains(&g.gid)
            {
                additional_gids.push(g.gid);
            }
        }
    }
    let home = if entry.home.is_empty() {
        "/".to_owned()
    } else {
        entry.home
    };
    Ok(ResolvedUser {
        uid: entry.uid,
        gid,
        additional_gids,
        home,
    })
}

/// Reads `rel` (relative to the rootfs, like `etc/passwd`) without leaving `rootfs`:
/// symlinks and `..` resolve as if `rootfs` were `/`. `Ok(None)` when it does not
/// exist; an error when it is larger than [`MAX_ETC_FILE`] or not a regular file.
pub fn read_in_root(rootfs: &Path, rel: &str) -> io::Result<Option<String>> {
    let root = File::open(rootfs)?;
    let Ok(path) = std::ffi::CString::new(Path::new(rel).as_os_str().as_bytes()) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    // SAFETY: open_how is plain data; zeroed is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid directory fd, NUL-terminated path and an open_how of the size
    // passed; the kernel only reads them.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            std::os::fd::AsRawFd::as_raw_fd(&root),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::NotFound {
            Ok(None)
        } else {
            Err(err)
        };
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: openat2 just returned this fd and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/{rel} is not a regular file"),
        ));
    }
    let mut bytes = Vec::new();
    file.take(MAX_ETC_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_ETC_FILE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/{rel} is over {MAX_ETC_FILE} bytes"),
        ));
    }
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// Resolves `spec` in the container at `rootfs`. Numeric-only specs need no file.
pub fn resolve_in_rootfs(rootfs: &Path, spec: &str) -> Result<ResolvedUser, ResolveUserError> {
    let read = |rel: &str| -> Result<String, ResolveUserError> {
        read_in_root(rootfs, rel)
            .map(Option::unwrap_or_default)
            .map_err(|source| ResolveUserError::Read {
                file: format!("/{rel}"),
                source,
            })
    };
    let passwd = parse_passwd(&read("etc/passwd")?);
    let groups = parse_group(&read("etc/group")?);
    Ok(resolve(spec, &passwd, &groups)?)
}

/// Resolving a user in a rootfs failed.
#[derive(Debug, thiserror::Error)]
pub enum ResolveUserError {
    /// The name is not there.
    #[error(transparent)]
    User(#[from] UserError),
    /// The file could not be read.
    #[error("cannot read the container's {file}: {source}")]
    Read {
        /// `/etc/passwd` or `/etc/group`.
        file: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # comment\n\
        broken line\n\
        daemon:x:1:1::/usr/sbin:/bin/false\n\
        app:x:1000:1000:App:/home/app:/bin/sh\n\
        nohome:x:1001:100:::/bin/sh\n";
    const GROUP: &str = "root:x:0:\n\
        users:x:100:app\n\
        app:x:1000:\n\
        audio:x:29:app,other\n\
        video:x:44: other , app \n\
        bad:x:notanumber:app\n";

    fn res(spec: &str) -> Result<ResolvedUser, UserError> {
        resolve(spec, &parse_passwd(PASSWD), &parse_group(GROUP))
    }

    #[test]
    fn parse_passwd_skips_malformed_lines() {
        let entries = parse_passwd(PASSWD);
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[2].name, "app");
        assert_eq!(entries[2].home, "/home/app");
    }

    #[test]
    fn parse_group_trims_members_and_skips_bad_gids() {
        let groups = parse_group(GROUP);
        assert_eq!(groups.len(), 5);
        assert_eq!(groups[4].members, ["other", "app"]);
    }

    #[test]
    fn extra_groups_merge_after_the_users_own_each_once() {
        let passwd = parse_passwd(PASSWD);
        let groups = parse_group(GROUP);
        let user = resolve("app", &passwd, &groups).unwrap();
        let own = user.additional_gids.clone();
        let merged = user
            .clone()
            .with_groups(&[1234, own[0], user.gid, 1234, 5678])
            .unwrap();
        let mut want = own;
        want.extend([1234, 5678]);
        assert_eq!(merged.additional_gids, want);
        assert_eq!(
            user.clone().with_groups(&[u32::MAX]),
            Err(UserError::BadGroupId(u32::MAX))
        );
        let many: Vec<u32> = (10_000..10_000 + MAX_GROUPS as u32).collect();
        assert!(matches!(
            user.with_groups(&many),
            Err(UserError::TooManyGroups(_))
        ));
    }

    #[test]
    fn resolve_empty_is_root_with_its_home() {
        let user = res("").unwrap();
        assert_eq!((user.uid, user.gid), (0, 0));
        assert_eq!(user.home, "/root");
    }

    #[test]
    fn resolve_name_gets_primary_and_member_groups() {
        let user = res("app").unwrap();
        assert_eq!((user.uid, user.gid), (1000, 1000));
        assert_eq!(user.additional_gids, [100, 29, 44]);
        assert_eq!(user.home, "/home/app");
    }

    #[test]
    fn resolve_name_with_group_name_overrides_gid() {
        let user = res("app:audio").unwrap();
        assert_eq!((user.uid, user.gid), (1000, 29));
        assert_eq!(user.additional_gids, [100, 44]);
    }

    #[test]
    fn resolve_uid_with_group_name() {
        let user = res("1000:users").unwrap();
        assert_eq!((user.uid, user.gid), (1000, 100));
    }

    #[test]
    fn resolve_numeric_without_files_needs_no_entry() {
        let user = resolve("4242:4343", &[], &[]).unwrap();
        assert_eq!((user.uid, user.gid), (4242, 4343));
        assert!(user.additional_gids.is_empty());
        assert_eq!(user.home, "/");
    }

    #[test]
    fn resolve_unknown_uid_defaults_to_gid_zero() {
        let user = resolve("4242", &[], &[]).unwrap();
        assert_eq!((user.uid, user.gid), (4242, 0));
    }

    #[test]
    fn resolve_missing_name_is_named() {
        assert_eq!(res("nobody"), Err(UserError::NoUser("nobody".into())));
        assert_eq!(res("app:wheel"), Err(UserError::NoGroup("wheel".into())));
    }

    #[test]
    fn resolve_malformed_is_refused() {
        for spec in [
            ":",
            "app:",
            ":1",
            "4294967295",
            "99999999999",
            "1:4294967295",
        ] {
            assert!(matches!(res(spec), Err(UserError::Malformed(_))), "{spec}");
        }
    }

    #[test]
    fn resolve_empty_home_becomes_root_dir() {
        assert_eq!(res("nohome").unwrap().home, "/");
    }

    #[test]
    fn read_in_root_symlink_out_of_root_stays_inside() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host:x:0:0::/:/bin/sh\n").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        // Absolute and `..` escapes both resolve inside the root, where there is nothing.
        std::os::unix::fs::symlink(
            outside.path().join("secret"),
            root.path().join("etc/passwd"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            "../../../../../../../../etc/hostname",
            root.path().join("etc/group"),
        )
        .unwrap();
        assert_eq!(read_in_root(root.path(), "etc/passwd").unwrap(), None);
        assert_eq!(read_in_root(root.path(), "etc/group").unwrap(), None);
    }

    #[test]
    fn read_in_root_symlink_inside_root_is_followed() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/passwd.real"), PASSWD).unwrap();
        std::os::unix::fs::symlink("/etc/passwd.real", root.path().join("etc/passwd")).unwrap();
        assert_eq!(
            read_in_root(root.path(), "etc/passwd").unwrap().as_deref(),
            Some(PASSWD)
        );
        assert_eq!(resolve_in_rootfs(root.path(), "app").unwrap().uid, 1000);
    }

    #[test]
    fn read_in_root_oversized_file_is_refused() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        let f = File::create(root.path().join("etc/passwd")).unwrap();
        f.set_len(MAX_ETC_FILE + 1).unwrap();
        let err = read_in_root(root.path(), "etc/passwd").unwrap_err();
        assert!(err.to_string().contains("is over"), "{err}");
    }

    #[test]
    fn read_in_root_directory_is_refused() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc/passwd")).unwrap();
        assert!(read_in_root(root.path(), "etc/passwd").is_err());
    }

    #[test]
    fn resolve_in_rootfs_missing_files_resolve_numeric_only() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(resolve_in_rootfs(root.path(), "5:6").unwrap().gid, 6);
        assert!(matches!(
            resolve_in_rootfs(root.path(), "app"),
            Err(ResolveUserError::User(UserError::NoUser(_)))
        ));
    }
}
