//! What the running kernel and process allow: the capability check made
//! before anything is loaded, and the classification of kernel refusals
//! into [`Error::KernelFeature`] (naming the feature, the kernel that has
//! it, and what to do instead) or [`Error::Bpf`] (naming the call).

use crate::error::{Error, Result};
use crate::sys::{self, Capability};

/// Fails early, with a clear message, when capabilities are missing.
pub(crate) fn require_capabilities(operation: &'static str) -> Result<()> {
    let caps =
        sys::effective_capabilities().map_err(|err| Error::io("read", "/proc/self/status", err))?;
    let has =
        |cap| sys::has_capability(caps, cap) || sys::has_capability(caps, Capability::SysAdmin);
    if !has(Capability::Bpf) && !has(Capability::NetAdmin) {
        return Err(Error::MissingCapability {
            operation,
            capability: "CAP_BPF and CAP_NET_ADMIN",
        });
    }
    if !has(Capability::Bpf) {
        return Err(Error::MissingCapability {
            operation,
            capability: "CAP_BPF",
        });
    }
    if !has(Capability::NetAdmin) {
        return Err(Error::MissingCapability {
            operation,
            capability: "CAP_NET_ADMIN",
        });
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum AttachStep {
    SockmapLink,
    CgroupLink,
}

/// Names the missing kernel feature when an attach fails because the
/// kernel does not know the attach type, otherwise reports the call.
pub(crate) fn classify_attach_error(step: AttachStep, source: std::io::Error) -> Error {
    match (step, sys::is_unsupported(&source)) {
        (AttachStep::SockmapLink, true) => Error::KernelFeature {
            feature: "sk_msg/sk_skb programs on socket maps (neither a BPF link nor \
                      BPF_PROG_ATTACH was accepted)",
            min_kernel: "4.17",
            source,
        },
        (AttachStep::CgroupLink, true) => Error::KernelFeature {
            feature: "cgroup BPF links for sock_ops programs",
            min_kernel: "5.7",
            source,
        },
        (AttachStep::SockmapLink, false) => Error::Bpf {
            call: "attaching a program to a socket map (BPF_LINK_CREATE, then BPF_PROG_ATTACH)",
            source,
        },
        (AttachStep::CgroupLink, false) => Error::Bpf {
            call: "bpf(BPF_LINK_CREATE) attaching fp_sock_ops to the cgroup",
            source,
        },
    }
}

/// The error for a kernel that cannot run `RedirectMode::Both`.
pub(crate) fn both_mode_unsupported(source: std::io::Error) -> Error {
    Error::KernelFeature {
        feature: "what RedirectMode::Both's program needs (the bpf_cast_to_kern_ctx and \
                  bpf_rdonly_cast kfuncs, kernel BTF with struct sk_msg and struct sk_psock); \
                  use RedirectMode::Egress, or Ingress plus a copying proxy",
        min_kernel: "6.2",
        source,
    }
}

/// The error for a kernel that cannot run streaming demotion.
pub(crate) fn streaming_demotion_unsupported(source: std::io::Error) -> Error {
    Error::KernelFeature {
        feature: "what streaming demotion needs (the bpf_cast_to_kern_ctx and bpf_rdonly_cast \
                  kfuncs, kernel BTF with struct sk_psock and task_struct); attach without \
                  AcceleratorBuilder::demote_streaming",
        min_kernel: "6.2",
        source,
    }
}

/// The error for a comm policy on a kernel whose sock_ops programs cannot
/// see the socket's owner process.
pub(crate) fn owners_unsupported(source: std::io::Error) -> Error {
    Error::KernelFeature {
        feature: "the socket owner's process in sock_ops programs (bpf_get_current_pid_tgid \
                  and bpf_get_current_task_btf there), which comm policies match; select by \
                  ports or CIDRs instead",
        min_kernel: "6.10",
        source,
    }
}

/// The oldest kernel the programs are built for and tested on (Debian's
/// 6.1 LTS), as `(major, minor)`.
pub(crate) const OLDEST_SUPPORTED_KERNEL: (u32, u32) = (6, 1);

/// `(major, minor)` of a kernel release such as "6.12.118+deb12-amd64".
pub(crate) fn release_version(release: &str) -> Option<(u32, u32)> {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) if release.starts_with(|c: char| c.is_ascii_digit()) => {
            Some((major, minor))
        }
        _ => None,
    }
}

/// The running kernel's release when it is older than
/// [`OLDEST_SUPPORTED_KERNEL`]; `None` when it is not, or is unknown.
pub(crate) fn running_kernel_older_than_supported() -> Option<String> {
    let release = nix::sys::utsname::uname()
        .ok()?
        .release()
        .to_string_lossy()
        .into_owned();
    (release_version(&release)? < OLDEST_SUPPORTED_KERNEL).then_some(release)
}

/// The error for a kernel older than [`OLDEST_SUPPORTED_KERNEL`] that
/// refused even the smallest configuration (on Debian's 5.10 the verifier
/// says "BPF_STX uses reserved fields": it predates BPF atomics).
pub(crate) fn kernel_too_old(release: &str, source: std::io::Error) -> Error {
    Error::KernelFeature {
        feature: crate::error::KERNEL_TOO_OLD_FEATURE,
        min_kernel: "6.1",
        source: std::io::Error::new(
            source.kind(),
            format!("Linux {release} refused even the smallest configuration: {source}"),
        ),
    }
}

/// Whether the guard knows this architecture's splice(2) and sendfile(2)
/// syscall numbers (bpf/fastpath.bpf.c); elsewhere it is refused.
pub(crate) const SPLICE_GUARD_ARCH_SUPPORTED: bool =
    cfg!(any(target_arch = "x86_64", target_arch = "aarch64"));

/// The refusal on other architectures, before anything is loaded.
pub(crate) fn splice_guard_arch_unsupported() -> Error {
    splice_guard_unsupported(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "the splice guard knows the splice and sendfile syscall numbers of x86_64 and arm64 only",
    ))
}

/// The error for a kernel that refuses to load or attach the guard.
pub(crate) fn splice_guard_unsupported(source: std::io::Error) -> Error {
    Error::KernelFeature {
        feature: crate::error::SPLICE_GUARD_FEATURE,
        min_kernel: "5.7",
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_versions_are_read_from_distribution_strings() {
        assert_eq!(release_version("6.12.118+deb12-amd64"), Some((6, 12)));
        assert_eq!(release_version("5.10.0-32-amd64"), Some((5, 10)));
        assert_eq!(release_version("6.18.44-fc-v1272"), Some((6, 18)));
        assert_eq!(release_version("6.1"), Some((6, 1)));
        assert_eq!(release_version("6"), None);
        assert_eq!(release_version("v6.1.0"), None);
        assert_eq!(release_version(""), None);
        assert!(release_version("5.15.0-91-generic").unwrap() < OLDEST_SUPPORTED_KERNEL);
        assert!(release_version("6.1.0-57-amd64").unwrap() >= OLDEST_SUPPORTED_KERNEL);
    }

    #[test]
    fn a_kernel_too_old_is_named_with_what_to_do() {
        let err = kernel_too_old(
            "5.10.0-32-amd64",
            std::io::Error::from_raw_os_error(nix::libc::EINVAL),
        );
        assert_eq!(err.kind(), crate::ErrorKind::Unsupported);
        let text = err.with_causes();
        for wanted in [
            "6.1 and newer",
            "upgrade the kernel",
            "Linux 5.10.0-32-amd64",
        ] {
            assert!(text.contains(wanted), "{wanted:?} in {text}");
        }
    }

    #[test]
    fn unknown_attach_types_name_the_feature_and_kernel() {
        let err = classify_attach_error(
            AttachStep::SockmapLink,
            std::io::Error::from_raw_os_error(nix::libc::EINVAL),
        );
        let text = err.to_string();
        assert!(
            text.contains("BPF_PROG_ATTACH") && text.contains("4.17"),
            "{text}"
        );
        let err = classify_attach_error(
            AttachStep::CgroupLink,
            std::io::Error::from_raw_os_error(nix::libc::EBADF),
        );
        assert!(matches!(err, Error::Bpf { .. }), "{err}");
    }

    #[test]
    fn both_mode_refusal_names_the_feature_and_the_alternatives() {
        let text = both_mode_unsupported(std::io::Error::from_raw_os_error(22)).to_string();
        for needle in ["bpf_rdonly_cast", "RedirectMode::Egress", "6.2"] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
    }
}
