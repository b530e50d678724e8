//! KVM state: opening and judging `/dev/kvm`, the VM (memory slots, in-kernel
//! irqchip and PIT) and the vCPUs with their run loops. Everything that will be
//! captured for snapshots later lives here.

pub mod kvm;
pub mod memory;
pub mod uffd;
pub mod vcpu;
pub mod vm;

/// What the VM's threads tell the VMM's main thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest reported its exit status through the exit port.
    Exit(u8),
    /// The guest reset or triple-faulted: why.
    Reset(&'static str),
    /// The guest asked to power off without reporting a status.
    PowerOff,
    /// A vCPU (or the device loop) stopped on an error; the message says why and
    /// what to do.
    VcpuError(String),
}

/// What reaches the VMM's main thread: events from the VM's threads, and requests
/// from the control API with the channel for their answer.
#[derive(Debug)]
pub enum VmMessage {
    /// The VM ends.
    Vm(VmEvent),
    /// A control API request, the files it carried (none, or one for each file it
    /// names, in order) and where its answer goes.
    Api(
        crate::api::Request,
        Vec<std::fs::File>,
        std::sync::mpsc::Sender<crate::api::Response>,
    ),
}
