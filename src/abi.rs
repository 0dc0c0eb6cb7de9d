//! The data shared with the BPF programs.
//!
//! `bpf/fastpath.h` is the single definition: the structs below are the
//! ones libbpf-cargo generates from the compiled object's BTF, so their
//! layout cannot drift. The flag constants and map limits are not in BTF;
//! the tests at the bottom check them against the header text and the
//! limits also against the compiled object's maps.

pub(crate) use crate::skel::types::{
    fp_cidr_key, fp_fwd_dir, fp_live, fp_proxy_pair, fp_sock_key, fp_sock_state,
    fp_splice_exclusion, fp_stats,
};

use std::net::{IpAddr, SocketAddr};

pub(crate) const FP_COMM_LEN: usize = 16;
pub(crate) const FP_MATCH_PORTS: u32 = 1;
pub(crate) const FP_MATCH_CIDRS: u32 = 2;
pub(crate) const FP_MATCH_COMMS: u32 = 4;
/// `fp_sock_state.flags`: paired with a local peer, or waiting to pair.
pub(crate) const FP_PAIRED: u32 = 8;
pub(crate) const FP_WAITING: u32 = 16;

/// Both mode: the getsockopt level and name `fp_backlog_query` answers.
pub(crate) const FP_SOL_FASTPATH: u32 = 0x4650_4654;
pub(crate) const FP_SO_BACKLOG_LEN: i32 = 1;

/// Fixed map sizes (`FP_MAX_*` in the header): inputs larger than these are
/// refused before anything is loaded.
pub(crate) const FP_MAX_PORTS: usize = 1024;
pub(crate) const FP_MAX_CIDRS: usize = 1024;
pub(crate) const FP_MAX_COMMS: usize = 256;
pub(crate) const FP_MAX_GROUPED_NAMESPACES: usize = 256;
pub(crate) const FP_MAX_SPLICE_EXCLUDED: usize = 4096;

/// Types that are plain bytes: `#[repr(C)]`, integers and integer arrays
/// only, no padding.
///
/// # Safety
/// Implement only for such types: `as_bytes` and `from_bytes` rely on it
/// (`no_padding` below checks the implementors).
pub(crate) unsafe trait Plain: Copy + Default {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: implementors are repr(C) integer-only structs without
        // padding (checked by `no_padding` below), so every byte is
        // initialised and the slice covers exactly the value.
        unsafe { std::slice::from_raw_parts((self as *const Self).cast(), size_of::<Self>()) }
    }

    /// Reads a value from the start of `bytes`, `None` if too short.
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        (bytes.len() >= size_of::<Self>()).then(|| {
            // SAFETY: the length was checked; every bit pattern is a valid
            // value of an integer-only struct; read_unaligned copes with any
            // alignment of the source buffer.
            unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) }
        })
    }
}

// SAFETY: each is generated from bpf/fastpath.h as a repr(C) struct of
// integers and integer arrays; `no_padding` checks there is no padding.
unsafe impl Plain for fp_cidr_key {}
// SAFETY: as above.
unsafe impl Plain for fp_sock_key {}
// SAFETY: as above.
unsafe impl Plain for fp_stats {}
// SAFETY: as above.
unsafe impl Plain for fp_fwd_dir {}
// SAFETY: as above.
unsafe impl Plain for fp_proxy_pair {}
// SAFETY: as above.
unsafe impl Plain for fp_sock_state {}
// SAFETY: as above.
unsafe impl Plain for fp_splice_exclusion {}

/// Network-order words of an address, IPv4 as IPv4-mapped IPv6 (as the BPF
/// side stores it).
fn key_words(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let octets = v6.octets();
    std::array::from_fn(|i| u32::from_ne_bytes(octets[4 * i..4 * i + 4].try_into().unwrap()))
}

/// The address a key's words hold (IPv4-mapped IPv6 back to IPv4).
fn key_ip(words: [u32; 4]) -> IpAddr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    std::net::Ipv6Addr::from(octets).to_canonical()
}

impl fp_sock_key {
    /// The socket's own address, as the key holds it.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        // Ports are 16-bit; the key stores them in 32-bit words.
        SocketAddr::new(key_ip(self.local_ip), self.local_port as u16)
    }

    /// The key the BPF side gives the socket with these addresses.
    pub(crate) fn of_socket(local: SocketAddr, remote: SocketAddr, netns_cookie: u64) -> Self {
        fp_sock_key {
            local_ip: key_words(local.ip()),
            remote_ip: key_words(remote.ip()),
            local_port: u32::from(local.port()),
            remote_port: u32::from(remote.port()),
            netns_cookie,
        }
    }
}

impl fp_fwd_dir {
    /// Bytes the programs moved in this direction: forwarded, and sent
    /// straight out of the peer by an application (both mode).
    pub(crate) fn total(&self) -> u64 {
        self.bytes + self.direct
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = include_str!("../bpf/fastpath.h");

    fn header_value(name: &str) -> u32 {
        let line = HEADER
            .lines()
            .find(|l| l.split_whitespace().any(|w| w == name))
            .unwrap_or_else(|| panic!("{name} not in bpf/fastpath.h"));
        let value = line
            .split(|c: char| c == '=' || c.is_whitespace() || c == ',')
            .filter(|w| !w.is_empty())
            .skip_while(|w| *w != name)
            .nth(1)
            .unwrap();
        match value.strip_prefix("0x") {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => value.parse(),
        }
        .unwrap_or_else(|_| panic!("{name}: {line}"))
    }

    #[test]
    fn constants_match_header() {
        assert_eq!(header_value("FP_COMM_LEN") as usize, FP_COMM_LEN);
        assert_eq!(header_value("FP_MATCH_PORTS"), FP_MATCH_PORTS);
        assert_eq!(header_value("FP_MATCH_CIDRS"), FP_MATCH_CIDRS);
        assert_eq!(header_value("FP_MATCH_COMMS"), FP_MATCH_COMMS);
        assert_eq!(header_value("FP_PAIRED"), FP_PAIRED);
        assert_eq!(header_value("FP_WAITING"), FP_WAITING);
        assert_eq!(header_value("FP_SOL_FASTPATH"), FP_SOL_FASTPATH);
        assert_eq!(header_value("FP_SO_BACKLOG_LEN") as i32, FP_SO_BACKLOG_LEN);
    }

    #[test]
    fn map_limits_match_header_and_object() {
        use libbpf_rs::skel::SkelBuilder;
        let mut storage = std::mem::MaybeUninit::uninit();
        let open = crate::skel::FastpathSkelBuilder::default()
            .open(&mut storage)
            .expect("opening the compiled object needs no privilege");
        let maps = &open.maps;
        for (name, rust, object) in [
            (
                "FP_MAX_PORTS",
                FP_MAX_PORTS,
                maps.policy_ports.max_entries(),
            ),
            (
                "FP_MAX_CIDRS",
                FP_MAX_CIDRS,
                maps.policy_cidrs.max_entries(),
            ),
            (
                "FP_MAX_COMMS",
                FP_MAX_COMMS,
                maps.policy_comms.max_entries(),
            ),
            (
                "FP_MAX_GROUPED_NAMESPACES",
                FP_MAX_GROUPED_NAMESPACES,
                maps.netns_spaces.max_entries(),
            ),
            (
                "FP_MAX_SPLICE_EXCLUDED",
                FP_MAX_SPLICE_EXCLUDED,
                maps.splice_excluded.max_entries(),
            ),
        ] {
            assert_eq!(header_value(name) as usize, rust, "{name} in the header");
            assert_eq!(object as usize, rust, "{name} in the compiled object");
        }
    }

    #[test]
    fn a_key_gives_back_its_local_address() {
        let remote: SocketAddr = "[::1]:9".parse().unwrap();
        for local in ["127.0.0.1:8080", "[fd00::5]:443"] {
            let local: SocketAddr = local.parse().unwrap();
            assert_eq!(fp_sock_key::of_socket(local, remote, 1).local_addr(), local);
        }
    }

    #[test]
    fn no_padding() {
        assert_eq!(size_of::<fp_cidr_key>(), 4 + 16);
        assert_eq!(size_of::<fp_sock_key>(), 4 * 4 * 2 + 4 + 4 + 8);
        assert_eq!(size_of::<fp_stats>() % 8, 0);
        assert_eq!(size_of::<fp_proxy_pair>(), 8 + 8);
        assert_eq!(
            size_of::<fp_sock_state>(),
            4 + 4 + FP_COMM_LEN + 8 + size_of::<fp_sock_key>() + 8 + 4 + 4
                // two fp_redirect_slot: four u64 and two u32 each
                + 2 * (4 * 8 + 4 + 4)
        );
        assert_eq!(size_of::<fp_splice_exclusion>(), 8 + 8);
    }
}
