//! Address prefixes (CIDRs) as the library's API takes them.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::error::Error;

/// An IP prefix such as `198.18.0.0/15` or `fd00::/8`; a bare address is a
/// /32 or /128. Host bits must be zero, so a typo such as `10.0.0.1/8` is
/// refused rather than silently widened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Builds a prefix, checking the length and that host bits are zero.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, Error> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(Error::invalid(
                "CIDR prefix length",
                format!("/{prefix} is longer than /{max} for {addr}"),
            ));
        }
        let net = IpNet { addr, prefix };
        if net.network() != addr {
            return Err(Error::invalid(
                "CIDR",
                format!(
                    "{addr}/{prefix} has host bits set; the network is {}/{prefix}",
                    net.network()
                ),
            ));
        }
        Ok(net)
    }

    /// A single address (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        IpNet { addr, prefix }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length (of the address's own family).
    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }

    /// The prefix length over the 128-bit v4-mapped form the maps use.
    pub fn mapped_prefix_len(&self) -> u32 {
        if self.addr.is_ipv4() {
            96 + u32::from(self.prefix)
        } else {
            u32::from(self.prefix)
        }
    }

    /// Whether `ip` is inside this prefix (IPv4 never matches IPv6).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }

    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }
}

impl FromStr for IpNet {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| {
            Error::invalid(
                "IP address",
                format!("{a:?} is not an IPv4 or IPv6 address"),
            )
        })?;
        match p {
            None => Ok(IpNet::host(addr)),
            Some(p) => {
                let prefix: u8 = p.trim().parse().map_err(|_| {
                    Error::invalid(
                        "CIDR prefix length",
                        format!("{p:?} in {s:?} is not a number"),
                    )
                })?;
                IpNet::new(addr, prefix)
            }
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_and_prefixes() {
        assert_eq!("127.0.0.2".parse::<IpNet>().unwrap().prefix_len(), 32);
        assert_eq!("::1".parse::<IpNet>().unwrap().prefix_len(), 128);
        let n: IpNet = "198.18.0.0/15".parse().unwrap();
        assert!(n.contains("198.19.255.1".parse().unwrap()));
        assert!(!n.contains("198.20.0.1".parse().unwrap()));
        assert_eq!(n.mapped_prefix_len(), 111);
        assert_eq!(n.to_string(), "198.18.0.0/15");
    }

    #[test]
    fn refuses_bad_input_naming_the_field() {
        for (s, field) in [
            ("10.0.0.1/8", "CIDR"),
            ("10.0.0.0/33", "CIDR prefix length"),
            ("10.0.0.0/x", "CIDR prefix length"),
            ("300.1.1.1", "IP address"),
            ("", "IP address"),
            ("fd00::/129", "CIDR prefix length"),
        ] {
            let e = s.parse::<IpNet>().unwrap_err().to_string();
            assert!(e.starts_with(&format!("invalid {field}")), "{s}: {e}");
        }
    }

    #[test]
    fn zero_prefix_matches_its_family_only() {
        let any4: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(any4.contains("1.2.3.4".parse().unwrap()));
        assert!(!any4.contains("::1".parse().unwrap()));
    }
}
