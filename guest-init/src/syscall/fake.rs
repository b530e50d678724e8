//! The recording [`Syscall`] of every test in the crate: it remembers every call,
//! fails the calls it is told to fail, and plays back scripted children, signals,
//! interfaces and disks. [`SharedFake`] is the same behind a lock, for code that
//! owns its `Box<dyn Syscall>` while the test looks on.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{Cidr, MountFlags, Reaped, RebootCmd, RoutePlan, Syscall};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    CreateDir {
        path: PathBuf,
        mode: u32,
    },
    Mount {
        source: String,
        target: PathBuf,
        fstype: String,
        flags: MountFlags,
        data: String,
    },
    Unmount(PathBuf),
    CreateFile(PathBuf),
    WriteFile(PathBuf, String),
    UnshareMountNs,
    Chdir(PathBuf),
    Chroot(PathBuf),
    Sync,
    DropCaches,
    SetRealtime(Duration),
    AddEntropy(usize),
    EnablePort(u16),
    Outb(u16, u8),
    Reboot(RebootCmd),
    KernelCmdline,
    AttachConsole,
    ConsolePending,
    BlockSignals,
    WaitSignal(Option<Duration>),
    Kill(libc::pid_t, libc::c_int),
    Spawn(Vec<OsString>),
    BecomeSubreaper,
    SetMac(String, String),
    SetAddress(String, Cidr),
    SetMtu(String, u32),
    LinkUp(String),
    AddRoute(RoutePlan),
    SetHostname(String),
}

/// One line per call, short enough to list a whole sequence in a test.
impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Call::CreateDir { path, .. } => write!(f, "mkdir {}", path.display()),
            Call::Mount {
                source,
                target,
                fstype,
                flags,
                ..
            } => {
                let kind = if flags & libc::MS_MOVE != 0 {
                    "move"
                } else if flags & libc::MS_REMOUNT != 0 {
                    "remount"
                } else if flags & libc::MS_BIND != 0 {
                    "bind"
                } else if flags & libc::MS_PRIVATE != 0 {
                    "private"
                } else {
                    fstype
                };
                write!(f, "mount {kind} {source} {}", target.display())
            }
            Call::Unmount(p) => write!(f, "umount {}", p.display()),
            Call::CreateFile(p) => write!(f, "touch {}", p.display()),
            Call::WriteFile(p, text) => write!(f, "write {} {text}", p.display()),
            Call::UnshareMountNs => f.write_str("unshare"),
            Call::Chdir(p) => write!(f, "chdir {}", p.display()),
            Call::Chroot(p) => write!(f, "chroot {}", p.display()),
            Call::DropCaches => f.write_str("drop caches"),
            Call::SetRealtime(t) => write!(f, "clock {}", t.as_secs()),
            Call::AddEntropy(n) => write!(f, "entropy {n}"),
            Call::BecomeSubreaper => f.write_str("subreaper"),
            Call::SetMac(i, mac) => write!(f, "mac {i} {mac}"),
            Call::SetAddress(i, c) => write!(f, "addr {i} {} {}", c.addr, c.netmask()),
            Call::SetMtu(i, mtu) => write!(f, "mtu {i} {mtu}"),
            Call::LinkUp(i) => write!(f, "up {i}"),
            Call::AddRoute(r) => write!(
                f,
                "route {}/{} via {:?}",
                r.destination.addr, r.destination.prefix, r.gateway
            ),
            Call::SetHostname(n) => write!(f, "hostname {n}"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// The fake. Fields are public so tests can script and inspect it directly.
#[derive(Debug)]
pub struct FakeSyscall {
    pub calls: Vec<Call>,
    /// errno per path for `create_dir` / `mount`.
    pub create_dir_errors: HashMap<PathBuf, i32>,
    pub mount_errors: HashMap<PathBuf, i32>,
    pub cmdline: String,
    pub uptime: Duration,
    /// What `spawn` returns: a pid or an errno.
    pub spawn_result: Result<libc::pid_t, i32>,
    /// Answers to `wait_any`, in order; `NoChildren` once empty.
    pub reaps: VecDeque<Reaped>,
    /// Answers to `wait_signal`, in order; `None` (timeout) once empty.
    pub signals: VecDeque<libc::c_int>,
    /// errno for every `enable_port`.
    pub enable_port_error: Option<i32>,
    /// Answers to `console_pending`, in order; 0 once empty.
    pub console_pending: VecDeque<usize>,
    /// Whether `reboot` succeeds (the real one never returns when it does).
    pub reboot_error: Option<i32>,
    /// Calls whose line (see `Display for Call`) starts with the text fail with
    /// the errno, after being recorded.
    pub fail_lines: Vec<(String, i32)>,
    /// What `in_guest` says.
    pub in_guest: bool,
    /// Paths `exists` and `is_dir` deny; every other path exists as a directory.
    pub missing: Vec<PathBuf>,
    /// (MAC, interface name) pairs `interface_by_mac` knows.
    pub macs: Vec<(String, String)>,
    /// (serial, sectors) of the attached disks.
    pub disks: Vec<(String, u64)>,
}

impl Default for FakeSyscall {
    fn default() -> Self {
        Self {
            calls: Vec::new(),
            create_dir_errors: HashMap::new(),
            mount_errors: HashMap::new(),
            cmdline: String::new(),
            uptime: Duration::from_millis(1234),
            spawn_result: Ok(100),
            reaps: VecDeque::new(),
            signals: VecDeque::new(),
            enable_port_error: None,
            console_pending: VecDeque::new(),
            reboot_error: None,
            fail_lines: Vec::new(),
            in_guest: true,
            missing: Vec::new(),
            macs: Vec::new(),
            disks: Vec::new(),
        }
    }
}

impl FakeSyscall {
    pub fn fail_create_dir(&mut self, path: &str, errno: i32) {
        self.create_dir_errors.insert(path.into(), errno);
    }

    pub fn fail_mount(&mut self, target: &str, errno: i32) {
        self.mount_errors.insert(target.into(), errno);
    }

    /// Makes every call whose line starts with `line` fail with `errno`.
    pub fn fail(&mut self, line: &str, errno: i32) {
        self.fail_lines.push((line.to_owned(), errno));
    }

    /// Every call as its line, in order.
    pub fn log(&self) -> Vec<String> {
        self.calls.iter().map(Call::to_string).collect()
    }

    /// Records `call` and answers as `fail_lines` says.
    fn record(&mut self, call: Call) -> io::Result<()> {
        let line = call.to_string();
        self.calls.push(call);
        match self.fail_lines.iter().find(|(l, _)| line.starts_with(l)) {
            Some(&(_, errno)) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }

    /// Targets of every mount attempted, failed or not.
    pub fn mount_targets(&self) -> Vec<&str> {
        self.calls
            .iter()
            .filter_map(|call| match call {
                Call::Mount { target, .. } => target.to_str(),
                _ => None,
            })
            .collect()
    }

    /// Every byte written to `port`.
    pub fn port_writes(&self, port: u16) -> Vec<u8> {
        self.calls
            .iter()
            .filter_map(|call| match call {
                Call::Outb(p, v) if *p == port => Some(*v),
                _ => None,
            })
            .collect()
    }

    fn errno(map: &HashMap<PathBuf, i32>, path: &Path) -> io::Result<()> {
        match map.get(path) {
            Some(&errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }
}

impl Syscall for FakeSyscall {
    fn create_dir(&mut self, path: &Path, mode: u32) -> io::Result<()> {
        self.record(Call::CreateDir {
            path: path.to_owned(),
            mode,
        })?;
        Self::errno(&self.create_dir_errors, path)
    }

    fn mount(
        &mut self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()> {
        self.record(Call::Mount {
            source: source.to_owned(),
            target: target.to_owned(),
            fstype: fstype.to_owned(),
            flags,
            data: data.to_owned(),
        })?;
        Self::errno(&self.mount_errors, target)
    }

    fn unmount(&mut self, target: &Path) -> io::Result<()> {
        self.record(Call::Unmount(target.to_owned()))
    }

    fn sync(&mut self) {
        self.calls.push(Call::Sync);
    }

    fn enable_port(&mut self, port: u16) -> io::Result<()> {
        self.calls.push(Call::EnablePort(port));
        match self.enable_port_error {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }

    fn outb(&mut self, port: u16, value: u8) -> io::Result<()> {
        self.calls.push(Call::Outb(port, value));
        Ok(())
    }

    fn reboot(&mut self, cmd: RebootCmd) -> io::Result<()> {
        self.calls.push(Call::Reboot(cmd));
        match self.reboot_error {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }

    fn uptime(&mut self) -> io::Result<Duration> {
        Ok(self.uptime)
    }

    fn kernel_cmdline(&mut self) -> io::Result<String> {
        self.calls.push(Call::KernelCmdline);
        Ok(self.cmdline.clone())
    }

    fn attach_console(&mut self) -> io::Result<()> {
        self.calls.push(Call::AttachConsole);
        Ok(())
    }

    fn console_pending(&mut self) -> io::Result<usize> {
        self.calls.push(Call::ConsolePending);
        Ok(self.console_pending.pop_front().unwrap_or(0))
    }

    fn block_signals(&mut self) -> io::Result<()> {
        self.calls.push(Call::BlockSignals);
        Ok(())
    }

    fn wait_signal(&mut self, timeout: Option<Duration>) -> io::Result<Option<libc::c_int>> {
        self.calls.push(Call::WaitSignal(timeout));
        let signal = self.signals.pop_front();
        assert!(
            signal.is_some() || timeout.is_some(),
            "the fake would block forever: no scripted signal left"
        );
        Ok(signal)
    }

    fn wait_any(&mut self) -> io::Result<Reaped> {
        Ok(self.reaps.pop_front().unwrap_or(Reaped::NoChildren))
    }

    fn kill(&mut self, pid: libc::pid_t, signal: libc::c_int) -> io::Result<()> {
        self.calls.push(Call::Kill(pid, signal));
        Ok(())
    }

    fn spawn(&mut self, argv: &[OsString]) -> io::Result<libc::pid_t> {
        self.calls.push(Call::Spawn(argv.to_vec()));
        self.spawn_result.map_err(io::Error::from_raw_os_error)
    }

    fn create_file(&mut self, path: &Path) -> io::Result<()> {
        self.record(Call::CreateFile(path.to_owned()))
    }

    fn write_file(&mut self, path: &Path, text: &str) -> io::Result<()> {
        self.record(Call::WriteFile(path.to_owned(), text.to_owned()))
    }

    fn exists(&mut self, path: &Path) -> bool {
        !self.missing.iter().any(|m| m == path)
    }

    fn is_dir(&mut self, path: &Path) -> bool {
        self.exists(path)
    }

    fn disk_sectors(&mut self, serial: &str) -> io::Result<Option<u64>> {
        Ok(self
            .disks
            .iter()
            .find(|(s, _)| s == serial)
            .map(|(_, n)| *n))
    }

    fn unshare_mount_ns(&mut self) -> io::Result<()> {
        self.record(Call::UnshareMountNs)
    }

    fn chdir(&mut self, path: &Path) -> io::Result<()> {
        self.record(Call::Chdir(path.to_owned()))
    }

    fn chroot(&mut self, path: &Path) -> io::Result<()> {
        self.record(Call::Chroot(path.to_owned()))
    }

    fn drop_caches(&mut self) -> io::Result<()> {
        self.record(Call::DropCaches)
    }

    fn in_guest(&mut self) -> bool {
        self.in_guest
    }

    fn set_realtime(&mut self, since_epoch: Duration) -> io::Result<()> {
        self.record(Call::SetRealtime(since_epoch))
    }

    fn add_entropy(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.record(Call::AddEntropy(bytes.len()))
    }

    fn become_subreaper(&mut self) -> io::Result<()> {
        self.record(Call::BecomeSubreaper)
    }

    fn interface_by_mac(&mut self, mac: &str) -> io::Result<Option<String>> {
        Ok(self
            .macs
            .iter()
            .find(|(m, _)| m == mac)
            .map(|(_, n)| n.clone()))
    }

    fn set_mac(&mut self, ifname: &str, mac: &str) -> io::Result<()> {
        self.record(Call::SetMac(ifname.to_owned(), mac.to_owned()))
    }

    fn set_address(&mut self, ifname: &str, cidr: Cidr) -> io::Result<()> {
        self.record(Call::SetAddress(ifname.to_owned(), cidr))
    }

    fn set_mtu(&mut self, ifname: &str, mtu: u32) -> io::Result<()> {
        self.record(Call::SetMtu(ifname.to_owned(), mtu))
    }

    fn link_up(&mut self, ifname: &str) -> io::Result<()> {
        self.record(Call::LinkUp(ifname.to_owned()))
    }

    fn add_route(&mut self, route: &RoutePlan) -> io::Result<()> {
        self.record(Call::AddRoute(route.clone()))
    }

    fn set_hostname(&mut self, name: &str) -> io::Result<()> {
        self.record(Call::SetHostname(name.to_owned()))
    }
}

/// A [`FakeSyscall`] that a test keeps a handle on after giving a clone away.
#[derive(Debug, Clone, Default)]
pub struct SharedFake(Arc<Mutex<FakeSyscall>>);

impl SharedFake {
    /// The fake itself, to script or inspect.
    pub fn get(&self) -> MutexGuard<'_, FakeSyscall> {
        self.0.lock().unwrap()
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.get().calls.clone()
    }
}

/// Forwards each method to the locked fake.
macro_rules! forward {
    ($(fn $name:ident(&mut self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        impl Syscall for SharedFake {
            $(fn $name(&mut self $(, $arg: $ty)*) -> $ret {
                self.get().$name($($arg),*)
            })*
        }
    };
}

forward! {
    fn create_dir(&mut self, path: &Path, mode: u32) -> io::Result<()>;
    fn create_file(&mut self, path: &Path) -> io::Result<()>;
    fn write_file(&mut self, path: &Path, text: &str) -> io::Result<()>;
    fn exists(&mut self, path: &Path) -> bool;
    fn is_dir(&mut self, path: &Path) -> bool;
    fn disk_sectors(&mut self, serial: &str) -> io::Result<Option<u64>>;
    fn mount(&mut self, source: &str, target: &Path, fstype: &str, flags: MountFlags, data: &str) -> io::Result<()>;
    fn unmount(&mut self, target: &Path) -> io::Result<()>;
    fn unshare_mount_ns(&mut self) -> io::Result<()>;
    fn chdir(&mut self, path: &Path) -> io::Result<()>;
    fn chroot(&mut self, path: &Path) -> io::Result<()>;
    fn sync(&mut self) -> ();
    fn drop_caches(&mut self) -> io::Result<()>;
    fn in_guest(&mut self) -> bool;
    fn enable_port(&mut self, port: u16) -> io::Result<()>;
    fn outb(&mut self, port: u16, value: u8) -> io::Result<()>;
    fn reboot(&mut self, cmd: RebootCmd) -> io::Result<()>;
    fn uptime(&mut self) -> io::Result<Duration>;
    fn set_realtime(&mut self, since_epoch: Duration) -> io::Result<()>;
    fn add_entropy(&mut self, bytes: &[u8]) -> io::Result<()>;
    fn kernel_cmdline(&mut self) -> io::Result<String>;
    fn attach_console(&mut self) -> io::Result<()>;
    fn console_pending(&mut self) -> io::Result<usize>;
    fn block_signals(&mut self) -> io::Result<()>;
    fn wait_signal(&mut self, timeout: Option<Duration>) -> io::Result<Option<libc::c_int>>;
    fn wait_any(&mut self) -> io::Result<Reaped>;
    fn kill(&mut self, pid: libc::pid_t, signal: libc::c_int) -> io::Result<()>;
    fn spawn(&mut self, argv: &[OsString]) -> io::Result<libc::pid_t>;
    fn become_subreaper(&mut self) -> io::Result<()>;
    fn interface_by_mac(&mut self, mac: &str) -> io::Result<Option<String>>;
    fn set_mac(&mut self, ifname: &str, mac: &str) -> io::Result<()>;
    fn set_address(&mut self, ifname: &str, cidr: Cidr) -> io::Result<()>;
    fn set_mtu(&mut self, ifname: &str, mtu: u32) -> io::Result<()>;
    fn link_up(&mut self, ifname: &str) -> io::Result<()>;
    fn add_route(&mut self, route: &RoutePlan) -> io::Result<()>;
    fn set_hostname(&mut self, name: &str) -> io::Result<()>;
}
