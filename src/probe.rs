//! `probe()`: what this kernel can do, found by trying it.
//!
//! Every finding comes from a real attempt: loading the programs, linking
//! them, and sending bytes over a private loopback connection made in a
//! temporary child cgroup, never from version numbers.

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType};

use crate::accelerator::Accelerator;
use crate::cgroup::{cgroup2_mount, Cgroup};
use crate::error::{Error, Result};
use crate::kernel_support::require_capabilities;
use crate::mode::RedirectMode;
use crate::programs::{LoadConfig, Programs};
use crate::splice_guard::{self, SpliceGuard};

/// One finding of [`probe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Present or works; the text says what was seen.
    Yes(String),
    /// Absent or broken; the text says why.
    No(String),
    /// Not tried, because something it depends on is missing.
    NotTested(String),
}

impl Finding {
    /// Whether this is [`Finding::Yes`].
    pub fn is_yes(&self) -> bool {
        matches!(self, Finding::Yes(_))
    }

    fn from_result<T>(result: Result<T>, yes: impl FnOnce(T) -> String) -> Finding {
        match result {
            Ok(value) => Finding::Yes(yes(value)),
            Err(err) => Finding::No(err.with_causes()),
        }
    }
}

/// What [`probe`] found.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProbeReport {
    /// `uname -r`.
    pub kernel_release: String,
    /// CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN) in effect.
    pub privileges: Finding,
    /// Kernel BTF at /sys/kernel/btf/vmlinux.
    pub btf: Finding,
    /// A cgroup v2 mount.
    pub cgroup2: Finding,
    /// The sock_ops and sk_msg programs load (verifier accepts them).
    pub programs_load: Finding,
    /// sock_ops programs see the process that owns a socket, which comm
    /// policies match (Linux 6.10: `bpf_get_current_pid_tgid` in every
    /// program type). Without it, `attach()` with a comm policy fails with
    /// [`Error::KernelFeature`](crate::Error::KernelFeature).
    pub socket_owners: Finding,
    /// sk_msg programs can be linked to a socket map with a BPF link
    /// (Linux 6.10). Where they cannot, `attach()` attaches them to the map
    /// the older way (`BPF_PROG_ATTACH`, detached by the guard), which
    /// behaves the same; this finding then says so.
    pub sockmap_link: Finding,
    /// Bytes sent on a private loopback pair were redirected, intact.
    pub redirect: Finding,
    /// The splice guard (BPF LSM program) loads and attaches.
    pub splice_guard: Finding,
    /// splice(2) reads redirected bytes natively (then no guard is needed).
    pub splice_reads_redirected: Finding,
    /// FIONREAD counts redirected bytes.
    pub fionread_counts_redirected: Finding,
    /// FIONREAD counts plain TCP bytes queued on a socket that is in a
    /// socket map. It does not on kernels with the sockmap FIONREAD change
    /// (6.18.44 here; upstream 929e30f93125, in stable 6.6.128+, 6.12.75+,
    /// 6.18.14+): such a socket reads 0 while bytes wait. The pairing
    /// protocol keeps every socket whose peer is not in the map out of it,
    /// so accelerated programs never see this; the finding says why that
    /// matters on this kernel.
    pub fionread_counts_plain_in_map: Finding,
    /// The both-mode sk_msg program loads (it needs the
    /// `bpf_cast_to_kern_ctx`/`bpf_rdonly_cast` kfuncs and CO-RE reads of
    /// socket-map internals); see [`RedirectMode::Both`].
    pub both_mode: Finding,
    /// A sender stops redirecting into a peer that holds more than
    /// [`receive_queue_limit`](crate::AcceleratorBuilder::receive_queue_limit)
    /// (needs the 6.2 kfuncs and a kernel that charges redirected bytes to
    /// the receiver, 6.12.8). Where it does not, a receiver that stops
    /// reading lets its local peer queue without limit.
    pub receive_queue_bound: Finding,
    /// How long the probe took.
    pub duration: Duration,
}

impl ProbeReport {
    /// Whether connections can be accelerated at all.
    pub fn can_accelerate(&self) -> bool {
        self.redirect.is_yes()
    }

    /// Whether `attach()` with the default [`SpliceGuard::On`] will work.
    pub fn can_guard_splice(&self) -> bool {
        self.splice_guard.is_yes() || self.splice_reads_redirected.is_yes()
    }
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "sockmap-fastpath probe of Linux {} ({:.0?}):",
            self.kernel_release, self.duration
        )?;
        let rows: [(&str, &Finding); 13] = [
            ("privileges", &self.privileges),
            ("kernel BTF", &self.btf),
            ("cgroup v2", &self.cgroup2),
            ("programs load", &self.programs_load),
            ("socket owners (comms)", &self.socket_owners),
            ("sockmap links", &self.sockmap_link),
            ("sk_msg redirect", &self.redirect),
            ("splice guard (BPF LSM)", &self.splice_guard),
            ("splice reads redirected", &self.splice_reads_redirected),
            ("FIONREAD counts them", &self.fionread_counts_redirected),
            ("FIONREAD, plain in map", &self.fionread_counts_plain_in_map),
            ("both mode program", &self.both_mode),
            ("receive queue bound", &self.receive_queue_bound),
        ];
        for (name, finding) in rows {
            let (mark, text) = match finding {
                Finding::Yes(t) => ("yes", t),
                Finding::No(t) => ("NO ", t),
                Finding::NotTested(t) => (" - ", t),
            };
            writeln!(f, "  [{mark}] {name:<24} {text}")?;
        }
        Ok(())
    }
}

const PROBE_BYTES: usize = 64 * 1024;

/// Tests what this kernel can do. Needs the same privileges as `attach()`;
/// without them the report says so. It makes a child cgroup of the calling
/// process's cgroup, where a short-lived forked helper creates the two
/// sockets of one loopback connection (accelerated only for that
/// connection's port); the calling process never changes cgroup. Everything
/// is removed before returning.
pub fn probe() -> ProbeReport {
    // Every failure here is a finding, reported in the report.
    crate::logging::expecting_failures(probe_quietly)
}

fn probe_quietly() -> ProbeReport {
    let start = Instant::now();
    let kernel_release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "(unknown)".into());
    let btf_path = Path::new("/sys/kernel/btf/vmlinux");
    let mut report = ProbeReport {
        kernel_release,
        privileges: Finding::from_result(require_capabilities("probing"), |()| {
            "CAP_BPF, CAP_NET_ADMIN".into()
        }),
        btf: if btf_path.exists() {
            Finding::Yes(btf_path.display().to_string())
        } else {
            Finding::No(format!(
                "{} missing (CO-RE needs CONFIG_DEBUG_INFO_BTF)",
                btf_path.display()
            ))
        },
        cgroup2: Finding::from_result(cgroup2_mount(), |p| p.display().to_string()),
        programs_load: Finding::NotTested(String::new()),
        socket_owners: Finding::NotTested(String::new()),
        sockmap_link: Finding::NotTested(String::new()),
        redirect: Finding::NotTested(String::new()),
        splice_guard: Finding::NotTested(String::new()),
        splice_reads_redirected: Finding::NotTested(String::new()),
        fionread_counts_redirected: Finding::NotTested(String::new()),
        fionread_counts_plain_in_map: Finding::NotTested(String::new()),
        both_mode: Finding::NotTested(String::new()),
        receive_queue_bound: Finding::NotTested(String::new()),
        duration: Duration::ZERO,
    };
    if report.privileges.is_yes() && report.cgroup2.is_yes() {
        report.splice_guard = probe_splice_guard();
        report.both_mode = probe_both_mode();
        report.socket_owners = probe_socket_owners();
        report.fionread_counts_plain_in_map = probe_fionread_plain_in_map().unwrap_or_else(|err| {
            Finding::NotTested(format!("setup failed: {}", err.with_causes()))
        });
        if let Err(err) = probe_traffic(&mut report) {
            let unset = Finding::NotTested(format!("setup failed: {}", err.with_causes()));
            for finding in [
                &mut report.redirect,
                &mut report.splice_reads_redirected,
                &mut report.fionread_counts_redirected,
                &mut report.receive_queue_bound,
            ] {
                if matches!(finding, Finding::NotTested(_)) {
                    *finding = unset.clone();
                }
            }
        }
        // Which owners a kernel records is moot where nothing loads.
        if matches!(report.programs_load, Finding::No(_)) && !report.socket_owners.is_yes() {
            report.socket_owners = Finding::NotTested("programs did not load".into());
        }
    } else {
        let why = Finding::NotTested("needs privileges and cgroup v2".into());
        for finding in [
            &mut report.programs_load,
            &mut report.socket_owners,
            &mut report.sockmap_link,
            &mut report.redirect,
            &mut report.splice_guard,
            &mut report.both_mode,
            &mut report.splice_reads_redirected,
            &mut report.fionread_counts_redirected,
            &mut report.fionread_counts_plain_in_map,
            &mut report.receive_queue_bound,
        ] {
            *finding = why.clone();
        }
    }
    report.duration = start.elapsed();
    report
}

fn probe_splice_guard() -> Finding {
    let programs = Programs::load(LoadConfig::new(RedirectMode::Ingress, 2, true));
    Finding::from_result(
        programs.and_then(|p| splice_guard::attach(&p.skel().progs.fp_splice_guard).map(drop)),
        |()| {
            let io_uring = match splice_guard::splice_read_functions().len() {
                0 => "io_uring splices NOT recognised: /proc/kallsyms shows no addresses".into(),
                n => format!("io_uring splices recognised ({n} splice read functions found)"),
            };
            format!("lsm/file_permission loads and attaches; {io_uring}")
        },
    )
}

fn probe_socket_owners() -> Finding {
    Finding::from_result(Programs::load_once(LoadConfig::minimal(true)), |_| {
        "fp_sock_ops records the owner process at connect() and listen()".into()
    })
}

fn probe_both_mode() -> Finding {
    let programs = Programs::load(LoadConfig::new(RedirectMode::Both, 2, false));
    Finding::from_result(programs, |_| {
        "fp_sk_msg_both and fp_backlog_query load (kfuncs, CO-RE reads of sk_msg and sk_psock)"
            .into()
    })
}

/// Puts the receiving socket of a private loopback pair into a fresh
/// one-entry socket hash (no program: the bytes stay plain TCP) and reads
/// FIONREAD with plain bytes queued. The map and both sockets are gone
/// when this returns.
fn probe_fionread_plain_in_map() -> Result<Finding> {
    const PLAIN_BYTES: usize = 1000;
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("bind", "127.0.0.1:0", e))?;
    let to = listener
        .local_addr()
        .map_err(|e| Error::io("getsockname", "listener", e))?;
    let mut client = TcpStream::connect(to).map_err(|e| Error::io("connect", "127.0.0.1", e))?;
    let (mut server, _) = listener
        .accept()
        .map_err(|e| Error::io("accept", "127.0.0.1", e))?;
    let opts = libbpf_sys::bpf_map_create_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
        ..Default::default()
    };
    let map = MapHandle::create(MapType::Sockhash, Some("fp_probe"), 4, 4, 1, &opts)
        .map_err(|err| Error::bpf("create a probe socket hash", err))?;
    let fd = u32::try_from(server.as_raw_fd()).expect("fds are not negative");
    map.update(&0u32.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
        .map_err(|err| Error::bpf("insert a socket into the probe socket hash", err))?;
    client
        .write_all(&[1; PLAIN_BYTES])
        .map_err(|e| Error::io("write", "probe socket", e))?;
    let queued = wait_for_fionread(&server, PLAIN_BYTES);
    // Read before the map goes: the plain bytes are safe, but be tidy.
    let mut got = [0u8; PLAIN_BYTES];
    server
        .read_exact(&mut got)
        .map_err(|e| Error::io("read", "probe socket", e))?;
    let text = format!("{queued} of {PLAIN_BYTES} plain bytes counted");
    Ok(if queued == PLAIN_BYTES {
        Finding::Yes(text)
    } else {
        Finding::No(text)
    })
}

fn probe_traffic(report: &mut ProbeReport) -> Result<()> {
    let original = Cgroup::current()?;
    let child = original.create_child(&format!("sockmap-fastpath-probe-{}", std::process::id()))?;
    // The listener and the client socket are created in the child cgroup
    // by a helper process (the accepted socket inherits the listener's):
    // this process never changes cgroup.
    let [listener, client] = crate::sys::tcp_sockets_created_in(child.as_path())
        .map_err(|e| Error::io("creating the probe's sockets in", child.as_path(), e))?;
    let Some((guard, mut client, mut server)) = probe_sockets(report, &child, listener, client)?
    else {
        return Ok(());
    };

    let data: Vec<u8> = (0..PROBE_BYTES).map(|i| (i * 7 % 251) as u8).collect();
    client
        .write_all(&data)
        .map_err(|e| Error::io("write", "probe socket", e))?;
    let queued = wait_for_fionread(&server, PROBE_BYTES);
    report.fionread_counts_redirected = if queued == PROBE_BYTES {
        Finding::Yes(format!("{queued} of {PROBE_BYTES} bytes"))
    } else {
        Finding::No(format!("{queued} of {PROBE_BYTES} bytes"))
    };
    report.splice_reads_redirected = probe_splice(&server);
    // The receiver now holds twice the probe's limit: the next message
    // goes plain.
    client
        .write_all(&[PROBE_LAST_BYTE])
        .map_err(|e| Error::io("write", "probe socket", e))?;
    let stats = guard.stats()?;
    report.receive_queue_bound = probe_receive_queue_bound(report, &stats);

    drop(client);
    let mut got = Vec::with_capacity(PROBE_BYTES + 1);
    server
        .read_to_end(&mut got)
        .map_err(|e| Error::io("read", "probe socket", e))?;
    let sent = [&data[..], &[PROBE_LAST_BYTE]].concat();
    let spliced = sent.len().saturating_sub(got.len()); // taken by a working splice
    let intact = sent[spliced..] == got[..];
    let redirected = stats.bytes_redirected;
    // The last byte is redirected too where the bound does not act.
    report.redirect = if redirected >= PROBE_BYTES as u64 && intact {
        Finding::Yes(format!("{redirected} bytes redirected, intact"))
    } else {
        Finding::No(format!(
            "{redirected} of {PROBE_BYTES} bytes redirected; intact: {intact}"
        ))
    };
    drop(guard);
    child.remove()
}

/// The receive queue limit the probe attaches with: half of what it sends.
const PROBE_QUEUE_LIMIT: u32 = PROBE_BYTES as u32 / 2;
const PROBE_LAST_BYTE: u8 = 0xfe;

fn probe_receive_queue_bound(report: &ProbeReport, stats: &crate::Stats) -> Finding {
    if stats.queue_limit_fallbacks == 1 {
        return Finding::Yes(format!(
            "a send went plain while its peer held {PROBE_BYTES} bytes (limit {PROBE_QUEUE_LIMIT})"
        ));
    }
    Finding::No(if report.both_mode.is_yes() {
        format!(
            "a peer holding {PROBE_BYTES} unread bytes did not pass the limit of \
             {PROBE_QUEUE_LIMIT}: this kernel does not charge redirected bytes to the \
             receiver (6.12.8); a receiver that stops reading lets its peer queue without limit"
        )
    } else {
        "needs the bpf_cast_to_kern_ctx kfunc (6.2); a receiver that stops reading lets \
         its peer queue without limit"
            .into()
    })
}

/// Attaches (only for the probe's own port) and opens one connection from
/// the two unbound sockets, both created in `child`.
fn probe_sockets(
    report: &mut ProbeReport,
    child: &Cgroup,
    listener: OwnedFd,
    client: OwnedFd,
) -> Result<Option<(crate::FastpathGuard, TcpStream, TcpStream)>> {
    let listener = socket2::Socket::from(listener);
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    listener
        .bind(&loopback.into())
        .and_then(|()| listener.listen(8))
        .map_err(|e| Error::io("bind and listen", "127.0.0.1:0", e))?;
    let listener = TcpListener::from(listener);
    let port = listener
        .local_addr()
        .map_err(|e| Error::io("getsockname", "listener", e))?
        .port();
    let attached = Accelerator::builder()
        .cgroup(child.clone())
        .ports([port])
        .splice_guard(SpliceGuard::Off)
        // Its own sockets are blocking, one thread each: no EAGAIN risk.
        .blocking_sockets(crate::BlockingSockets::Accelerate)
        .receive_queue_limit(PROBE_QUEUE_LIMIT)
        .capacity(2)
        .attach();
    let guard = match attached {
        Ok(guard) => {
            report.programs_load = Finding::Yes("fp_sock_ops, fp_sk_msg verified".into());
            report.sockmap_link = if guard.uses_sockmap_links() {
                Finding::Yes("BPF_LINK_TYPE_SOCKMAP".into())
            } else {
                Finding::No(
                    "no sockmap links (Linux 6.10); fp_sk_msg attached to the map with \
                     BPF_PROG_ATTACH instead, detached by the guard"
                        .into(),
                )
            };
            guard
        }
        Err(err) if err.is_kernel_too_old() => {
            report.programs_load = Finding::No(err.with_causes());
            report.sockmap_link = Finding::NotTested("programs did not load".into());
            return Ok(None);
        }
        Err(err @ Error::KernelFeature { .. }) => {
            report.programs_load = Finding::Yes("fp_sock_ops, fp_sk_msg verified".into());
            report.sockmap_link = Finding::No(err.with_causes());
            return Ok(None);
        }
        Err(err) => {
            report.programs_load = Finding::No(err.with_causes());
            report.sockmap_link = Finding::NotTested("programs did not load".into());
            return Ok(None);
        }
    };
    let client = socket2::Socket::from(client);
    client
        .connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())
        .map_err(|e| Error::io("connect", "127.0.0.1", e))?;
    let client = TcpStream::from(client);
    let (server, _) = listener
        .accept()
        .map_err(|e| Error::io("accept", "127.0.0.1", e))?;
    Ok(Some((guard, client, server)))
}

fn wait_for_fionread(socket: &TcpStream, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        let queued = crate::sys::bytes_readable(socket.as_fd()).unwrap_or(0);
        if queued >= want || Instant::now() > deadline {
            return queued;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A non-blocking splice of the queued bytes into a pipe.
fn probe_splice(server: &TcpStream) -> Finding {
    let result = (|| -> nix::Result<usize> {
        let (_read_end, write_end) = nix::unistd::pipe()?;
        server
            .set_nonblocking(true)
            .map_err(|_| nix::errno::Errno::EIO)?;
        let spliced = nix::fcntl::splice(
            server.as_fd(),
            None,
            write_end.as_fd(),
            None,
            PROBE_BYTES,
            nix::fcntl::SpliceFFlags::SPLICE_F_NONBLOCK,
        );
        server
            .set_nonblocking(false)
            .map_err(|_| nix::errno::Errno::EIO)?;
        spliced
    })();
    match result {
        Ok(n) if n > 0 => Finding::Yes(format!("spliced {n} bytes")),
        Ok(_) => Finding::No("splice returned 0 (false EOF) with bytes queued".into()),
        Err(errno) => Finding::No(format!(
            "splice failed with {errno} while the bytes were queued"
        )),
    }
}
