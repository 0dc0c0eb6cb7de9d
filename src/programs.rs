//! The loaded BPF object (skeleton) and the typed operations on its maps.

use std::mem::{ManuallyDrop, MaybeUninit};
use std::ptr::NonNull;

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle, OpenObject};

use crate::abi::{fp_live, FP_MATCH_CIDRS, FP_MATCH_COMMS, FP_MATCH_PORTS};
use crate::error::{Error, Result};
use crate::forward::{DirectMaps, ForwardMaps};
use crate::kernel_support::{
    both_mode_unsupported, kernel_too_old, owners_unsupported, running_kernel_older_than_supported,
    splice_guard_arch_unsupported, splice_guard_unsupported, streaming_demotion_unsupported,
    SPLICE_GUARD_ARCH_SUPPORTED,
};
use crate::logging::{expecting_failures, route_libbpf_output};
use crate::mode::RedirectMode;
use crate::policy::{cidr_keys, comm_keys, port_keys, sync_set, Cidr, Policy};
use crate::skel::{FastpathSkel, FastpathSkelBuilder};
use crate::stats::StatsReader;
use crate::StreamingDemotion;

/// What is fixed before the programs are loaded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoadConfig {
    pub mode: RedirectMode,
    pub capacity: u32,
    pub splice_guard: bool,
    /// Load `fp_lsm_canary` (classifies a failed splice guard).
    pub lsm_canary: bool,
    /// Record each socket's owner process (for comm policies and the splice
    /// guard's exclusions) where the kernel lets sock_ops see the task.
    pub record_owners: bool,
    /// A comm policy needs the owners: fail where they cannot be recorded.
    pub owners_required: bool,
    /// Keep connections from sockets blocking at connect() plain.
    pub keep_blocking_plain: bool,
    /// Receive memory (bytes) above which a peer stops redirecting; 0: none.
    pub receive_queue_limit: u32,
    /// Ingress mode: when streaming pairs leave the shortcut; None: never.
    pub demotion: Option<StreamingDemotion>,
}

/// Egress and both modes: segments a forwarded socket's psock backlog (bytes
/// forwarded to it that wait for room in its send buffer) may hold before
/// the forwarding program keeps further bytes on the receiving socket, where
/// TCP's window pushes back. Loopback segments leave the sender with up to
/// 64 KiB, so usually at most about 4 MiB per direction wait there, besides
/// the two sockets' buffers (as in front of a user-space proxy); segments a
/// busy receiver coalesced can hold up to 17 page fragments (about 576 KiB),
/// so at worst about 36 MiB.
pub(crate) const FORWARD_BACKLOG_SEGMENTS: u32 = 64;

/// The kernel's TCP memory pressure threshold in pages (`tcp_mem[1]`), or 0
/// if it cannot be read.
fn tcp_memory_pressure_pages() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem")
        .ok()
        .and_then(|text| text.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

impl LoadConfig {
    pub fn new(mode: RedirectMode, capacity: u32, splice_guard: bool) -> Self {
        LoadConfig {
            mode,
            capacity,
            splice_guard,
            lsm_canary: false,
            record_owners: true,
            owners_required: false,
            keep_blocking_plain: true,
            receive_queue_limit: 0,
            demotion: None,
        }
    }

    /// The smallest configuration, with or without owner records.
    pub(crate) fn minimal(record_owners: bool) -> Self {
        LoadConfig {
            record_owners,
            ..LoadConfig::new(RedirectMode::Ingress, 2, false)
        }
    }
}

/// Owns the skeleton together with the `OpenObject` storage it borrows.
pub(crate) struct Programs {
    skel: ManuallyDrop<FastpathSkel<'static>>,
    object: NonNull<MaybeUninit<OpenObject>>,
}

// SAFETY: the skeleton is Send (libbpf objects may move between threads) and
// `object` is only touched again in Drop.
unsafe impl Send for Programs {}
// SAFETY: shared access only reads maps through fds, which the kernel
// serialises; no interior mutability on the Rust side.
unsafe impl Sync for Programs {}

impl Programs {
    /// Opens, configures and loads the programs into the kernel.
    pub fn load(config: LoadConfig) -> Result<Self> {
        if config.splice_guard && !SPLICE_GUARD_ARCH_SUPPORTED {
            return Err(splice_guard_arch_unsupported());
        }
        // The reloads below only classify a failure: quiet.
        let loads_without = |change: fn(&mut LoadConfig)| {
            let mut reduced = config;
            change(&mut reduced);
            expecting_failures(|| Self::load_once(reduced)).is_ok()
        };
        let too_old = running_kernel_older_than_supported();
        match Self::load_once(config) {
            // sock_ops programs cannot see the current task here (6.1):
            // without owners, unless a comm policy needs them.
            Err(Error::Bpf { source, .. })
                if config.record_owners
                    && expecting_failures(|| {
                        Self::load_once(LoadConfig::minimal(true)).is_err()
                            && Self::load_once(LoadConfig::minimal(false)).is_ok()
                    }) =>
            {
                if config.owners_required {
                    return Err(owners_unsupported(source));
                }
                Self::load(LoadConfig {
                    record_owners: false,
                    ..config
                })
            }
            // Everything but the splice guard loads, and so does the
            // smallest LSM program: the guard failed to verify (our bug).
            Err(Error::Bpf { source, .. })
                if config.splice_guard
                    && loads_without(|c| {
                        c.splice_guard = false;
                        c.lsm_canary = true;
                    }) =>
            {
                Err(Error::Bpf {
                    call: "loading fp_splice_guard (this kernel takes LSM programs, but the \
                           verifier refused the guard: please report it)",
                    source,
                })
            }
            // Everything but the splice guard loads, and no LSM program
            // does: the kernel refuses them (no BPF LSM, lockdown, no BTF).
            Err(Error::Bpf { source, .. })
                if config.splice_guard && loads_without(|c| c.splice_guard = false) =>
            {
                Err(splice_guard_unsupported(source))
            }
            // It loads without streaming demotion: the kfuncs or the kernel
            // internals it reads are missing.
            Err(Error::Bpf { source, .. })
                if config.demotion.is_some()
                    && loads_without(|c| {
                        c.demotion = None;
                        c.splice_guard = false;
                    }) =>
            {
                Err(streaming_demotion_unsupported(source))
            }
            // Ingress mode loads but both mode does not: the kfuncs or the
            // kernel internals fp_sk_msg_both reads are missing.
            Err(Error::Bpf { source, .. })
                if config.mode == RedirectMode::Both
                    && loads_without(|c| {
                        c.mode = RedirectMode::Ingress;
                        c.splice_guard = false;
                    }) =>
            {
                Err(both_mode_unsupported(source))
            }
            // Not even the smallest configuration loads, on a kernel older
            // than any this crate supports: say that, not its verifier's
            // words alone.
            Err(Error::Bpf { source, .. })
                if too_old.is_some()
                    && expecting_failures(|| {
                        Self::load_once(LoadConfig::minimal(false)).is_err()
                    }) =>
            {
                Err(kernel_too_old(too_old.as_deref().unwrap_or("?"), source))
            }
            other => other,
        }
    }

    /// Loads exactly `config`, without classifying a failure.
    pub(crate) fn load_once(config: LoadConfig) -> Result<Self> {
        route_libbpf_output();
        let object = NonNull::from(Box::leak(Box::new(MaybeUninit::<OpenObject>::uninit())));
        // SAFETY: `object` stays allocated until Drop, after the skeleton that
        // borrows it is gone; nothing else accesses it meanwhile.
        let storage: &'static mut MaybeUninit<OpenObject> = unsafe { &mut *object.as_ptr() };
        match Self::open_and_load(storage, config) {
            Ok(skel) => Ok(Programs {
                skel: ManuallyDrop::new(skel),
                object,
            }),
            Err(err) => {
                // SAFETY: the failed skeleton was dropped inside
                // open_and_load; `object` came from Box::leak above.
                drop(unsafe { Box::from_raw(object.as_ptr()) });
                Err(err)
            }
        }
    }

    fn open_and_load(
        storage: &'static mut MaybeUninit<OpenObject>,
        config: LoadConfig,
    ) -> Result<FastpathSkel<'static>> {
        let mut open = FastpathSkelBuilder::default()
            .open(storage)
            .map_err(|err| Error::bpf("bpf_object__open (embedded fastpath.bpf.o)", err))?;
        for map in [
            &mut open.maps.sock_map,
            &mut open.maps.fwd_map,
            &mut open.maps.fwd_dirs,
            &mut open.maps.fwd_copied,
            &mut open.maps.proxy_pairs,
            &mut open.maps.pairs,
            &mut open.maps.demotions,
        ] {
            map.set_max_entries(config.capacity)
                .map_err(|err| Error::bpf("bpf_map__set_max_entries", err))?;
        }
        // Load only what the mode attaches: fp_sk_msg_both reads kernel
        // internals (kfuncs, CO-RE) that other modes need not depend on.
        let both = config.mode == RedirectMode::Both;
        open.progs
            .fp_sk_msg
            .set_autoload(config.mode == RedirectMode::Ingress);
        open.progs.fp_sk_msg_both.set_autoload(both);
        open.progs.fp_backlog_query.set_autoload(both);
        open.progs
            .fp_sock_ops
            .set_autoload(config.mode != RedirectMode::Egress);
        open.progs
            .fp_fwd_verdict
            .set_autoload(config.mode != RedirectMode::Ingress);
        open.progs.fp_splice_guard.set_autoload(config.splice_guard);
        open.progs.fp_lsm_canary.set_autoload(config.lsm_canary);
        let rodata = open
            .maps
            .rodata_data
            .as_deref_mut()
            .expect(".rodata is mmapped");
        rodata.record_owners = u32::from(config.record_owners);
        rodata.keep_blocking_plain = u32::from(config.keep_blocking_plain);
        rodata.receive_queue_limit = config.receive_queue_limit;
        if let Some(demotion) = config.demotion {
            rodata.demote_after_msgs = demotion.messages_in_a_row;
            rodata.demote_max_msg_size = demotion.max_message_bytes;
        }
        rodata.fwd_backlog_limit = FORWARD_BACKLOG_SEGMENTS;
        rodata.apps_queue_on_forwarded = u32::from(both);
        rodata.tcp_memory_pressure_pages = tcp_memory_pressure_pages();
        if config.splice_guard {
            crate::splice_guard::write_splice_read_text(&mut rodata.splice_read_text);
        }
        let (loaded, libbpf_said) = crate::logging::capturing(|| open.load());
        loaded.map_err(|err| {
            Error::bpf_saying(
                "loading the BPF object (bpf_object__load: creating maps, verifying the programs)",
                err,
                &libbpf_said,
            )
        })
    }

    pub fn skel(&self) -> &FastpathSkel<'static> {
        &self.skel
    }

    /// Sets `live.paused`: from now on nothing is inserted or redirected.
    pub fn pause(&mut self) {
        store_shared(&mut self.live().paused, 1);
    }

    /// The live settings in the mmapped .bss, shared with the programs.
    fn live(&mut self) -> &mut fp_live {
        &mut self
            .skel
            .maps
            .bss_data
            .as_deref_mut()
            .expect(".bss is mmapped")
            .live
    }

    /// Handles to the maps a forwarded pair lives in (with `direct`, both
    /// mode's too); the kernel keeps each map while a handle is open, so a
    /// `Forwarding` may outlive the guard.
    ///
    /// # Errors
    /// [`Error::Bpf`] if a map fd cannot be duplicated.
    pub fn forward_maps(&self, direct: bool) -> Result<ForwardMaps> {
        let maps = &self.skel.maps;
        let dup = |map: &libbpf_rs::Map<'_>, call| {
            MapHandle::try_from(map).map_err(|e| Error::bpf(call, e))
        };
        Ok(ForwardMaps {
            fwd_map: dup(&maps.fwd_map, "dup of the fwd_map fd")?,
            dirs: dup(&maps.fwd_dirs, "dup of the fwd_dirs fd")?,
            copied: dup(&maps.fwd_copied, "dup of the fwd_copied fd")?,
            direct: if direct {
                Some(DirectMaps {
                    pairs: dup(&maps.proxy_pairs, "dup of the proxy_pairs fd")?,
                    sock_state: dup(&maps.sock_state, "dup of the sock_state fd")?,
                    netns_spaces: dup(&maps.netns_spaces, "dup of the netns_spaces fd")?,
                    backlog_query: None,
                })
            } else {
                None
            },
        })
    }

    pub fn stats_reader(&self) -> Result<StatsReader> {
        StatsReader::new(&self.skel.maps.stats)
    }

    /// Number of sockets currently in the socket map.
    pub fn socket_count(&self) -> usize {
        self.skel.maps.sock_map.keys().count()
    }

    pub fn set_policy(&mut self, policy: &Policy) -> Result<()> {
        self.set_ports(&policy.ports)?;
        self.set_cidrs(&policy.cidrs)?;
        self.set_comms(&policy.comms)
    }

    /// Writes `(netns cookie, address space id)` pairs (see `netns`).
    pub fn set_netns_spaces(&mut self, spaces: &[(u64, u64)]) -> Result<()> {
        for (cookie, space) in spaces {
            self.skel
                .maps
                .netns_spaces
                .update(&cookie.to_ne_bytes(), &space.to_ne_bytes(), MapFlags::ANY)
                .map_err(|err| Error::bpf("bpf(BPF_MAP_UPDATE_ELEM) on netns_spaces", err))?;
        }
        Ok(())
    }

    pub fn set_ports(&mut self, ports: &[u16]) -> Result<()> {
        self.set_knob(FP_MATCH_PORTS, !ports.is_empty(), |skel| {
            sync_set(
                "bpf(BPF_MAP_UPDATE_ELEM) on policy_ports",
                &skel.maps.policy_ports,
                &port_keys(ports),
            )
        })
    }

    pub fn set_cidrs(&mut self, cidrs: &[Cidr]) -> Result<()> {
        self.set_knob(FP_MATCH_CIDRS, !cidrs.is_empty(), |skel| {
            sync_set(
                "bpf(BPF_MAP_UPDATE_ELEM) on policy_cidrs",
                &skel.maps.policy_cidrs,
                &cidr_keys(cidrs),
            )
        })
    }

    /// Whether sockets get their owner process recorded (see
    /// [`LoadConfig::record_owners`]).
    pub fn records_owners(&self) -> bool {
        self.skel
            .maps
            .rodata_data
            .as_ref()
            .is_some_and(|r| r.record_owners != 0)
    }

    pub fn set_comms(&mut self, comms: &[String]) -> Result<()> {
        if !comms.is_empty() && !self.records_owners() {
            return Err(owners_unsupported(std::io::Error::other(
                "loaded without owner records: this kernel's sock_ops programs cannot see \
                 the current task",
            )));
        }
        let keys = comm_keys(comms)?;
        self.set_knob(FP_MATCH_COMMS, !comms.is_empty(), |skel| {
            sync_set(
                "bpf(BPF_MAP_UPDATE_ELEM) on policy_comms",
                &skel.maps.policy_comms,
                &keys,
            )
        })
    }

    /// Switches a knob with no moment where it matches less than the old
    /// or new set intends: the flag is cleared before an emptied set, and
    /// raised only after the set is written.
    fn set_knob(
        &mut self,
        flag: u32,
        enabled: bool,
        write_set: impl FnOnce(&FastpathSkel<'static>) -> Result<()>,
    ) -> Result<()> {
        if !enabled {
            self.update_match_flags(|flags| flags & !flag);
        }
        write_set(&self.skel)?;
        if enabled {
            self.update_match_flags(|flags| flags | flag);
        }
        Ok(())
    }

    fn update_match_flags(&mut self, change: impl FnOnce(u32) -> u32) {
        let live = self.live();
        let new = change(live.match_flags);
        store_shared(&mut live.match_flags, new);
    }
}

/// Stores to memory the kernel reads concurrently (the mmapped .bss): a
/// volatile write keeps the compiler from eliding or reordering it.
fn store_shared(slot: &mut u32, value: u32) {
    // SAFETY: `slot` is a valid, aligned, exclusive reference.
    unsafe { std::ptr::write_volatile(slot, value) };
}

impl Drop for Programs {
    fn drop(&mut self) {
        // SAFETY: the skeleton is dropped exactly once, here, before the
        // storage it borrows; `object` came from Box::leak in `load`.
        unsafe {
            ManuallyDrop::drop(&mut self.skel);
            drop(Box::from_raw(self.object.as_ptr()));
        }
    }
}
