//! `atoll-kvm-hold`: holds one KVM VM (in-kernel irqchip, one vCPU that never runs)
//! open until killed. The nested node's `/init` starts it before the command.
//!
//! Why: KVM flips kernel static keys when the first VM of the system is created or
//! the last one destroyed (the scheduler's preempt notifiers, patched into
//! `__schedule`) and when a vCPU's local APIC is created or enabled. Each flip
//! rewrites kernel text through `int3`, and multi-threaded TCG occasionally runs
//! another vCPU's stale copy of that text: L1 oopsed (`int3` in `__schedule`), hung,
//! or faulted recursively, every few minutes of tests that start and stop many VMs.
//! With one VM always open and its never-run vCPU's APIC still software-disabled,
//! those keys stay on for the whole run, and L1's text is patched no more.

use std::process::ExitCode;

const KVM_CREATE_VM: libc::c_ulong = 0xae01;
const KVM_CREATE_VCPU: libc::c_ulong = 0xae41;
const KVM_CREATE_IRQCHIP: libc::c_ulong = 0xae60;

fn ioctl(fd: libc::c_int, req: libc::c_ulong, arg: libc::c_ulong) -> std::io::Result<libc::c_int> {
    // SAFETY: the three KVM requests used here take an integer argument (no memory is
    // passed) and return a new fd or 0.
    let r = unsafe { libc::ioctl(fd, req, arg) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

fn hold() -> std::io::Result<()> {
    // SAFETY: open(2) on a NUL-terminated literal; the fd is kept for the process's life.
    let kvm = unsafe { libc::open(c"/dev/kvm".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if kvm < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let vm = ioctl(kvm, KVM_CREATE_VM, 0)?;
    ioctl(vm, KVM_CREATE_IRQCHIP, 0)?;
    ioctl(vm, KVM_CREATE_VCPU, 0)?;
    Ok(())
}

fn main() -> ExitCode {
    if let Err(e) = hold() {
        eprintln!("atoll-kvm-hold: cannot hold a KVM VM open: {e}");
        return ExitCode::FAILURE;
    }
    loop {
        // SAFETY: pause(2) takes no arguments; only a signal ends it.
        unsafe { libc::pause() };
    }
}
