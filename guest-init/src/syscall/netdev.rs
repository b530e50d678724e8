//! The network half of [`LinuxSyscall`](super::LinuxSyscall): old-style `SIOC*`
//! ioctls on an `AF_INET` datagram socket, enough for IPv4 addresses, MTU, MAC,
//! link up and routes without netlink.

use std::ffi::CString;
use std::fs;
use std::io;
use std::mem;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{Cidr, RoutePlan};

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket has no memory arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq_for(ifname: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data (a name array and a union of PODs); all zeros is
    // a valid value.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    let bytes = ifname.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte POD socket addresses; this is
    // how the ioctl interface takes an AF_INET address.
    unsafe { mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(fd: &OwnedFd, request: libc::c_ulong, arg: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: every caller passes a pointer to the structure `request` expects (an
    // ifreq or an rtentry) that lives across the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's `struct rtentry` (x86_64 / LP64 layout, `include/uapi/linux/route.h`).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// Sets IFF_UP on one interface.
pub(super) fn link_up(ifname: &str) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq_for(ifname)?;
    ioctl(
        &sock,
        libc::SIOCGIFFLAGS,
        (&mut req as *mut libc::ifreq).cast(),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP as libc::c_short);
    ioctl(
        &sock,
        libc::SIOCSIFFLAGS,
        (&mut req as *mut libc::ifreq).cast(),
    )
}

pub(super) fn interface_by_mac(mac: &str) -> io::Result<Option<String>> {
    for entry in fs::read_dir("/sys/class/net")? {
        let entry = entry?;
        let address = fs::read_to_string(entry.path().join("address")).unwrap_or_default();
        if address.trim().eq_ignore_ascii_case(mac) {
            return Ok(Some(entry.file_name().to_string_lossy().into_owned()));
        }
    }
    Ok(None)
}

pub(super) fn set_mac(ifname: &str, mac: &str) -> io::Result<()> {
    let mut bytes = [0u8; 6];
    for (b, part) in bytes.iter_mut().zip(mac.split(':')) {
        *b = u8::from_str_radix(part, 16)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    }
    let sock = inet_socket()?;
    let mut req = ifreq_for(ifname)?;
    // A sockaddr: the family, then 14 data bytes of which a MAC takes 6.
    let mut hw = libc::sockaddr {
        sa_family: libc::ARPHRD_ETHER,
        sa_data: [0; 14],
    };
    for (d, b) in hw.sa_data.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    req.ifr_ifru.ifru_hwaddr = hw;
    ioctl(
        &sock,
        libc::SIOCSIFHWADDR,
        (&mut req as *mut libc::ifreq).cast(),
    )
}

pub(super) fn set_address(ifname: &str, cidr: Cidr) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq_for(ifname)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(cidr.addr);
    ioctl(
        &sock,
        libc::SIOCSIFADDR,
        (&mut req as *mut libc::ifreq).cast(),
    )?;
    let mut req = ifreq_for(ifname)?;
    req.ifr_ifru.ifru_netmask = sockaddr_in(cidr.netmask());
    ioctl(
        &sock,
        libc::SIOCSIFNETMASK,
        (&mut req as *mut libc::ifreq).cast(),
    )
}

pub(super) fn set_mtu(ifname: &str, mtu: u32) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq_for(ifname)?;
    req.ifr_ifru.ifru_mtu =
        libc::c_int::try_from(mtu).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    ioctl(
        &sock,
        libc::SIOCSIFMTU,
        (&mut req as *mut libc::ifreq).cast(),
    )
}

pub(super) fn add_route(route: &RoutePlan) -> io::Result<()> {
    let sock = inet_socket()?;
    let device = route
        .device
        .as_deref()
        .map(CString::new)
        .transpose()
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut flags = libc::RTF_UP;
    if route.gateway.is_some() {
        flags |= libc::RTF_GATEWAY;
    }
    if route.destination.prefix == 32 {
        flags |= libc::RTF_HOST;
    }
    let mut entry = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_in(route.destination.addr),
        rt_gateway: sockaddr_in(route.gateway.unwrap_or(Ipv4Addr::UNSPECIFIED)),
        rt_genmask: sockaddr_in(route.destination.netmask()),
        rt_flags: flags,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: device
            .as_ref()
            .map_or(std::ptr::null_mut(), |d| d.as_ptr().cast_mut()),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // `device` outlives the call, so `rt_dev` stays valid.
    ioctl(&sock, libc::SIOCADDRT, (&mut entry as *mut RtEntry).cast())
}
