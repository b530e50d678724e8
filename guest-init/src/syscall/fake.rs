//! A recording [`Syscall`] for tests: it remembers every call, fails the calls it is
//! told to fail, and plays back scripted children and signals.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{MountFlags, Reaped, RebootCmd, Syscall};

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
    Sync,
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
        self.calls.push(Call::CreateDir {
            path: path.to_owned(),
            mode,
        });
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
        self.calls.push(Call::Mount {
            source: source.to_owned(),
            target: target.to_owned(),
            fstype: fstype.to_owned(),
            flags,
            data: data.to_owned(),
        });
        Self::errno(&self.mount_errors, target)
    }

    fn unmount(&mut self, target: &Path) -> io::Result<()> {
        self.calls.push(Call::Unmount(target.to_owned()));
        Ok(())
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
}
