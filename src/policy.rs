//! Which connections get the shortcut.
//!
//! A connection's socket is put into the socket map when it becomes
//! established and every knob that is set matches (unset knobs match all):
//! - ports: its local or its remote port is in the set;
//! - CIDRs: its remote (peer) address is in one of the prefixes;
//! - comms: the process that owns it has one of the names. The owner is the
//!   process that called `connect()` on the connecting side, and the one
//!   that called `listen()` on the listening socket for accepted sockets.
//!
//! Each end decides for itself; bytes take the shortcut only when both ends
//! of a connection are in the map.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use libbpf_rs::{MapCore, MapFlags};

use crate::abi::{
    fp_cidr_key, Plain, FP_COMM_LEN, FP_MAX_CIDRS as MAX_CIDRS, FP_MAX_COMMS as MAX_COMMS,
    FP_MAX_PORTS as MAX_PORTS,
};
use crate::error::{Error, Result};

/// An IPv4 or IPv6 prefix such as `10.0.0.0/8` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    /// A prefix of `prefix_len` bits of `addr` (host bits are ignored).
    ///
    /// # Errors
    /// [`Error::InvalidCidr`] if `prefix_len` exceeds 32 (IPv4) or 128 (IPv6).
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(Error::InvalidCidr {
                input: format!("{addr}/{prefix_len}"),
                reason: format!(
                    "prefix length {prefix_len} is out of range: at most {max} for {}",
                    ip_kind(addr)
                ),
            });
        }
        Ok(Cidr { addr, prefix_len })
    }

    /// The address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The LPM-trie key: IPv4 as IPv4-mapped IPv6, as the BPF side stores it.
    pub(crate) fn lpm_key(&self) -> fp_cidr_key {
        let (v6, prefix) = match self.addr {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped(), 96 + u32::from(self.prefix_len)),
            IpAddr::V6(v6) => (v6, u32::from(self.prefix_len)),
        };
        fp_cidr_key {
            prefixlen: prefix,
            addr: v6.octets(),
        }
    }
}

fn ip_kind(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

impl FromStr for Cidr {
    type Err = Error;

    /// Parses `ADDR/LEN`, or a bare address as a host prefix.
    fn from_str(s: &str) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidCidr {
            input: s.to_owned(),
            reason,
        };
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| invalid(format!("{addr:?} is not an IPv4 or IPv6 address")))?;
        let len = match len {
            None if addr.is_ipv4() => 32,
            None => 128,
            Some(len) => len.parse::<u8>().map_err(|_| {
                invalid(format!(
                    "prefix length {len:?} is not a number from 0 to {}",
                    if addr.is_ipv4() { 32 } else { 128 }
                ))
            })?,
        };
        Cidr::new(addr, len).map_err(|err| match err {
            Error::InvalidCidr { reason, .. } => invalid(reason),
            other => other,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Validates a process name for the comm knob and pads it as the kernel
/// stores `task->comm`.
pub(crate) fn comm_key(comm: &str) -> Result<[u8; FP_COMM_LEN]> {
    let invalid = |reason| Error::InvalidComm {
        comm: comm.to_owned(),
        reason,
    };
    if comm.is_empty() {
        return Err(invalid(
            "it is empty; pass a process name such as \"envoy\"",
        ));
    }
    if comm.len() >= FP_COMM_LEN {
        return Err(invalid(
            "it is longer than 15 bytes, and the kernel keeps only the first 15 bytes of a \
             process name (see /proc/<pid>/comm): pass those",
        ));
    }
    if comm.contains('\0') {
        return Err(invalid("it contains a NUL byte"));
    }
    let mut key = [0u8; FP_COMM_LEN];
    key[..comm.len()].copy_from_slice(comm.as_bytes());
    Ok(key)
}

/// Validates ports: 0 cannot match.
pub(crate) fn validate_ports(ports: &[u16]) -> Result<()> {
    if ports.contains(&0) {
        return Err(Error::InvalidPort);
    }
    check_size("ports", ports.len(), MAX_PORTS)
}

fn check_size(what: &'static str, given: usize, max: usize) -> Result<()> {
    if given > max {
        return Err(Error::PolicyTooLarge { what, given, max });
    }
    Ok(())
}

/// Validates a CIDR set (its size; each prefix was checked when parsed).
pub(crate) fn validate_cidrs(cidrs: &[Cidr]) -> Result<()> {
    check_size("CIDRs", cidrs.len(), MAX_CIDRS)
}

/// Validates a process-name set: its size and every name.
pub(crate) fn validate_comms(comms: &[String]) -> Result<()> {
    check_size("comms", comms.len(), MAX_COMMS)?;
    comms.iter().try_for_each(|c| comm_key(c).map(drop))
}

/// The selection knobs, as given to the builder or a live guard.
#[derive(Debug, Clone, Default)]
pub(crate) struct Policy {
    pub ports: Vec<u16>,
    pub cidrs: Vec<Cidr>,
    pub comms: Vec<String>,
}

impl Policy {
    /// Checks every knob before anything touches the kernel.
    pub fn validate(&self) -> Result<()> {
        validate_ports(&self.ports)?;
        validate_cidrs(&self.cidrs)?;
        validate_comms(&self.comms)
    }
}

/// Makes a BPF hash or trie `map` hold exactly the keys in `wanted` (each
/// mapped to 1): inserts the new ones first, then deletes the stale ones.
pub(crate) fn sync_set<M: MapCore>(
    call: &'static str,
    map: &M,
    wanted: &BTreeSet<Vec<u8>>,
) -> Result<()> {
    for key in wanted {
        map.update(key, &[1u8], MapFlags::ANY)
            .map_err(|err| Error::bpf(call, err))?;
    }
    let stale: Vec<Vec<u8>> = map.keys().filter(|k| !wanted.contains(k)).collect();
    for key in stale {
        map.delete(&key).map_err(|err| Error::bpf(call, err))?;
    }
    Ok(())
}

pub(crate) fn port_keys(ports: &[u16]) -> BTreeSet<Vec<u8>> {
    ports
        .iter()
        .map(|&p| u32::from(p).to_ne_bytes().to_vec())
        .collect()
}

pub(crate) fn cidr_keys(cidrs: &[Cidr]) -> BTreeSet<Vec<u8>> {
    cidrs
        .iter()
        .map(|c| c.lpm_key().as_bytes().to_vec())
        .collect()
}

pub(crate) fn comm_keys(comms: &[String]) -> Result<BTreeSet<Vec<u8>>> {
    comms
        .iter()
        .map(|c| comm_key(c).map(|k| k.to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cidrs_and_names_the_problem() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert_eq!(c.lpm_key().prefixlen, 104);
        assert_eq!(
            &c.lpm_key().addr[..12],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
        );
        let c: Cidr = "fd00::/8".parse().unwrap();
        assert_eq!(c.lpm_key().prefixlen, 8);
        assert_eq!("127.0.0.1".parse::<Cidr>().unwrap().prefix_len(), 32);

        let err = "10.0.0.0/33".parse::<Cidr>().unwrap_err();
        assert!(err.to_string().contains("at most 32 for IPv4"), "{err}");
        let err = "::/129".parse::<Cidr>().unwrap_err();
        assert!(err.to_string().contains("at most 128 for IPv6"), "{err}");
        let err = "banana/8".parse::<Cidr>().unwrap_err();
        assert!(
            err.to_string().contains("not an IPv4 or IPv6 address"),
            "{err}"
        );
        let err = "10.0.0.0/x".parse::<Cidr>().unwrap_err();
        assert!(err.to_string().contains("not a number"), "{err}");
    }

    #[test]
    fn comm_rules() {
        assert_eq!(&comm_key("envoy").unwrap()[..6], b"envoy\0");
        assert!(comm_key("exactly15bytes!").is_ok());
        let err = comm_key("sixteen-bytes-xx").unwrap_err();
        assert!(err.to_string().contains("longer than 15 bytes"), "{err}");
        let err = comm_key("").unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }

    #[test]
    fn port_zero_is_refused() {
        let err = validate_ports(&[80, 0]).unwrap_err();
        assert!(err.to_string().contains("port 0"), "{err}");
        let too_many: Vec<u16> = (1..=2000).collect();
        assert!(matches!(
            validate_ports(&too_many),
            Err(Error::PolicyTooLarge { .. })
        ));
    }
}
