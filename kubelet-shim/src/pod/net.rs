//! `atoll run --net`: the pod's link to the host. Each pod gets a tap of its own,
//! `atl<first 6 characters of the pod id>`, made here (persistent, so the VMM can
//! attach to it) with `10.X.Y.1/30` on the host side; the guest's `eth0` gets
//! `10.X.Y.2/30` and a default route via `.1` through the agent's ConfigureNetwork.
//!
//! [`HostTap`] owns the tap: dropping it deletes the interface (attach, clear the
//! persist flag, close), so every way a [`super::Pod`] ends removes it. The VMM must
//! be gone by then (it holds the tap open), which the pod's drop order guarantees.
//! Only an `atoll` killed with SIGKILL leaves its tap behind (`ip link delete`).
//!
//! Addresses are set with `SIOC*` ioctls, so `ip` is not needed.

use std::fs::{File, OpenOptions};
use std::io;
use std::mem;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use atoll_agent_proto::v1;

/// Every pod tap's name starts with this.
pub const TAP_PREFIX: &str = "atl";
/// The guest's interface (the only virtio-net device of the VM).
pub const GUEST_IFACE: &str = "eth0";
/// The prefix length of a pod's link.
pub const LINK_PREFIX: u8 = 30;
/// Longest hostname (HOST_NAME_MAX).
const MAX_HOSTNAME: usize = 64;
/// The host's resolver configuration, read for the pod's DNS servers.
pub const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";
/// Most DNS servers passed on (as glibc's MAXNS).
const MAX_DNS: usize = 3;

/// A pod's link: `10.x.y.0/30`, the host at `.1`, the guest at `.2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub x: u8,
    pub y: u8,
}

impl Subnet {
    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.x, self.y, 0)
    }

    pub fn host(self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.x, self.y, 1)
    }

    pub fn guest(self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.x, self.y, 2)
    }

    /// Whether `10.x.y.0/30` shares an address with `addr/prefix`.
    fn overlaps(self, addr: Ipv4Addr, prefix: u8) -> bool {
        let shorter = prefix.min(LINK_PREFIX);
        let mask = prefix_mask(shorter);
        u32::from(self.network()) & mask == u32::from(addr) & mask
    }
}

fn prefix_mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

/// FNV-1a of the id: spreads pod ids over subnets and MACs the same way every time.
fn hash(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The pod's tap name: `atl` and the first 6 characters of its id (at most 9 bytes,
/// under IFNAMSIZ). Characters an interface name cannot have are left out.
pub fn tap_name(pod_id: &str) -> String {
    let mut name = String::from(TAP_PREFIX);
    name.extend(
        pod_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
            .take(6),
    );
    name
}

/// A locally administered unicast MAC for the guest, derived from the pod id.
pub fn guest_mac(pod_id: &str) -> String {
    let b = hash(pod_id).to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[3], b[4], b[5], b[6], b[7]
    )
}

/// The first `10.x.y.0/30` (starting at one derived from the pod id) that overlaps
/// none of the host's networks in `taken` (address, prefix), other pods' links
/// included. `None` when every one does.
pub fn pick_subnet(pod_id: &str, taken: &[(Ipv4Addr, u8)]) -> Option<Subnet> {
    let start = (hash(pod_id) & 0xffff) as u16;
    (0..=u16::MAX).find_map(|k| {
        let [x, y] = start.wrapping_add(k).to_be_bytes();
        let s = Subnet { x, y };
        (!taken.iter().any(|&(a, p)| s.overlaps(a, p))).then_some(s)
    })
}

/// The IPv4 addresses of the host's interfaces with their prefix lengths.
pub fn host_networks() -> io::Result<Vec<(Ipv4Addr, u8)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head through the pointer, which lives across
    // the call; the list is freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if let (Some(a), Some(m)) = (ipv4_of(ifa.ifa_addr), ipv4_of(ifa.ifa_netmask)) {
            let prefix = u8::try_from(u32::from(m).count_ones()).unwrap_or(32);
            out.push((a, prefix));
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list came from getifaddrs and is freed once; nothing refers to it.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

fn ipv4_of(sa: *const libc::sockaddr) -> Option<Ipv4Addr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: a non-null address from getifaddrs points to at least a sockaddr.
    if i32::from(unsafe { (*sa).sa_family }) != libc::AF_INET {
        return None;
    }
    // SAFETY: an AF_INET address is a sockaddr_in.
    let sin = unsafe { &*sa.cast::<libc::sockaddr_in>() };
    Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
}

/// The `nameserver`s of a resolv.conf that the guest can use: loopback ones (a
/// local stub resolver such as systemd-resolved's 127.0.0.53) are of no use there.
pub fn nameservers(resolv_conf: &str) -> Vec<String> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter_map(|s| s.parse::<std::net::IpAddr>().ok())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .map(|ip| ip.to_string())
        .take(MAX_DNS)
        .collect()
}

/// Whether `name` can be a hostname: 1 to 64 of `[A-Za-z0-9.-]`, not starting with
/// '-' or '.' (what the agent accepts).
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HOSTNAME
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// What the guest is told: `eth0` (found by its MAC) with the guest address, a
/// default route via the host end, the DNS servers and the hostname.
pub fn configure_request(
    subnet: Option<(Subnet, &str)>,
    dns: &[String],
    hostname: &str,
) -> v1::ConfigureNetwork {
    let mut req = v1::ConfigureNetwork {
        hostname: hostname.to_owned(),
        ..Default::default()
    };
    if let Some((s, mac)) = subnet {
        req.interfaces.push(v1::Interface {
            name: GUEST_IFACE.into(),
            mac: mac.to_owned(),
            addresses: vec![format!("{}/{LINK_PREFIX}", s.guest())],
            mtu: 0,
            set_mac: String::new(),
        });
        req.routes.push(v1::Route {
            destination: "0.0.0.0/0".into(),
            gateway: s.host().to_string(),
            device: GUEST_IFACE.into(),
        });
        req.dns_servers = dns.to_vec();
    }
    req
}

/// Making or configuring the pod's tap failed.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "cannot open /dev/net/tun for the pod's tap (is the tun module loaded? `modprobe tun`)"
    )]
    OpenTun(#[source] io::Error),
    #[error("cannot create tap {name} (TUNSETIFF; --net needs root or CAP_NET_ADMIN, and no other interface of that name)")]
    Create {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot make tap {name} persistent (TUNSETPERSIST)")]
    Persist {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot {action} on tap {name}")]
    Configure {
        name: String,
        action: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot list the host's addresses to pick a free subnet for the pod")]
    HostAddresses(#[source] io::Error),
    #[error("every 10.x.y.0/30 overlaps a network of this host: no subnet left for the pod")]
    NoSubnet,
}

/// A persistent tap made for one pod, with the host end addressed and up. Dropping it
/// deletes the interface.
#[derive(Debug)]
pub struct HostTap {
    name: String,
    subnet: Subnet,
    mac: String,
}

impl HostTap {
    /// Makes the tap for `pod_id` on a free subnet.
    pub fn create(pod_id: &str) -> Result<Self, TapError> {
        let taken = host_networks().map_err(TapError::HostAddresses)?;
        let subnet = pick_subnet(pod_id, &taken).ok_or(TapError::NoSubnet)?;
        Self::create_named(&tap_name(pod_id), subnet, &guest_mac(pod_id))
    }

    /// Makes tap `name` (refused if an interface of that name exists) and gives it
    /// `subnet`'s host address.
    pub fn create_named(name: &str, subnet: Subnet, mac: &str) -> Result<Self, TapError> {
        let tun = make_persistent_tap(name)?;
        // From here on, dropping `tap` deletes the interface.
        let tap = Self {
            name: name.into(),
            subnet,
            mac: mac.into(),
        };
        drop(tun);
        let cfg = |action: String| {
            let name = name.to_owned();
            move |source| TapError::Configure {
                name,
                action,
                source,
            }
        };
        let sock = inet_socket().map_err(cfg("open an AF_INET socket".into()))?;
        set_addr(&sock, name, libc::SIOCSIFADDR, subnet.host())
            .map_err(cfg(format!("set address {}", subnet.host())))?;
        let mask = Ipv4Addr::from(prefix_mask(LINK_PREFIX));
        set_addr(&sock, name, libc::SIOCSIFNETMASK, mask)
            .map_err(cfg(format!("set netmask {mask}")))?;
        link_up(&sock, name).map_err(cfg("bring the link up".into()))?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    /// The MAC the guest's interface gets.
    pub fn mac(&self) -> &str {
        &self.mac
    }

    /// Deletes the interface (attaches to it and clears its persist flag; it goes
    /// with the last close). Fails while the VMM still holds it.
    fn delete(&self) -> io::Result<()> {
        let tun = open_tun().map_err(|e| match e {
            TapError::OpenTun(e) => e,
            other => io::Error::other(other.to_string()),
        })?;
        let mut req = ifreq(&self.name)?;
        req.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq that lives across the call.
        if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } != 0 {
            return Err(io::Error::last_os_error());
        }
        set_persist(&tun, false)
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            tracing::warn!(
                "cannot delete the pod's tap {} ({e}); remove it with `ip link delete {}`",
                self.name,
                self.name
            );
        }
    }
}

/// Makes a persistent tap `name` with no address, `mtu` (when given) and up, in
/// the calling thread's network namespace: a CNI pod's tap, joined to the pod's
/// interface by [`super::netns`]. It goes with its namespace.
pub fn create_link_tap(name: &str, mtu: Option<u32>) -> Result<(), TapError> {
    drop(make_persistent_tap(name)?);
    let cfg = |action: &str| {
        let (name, action) = (name.to_owned(), action.to_owned());
        move |source| TapError::Configure {
            name,
            action,
            source,
        }
    };
    let sock = inet_socket().map_err(cfg("open an AF_INET socket"))?;
    if let Some(mtu) = mtu {
        let mut req = ifreq(name).map_err(cfg("set the MTU"))?;
        req.ifr_ifru.ifru_mtu = libc::c_int::try_from(mtu).unwrap_or(1500);
        // SAFETY: SIOCSIFMTU reads one ifreq, which lives across the call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &mut req) } != 0 {
            return Err(cfg("set the MTU")(io::Error::last_os_error()));
        }
    }
    link_up(&sock, name).map_err(cfg("bring the link up"))
}

/// Brings `lo` up in the calling thread's network namespace.
pub fn loopback_up() -> io::Result<()> {
    link_up(&inet_socket()?, "lo")
}

/// The MAC (`aa:bb:cc:dd:ee:ff`) of interface `name` in the calling thread's
/// network namespace.
pub fn link_mac(name: &str) -> io::Result<String> {
    let sock = inet_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFHWADDR fills one ifreq, which lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR wrote the hwaddr member of the union.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    Ok(data[..6]
        .iter()
        .map(|b| format!("{:02x}", *b as u8))
        .collect::<Vec<_>>()
        .join(":"))
}

/// The MTU of interface `name` in the calling thread's network namespace.
pub fn link_mtu(name: &str) -> io::Result<u32> {
    let sock = inet_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFMTU fills one ifreq, which lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFMTU wrote the mtu member of the union.
    Ok(u32::try_from(unsafe { req.ifr_ifru.ifru_mtu }).unwrap_or(1500))
}

/// Makes tap `name` in the calling thread's network namespace (refused if an
/// interface of that name exists: IFF_TUN_EXCL never takes over another pod's) and
/// makes it persistent; the open queue is returned to be closed.
fn make_persistent_tap(name: &str) -> Result<File, TapError> {
    let tun = open_tun()?;
    let mut req = ifreq(name).map_err(|source| TapError::Create {
        name: name.into(),
        source,
    })?;
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL)
            as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq that lives across the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } != 0 {
        return Err(TapError::Create {
            name: name.into(),
            source: io::Error::last_os_error(),
        });
    }
    set_persist(&tun, true).map_err(|source| TapError::Persist {
        name: name.into(),
        source,
    })?;
    Ok(tun)
}

fn open_tun() -> Result<File, TapError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(TapError::OpenTun)
}

fn set_persist(tun: &File, on: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST takes its flag by value; no memory is passed.
    if unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETPERSIST,
            libc::c_ulong::from(on),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain data (a name array and a union of plain data); all zeros
    // is a valid value.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name"),
        ));
    }
    for (dst, &src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no memory arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// SIOCSIFADDR / SIOCSIFNETMASK with an AF_INET address.
fn set_addr(sock: &OwnedFd, name: &str, request: libc::c_ulong, addr: Ipv4Addr) -> io::Result<()> {
    let mut req = ifreq(name)?;
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: the union member is a 16-byte sockaddr, as large as a sockaddr_in; the
    // kernel reads it as the AF_INET address it says it is.
    unsafe {
        std::ptr::write(
            std::ptr::addr_of_mut!(req.ifr_ifru.ifru_addr).cast::<libc::sockaddr_in>(),
            sin,
        );
    }
    // SAFETY: the request takes one ifreq, which lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn link_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS fills one ifreq, which lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS wrote the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads one ifreq, which lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_name_is_prefix_and_six_id_characters() {
        assert_eq!(tap_name("0a1b2c3d4e5f"), "atl0a1b2c");
        assert_eq!(tap_name("ab"), "atlab");
        assert_eq!(tap_name("x.y.z-1234"), "atlxyz-12");
        assert!(tap_name("0a1b2c3d4e5f").len() < 16);
    }

    #[test]
    fn guest_mac_is_local_unicast_and_stable() {
        let m = guest_mac("0a1b2c3d4e5f");
        assert_eq!(m, guest_mac("0a1b2c3d4e5f"));
        assert_ne!(m, guest_mac("0a1b2c3d4e60"));
        assert!(m.starts_with("02:"), "{m}");
        assert_eq!(m.len(), 17);
    }

    #[test]
    fn subnet_addresses_are_one_two_of_a_slash_30() {
        let s = Subnet { x: 7, y: 9 };
        assert_eq!(s.network(), Ipv4Addr::new(10, 7, 9, 0));
        assert_eq!(s.host(), Ipv4Addr::new(10, 7, 9, 1));
        assert_eq!(s.guest(), Ipv4Addr::new(10, 7, 9, 2));
    }

    #[test]
    fn pick_subnet_avoids_host_networks_and_other_pods() {
        let free = pick_subnet("p1", &[]).unwrap();
        assert_eq!(pick_subnet("p1", &[]), Some(free), "stable per id");
        // The derived one is taken by another pod's link: the next one is picked.
        let taken = [(free.host(), 30)];
        let next = pick_subnet("p1", &taken).unwrap();
        assert_ne!(next, free);
        assert!(!next.overlaps(free.host(), 30));
        // A host /16 covering the derived one.
        let wide = [(Ipv4Addr::new(10, free.x, 0, 5), 16)];
        let s = pick_subnet("p1", &wide).unwrap();
        assert_ne!(s.x, free.x);
        // A /8 over all of 10/8: nothing is left.
        assert_eq!(pick_subnet("p1", &[(Ipv4Addr::new(10, 1, 2, 3), 8)]), None);
        // Unrelated networks do not matter.
        let other = [
            (Ipv4Addr::new(192, 168, 1, 5), 24),
            (Ipv4Addr::LOCALHOST, 8),
        ];
        assert_eq!(pick_subnet("p1", &other), Some(free));
    }

    #[test]
    fn nameservers_skip_loopback_comments_and_garbage() {
        let text = "# generated\nsearch example.com\nnameserver 127.0.0.53\n\
                    nameserver 10.0.2.3\nnameserver   1.1.1.1 # cloud\nnameserver bogus\n\
                    ;nameserver 9.9.9.9\nnameserver 2001:4860::8888\nnameserver 8.8.8.8\n";
        assert_eq!(
            nameservers(text),
            ["10.0.2.3", "1.1.1.1", "2001:4860::8888"]
        );
        assert!(nameservers("").is_empty());
    }

    #[test]
    fn hostnames_the_agent_accepts() {
        assert!(valid_hostname("web-0"));
        assert!(valid_hostname("a.b.c"));
        assert!(!valid_hostname(""));
        assert!(!valid_hostname("-x"));
        assert!(!valid_hostname("under_score"));
        assert!(!valid_hostname(&"a".repeat(65)));
    }

    #[test]
    fn configure_request_with_link_routes_via_host_end() {
        let s = Subnet { x: 1, y: 2 };
        let r = configure_request(Some((s, "02:00:00:00:00:01")), &["1.1.1.1".into()], "web");
        assert_eq!(r.hostname, "web");
        assert_eq!(r.interfaces.len(), 1);
        assert_eq!(r.interfaces[0].name, "eth0");
        assert_eq!(r.interfaces[0].mac, "02:00:00:00:00:01");
        assert_eq!(r.interfaces[0].addresses, ["10.1.2.2/30"]);
        assert_eq!(r.routes[0].destination, "0.0.0.0/0");
        assert_eq!(r.routes[0].gateway, "10.1.2.1");
        assert_eq!(r.dns_servers, ["1.1.1.1"]);
        // Hostname only: no interface, no DNS.
        let r = configure_request(None, &["1.1.1.1".into()], "solo");
        assert!(r.interfaces.is_empty() && r.routes.is_empty() && r.dns_servers.is_empty());
        assert_eq!(r.hostname, "solo");
    }

    /// Runs `f` on a thread of its own in a new network namespace (a thread's
    /// namespace is its own: the test process's stays as it is). These tests need
    /// root (CAP_NET_ADMIN), as CI has: without it they fail, saying so.
    fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            // SAFETY: unshare(2) takes only flags; it changes this thread only.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                panic!(
                    "this test needs root (CAP_NET_ADMIN) for a network namespace: {}",
                    io::Error::last_os_error()
                );
            }
            f()
        })
        .join()
        .unwrap()
    }

    fn if_exists(name: &str) -> bool {
        let sock = inet_socket().unwrap();
        let mut req = ifreq(name).unwrap();
        // SAFETY: SIOCGIFINDEX fills one ifreq, which lives across the call.
        unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX, &mut req) == 0 }
    }

    #[test]
    fn host_tap_is_addressed_up_exclusive_and_deleted_on_drop() {
        let (exists, nets, refused, after) = in_netns(|| {
            let s = Subnet { x: 77, y: 1 };
            let tap = HostTap::create_named("atltest0", s, "02:00:00:00:00:07").unwrap();
            let exists = if_exists("atltest0");
            let nets = host_networks().unwrap();
            // A second pod may not take the same name.
            let second = HostTap::create_named("atltest0", s, "02:00:00:00:00:08");
            let refused = matches!(second, Err(TapError::Create { .. }));
            drop(tap);
            (exists, nets, refused, if_exists("atltest0"))
        });
        assert!(exists, "the tap exists once made");
        assert!(
            nets.contains(&(Ipv4Addr::new(10, 77, 1, 1), 30)),
            "host end addressed and up: {nets:?}"
        );
        assert!(refused, "an existing interface is never taken over");
        assert!(!after, "the tap is deleted when dropped");
    }
}
