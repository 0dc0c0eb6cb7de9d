//! The crate's error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong when building, attaching or inspecting an
/// accelerator. Each message says what failed and what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The process lacks a capability the kernel requires.
    #[error(
        "{operation} needs {capability} (effective capabilities of this process lack it): \
         run as root or grant it, e.g. `setcap cap_bpf,cap_net_admin,cap_perfmon+ep <binary>`"
    )]
    MissingCapability {
        /// What was being done.
        operation: &'static str,
        /// The capability (or capabilities) missing.
        capability: &'static str,
    },

    /// No cgroup v2 filesystem is mounted.
    #[error(
        "no cgroup2 filesystem is mounted (none listed in /proc/self/mountinfo): \
         mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    Cgroup2NotMounted,

    /// The cgroup path does not exist.
    #[error("cgroup {path} does not exist: create it (mkdir below the cgroup2 mount {mount}) or pass an existing cgroup directory")]
    CgroupNotFound {
        /// The path given.
        path: PathBuf,
        /// Where cgroup v2 is mounted, if found.
        mount: String,
    },

    /// The path exists but is not a directory of a cgroup v2 filesystem.
    #[error("{path} is not a cgroup v2 directory ({detail}): pass a directory below the cgroup2 mount {mount}")]
    NotCgroupV2 {
        /// The path given.
        path: PathBuf,
        /// What it is instead.
        detail: String,
        /// Where cgroup v2 is mounted, if found.
        mount: String,
    },

    /// No cgroup was chosen on the builder.
    #[error("no cgroup chosen: call `.cgroup(Cgroup::path(..)?)` (or `Cgroup::current()?`) on the builder before `attach()`")]
    NoCgroup,

    /// `forward()` was called on a guard in ingress mode.
    #[error("forward() needs an accelerator built with `.redirect(RedirectMode::Egress)` or `.redirect(RedirectMode::Both)`; this one is in ingress mode")]
    NotEgressMode,

    /// A process name for the comm policy is unusable.
    #[error("invalid comm {comm:?}: {reason}")]
    InvalidComm {
        /// The name given.
        comm: String,
        /// Why it cannot match.
        reason: &'static str,
    },

    /// A CIDR could not be parsed or has a prefix length out of range.
    #[error("invalid CIDR {input:?}: {reason}")]
    InvalidCidr {
        /// The text or address given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Port 0 was given in the port policy.
    #[error("port 0 cannot match a TCP connection: pass ports from 1 to 65535")]
    InvalidPort,

    /// The socket map capacity is zero.
    #[error("socket map capacity 0 would accelerate nothing: pass at least 1 (the default is {default})")]
    ZeroCapacity {
        /// The default capacity.
        default: u32,
    },

    /// The receive queue limit is zero.
    #[error("receive queue limit 0 would let nothing be redirected: pass a byte count (the default is {default}; u32::MAX for no bound)")]
    ZeroReceiveQueueLimit {
        /// The default limit.
        default: u32,
    },

    /// A [`StreamingDemotion`](crate::StreamingDemotion) field is zero.
    #[error("streaming demotion: {field} 0 would demote every pair at its first message or none: pass at least 1 (StreamingDemotion::default() has 64 messages of at most 16 KiB)")]
    ZeroStreamingDemotion {
        /// Which field.
        field: &'static str,
    },

    /// Streaming demotion was asked for outside ingress mode.
    #[error("streaming demotion works in RedirectMode::Ingress only, not {mode:?}: drop demote_streaming() or use ingress mode")]
    StreamingDemotionMode {
        /// The mode asked for.
        mode: crate::RedirectMode,
    },

    /// A policy set has more entries than its BPF map holds.
    #[error("too many {what}: {given} given, at most {max} fit")]
    PolicyTooLarge {
        /// Which knob.
        what: &'static str,
        /// How many were given.
        given: usize,
        /// The limit.
        max: usize,
    },

    /// The running kernel lacks something the accelerator needs.
    #[error("the kernel lacks {feature} (needs Linux {min_kernel} or newer, built with it)")]
    KernelFeature {
        /// The missing feature.
        feature: &'static str,
        /// The first kernel version that has it.
        min_kernel: &'static str,
        /// What the kernel answered.
        source: io::Error,
    },

    /// A namespace group (`AcceleratorBuilder::namespace_group`) is unusable.
    #[error("namespace group member {path}: {reason}")]
    NamespaceGroup {
        /// The namespace file concerned.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },

    /// A BPF operation failed for another reason.
    #[error("{call} failed")]
    Bpf {
        /// The failing call.
        call: &'static str,
        /// The underlying error.
        source: io::Error,
    },

    /// A file, socket or process operation failed.
    #[error("{call} {about} failed")]
    Io {
        /// The failing call.
        call: &'static str,
        /// What it was called on: a path, an address, a socket's role.
        about: String,
        /// The underlying error.
        source: io::Error,
    },
}

/// What kind of failure an [`Error`] is, for matching without parsing
/// messages (see [`Error::kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad input to the builder or a live setter (port 0, a long comm, a
    /// bad CIDR, capacity 0, too many entries, a bad namespace group, no
    /// cgroup chosen): fix the call.
    InvalidInput,
    /// A capability or permission is missing.
    Permission,
    /// cgroup v2 is not mounted, or the path is not a cgroup v2 directory.
    Cgroup,
    /// The running kernel lacks a feature ([`Error::KernelFeature`]).
    Unsupported,
    /// `forward()` on a guard not in egress or both mode, or streaming
    /// demotion outside ingress mode.
    WrongMode,
    /// A map is full, or a socket is already in it (e.g. forwarded twice).
    MapFullOrTaken,
    /// Another BPF call failed.
    Bpf,
    /// A file or socket operation failed.
    Io,
}

/// [`Error::KernelFeature`]'s `feature` when the kernel refuses the guard.
pub(crate) const SPLICE_GUARD_FEATURE: &str =
    "BPF LSM programs for the splice guard (CONFIG_BPF_LSM, `bpf` \
     among the active LSMs, BTF, and no lockdown refusing them); opt out with \
     `.splice_guard(SpliceGuard::Off)` only if no selected program uses splice(2)";

/// [`Error::KernelFeature`]'s `feature` when the kernel is older than any
/// supported and refuses even the smallest configuration.
pub(crate) const KERNEL_TOO_OLD_FEATURE: &str =
    "what the fast path's programs need (BPF atomics, the sock_ops, sk_msg and \
     socket storage helpers they call): this crate supports Linux 6.1 and newer; \
     upgrade the kernel";

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether this is the kernel refusing the splice guard (and nothing
    /// else): the one failure a program known not to splice may answer by
    /// attaching again with `.splice_guard(SpliceGuard::Off)`.
    pub fn is_splice_guard_refused(&self) -> bool {
        matches!(self, Error::KernelFeature { feature, .. } if *feature == SPLICE_GUARD_FEATURE)
    }

    /// Whether this is a kernel older than any supported (6.1) refusing
    /// the programs.
    pub(crate) fn is_kernel_too_old(&self) -> bool {
        matches!(self, Error::KernelFeature { feature, .. } if *feature == KERNEL_TOO_OLD_FEATURE)
    }

    /// The kind of failure, for matching.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::MissingCapability { .. } => ErrorKind::Permission,
            Error::Cgroup2NotMounted | Error::CgroupNotFound { .. } | Error::NotCgroupV2 { .. } => {
                ErrorKind::Cgroup
            }
            Error::NoCgroup
            | Error::InvalidComm { .. }
            | Error::InvalidCidr { .. }
            | Error::InvalidPort
            | Error::ZeroCapacity { .. }
            | Error::ZeroReceiveQueueLimit { .. }
            | Error::ZeroStreamingDemotion { .. }
            | Error::PolicyTooLarge { .. }
            | Error::NamespaceGroup { .. } => ErrorKind::InvalidInput,
            Error::NotEgressMode | Error::StreamingDemotionMode { .. } => ErrorKind::WrongMode,
            Error::KernelFeature { .. } => ErrorKind::Unsupported,
            Error::Bpf { source, .. } => match source.kind() {
                io::ErrorKind::PermissionDenied => ErrorKind::Permission,
                io::ErrorKind::ArgumentListTooLong
                | io::ErrorKind::StorageFull
                | io::ErrorKind::AlreadyExists => ErrorKind::MapFullOrTaken,
                _ => ErrorKind::Bpf,
            },
            Error::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
                ErrorKind::Permission
            }
            Error::Io { .. } => ErrorKind::Io,
        }
    }

    pub(crate) fn io(
        call: &'static str,
        about: impl AsRef<std::ffi::OsStr>,
        source: io::Error,
    ) -> Self {
        Error::Io {
            call,
            about: about.as_ref().to_string_lossy().into_owned(),
            source,
        }
    }

    /// This error followed by its sources, joined with ": " (what anyhow's
    /// `{:#}` prints). `Display` shows this error alone; the cause (an errno
    /// with libbpf's context, say) is its [`source`](std::error::Error::source).
    pub fn with_causes(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(err) = cause {
            text.push_str(": ");
            text.push_str(&err.to_string());
            cause = err.source();
        }
        text
    }

    /// Converts a libbpf-rs error from `call`, keeping its errno.
    pub(crate) fn bpf(call: &'static str, err: libbpf_rs::Error) -> Self {
        Error::bpf_saying(call, err, &[])
    }

    /// [`Error::bpf`], with what libbpf logged during the call: the failing
    /// program and the end of the verifier's log join the cause's message
    /// (the whole log goes to the `log` facade, target `libbpf`).
    pub(crate) fn bpf_saying(call: &'static str, err: libbpf_rs::Error, said: &[String]) -> Self {
        let source = libbpf_to_io(&err);
        let summary = libbpf_summary(said);
        if summary.is_empty() {
            return Error::Bpf { call, source };
        }
        Error::Bpf {
            call,
            source: io::Error::new(
                source.kind(),
                format!("{source}; libbpf reported: {summary}"),
            ),
        }
    }
}

/// The lines of libbpf's output that say what failed: which program failed
/// to load, and the last lines of its verifier log (where the verifier
/// names the instruction it refused), joined with " | ".
fn libbpf_summary(said: &[String]) -> String {
    const VERIFIER_TAIL: usize = 4;
    let lines: Vec<&str> = said
        .iter()
        .flat_map(|m| m.lines())
        .map(|l| l.trim().trim_start_matches("libbpf: "))
        .filter(|l| !l.is_empty() && !l.contains("skipping optional"))
        .collect();
    let mut picked: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.contains("failed") && !l.contains("LOAD LOG"))
        .take(2)
        .collect();
    if let Some(end) = lines.iter().position(|l| l.contains("END PROG LOAD LOG")) {
        let start = lines[..end]
            .iter()
            .rposition(|l| l.contains("BEGIN PROG LOAD LOG"))
            .map_or(0, |b| b + 1);
        picked.extend(&lines[end.saturating_sub(VERIFIER_TAIL).max(start)..end]);
    }
    picked.join(" | ")
}

/// The errno inside a libbpf-rs error, as an `io::Error` whose message keeps
/// libbpf's context.
pub(crate) fn libbpf_to_io(err: &libbpf_rs::Error) -> io::Error {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(code) = e
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
        {
            return io::Error::from_raw_os_error(code);
        }
        cause = e.source();
    }
    use libbpf_rs::ErrorKind as K;
    let kind = match err.kind() {
        K::NotFound => io::ErrorKind::NotFound,
        K::PermissionDenied => io::ErrorKind::PermissionDenied,
        K::AlreadyExists => io::ErrorKind::AlreadyExists,
        K::WouldBlock => io::ErrorKind::WouldBlock,
        K::InvalidInput => io::ErrorKind::InvalidInput,
        K::InvalidData => io::ErrorKind::InvalidData,
        K::TimedOut => io::ErrorKind::TimedOut,
        K::Interrupted => io::ErrorKind::Interrupted,
        K::Unsupported => io::ErrorKind::Unsupported,
        K::OutOfMemory => io::ErrorKind::OutOfMemory,
        K::TooBig => io::ErrorKind::ArgumentListTooLong,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("{err:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Display shows the error alone and `source()` the cause, so a chain
    /// printer shows each once; `with_causes()` joins them.
    #[test]
    fn the_cause_is_printed_once() {
        let errno = || io::Error::from_raw_os_error(nix::libc::EPERM);
        let cause = errno().to_string();
        for err in [
            Error::Bpf {
                call: "bpf(BPF_PROG_LOAD)",
                source: errno(),
            },
            Error::io("open", "/sys/fs/cgroup/x", errno()),
            crate::kernel_support::splice_guard_unsupported(errno()),
        ] {
            assert!(!err.to_string().contains(&cause), "{err}");
            assert!(std::error::Error::source(&err).is_some(), "{err:?}");
            let full = err.with_causes();
            assert_eq!(full.matches(&cause).count(), 1, "{full}");
            assert!(full.starts_with(&err.to_string()), "{full}");
        }
    }

    /// A load failure names the program and the instruction the verifier
    /// refused (the end of its log), keeping the errno's kind.
    #[test]
    fn a_load_failure_carries_what_the_verifier_said() {
        let said = [
            "libbpf: object 'fastpath_bpf': failed (-22) to create BPF token from '/sys/fs/bpf', \
             skipping optional step..."
                .to_owned(),
            "libbpf: prog 'fp_x': BPF program load failed: -EACCES".to_owned(),
            "libbpf: prog 'fp_x': -- BEGIN PROG LOAD LOG --\n0: (b7) r0 = 0\n1: (79) r8 = \
             *(u64 *)(r1 +656)\nR1 invalid mem access 'rcu_ptr_or_null_'\nprocessed 2 insns\n\
             -- END PROG LOAD LOG --"
                .to_owned(),
            "libbpf: failed to load object 'fastpath_bpf'".to_owned(),
        ];
        let err = Error::bpf_saying(
            "loading",
            libbpf_rs::Error::from(io::Error::from_raw_os_error(nix::libc::EACCES)),
            &said,
        );
        let full = err.with_causes();
        assert_eq!(err.kind(), ErrorKind::Permission, "{full}");
        for part in [
            "prog 'fp_x': BPF program load failed",
            "R1 invalid mem access",
            "(os error 13)",
        ] {
            assert!(full.contains(part), "{part}: {full}");
        }
        assert!(!full.contains("token"), "{full}");
    }

    /// On architectures whose syscall numbers the guard does not know, the
    /// refusal is the splice guard's (callers may retry without it).
    #[test]
    fn the_guard_refused_for_the_architecture_says_so() {
        let err = crate::kernel_support::splice_guard_arch_unsupported();
        assert!(err.is_splice_guard_refused(), "{err}");
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.with_causes().contains("x86_64 and arm64"), "{err}");
    }
}
