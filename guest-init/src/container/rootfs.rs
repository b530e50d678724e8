//! A container's root file system: the image disk (found by its virtio-blk serial,
//! mounted read-only once and shared by every container of that image) under a
//! writable overlay on the container's own tmpfs, or the image's OCI layers unpacked
//! into that tmpfs (see [`super::layers`]); plus the pod's tmpfs volumes and
//! read-only data disks that containers bind.
//!
//! Every mount goes through [`Syscall`], so the plan is tested with the recording fake.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use atoll_agent_proto::v1;

use super::layers::{LayersDisk, LayersError, GUEST_LIMITS};
use crate::syscall::{MountFlags, Syscall};

/// Flags of a mount, the subset this module uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountKind {
    /// A new file system (`erofs`, `ext4`, `tmpfs`, `overlay`), read-only or not.
    New {
        /// `MS_RDONLY`.
        readonly: bool,
    },
    /// `MS_BIND`.
    Bind,
    /// `MS_BIND | MS_REMOUNT | MS_RDONLY` of an existing bind.
    RemountBindReadonly,
}

impl MountKind {
    /// The mount(2) flags of this kind.
    pub fn flags(self) -> MountFlags {
        match self {
            MountKind::New { readonly: true } => libc::MS_RDONLY,
            MountKind::New { readonly: false } => 0,
            MountKind::Bind => libc::MS_BIND,
            MountKind::RemountBindReadonly => libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
        }
    }
}

/// mount(2) of one `kind` through `sys`.
fn mount(
    sys: &mut dyn Syscall,
    source: &str,
    target: &Path,
    fstype: &str,
    kind: MountKind,
    data: &str,
) -> io::Result<()> {
    sys.mount(source, target, fstype, kind.flags(), data)
}

/// Preparing or freeing a rootfs, volume or disk failed.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The request names a file system we do not mount.
    #[error("rootfs.block.fs_type {0:?} is not \"erofs\" or \"ext4\"")]
    FsType(String),
    /// No disk has that serial.
    #[error(
        "no disk with serial {0:?} is attached to the VM (check the --disk ...,id= of the pod)"
    )]
    NoDisk(String),
    /// The disk is there but stays empty (attached to a running VM, and its size
    /// change never arrived).
    #[error("the disk with serial {0:?} still has no data after {1:?}")]
    EmptyDisk(String, std::time::Duration),
    /// The image's layers could not be unpacked.
    #[error(transparent)]
    Layers(#[from] LayersError),
    /// The request has no rootfs source.
    #[error("rootfs: neither block nor layers is set")]
    Missing,
    /// A mount or directory operation failed.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// Its target.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RootfsError + 'a {
    move |source| RootfsError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Finds `/dev/vdX` whose `<sys_block>/vdX/serial` is `serial` (NULs and whitespace
/// trimmed).
pub fn find_disk(sys_block: &Path, serial: &str) -> Result<PathBuf, RootfsError> {
    let entries = std::fs::read_dir(sys_block).map_err(io_err("list", sys_block))?;
    for entry in entries.flatten().take(4096) {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("vd") {
            continue;
        }
        let mut buf = Vec::new();
        let read = std::fs::File::open(entry.path().join("serial"))
            .and_then(|f| f.take(256).read_to_end(&mut buf));
        if read.is_err() {
            continue;
        }
        let found = String::from_utf8_lossy(&buf);
        if found.trim_matches(|c: char| c == '\0' || c.is_whitespace()) == serial {
            return Ok(PathBuf::from("/dev").join(name));
        }
    }
    Err(RootfsError::NoDisk(serial.to_owned()))
}

/// How long a disk found by its serial may take to show its size: a disk attached
/// to a running VM (a pod's image in a spare slot) is announced by a configuration
/// change the driver handles on its own time.
pub const DISK_SIZE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits until `<sys_block>/<name of device>/size` is not 0 (a device without a
/// size file counts as ready), at most `wait`.
pub fn wait_for_size(
    sys_block: &Path,
    device: &Path,
    serial: &str,
    wait: std::time::Duration,
) -> Result<(), RootfsError> {
    let Some(name) = device.file_name() else {
        return Ok(());
    };
    let size_file = sys_block.join(name).join("size");
    let start = std::time::Instant::now();
    loop {
        let size = match std::fs::read_to_string(&size_file) {
            Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
            Err(_) => return Ok(()),
        };
        if size > 0 {
            return Ok(());
        }
        if start.elapsed() >= wait {
            return Err(RootfsError::EmptyDisk(serial.to_owned(), start.elapsed()));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Mounts of the pod: image and data disks (reference-counted), volumes (kept for the
/// life of the pod), and each container's tmpfs + overlay.
pub struct Mounts {
    root: PathBuf,
    sys_block: PathBuf,
    /// Where the block devices `find_disk` names are (`/dev`).
    dev: PathBuf,
    /// mount(2) and umount2(2).
    sys: Box<dyn Syscall>,
    images: HashMap<String, usize>,
    disks: HashMap<String, usize>,
    volumes: HashSet<String>,
    /// Whether the tmpfs of copied volumes is mounted.
    copies: bool,
}

/// The tmpfs that holds the pod's copied volumes (Attach VOLUME): a quarter of the
/// guest's memory at most, so host mounts cannot take the containers' memory.
const COPIES_TMPFS_OPTIONS: &str = "mode=0755,size=25%";

impl std::fmt::Debug for Mounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounts")
            .field("root", &self.root)
            .field("images", &self.images)
            .field("disks", &self.disks)
            .field("volumes", &self.volumes)
            .finish()
    }
}

fn mkdir(path: &Path) -> Result<(), RootfsError> {
    std::fs::create_dir_all(path).map_err(io_err("create", path))
}

impl Mounts {
    /// Mounts under `root`, finding disks in `sys_block` (`/sys/block`).
    pub fn new(root: PathBuf, sys_block: PathBuf, sys: Box<dyn Syscall>) -> Self {
        Self {
            root,
            sys_block,
            dev: PathBuf::from("/dev"),
            sys,
            images: HashMap::new(),
            disks: HashMap::new(),
            volumes: HashSet::new(),
            copies: false,
        }
    }

    /// Where the copied volume `name` is.
    pub fn copy_dir(root: &Path, name: &str) -> PathBuf {
        root.join("copies").join(name)
    }

    /// Makes the tmpfs of copied volumes exist and returns its path
    /// (`<root>/copies`).
    pub fn ensure_copies(&mut self) -> Result<PathBuf, RootfsError> {
        let dir = self.root.join("copies");
        if self.copies {
            return Ok(dir);
        }
        self.mount_tmpfs(&dir, COPIES_TMPFS_OPTIONS)?;
        self.copies = true;
        Ok(dir)
    }

    /// Makes `dir` and mounts a new writable tmpfs with `options` on it.
    fn mount_tmpfs(&mut self, dir: &Path, options: &str) -> Result<(), RootfsError> {
        mkdir(dir)?;
        mount(
            self.sys.as_mut(),
            "tmpfs",
            dir,
            "tmpfs",
            MountKind::New { readonly: false },
            options,
        )
        .map_err(io_err("mount a tmpfs on", dir))
    }

    /// Looks block devices up in `dev` instead of `/dev` (tests).
    #[cfg(test)]
    pub(crate) fn set_dev_dir(&mut self, dev: PathBuf) {
        self.dev = dev;
    }

    /// The container's directory (its own tmpfs).
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.root.join("containers").join(id)
    }

    /// Where the image `serial` is mounted.
    pub fn image_dir(&self, serial: &str) -> PathBuf {
        self.root.join("images").join(serial)
    }

    fn acquire_disk(
        &mut self,
        dir: PathBuf,
        serial: &str,
        fs_type: &str,
        image: bool,
    ) -> Result<(), RootfsError> {
        let counts = if image {
            &mut self.images
        } else {
            &mut self.disks
        };
        if let Some(n) = counts.get_mut(serial) {
            *n += 1;
            return Ok(());
        }
        let device = find_disk(&self.sys_block, serial)?;
        wait_for_size(&self.sys_block, &device, serial, DISK_SIZE_WAIT)?;
        mkdir(&dir)?;
        let data = if fs_type == "ext4" { "noload" } else { "" };
        let device_str = device.to_string_lossy().into_owned();
        let mounted = mount(
            self.sys.as_mut(),
            &device_str,
            &dir,
            fs_type,
            MountKind::New { readonly: true },
            data,
        );
        if let Err(e) = mounted {
            // ext4 without a journal refuses nothing; some kernels refuse "noload".
            if fs_type != "ext4" {
                return Err(io_err("mount", &dir)(e));
            }
            mount(
                self.sys.as_mut(),
                &device_str,
                &dir,
                fs_type,
                MountKind::New { readonly: true },
                "",
            )
            .map_err(io_err("mount", &dir))?;
        }
        let counts = if image {
            &mut self.images
        } else {
            &mut self.disks
        };
        counts.insert(serial.to_owned(), 1);
        Ok(())
    }

    fn release_disk(&mut self, serial: &str, image: bool) {
        let dir = if image {
            self.image_dir(serial)
        } else {
            self.root.join("disks").join(serial)
        };
        let counts = if image {
            &mut self.images
        } else {
            &mut self.disks
        };
        let Some(n) = counts.get_mut(serial) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            counts.remove(serial);
            let _ = self.sys.unmount(&dir);
            let _ = std::fs::remove_dir(&dir);
        }
    }

    /// Prepares `<root>/containers/<id>/rootfs` from the image `serial`: a tmpfs for the
    /// container, then an overlay (or a read-only bind when `readonly`). Returns the
    /// rootfs path. On failure nothing stays mounted.
    pub fn prepare_rootfs(
        &mut self,
        id: &str,
        serial: &str,
        fs_type: &str,
        readonly: bool,
    ) -> Result<PathBuf, RootfsError> {
        if fs_type != "erofs" && fs_type != "ext4" {
            return Err(RootfsError::FsType(fs_type.to_owned()));
        }
        let image = self.image_dir(serial);
        self.acquire_disk(image.clone(), serial, fs_type, true)?;
        let result = self.overlay(id, &image, readonly);
        if result.is_err() {
            self.release_disk(serial, true);
        }
        result
    }

    /// Mounts the container's own tmpfs at `<root>/containers/<id>`, makes `rootfs`
    /// in it and lets `fill` put the root there. On any failure everything is
    /// unmounted and removed again. Returns the rootfs path.
    fn in_container_tmpfs(
        &mut self,
        id: &str,
        fill: impl FnOnce(&mut Self, &Path, &Path) -> Result<(), RootfsError>,
    ) -> Result<PathBuf, RootfsError> {
        let dir = self.container_dir(id);
        mkdir(&dir)?;
        mount(
            self.sys.as_mut(),
            "tmpfs",
            &dir,
            "tmpfs",
            MountKind::New { readonly: false },
            "mode=0700",
        )
        .map_err(io_err("mount a tmpfs on", &dir))?;
        let rootfs = dir.join("rootfs");
        let done = mkdir(&rootfs).and_then(|()| fill(self, &dir, &rootfs));
        match done {
            Ok(()) => Ok(rootfs),
            Err(e) => {
                let _ = self.sys.unmount(&rootfs);
                let _ = self.sys.unmount(&dir);
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn overlay(&mut self, id: &str, image: &Path, readonly: bool) -> Result<PathBuf, RootfsError> {
        self.in_container_tmpfs(id, |this, dir, rootfs| {
            if readonly {
                let image_str = image.to_string_lossy().into_owned();
                mount(
                    this.sys.as_mut(),
                    &image_str,
                    rootfs,
                    "",
                    MountKind::Bind,
                    "",
                )
                .map_err(io_err("bind the image on", rootfs))?;
                mount(
                    this.sys.as_mut(),
                    "",
                    rootfs,
                    "",
                    MountKind::RemountBindReadonly,
                    "",
                )
                .map_err(io_err("make read-only", rootfs))?;
            } else {
                let (upper, work) = (dir.join("upper"), dir.join("work"));
                mkdir(&upper)?;
                mkdir(&work)?;
                let data = format!(
                    "lowerdir={},upperdir={},workdir={}",
                    image.display(),
                    upper.display(),
                    work.display()
                );
                mount(
                    this.sys.as_mut(),
                    "overlay",
                    rootfs,
                    "overlay",
                    MountKind::New { readonly: false },
                    &data,
                )
                .map_err(io_err("mount the overlay on", rootfs))?;
            }
            Ok(())
        })
    }

    /// Prepares `<root>/containers/<id>/rootfs` by unpacking `layers` into the
    /// container's tmpfs: the writable root itself, no overlay (`readonly` is left to
    /// the spec's `root.readonly`). The request is checked against the disk before
    /// anything is mounted; on failure nothing stays mounted. Returns the rootfs
    /// path.
    pub fn prepare_layers_rootfs(
        &mut self,
        id: &str,
        layers: &v1::OciLayers,
    ) -> Result<PathBuf, RootfsError> {
        let device = find_disk(&self.sys_block, &layers.serial)?;
        let device = match device.file_name() {
            Some(name) => self.dev.join(name),
            None => device,
        };
        let disk = LayersDisk::open(&device)?;
        let ranges = disk.plan(&layers.layers)?;
        self.in_container_tmpfs(id, |_, _, rootfs| {
            // As an image root is unless a layer says otherwise (whatever our umask).
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(rootfs, std::fs::Permissions::from_mode(0o755))
                .map_err(io_err("chmod", rootfs))?;
            disk.unpack(&ranges, rootfs, GUEST_LIMITS)?;
            Ok(())
        })
    }

    /// Undoes [`Mounts::prepare_rootfs`] (idempotent: a second call does nothing).
    pub fn release_rootfs(&mut self, id: &str, serial: &str) {
        let dir = self.container_dir(id);
        let _ = self.sys.unmount(&dir.join("rootfs"));
        let _ = self.sys.unmount(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        self.release_disk(serial, true);
    }

    /// Mounts the data disk `serial` read-only at `<root>/disks/<serial>` (once).
    pub fn acquire_data_disk(&mut self, serial: &str) -> Result<(), RootfsError> {
        let dir = self.root.join("disks").join(serial);
        // A data disk made by atoll-image is erofs or ext4: try erofs first.
        if self.disks.contains_key(serial) {
            return self.acquire_disk(dir, serial, "erofs", false);
        }
        match self.acquire_disk(dir.clone(), serial, "erofs", false) {
            Err(RootfsError::Io { .. }) => self.acquire_disk(dir, serial, "ext4", false),
            other => other,
        }
    }

    /// Drops one reference to the data disk `serial`.
    pub fn release_data_disk(&mut self, serial: &str) {
        self.release_disk(serial, false);
    }

    /// Makes the pod volume `name` exist (a tmpfs at `<root>/volumes/<name>`).
    pub fn ensure_volume(&mut self, name: &str) -> Result<(), RootfsError> {
        if self.volumes.contains(name) {
            return Ok(());
        }
        let dir = self.root.join("volumes").join(name);
        self.mount_tmpfs(&dir, "mode=1777")?;
        self.volumes.insert(name.to_owned());
        Ok(())
    }

    /// How many containers use the image `serial`.
    pub fn image_users(&self, serial: &str) -> usize {
        self.images.get(serial).copied().unwrap_or(0)
    }
}

#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use crate::syscall::fake::{Call, SharedFake};

    /// One mount or unmount, in this module's terms.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Op {
        Mount {
            source: String,
            target: PathBuf,
            fstype: String,
            kind: MountKind,
            data: String,
        },
        Unmount(PathBuf),
    }

    fn kind(flags: MountFlags) -> MountKind {
        [
            MountKind::New { readonly: true },
            MountKind::New { readonly: false },
            MountKind::Bind,
            MountKind::RemountBindReadonly,
        ]
        .into_iter()
        .find(|k| k.flags() == flags)
        .unwrap_or_else(|| panic!("flags {flags:#x} are no MountKind"))
    }

    /// The mounts and unmounts `fake` saw, in order.
    pub fn ops(fake: &SharedFake) -> Vec<Op> {
        fake.calls()
            .into_iter()
            .filter_map(|call| match call {
                Call::Mount {
                    source,
                    target,
                    fstype,
                    flags,
                    data,
                } => Some(Op::Mount {
                    source,
                    target,
                    fstype,
                    kind: kind(flags),
                    data,
                }),
                Call::Unmount(target) => Some(Op::Unmount(target)),
                _ => None,
            })
            .collect()
    }

    /// Makes every mount of `fstype` fail with EINVAL.
    pub fn fail_fstype(fake: &SharedFake, fstype: &str) {
        fake.get().fail(&format!("mount {fstype} "), libc::EINVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{fail_fstype, ops, Op};
    use super::*;
    use crate::syscall::fake::SharedFake;

    fn sysfs(disks: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, serial) in disks {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("serial"), serial).unwrap();
        }
        std::fs::create_dir(dir.path().join("loop0")).unwrap();
        dir
    }

    fn setup(disks: &[(&str, &str)]) -> (tempfile::TempDir, tempfile::TempDir, Mounts, SharedFake) {
        let sys = sysfs(disks);
        let root = tempfile::tempdir().unwrap();
        let fake = SharedFake::default();
        let m = Mounts::new(
            root.path().into(),
            sys.path().into(),
            Box::new(fake.clone()),
        );
        (sys, root, m, fake)
    }

    #[test]
    fn a_disk_whose_size_stays_zero_is_refused_after_the_wait_and_one_with_data_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let vda = dir.path().join("vda");
        std::fs::create_dir(&vda).unwrap();
        std::fs::write(vda.join("size"), "0\n").unwrap();
        let dev = Path::new("/dev/vda");
        let wait = std::time::Duration::from_millis(30);
        let e = wait_for_size(dir.path(), dev, "img-1", wait).unwrap_err();
        assert!(e.to_string().contains("\"img-1\" still has no data"), "{e}");
        std::fs::write(vda.join("size"), "16\n").unwrap();
        wait_for_size(dir.path(), dev, "img-1", wait).unwrap();
        // Without a size file (test doubles, odd devices): not waited for.
        wait_for_size(dir.path(), Path::new("/dev/vdb"), "x", wait).unwrap();
    }

    #[test]
    fn find_disk_matches_trimmed_serial() {
        let sys = sysfs(&[("vda", "other\n"), ("vdb", "img1\0\0\0")]);
        assert_eq!(
            find_disk(sys.path(), "img1").unwrap(),
            Path::new("/dev/vdb")
        );
        assert!(matches!(
            find_disk(sys.path(), "img"),
            Err(RootfsError::NoDisk(_))
        ));
    }

    #[test]
    fn prepare_rootfs_mounts_image_once_and_overlays() {
        let (_sys, root, mut m, fake) = setup(&[("vda", "img1")]);
        let r1 = m.prepare_rootfs("c1", "img1", "erofs", false).unwrap();
        let r2 = m.prepare_rootfs("c2", "img1", "erofs", false).unwrap();
        assert_eq!(r1, root.path().join("containers/c1/rootfs"));
        assert_eq!(r2, root.path().join("containers/c2/rootfs"));
        let ops = ops(&fake);
        let image_mounts = ops
            .iter()
            .filter(|o| matches!(o, Op::Mount { fstype, .. } if fstype == "erofs"))
            .count();
        assert_eq!(image_mounts, 1);
        assert_eq!(
            ops[0],
            Op::Mount {
                source: "/dev/vda".into(),
                target: root.path().join("images/img1"),
                fstype: "erofs".into(),
                kind: MountKind::New { readonly: true },
                data: String::new(),
            }
        );
        let overlay = ops.iter().find_map(|o| match o {
            Op::Mount {
                fstype,
                data,
                target,
                ..
            } if fstype == "overlay" => Some((data.clone(), target.clone())),
            _ => None,
        });
        let (data, target) = overlay.unwrap();
        assert_eq!(target, r1);
        assert!(data.starts_with(&format!("lowerdir={}/images/img1,", root.path().display())));
        assert!(data.contains("/containers/c1/upper,workdir="));
        assert_eq!(m.image_users("img1"), 2);
    }

    #[test]
    fn release_rootfs_unmounts_image_after_last_user() {
        let (_sys, root, mut m, fake) = setup(&[("vda", "img1")]);
        m.prepare_rootfs("c1", "img1", "erofs", false).unwrap();
        m.prepare_rootfs("c2", "img1", "erofs", false).unwrap();
        m.release_rootfs("c1", "img1");
        let image = root.path().join("images/img1");
        assert!(!ops(&fake).contains(&Op::Unmount(image.clone())));
        m.release_rootfs("c2", "img1");
        assert!(ops(&fake).contains(&Op::Unmount(image)));
        assert_eq!(m.image_users("img1"), 0);
        // Idempotent.
        m.release_rootfs("c2", "img1");
        assert_eq!(m.image_users("img1"), 0);
    }

    #[test]
    fn prepare_rootfs_readonly_binds_and_remounts() {
        let (_sys, _root, mut m, fake) = setup(&[("vda", "img1")]);
        let rootfs = m.prepare_rootfs("c1", "img1", "ext4", true).unwrap();
        let ops = ops(&fake);
        assert!(matches!(&ops[0], Op::Mount { data, .. } if data == "noload"));
        assert!(ops.iter().any(
            |o| matches!(o, Op::Mount { kind: MountKind::Bind, target, .. } if *target == rootfs)
        ));
        assert!(matches!(
            ops.last(),
            Some(Op::Mount {
                kind: MountKind::RemountBindReadonly,
                ..
            })
        ));
        assert!(!ops
            .iter()
            .any(|o| matches!(o, Op::Mount { fstype, .. } if fstype == "overlay")));
    }

    #[test]
    fn prepare_rootfs_refuses_other_fs_types() {
        let (_sys, _root, mut m, fake) = setup(&[("vda", "img1")]);
        assert!(matches!(
            m.prepare_rootfs("c1", "img1", "xfs", false),
            Err(RootfsError::FsType(_))
        ));
        assert!(ops(&fake).is_empty());
    }

    #[test]
    fn prepare_rootfs_overlay_failure_releases_the_image() {
        let (_sys, root, mut m, fake) = setup(&[("vda", "img1")]);
        fail_fstype(&fake, "overlay");
        let err = m.prepare_rootfs("c1", "img1", "erofs", false).unwrap_err();
        assert!(
            err.to_string().starts_with("cannot mount the overlay on"),
            "{err}"
        );
        assert_eq!(m.image_users("img1"), 0);
        let ops = ops(&fake);
        assert!(ops.contains(&Op::Unmount(root.path().join("images/img1"))));
        assert!(ops.contains(&Op::Unmount(root.path().join("containers/c1"))));
    }

    #[test]
    fn prepare_rootfs_missing_disk_mounts_nothing() {
        let (_sys, _root, mut m, fake) = setup(&[("vda", "img1")]);
        let err = m.prepare_rootfs("c1", "nope", "erofs", false).unwrap_err();
        assert!(matches!(err, RootfsError::NoDisk(_)));
        assert!(ops(&fake).is_empty());
    }

    #[test]
    fn prepare_layers_rootfs_unpacks_into_the_container_dir_and_release_removes_it() {
        use super::super::layers::testing::{gzip, tar_of, write_disk};
        use std::os::unix::fs::PermissionsExt;
        let (_sys, root, mut m, fake) = setup(&[("vdb", "layers0")]);
        let dev = tempfile::tempdir().unwrap();
        let layers = write_disk(
            &dev.path().join("vdb"),
            &[gzip(&tar_of(&[("bin", None), ("bin/sh", Some(b"#!\n"))]))],
        );
        m.set_dev_dir(dev.path().to_owned());
        let req = v1::OciLayers {
            serial: "layers0".into(),
            layers,
        };
        let rootfs = m.prepare_layers_rootfs("c1", &req).unwrap();
        assert_eq!(rootfs, root.path().join("containers/c1/rootfs"));
        assert_eq!(std::fs::read(rootfs.join("bin/sh")).unwrap(), b"#!\n");
        let mode = std::fs::metadata(&rootfs).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755);
        assert_eq!(ops(&fake).len(), 1, "only the tmpfs is mounted");
        assert_eq!(m.image_users("layers0"), 0, "no image disk is mounted");
        m.release_rootfs("c1", "");
        assert!(!root.path().join("containers/c1").exists());
    }

    #[test]
    fn ensure_volume_mounts_tmpfs_once() {
        let (_sys, root, mut m, fake) = setup(&[]);
        m.ensure_volume("cache").unwrap();
        m.ensure_volume("cache").unwrap();
        let ops = ops(&fake);
        assert_eq!(ops.len(), 1);
        assert!(matches!(&ops[0], Op::Mount { target, fstype, .. }
            if *target == root.path().join("volumes/cache") && fstype == "tmpfs"));
    }

    #[test]
    fn data_disk_falls_back_to_ext4_and_is_counted() {
        let (_sys, root, mut m, fake) = setup(&[("vdc", "data1")]);
        fail_fstype(&fake, "erofs");
        m.acquire_data_disk("data1").unwrap();
        m.acquire_data_disk("data1").unwrap();
        m.release_data_disk("data1");
        let dir = root.path().join("disks/data1");
        assert!(!ops(&fake).contains(&Op::Unmount(dir.clone())));
        m.release_data_disk("data1");
        let ops = ops(&fake);
        assert!(ops.contains(&Op::Unmount(dir)));
        assert!(ops
            .iter()
            .any(|o| matches!(o, Op::Mount { fstype, .. } if fstype == "ext4")));
    }
}
