//! ConfigureNetwork: the VM's interfaces, routes, DNS and hostname. Every container of
//! the pod shares the VM's network namespace, so this is the pod's network.
//!
//! The request is checked and turned into a [`NetPlan`] first (pure, unit-tested);
//! only a plan that is valid as a whole is applied, through [`Syscall`] (old-style
//! `SIOC*` ioctls on an `AF_INET` socket: enough for IPv4 addresses, MTU, link up and
//! routes, without netlink). The pod's `resolv.conf`, `hosts` and `hostname` are
//! written under the runtime's `pod/` directory, which the runtime bind-mounts into
//! every container.

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use atoll_agent_proto::v1;

use crate::syscall::Syscall;

/// Most interfaces, addresses per interface, routes, DNS servers and search domains
/// one request may carry.
pub const MAX_ITEMS: usize = 32;
/// Longest interface name (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;
/// Longest hostname (HOST_NAME_MAX).
const MAX_HOSTNAME: usize = 64;
/// Longest DNS search domain.
const MAX_DOMAIN: usize = 253;
/// Where sysctls are.
const PROC_SYS: &str = "/proc/sys";
/// Longest resolv.conf option ("ndots:5").
const MAX_DNS_OPTION: usize = 64;
/// Most sysctls one pod may set.
pub const MAX_SYSCTLS: usize = 128;
/// Longest sysctl name and value.
const MAX_SYSCTL_NAME: usize = 256;
const MAX_SYSCTL_VALUE: usize = 4096;

/// The request cannot be applied as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetPlanError {
    /// An address is not `a.b.c.d/len`.
    #[error("invalid address {0:?}: expected IPv4 a.b.c.d/prefix such as 10.0.0.2/24")]
    BadCidr(String),
    /// IPv6 is not configured by this agent.
    #[error("IPv6 address {0:?} is not supported: the agent configures IPv4 only")]
    Ipv6(String),
    /// A gateway or DNS server is not an IP address.
    #[error("invalid {what} {value:?}: expected an IP address")]
    BadAddress {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: String,
    },
    /// An interface name is empty, too long or has odd characters.
    #[error("invalid interface name {0:?}: 1 to 15 characters, no '/', whitespace or NUL")]
    BadInterface(String),
    /// A MAC address is not `aa:bb:cc:dd:ee:ff`.
    #[error("invalid MAC address {0:?}: expected aa:bb:cc:dd:ee:ff")]
    BadMac(String),
    /// A hostname is not a DNS name.
    #[error("invalid hostname {0:?}: 1 to 64 characters of a-z, A-Z, 0-9, '-' and '.'")]
    BadHostname(String),
    /// A search domain has whitespace or is too long.
    #[error("invalid DNS search domain {0:?}")]
    BadDomain(String),
    /// A resolv.conf option is empty, too long or has whitespace.
    #[error("invalid DNS option {0:?}: one word such as ndots:5, at most 64 characters")]
    BadDnsOption(String),
    /// A sysctl name is not a path below /proc/sys.
    #[error("invalid sysctl name {0:?}: dotted (net.ipv4.ip_forward) or slashed (net/ipv4/conf/eth0.1/forwarding) components of a-z, A-Z, 0-9, '_', '-' (and '.' when slashed)")]
    BadSysctlName(String),
    /// A sysctl value is too long or has a newline or NUL.
    #[error("invalid value for sysctl {0}: at most 4096 bytes, one line")]
    BadSysctlValue(String),
    /// Too many entries of a kind.
    #[error("too many {0} (at most {MAX_ITEMS})")]
    TooMany(&'static str),
    /// Too many sysctls.
    #[error("too many sysctls (at most {MAX_SYSCTLS})")]
    TooManySysctls,
    /// MTU out of range.
    #[error("MTU {0} is out of range (68 to 65535, or 0 to keep it)")]
    BadMtu(u32),
    /// A route with neither a gateway nor a device.
    #[error("route to {0} needs a gateway or a device")]
    RouteTarget(String),
}

/// An IPv4 network: address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The address as written (a host address for interfaces).
    pub addr: Ipv4Addr,
    /// 0 to 32.
    pub prefix: u8,
}

impl Cidr {
    /// The netmask of the prefix.
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        };
        Ipv4Addr::from(bits)
    }

    /// The address with host bits cleared.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & u32::from(self.netmask()))
    }
}

/// Parses `a.b.c.d/len`; a bare `a.b.c.d` is a /32.
pub fn parse_cidr(text: &str) -> Result<Cidr, NetPlanError> {
    let (addr, prefix) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    if addr.parse::<std::net::Ipv6Addr>().is_ok() {
        return Err(NetPlanError::Ipv6(text.to_owned()));
    }
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| NetPlanError::BadCidr(text.to_owned()))?;
    let prefix = match prefix {
        None => 32,
        // `u8::from_str` would also take "+8".
        Some(p) if !p.is_empty() && p.len() <= 2 && p.bytes().all(|b| b.is_ascii_digit()) => {
            match p.parse::<u8>() {
                Ok(p) if p <= 32 => p,
                _ => return Err(NetPlanError::BadCidr(text.to_owned())),
            }
        }
        Some(_) => return Err(NetPlanError::BadCidr(text.to_owned())),
    };
    Ok(Cidr { addr, prefix })
}

fn parse_ipv4(what: &'static str, text: &str) -> Result<Ipv4Addr, NetPlanError> {
    match text.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Ok(a),
        Ok(IpAddr::V6(_)) => Err(NetPlanError::Ipv6(text.to_owned())),
        Err(_) => Err(NetPlanError::BadAddress {
            what,
            value: text.to_owned(),
        }),
    }
}

fn check_ifname(name: &str) -> Result<(), NetPlanError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(NetPlanError::BadInterface(name.to_owned()))
    }
}

/// Normalises a MAC to lower case `aa:bb:cc:dd:ee:ff`.
fn parse_mac(text: &str) -> Result<String, NetPlanError> {
    let parts: Vec<&str> = text.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    if ok {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(NetPlanError::BadMac(text.to_owned()))
    }
}

/// Checks a hostname: 1 to 64 of `[A-Za-z0-9.-]`, not starting with '-' or '.'.
pub fn check_hostname(name: &str) -> Result<(), NetPlanError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_HOSTNAME
        && !name.starts_with(['-', '.'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(NetPlanError::BadHostname(name.to_owned()))
    }
}

fn bounded<T>(items: &[T], what: &'static str) -> Result<(), NetPlanError> {
    if items.len() > MAX_ITEMS {
        Err(NetPlanError::TooMany(what))
    } else {
        Ok(())
    }
}

/// One interface to configure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfacePlan {
    /// The name from the request (used when no MAC is given).
    pub name: String,
    /// Lower-case MAC to find the interface by, when given.
    pub mac: Option<String>,
    /// Its addresses.
    pub addresses: Vec<Cidr>,
    /// 0: leave as is.
    pub mtu: u32,
    /// The lower-case MAC it takes, when given.
    pub set_mac: Option<String>,
}

/// One route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    /// Destination network (`0.0.0.0/0`: default route).
    pub destination: Cidr,
    /// Next hop, if any.
    pub gateway: Option<Ipv4Addr>,
    /// Output device, if given.
    pub device: Option<String>,
}

/// A checked ConfigureNetwork request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPlan {
    /// Interfaces.
    pub interfaces: Vec<IfacePlan>,
    /// Routes, in order.
    pub routes: Vec<RoutePlan>,
    /// DNS servers (IPv4 or IPv6: they only go to resolv.conf).
    pub dns_servers: Vec<IpAddr>,
    /// Search domains.
    pub dns_search: Vec<String>,
    /// The pod's hostname, if given.
    pub hostname: Option<String>,
    /// resolv.conf options.
    pub dns_options: Vec<String>,
    /// Sysctls: the file below /proc/sys, the name as given, the value.
    pub sysctls: Vec<SysctlPlan>,
}

/// One sysctl to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlPlan {
    /// The name as the request gave it (for messages).
    pub name: String,
    /// Its file, relative to /proc/sys ("net/ipv4/ip_forward").
    pub path: PathBuf,
    /// What is written.
    pub value: String,
}

/// Where a sysctl lives below /proc/sys: the components of a dotted name, or of a
/// slashed one (whose components may hold dots, as interface names like
/// `eth0.100` do). None for anything that could leave /proc/sys.
pub fn sysctl_path(name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.len() > MAX_SYSCTL_NAME {
        return None;
    }
    let slashed = name.contains('/');
    let parts: Vec<&str> = if slashed {
        name.split('/').collect()
    } else {
        name.split('.').collect()
    };
    let ok = |p: &&str| {
        !p.is_empty()
            && *p != "."
            && *p != ".."
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || (slashed && c == '.'))
    };
    parts.iter().all(ok).then(|| parts.iter().collect())
}

/// Checks a request and turns it into a plan; nothing is applied on any error.
pub fn plan(req: &v1::ConfigureNetwork) -> Result<NetPlan, NetPlanError> {
    bounded(&req.interfaces, "interfaces")?;
    bounded(&req.routes, "routes")?;
    bounded(&req.dns_servers, "DNS servers")?;
    bounded(&req.dns_search, "DNS search domains")?;
    bounded(&req.dns_options, "DNS options")?;
    if req.sysctls.len() > MAX_SYSCTLS {
        return Err(NetPlanError::TooManySysctls);
    }
    let mut interfaces = Vec::new();
    for iface in &req.interfaces {
        bounded(&iface.addresses, "addresses on one interface")?;
        let mac = if iface.mac.is_empty() {
            check_ifname(&iface.name)?;
            None
        } else {
            if !iface.name.is_empty() {
                check_ifname(&iface.name)?;
            }
            Some(parse_mac(&iface.mac)?)
        };
        if iface.mtu != 0 && !(68..=65535).contains(&iface.mtu) {
            return Err(NetPlanError::BadMtu(iface.mtu));
        }
        let addresses = iface
            .addresses
            .iter()
            .map(|a| parse_cidr(a))
            .collect::<Result<_, _>>()?;
        let set_mac = if iface.set_mac.is_empty() {
            None
        } else {
            Some(parse_mac(&iface.set_mac)?)
        };
        interfaces.push(IfacePlan {
            name: iface.name.clone(),
            mac,
            addresses,
            mtu: iface.mtu,
            set_mac,
        });
    }
    let mut routes = Vec::new();
    for route in &req.routes {
        let destination = parse_cidr(&route.destination)?;
        let gateway = if route.gateway.is_empty() {
            None
        } else {
            Some(parse_ipv4("gateway", &route.gateway)?)
        };
        let device = if route.device.is_empty() {
            None
        } else {
            check_ifname(&route.device)?;
            Some(route.device.clone())
        };
        if gateway.is_none() && device.is_none() {
            return Err(NetPlanError::RouteTarget(route.destination.clone()));
        }
        routes.push(RoutePlan {
            destination: Cidr {
                addr: destination.network(),
                prefix: destination.prefix,
            },
            gateway,
            device,
        });
    }
    let dns_servers = req
        .dns_servers
        .iter()
        .map(|s| {
            s.parse::<IpAddr>().map_err(|_| NetPlanError::BadAddress {
                what: "DNS server",
                value: s.clone(),
            })
        })
        .collect::<Result<_, _>>()?;
    for domain in &req.dns_search {
        if domain.is_empty()
            || domain.len() > MAX_DOMAIN
            || domain
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '#')
        {
            return Err(NetPlanError::BadDomain(domain.clone()));
        }
    }
    for option in &req.dns_options {
        if option.is_empty()
            || option.len() > MAX_DNS_OPTION
            || option
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '#' || c == ';')
        {
            return Err(NetPlanError::BadDnsOption(option.clone()));
        }
    }
    let hostname = if req.hostname.is_empty() {
        None
    } else {
        check_hostname(&req.hostname)?;
        Some(req.hostname.clone())
    };
    let sysctls = req
        .sysctls
        .iter()
        .map(|s| {
            let path =
                sysctl_path(&s.name).ok_or_else(|| NetPlanError::BadSysctlName(s.name.clone()))?;
            if s.value.len() > MAX_SYSCTL_VALUE || s.value.contains(['\n', '\0']) {
                return Err(NetPlanError::BadSysctlValue(s.name.clone()));
            }
            Ok(SysctlPlan {
                name: s.name.clone(),
                path,
                value: s.value.clone(),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(NetPlan {
        interfaces,
        routes,
        dns_servers,
        dns_search: req.dns_search.clone(),
        hostname,
        dns_options: req.dns_options.clone(),
        sysctls,
    })
}

/// The text of `resolv.conf`.
pub fn render_resolv_conf(servers: &[IpAddr], search: &[String], options: &[String]) -> String {
    let mut out = String::new();
    if !search.is_empty() {
        out.push_str("search ");
        out.push_str(&search.join(" "));
        out.push('\n');
    }
    for server in servers {
        out.push_str(&format!("nameserver {server}\n"));
    }
    if !options.is_empty() {
        out.push_str("options ");
        out.push_str(&options.join(" "));
        out.push('\n');
    }
    out
}

/// The text of `hosts`: localhost, and the hostname on the pod's first address (or
/// 127.0.1.1 when the pod has none).
pub fn render_hosts(hostname: Option<&str>, pod_ip: Option<Ipv4Addr>) -> String {
    let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if let Some(name) = hostname {
        let ip = pod_ip.unwrap_or(Ipv4Addr::new(127, 0, 1, 1));
        out.push_str(&format!("{ip}\t{name}\n"));
    }
    out
}

/// Applying a valid plan failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigureNetworkError {
    /// The request is invalid.
    #[error(transparent)]
    Plan(#[from] NetPlanError),
    /// No interface has the given MAC.
    #[error("no network interface has MAC address {0}")]
    NoSuchMac(String),
    /// A kernel operation failed.
    #[error("cannot {action}: {cause}")]
    Apply {
        /// What was being done.
        action: String,
        /// What the kernel said.
        cause: io::Error,
    },
    /// The guest kernel refused a sysctl: it has no such one (ENOENT), or not
    /// that value (EINVAL).
    #[error("cannot set sysctl {name} to {value:?}: {cause}")]
    Sysctl {
        /// As the request named it.
        name: String,
        /// What was written.
        value: String,
        /// What the kernel said.
        cause: io::Error,
    },
    /// A pod file could not be written.
    #[error("cannot write {path}: {cause}")]
    WriteFile {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: io::Error,
    },
}

fn apply_err(action: String) -> impl FnOnce(io::Error) -> ConfigureNetworkError {
    move |cause| ConfigureNetworkError::Apply { action, cause }
}

/// Applies a request: interfaces (address, MTU, up), routes, hostname and the pod
/// files in `pod_dir`.
pub fn configure(
    ops: &mut dyn Syscall,
    req: &v1::ConfigureNetwork,
    pod_dir: &Path,
) -> Result<(), ConfigureNetworkError> {
    let plan = plan(req)?;
    let mut pod_ip = None;
    for iface in &plan.interfaces {
        let name = match &iface.mac {
            Some(mac) => ops
                .interface_by_mac(mac)
                .map_err(apply_err(format!("look for the interface with MAC {mac}")))?
                .ok_or_else(|| ConfigureNetworkError::NoSuchMac(mac.clone()))?,
            None => iface.name.clone(),
        };
        if let Some(mac) = &iface.set_mac {
            ops.set_mac(&name, mac)
                .map_err(apply_err(format!("set MAC {mac} on {name}")))?;
        }
        for cidr in &iface.addresses {
            ops.set_address(&name, *cidr).map_err(apply_err(format!(
                "set address {}/{} on {name}",
                cidr.addr, cidr.prefix
            )))?;
            pod_ip.get_or_insert(cidr.addr);
        }
        if iface.mtu != 0 {
            ops.set_mtu(&name, iface.mtu)
                .map_err(apply_err(format!("set MTU {} on {name}", iface.mtu)))?;
        }
        ops.link_up(&name)
            .map_err(apply_err(format!("bring {name} up")))?;
    }
    for route in &plan.routes {
        ops.add_route(route).map_err(apply_err(format!(
            "add route to {}/{}",
            route.destination.addr, route.destination.prefix
        )))?;
    }
    if let Some(name) = &plan.hostname {
        ops.set_hostname(name)
            .map_err(apply_err(format!("set hostname {name}")))?;
    }
    for sysctl in &plan.sysctls {
        ops.write_file(&Path::new(PROC_SYS).join(&sysctl.path), &sysctl.value)
            .map_err(|cause| ConfigureNetworkError::Sysctl {
                name: sysctl.name.clone(),
                value: sysctl.value.clone(),
                cause,
            })?;
    }
    write_pod_file(
        pod_dir,
        "resolv.conf",
        &render_resolv_conf(&plan.dns_servers, &plan.dns_search, &plan.dns_options),
    )?;
    write_pod_file(
        pod_dir,
        "hosts",
        &render_hosts(plan.hostname.as_deref(), pod_ip),
    )?;
    if let Some(name) = &plan.hostname {
        write_pod_file(pod_dir, "hostname", &format!("{name}\n"))?;
    }
    Ok(())
}

fn write_pod_file(dir: &Path, name: &str, text: &str) -> Result<(), ConfigureNetworkError> {
    let path = dir.join(name);
    fs::create_dir_all(dir)
        .and_then(|()| fs::write(&path, text))
        .map_err(|cause| ConfigureNetworkError::WriteFile { path, cause })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::fake::FakeSyscall;

    #[test]
    fn parse_cidr_address_and_prefix() {
        let c = parse_cidr("10.0.0.2/24").unwrap();
        assert_eq!(c.addr, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(c.prefix, 24);
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.network(), Ipv4Addr::new(10, 0, 0, 0));
        let default = parse_cidr("0.0.0.0/0").unwrap();
        assert_eq!(default.netmask(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(parse_cidr("1.2.3.4").unwrap().prefix, 32);
        assert_eq!(
            parse_cidr("1.2.3.4/32").unwrap().netmask(),
            Ipv4Addr::BROADCAST
        );
    }

    #[test]
    fn parse_cidr_rejects_garbage_and_ipv6_clearly() {
        for bad in [
            "",
            "10.0.0.2/33",
            "10.0.0/24",
            "10.0.0.2/",
            "10.0.0.2/-1",
            "10.0.0.2/+8",
            "x/8",
            "10.0.0.2/2/4",
        ] {
            assert_eq!(
                parse_cidr(bad),
                Err(NetPlanError::BadCidr(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            parse_cidr("fd00::2/64"),
            Err(NetPlanError::Ipv6("fd00::2/64".into()))
        );
        let err = parse_cidr("fd00::2").unwrap_err();
        assert_eq!(err, NetPlanError::Ipv6("fd00::2".into()));
        assert!(err.to_string().contains("IPv4 only"));
    }

    fn request() -> v1::ConfigureNetwork {
        v1::ConfigureNetwork {
            interfaces: vec![v1::Interface {
                name: "eth0".into(),
                mac: String::new(),
                addresses: vec!["10.0.0.2/24".into()],
                mtu: 1400,
                set_mac: String::new(),
            }],
            routes: vec![v1::Route {
                destination: "0.0.0.0/0".into(),
                gateway: "10.0.0.1".into(),
                device: String::new(),
            }],
            dns_servers: vec!["10.96.0.10".into()],
            dns_search: vec!["default.svc.cluster.local".into(), "cluster.local".into()],
            hostname: "web-0".into(),
            ..Default::default()
        }
    }

    #[test]
    fn plan_default_route_and_normalised_destination() {
        let mut req = request();
        req.routes.push(v1::Route {
            destination: "10.1.2.3/16".into(),
            gateway: String::new(),
            device: "eth0".into(),
        });
        let plan = plan(&req).unwrap();
        assert_eq!(plan.routes[0].destination, parse_cidr("0.0.0.0/0").unwrap());
        assert_eq!(plan.routes[0].gateway, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(plan.routes[1].destination.addr, Ipv4Addr::new(10, 1, 0, 0));
        assert_eq!(plan.routes[1].device.as_deref(), Some("eth0"));
        assert_eq!(plan.hostname.as_deref(), Some("web-0"));
    }

    #[test]
    fn plan_refuses_bad_fields_naming_them() {
        let mut req = request();
        req.hostname = "bad host".into();
        assert_eq!(
            plan(&req),
            Err(NetPlanError::BadHostname("bad host".into()))
        );
        let mut req = request();
        req.interfaces[0].name = "../eth0".into();
        assert!(matches!(plan(&req), Err(NetPlanError::BadInterface(_))));
        let mut req = request();
        req.interfaces[0].mtu = 20;
        assert_eq!(plan(&req), Err(NetPlanError::BadMtu(20)));
        let mut req = request();
        req.routes[0].gateway = String::new();
        assert!(matches!(plan(&req), Err(NetPlanError::RouteTarget(_))));
        let mut req = request();
        req.dns_search = vec!["a\nnameserver 6.6.6.6".into()];
        assert!(matches!(plan(&req), Err(NetPlanError::BadDomain(_))));
        let mut req = request();
        req.dns_servers = vec!["8.8.8".into()];
        assert!(matches!(plan(&req), Err(NetPlanError::BadAddress { .. })));
        let mut req = request();
        req.interfaces[0].mac = "02:00:00:00:00".into();
        assert!(matches!(plan(&req), Err(NetPlanError::BadMac(_))));
        let mut req = request();
        req.routes = vec![req.routes[0].clone(); MAX_ITEMS + 1];
        assert_eq!(plan(&req), Err(NetPlanError::TooMany("routes")));
    }

    #[test]
    fn resolv_conf_has_search_then_nameservers() {
        let text = render_resolv_conf(
            &["10.96.0.10".parse().unwrap(), "fd00::a".parse().unwrap()],
            &["ns.svc".into(), "svc".into()],
            &[],
        );
        assert_eq!(
            text,
            "search ns.svc svc\nnameserver 10.96.0.10\nnameserver fd00::a\n"
        );
        assert_eq!(render_resolv_conf(&[], &[], &[]), "");
        assert_eq!(
            render_resolv_conf(
                &["10.96.0.10".parse().unwrap()],
                &[],
                &["ndots:5".into(), "edns0".into()]
            ),
            "nameserver 10.96.0.10\noptions ndots:5 edns0\n"
        );
    }

    #[test]
    fn hosts_maps_hostname_to_pod_ip_or_loopback() {
        let text = render_hosts(Some("web-0"), Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert!(text.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(text.ends_with("10.0.0.2\tweb-0\n"));
        assert!(render_hosts(Some("web-0"), None).ends_with("127.0.1.1\tweb-0\n"));
        assert!(!render_hosts(None, None).contains("127.0.1.1"));
    }

    #[test]
    fn configure_applies_in_order_and_writes_pod_files() {
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join("pod");
        let mut ops = FakeSyscall::default();
        configure(&mut ops, &request(), &pod).unwrap();
        assert_eq!(
            ops.log(),
            [
                "addr eth0 10.0.0.2 255.255.255.0",
                "mtu eth0 1400",
                "up eth0",
                "route 0.0.0.0/0 via Some(10.0.0.1)",
                "hostname web-0"
            ]
        );
        assert_eq!(
            fs::read_to_string(pod.join("resolv.conf")).unwrap(),
            "search default.svc.cluster.local cluster.local\nnameserver 10.96.0.10\n"
        );
        assert!(fs::read_to_string(pod.join("hosts"))
            .unwrap()
            .ends_with("10.0.0.2\tweb-0\n"));
        assert_eq!(fs::read_to_string(pod.join("hostname")).unwrap(), "web-0\n");
    }

    #[test]
    fn sysctl_names_map_below_proc_sys_and_nothing_escapes() {
        let p = |n: &str| sysctl_path(n).map(|p| p.display().to_string());
        assert_eq!(
            p("net.ipv4.ip_forward").as_deref(),
            Some("net/ipv4/ip_forward")
        );
        assert_eq!(
            p("net/ipv4/conf/eth0.100/forwarding").as_deref(),
            Some("net/ipv4/conf/eth0.100/forwarding")
        );
        assert_eq!(
            p("kernel.shm_rmid_forced").as_deref(),
            Some("kernel/shm_rmid_forced")
        );
        for bad in [
            "",
            "net..ipv4",
            "net/../../etc/passwd",
            "/net/ipv4",
            "net/ipv4/",
            "..",
            "net.ipv4.ip forward",
            "net.ipv4.x\n",
            "net/ipv4/..",
        ] {
            assert_eq!(sysctl_path(bad), None, "{bad:?}");
        }
        assert_eq!(sysctl_path(&"a.".repeat(200)), None);
    }

    #[test]
    fn configure_writes_sysctls_after_the_interfaces_and_dns_options() {
        let dir = tempfile::tempdir().unwrap();
        let mut req = request();
        req.dns_options = vec!["ndots:5".into()];
        req.sysctls = vec![
            v1::Sysctl {
                name: "net.ipv4.ip_unprivileged_port_start".into(),
                value: "0".into(),
            },
            v1::Sysctl {
                name: "net/ipv4/ping_group_range".into(),
                value: "0 2147483647".into(),
            },
        ];
        let mut ops = FakeSyscall::default();
        configure(&mut ops, &req, dir.path()).unwrap();
        let log = ops.log();
        assert_eq!(
            log[log.len() - 2..],
            [
                "write /proc/sys/net/ipv4/ip_unprivileged_port_start 0",
                "write /proc/sys/net/ipv4/ping_group_range 0 2147483647"
            ]
        );
        assert!(
            log.iter().position(|l| l == "up eth0")
                < log.iter().position(|l| l.starts_with("write"))
        );
        assert!(fs::read_to_string(dir.path().join("resolv.conf"))
            .unwrap()
            .ends_with("nameserver 10.96.0.10\noptions ndots:5\n"));

        // The kernel refusing one names it, and is no plan error.
        let mut ops = FakeSyscall::default();
        ops.fail("write /proc/sys/net/ipv4/ping_group_range", libc::EINVAL);
        let err = configure(&mut ops, &req, dir.path()).unwrap_err();
        assert!(matches!(err, ConfigureNetworkError::Sysctl { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("cannot set sysctl net/ipv4/ping_group_range to \"0 2147483647\""),
            "{err}"
        );
    }

    #[test]
    fn plan_refuses_bad_sysctls_and_dns_options_before_anything_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let sysctl = |name: &str, value: &str| v1::Sysctl {
            name: name.into(),
            value: value.into(),
        };
        for (sysctls, options, want) in [
            (vec![sysctl("net/../x", "1")], vec![], "invalid sysctl name"),
            (
                vec![sysctl("net.core.somaxconn", "1\n2")],
                vec![],
                "invalid value",
            ),
            (
                vec![sysctl("a.b", "1"); MAX_SYSCTLS + 1],
                vec![],
                "too many sysctls",
            ),
            (
                vec![],
                vec!["ndots:5 edns0".to_string()],
                "invalid DNS option",
            ),
            (vec![], vec![String::new()], "invalid DNS option"),
        ] {
            let mut req = request();
            req.sysctls = sysctls;
            req.dns_options = options;
            let mut ops = FakeSyscall::default();
            let err = configure(&mut ops, &req, dir.path()).unwrap_err();
            assert!(err.to_string().contains(want), "{err}");
            assert!(ops.calls.is_empty(), "{:?}", ops.calls);
        }
    }

    #[test]
    fn configure_finds_interface_by_mac_or_fails_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let mut req = request();
        req.interfaces[0].mac = "02:AA:00:00:00:01".into();
        let mut ops = FakeSyscall {
            macs: vec![("02:aa:00:00:00:01".into(), "enp0".into())],
            ..FakeSyscall::default()
        };
        configure(&mut ops, &req, dir.path()).unwrap();
        assert_eq!(ops.log()[0], "addr enp0 10.0.0.2 255.255.255.0");

        // A MAC to take comes first (before the link is up), normalised.
        let mut named = request();
        named.interfaces[0].set_mac = "0A:58:0A:58:00:07".into();
        let mut ops = FakeSyscall::default();
        configure(&mut ops, &named, dir.path()).unwrap();
        assert_eq!(ops.log()[0], "mac eth0 0a:58:0a:58:00:07");
        named.interfaces[0].set_mac = "0A:58".into();
        assert!(configure(&mut FakeSyscall::default(), &named, dir.path()).is_err());

        let mut ops = FakeSyscall::default();
        let err = configure(&mut ops, &req, &dir.path().join("x")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no network interface has MAC address 02:aa:00:00:00:01"
        );
        assert!(ops.calls.is_empty());
        assert!(!dir.path().join("x").exists());
    }
}
