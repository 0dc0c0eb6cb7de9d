//! Shared by the integration tests: privilege check, serialisation, RAII
//! guards for cgroups and network namespaces, and traffic helpers.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use sockmap_fastpath::{
    AcceleratorBuilder, Cgroup, ChildCgroup, FastpathGuard, ForwardStats, SpliceGuard, Stats,
};

/// Tests move this process between cgroups and netns: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Everything a privileged test holds; dropping it cleans up, also on panic.
pub struct Env {
    pub cgroup: TestCgroup,
    _serial: MutexGuard<'static, ()>,
}

/// The environment variable that lets privileged tests skip (outside CI).
pub const SKIP_VAR: &str = "FASTPATH_SKIP_PRIVILEGED";

/// Sets up a privileged test. When the machine cannot run it, the test
/// fails, unless the caller asked for skips with `FASTPATH_SKIP_PRIVILEGED=1`
/// outside CI: then it returns `None` (the test returns early) and says so
/// on stderr, past the test harness's capture.
pub fn privileged_env() -> Option<Env> {
    let serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(reason) = missing_privilege() {
        let in_ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
        let skip_asked = std::env::var(SKIP_VAR).is_ok_and(|v| v == "1");
        if in_ci || !skip_asked {
            panic!(
                "privileged test cannot run: {reason}; run as root (scripts/test.sh), or set \
                 {SKIP_VAR}=1 outside CI to skip privileged tests"
            );
        }
        // Written to the process's stderr directly: eprintln! is captured.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("SKIPPED privileged test (not a pass): {reason}\n").as_bytes(),
        );
        return None;
    }
    let cgroup = TestCgroup::enter();
    watch(&cgroup);
    Some(Env {
        cgroup,
        _serial: serial,
    })
}

impl Drop for Env {
    fn drop(&mut self) {
        *RUNNING.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// How long one privileged test may run (`FASTPATH_TEST_DEADLINE_SECS`,
/// default 300) before the watchdog ends the test binary: a regression that
/// hangs (a blocking read, a join, `wait()`) fails instead of eating CI's
/// time.
fn test_deadline() -> Duration {
    let secs = std::env::var("FASTPATH_TEST_DEADLINE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

/// The privileged test running now: its name, start, and cgroups.
struct Running {
    test: String,
    since: Instant,
    cgroup: PathBuf,
    original: Cgroup,
}

static RUNNING: Mutex<Option<Running>> = Mutex::new(None);

fn watch(cgroup: &TestCgroup) {
    static WATCHDOG: std::sync::Once = std::sync::Once::new();
    *RUNNING.lock().unwrap_or_else(|p| p.into_inner()) = Some(Running {
        test: thread::current().name().unwrap_or("?").to_owned(),
        since: Instant::now(),
        cgroup: cgroup.path(),
        original: cgroup.original.clone(),
    });
    WATCHDOG.call_once(|| {
        let deadline = test_deadline();
        thread::spawn(move || loop {
            thread::sleep(Duration::from_millis(500));
            let running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
            let Some(r) = running.as_ref().filter(|r| r.since.elapsed() > deadline) else {
                continue;
            };
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!(
                    "FAILED: test {} still running after {deadline:?} (hung?); ending the test \
                     binary. Its threads:\n{}",
                    r.test,
                    thread_states()
                )
                .as_bytes(),
            );
            // Leave no cgroup behind: the process's sockets and links go
            // with it. (Once, after a hang, the removal failed and left the
            // cgroup: retry briefly, and name it if it stays.)
            let _ = r.original.add_process(std::process::id());
            let mut removed = false;
            for _ in 0..20 {
                removed = std::fs::remove_dir(&r.cgroup).is_ok();
                if removed {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            if !removed {
                let _ = std::io::Write::write_all(
                    &mut std::io::stderr(),
                    format!(
                        "could not remove {}: rmdir it by hand\n",
                        r.cgroup.display()
                    )
                    .as_bytes(),
                );
            }
            std::process::exit(124);
        });
    });
}

/// Each thread of this process: name, state, where it waits in the kernel
/// (`/proc/self/task/*`), to tell a hang in the kernel from one in the test.
fn thread_states() -> String {
    let mut text = String::new();
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let read = |file: &str| std::fs::read_to_string(task.path().join(file)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next()
            .unwrap_or("?");
        text.push_str(&format!(
            "  {} {} {state} wchan={}\n{}",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan"),
            read("stack")
        ));
    }
    text
}

fn missing_privilege() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root (CAP_BPF, CAP_NET_ADMIN, cgroup writes)".into());
    }
    if let Err(err) = sockmap_fastpath::cgroup2_mount() {
        return Some(err.to_string());
    }
    None
}

pub fn unique_name(what: &str) -> String {
    format!(
        "fp-{what}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh child cgroup with this process in it; on drop the process goes
/// back and the cgroup is removed.
pub struct TestCgroup {
    child: Option<ChildCgroup>,
    original: Cgroup,
}

impl TestCgroup {
    pub fn enter() -> Self {
        let original = Cgroup::current().expect("current cgroup");
        let child = original
            .create_child(&unique_name("cg"))
            .expect("create child cgroup");
        assert!(!child.is_root());
        child
            .add_process(std::process::id())
            .expect("enter child cgroup");
        TestCgroup {
            child: Some(child),
            original,
        }
    }

    pub fn cgroup(&self) -> Cgroup {
        self.child.as_ref().unwrap().cgroup().clone()
    }

    /// A second, sibling cgroup (not entered).
    pub fn sibling(&self) -> ChildCgroup {
        self.original
            .create_child(&unique_name("cg"))
            .expect("create sibling cgroup")
    }

    pub fn path(&self) -> PathBuf {
        self.cgroup().as_path().to_owned()
    }

    /// Runs `make` with this process back in its original cgroup, so the
    /// sockets it creates are outside the accelerator's scope.
    pub fn outside<T>(&self, make: impl FnOnce() -> T) -> T {
        self.original
            .add_process(std::process::id())
            .expect("leave the test cgroup");
        let made = make();
        self.cgroup()
            .add_process(std::process::id())
            .expect("re-enter the test cgroup");
        made
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = self.original.add_process(std::process::id());
        if let Some(child) = self.child.take() {
            child.remove().expect("remove test cgroup");
        }
    }
}

impl Env {
    /// A builder for the test cgroup. The splice guard is off: this VM's
    /// kernel refuses LSM programs (see tests/splice.rs), and these tests
    /// do not splice.
    pub fn builder(&self) -> AcceleratorBuilder {
        sockmap_fastpath::Accelerator::builder()
            .cgroup(self.cgroup.cgroup())
            .splice_guard(SpliceGuard::Off)
    }

    pub fn attach(
        &self,
        configure: impl FnOnce(AcceleratorBuilder) -> AcceleratorBuilder,
    ) -> FastpathGuard {
        configure(self.builder()).attach().expect("attach")
    }
}

/// No receive-queue bound: for tests that count every byte as redirected
/// while a reader lags behind by more than the default limit (the bound
/// has its own tests, tests/backpressure.rs).
pub fn unbounded_queue(builder: AcceleratorBuilder) -> AcceleratorBuilder {
    builder.receive_queue_limit(u32::MAX)
}

pub use support::netns::NetNs;

/// Connects like an event loop (non-blocking `connect()`, then blocking
/// mode for the test's simple code), so that the default
/// `BlockingSockets::KeepPlain` accelerates the connection. Connections
/// from sockets blocking at `connect()` are tested in tests/blocking.rs.
pub fn connect(to: impl std::net::ToSocketAddrs) -> TcpStream {
    let to = to
        .to_socket_addrs()
        .expect("address")
        .next()
        .expect("an address");
    support::connect::connect_nonblocking(to).expect("connect")
}

/// [`connect`] for a socket already set up (bound to a source, say).
pub fn connect_socket(socket: socket2::Socket, to: SocketAddr) -> TcpStream {
    support::connect::connect_socket_nonblocking(socket, to).expect("connect")
}

/// A fresh namespace with a unique name.
pub fn new_netns() -> NetNs {
    NetNs::new(unique_name("ns"))
}

/// Joins two namespaces with a veth pair, addresses `here` and `there`;
/// returns the device names.
pub fn veth_between(a: &NetNs, b: &NetNs, here: &str, there: &str) -> (String, String) {
    a.veth_to(b, Some(here), Some(there))
}

/// Deterministic pseudo-random bytes (xorshift64*), different per seed.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A connected (client, accepted server) pair on `listen_addr`.
pub fn connected_pair(listen_addr: &str) -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind(listen_addr).expect("bind");
    connect_to(&listener)
}

pub fn connect_to(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let client = connect(listener.local_addr().unwrap());
    let (server, _) = listener.accept().expect("accept");
    (client, server)
}

pub fn connect_from(listener: &TcpListener, to: SocketAddr) -> (TcpStream, TcpStream) {
    let client = connect(to);
    let (server, _) = listener.accept().expect("accept");
    (client, server)
}

/// Sends `a_to_b` from `a` to `b` and `b_to_a` the other way at the same
/// time, half-closes each direction when done, and asserts both arrive
/// intact.
pub fn exchange(a: TcpStream, b: TcpStream, a_to_b: Vec<u8>, b_to_a: Vec<u8>) {
    let send = |mut s: TcpStream, data: Vec<u8>| {
        thread::spawn(move || {
            s.write_all(&data).expect("write");
            s.shutdown(Shutdown::Write).expect("shutdown");
        })
    };
    let recv = |mut s: TcpStream| thread::spawn(move || read_all(&mut s));
    let writers = [
        send(a.try_clone().unwrap(), a_to_b.clone()),
        send(b.try_clone().unwrap(), b_to_a.clone()),
    ];
    let got_b = recv(b);
    let got_a = recv(a);
    writers.into_iter().for_each(|w| w.join().unwrap());
    assert_bytes_eq(&got_b.join().unwrap(), &a_to_b, "a -> b");
    assert_bytes_eq(&got_a.join().unwrap(), &b_to_a, "b -> a");
}

/// Spurious EAGAIN results of blocking reads seen by [`read_all`].
pub static SPURIOUS_EAGAIN: AtomicU32 = AtomicU32::new(0);

/// Reads to EOF. A blocking read of an accelerated socket can fail with
/// EAGAIN while another thread writes to the same socket (a kernel bug in
/// tcp_bpf_recvmsg, see docs/known-limits.md); this retries and counts it.
pub fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match read_some(s, &mut buf) {
            0 => return got,
            n => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A transfer's progress (bytes, counted by its thread) until it stops
/// moving (`quiet` without a byte) or reaches `total`: how far it got.
pub fn progress_when_stalled(
    progress: &std::sync::atomic::AtomicUsize,
    total: usize,
    quiet: Duration,
) -> usize {
    let mut last = progress.load(Ordering::SeqCst);
    let mut since = Instant::now();
    loop {
        thread::sleep(Duration::from_millis(50));
        let now = progress.load(Ordering::SeqCst);
        if now >= total {
            return now;
        }
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() > quiet {
            return now;
        }
    }
}

/// Runs `body`; while it runs longer than `every`, writes the guard's
/// counters to stderr each `every`, past the harness's capture (a hung
/// test's captured output is lost when the watchdog ends the binary), so a
/// hang leaves what the programs saw.
pub fn reporting_if_slow<T>(
    guard: &FastpathGuard,
    what: &str,
    every: Duration,
    body: impl FnOnce() -> T,
) -> T {
    let done = std::sync::atomic::AtomicBool::new(false);
    thread::scope(|scope| {
        scope.spawn(|| {
            let started = Instant::now();
            let mut next = every;
            while !done.load(Ordering::SeqCst) {
                if started.elapsed() >= next {
                    let report = format!(
                        "{what}: still running after {next:?}; counters: {}\n",
                        guard
                            .stats()
                            .map_or_else(|e| e.to_string(), |s| s.to_string())
                    );
                    let _ = std::io::stderr().write_all(report.as_bytes());
                    next += every;
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        let result = body();
        done.store(true, Ordering::SeqCst);
        result
    })
}

/// One successful blocking read (0 at EOF); EAGAIN is counted in
/// [`SPURIOUS_EAGAIN`] and retried, EINTR retried, anything else panics.
pub fn read_some(s: &mut TcpStream, buf: &mut [u8]) -> usize {
    loop {
        match s.read(buf) {
            Ok(n) => return n,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                SPURIOUS_EAGAIN.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => panic!("read: {err}"),
        }
    }
}

pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first_diff = got
            .iter()
            .zip(want)
            .position(|(g, w)| g != w)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: got {} bytes, want {}; first difference at byte {first_diff}",
            got.len(),
            want.len()
        );
    }
}

/// Snapshot helper: counters since `before`.
pub fn delta(guard: &FastpathGuard, before: &Stats) -> Stats {
    guard.stats().expect("stats").since(before)
}

/// Polls until the socket map is empty (connections close asynchronously).
pub fn wait_map_empty(guard: &FastpathGuard) -> usize {
    for _ in 0..200 {
        if guard.socket_count() == 0 {
            return 0;
        }
        thread::sleep(std::time::Duration::from_millis(10));
    }
    guard.socket_count()
}

/// The IDs of our programs (every `fp_*` program of bpf/fastpath.bpf.c)
/// loaded anywhere in the kernel.
pub fn loaded_programs() -> std::collections::BTreeSet<u32> {
    let out = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "bpftool prog show failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w.starts_with("fp_")))
        .filter_map(|l| l.split(':').next()?.trim().parse().ok())
        .collect()
}

pub fn attached_to(cgroup: &Cgroup) -> String {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup.as_path())
        .output()
        .expect("bpftool");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Nothing attached to `cgroup`, and no program of ours loaded that was
/// not loaded at `baseline`. Teardown after the last fd closes is
/// asynchronous (RCU), so this waits up to 3 s; programs an earlier test
/// left to its sockets may go meanwhile.
pub fn assert_nothing_left(cgroup: &Cgroup, baseline: &std::collections::BTreeSet<u32>) {
    assert_eq!(
        attached_to(cgroup),
        "",
        "nothing attached to {}",
        cgroup.as_path().display()
    );
    let mut new = Vec::new();
    for _ in 0..300 {
        new = loaded_programs().difference(baseline).copied().collect();
        if new.is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("programs still loaded since the baseline: ids {new:?}");
}

/// A client, the upstream server's accepted socket, and the proxy's
/// forwarding running on a thread that keeps the proxy's streams until the
/// pair ends.
pub struct Proxied {
    pub client: TcpStream,
    pub server: TcpStream,
    pub proxy: thread::JoinHandle<ForwardStats>,
}

/// Builds client -> proxy (`front`) -> upstream. The client writes
/// `client_first` before the proxy hands the pair over; `before_hand_over`
/// runs on the proxy's (downstream, upstream) sockets just before
/// `forward()`.
pub fn proxied_via(
    guard: &FastpathGuard,
    front: &TcpListener,
    upstream: &TcpListener,
    client_first: &[u8],
    before_hand_over: impl FnOnce(&mut TcpStream, &mut TcpStream),
) -> Proxied {
    let mut client = connect(front.local_addr().unwrap());
    client.write_all(client_first).unwrap();
    let (mut down, _) = front.accept().unwrap();
    let mut up = connect(upstream.local_addr().unwrap());
    let (server, _) = upstream.accept().unwrap();
    before_hand_over(&mut down, &mut up);
    let forwarding = guard.forward(&down, &up).expect("forward");
    let proxy = thread::spawn(move || {
        let stats = forwarding.wait().expect("wait");
        drop((down, up));
        stats
    });
    Proxied {
        client,
        server,
        proxy,
    }
}

/// The client streams `data[already_sent..]` (it sent the rest before the
/// hand-over), half of it before the guard is dropped (once a quarter has
/// arrived) and half after: every byte arrives in order and the pair then
/// closes cleanly. Returns the counters just before the drop and at the end
/// (the programs keep counting for the sockets that hold them), the bytes
/// the client wrote after the drop, and what the pair moved.
pub fn upload_across_guard_drop(
    p: Proxied,
    guard: FastpathGuard,
    data: &[u8],
    already_sent: usize,
) -> (Stats, Stats, u64, ForwardStats) {
    let Proxied {
        mut client,
        mut server,
        proxy,
    } = p;
    let (dropped, after_drop) = std::sync::mpsc::channel::<()>();
    let rest = data[already_sent..].to_vec();
    let sent_after_drop = (rest.len() - rest.len() / 2) as u64;
    let writer = {
        thread::spawn(move || {
            let (before, after) = rest.split_at(rest.len() / 2);
            client.write_all(before).unwrap();
            after_drop.recv().unwrap();
            client.write_all(after).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            client
        })
    };
    let mut got = vec![0u8; data.len() / 4];
    server.read_exact(&mut got).unwrap();
    let counters = guard.stats_reader().expect("stats reader");
    let at_drop = counters.read().expect("stats");
    drop(guard); // links detached; the pair keeps its programs
    dropped.send(()).unwrap();
    got.extend(read_all(&mut server));
    assert_bytes_eq(&got, data, "bytes across the guard's drop");
    server.shutdown(Shutdown::Write).unwrap();
    let mut client = writer.join().unwrap();
    assert_eq!(read_all(&mut client), b"");
    let forwarded = proxy.join().unwrap();
    assert_eq!(forwarded.end, sockmap_fastpath::ForwardEnd::Closed);
    (
        at_drop,
        counters.read().expect("stats"),
        sent_after_drop,
        forwarded,
    )
}

/// Sends `size` bytes each way between a pair made after `before` was read
/// and asserts that both sockets were inserted and every byte took the
/// shortcut.
pub fn exchange_all_redirected(
    guard: &FastpathGuard,
    before: &Stats,
    client: TcpStream,
    server: TcpStream,
    size: usize,
) {
    exchange(client, server, random_bytes(size, 1), random_bytes(size, 2));
    let d = delta(guard, before);
    assert_eq!(d.sockets_inserted, 2, "{d}");
    assert_eq!(
        d.bytes_redirected,
        2 * size as u64,
        "every byte redirected: {d}"
    );
    assert_eq!(d.bytes_passed, 0, "{d}");
}

/// What `probe()` found on this kernel (probed once per test binary, from
/// inside a privileged test): tests whose expectation depends on the
/// kernel take it from here, never from version numbers.
pub fn kernel() -> &'static sockmap_fastpath::ProbeReport {
    static REPORT: std::sync::OnceLock<sockmap_fastpath::ProbeReport> = std::sync::OnceLock::new();
    REPORT.get_or_init(sockmap_fastpath::probe)
}

/// Whether this kernel's release is at least `major.minor`: only for
/// checking that `probe()` did not call a feature missing where the kernel
/// has what it needs (our own program failing to verify looks like that).
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let version: Vec<u32> = kernel()
        .kernel_release
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .map(|n| n.parse().unwrap())
        .collect();
    version >= vec![major, minor]
}

/// Says on the test binary's stderr (not captured, unlike `eprintln!`)
/// that a test did not run its check on this kernel, and which `probe()`
/// finding kept it from running; the test then returns.
pub fn not_run(why: &str) {
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("not run on this kernel: {why}\n").as_bytes(),
    );
}

/// Whether this kernel lets the programs record a socket's owner process
/// (comm policies need it; Linux 6.10).
pub fn kernel_records_owners() -> bool {
    kernel().socket_owners.is_yes()
}

/// Whether FIONREAD counts redirected bytes here (not on 6.1).
pub fn fionread_counts_redirected() -> bool {
    kernel().fionread_counts_redirected.is_yes()
}

/// An egress-mode guard (no cgroup: proxies hand it their sockets).
pub fn egress_guard() -> FastpathGuard {
    sockmap_fastpath::Accelerator::builder()
        .redirect(sockmap_fastpath::RedirectMode::Egress)
        .attach()
        .expect("attach egress")
}

/// Both mode needs Linux 6.2. Where `probe()` says it cannot load, asserts
/// that `attach()` refuses it with `Error::KernelFeature` naming the
/// minimum kernel and leaving nothing behind, says so on stderr, and
/// returns false: the caller's test of the mode has nothing more to run.
pub fn both_mode_or_refused(env: &Env) -> bool {
    if kernel().both_mode.is_yes() {
        return true;
    }
    // Every kernel from 6.2 in the matrix (6.12, 6.18) takes both mode: a
    // refusal there is our program failing to load, not a missing feature.
    assert!(
        !kernel_at_least(6, 2),
        "both mode refused on {}: {:?}",
        kernel().kernel_release,
        kernel().both_mode
    );
    let baseline = loaded_programs();
    let err = env
        .builder()
        .redirect(sockmap_fastpath::RedirectMode::Both)
        .attach()
        .unwrap_err();
    assert!(
        matches!(
            err,
            sockmap_fastpath::Error::KernelFeature {
                min_kernel: "6.2",
                ..
            }
        ),
        "{err:?}"
    );
    assert_nothing_left(&env.cgroup.cgroup(), &baseline);
    not_run("both mode refused (KernelFeature, 6.2), as probe() said");
    false
}

/// The most payload a stream verdict may see in one segment on loopback.
/// A segment leaves the sender with at most 64 KiB, but a receiver whose
/// socket is busy (owned by its psock backlog sending the other way, say)
/// coalesces what arrives meanwhile, up to `MAX_SKB_FRAGS` (17) page
/// fragments of at most 32 KiB (the sender's page frag) plus the linear
/// head. Seen in CI: 192 forwarded segments carried 13 MB, 68 KiB each.
pub const LARGEST_VERDICT_SEGMENT: usize = 18 * (32 << 10);

/// Every one of `total` bytes went through the kernel: forwarded by the
/// program, or kept by it on the receiving socket while the other socket's
/// backlog was full and copied on by `wait()` (counted on both sides).
pub fn assert_every_byte_forwarded_or_kept(counters: &Stats, pair: &ForwardStats, total: usize) {
    assert_eq!(
        counters.fwd_bytes + pair.copied,
        total as u64,
        "{} copied by wait(): {counters}",
        pair.copied
    );
    assert!(counters.fwd_bytes > 0, "{counters}");
    if pair.copied > 0 {
        assert!(
            counters.fwd_backlog_kept + counters.fwd_queued_behind > 0,
            "{counters}"
        );
    }
}
