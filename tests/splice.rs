//! splice(2) and accelerated sockets.

mod common;
use common::*;

use std::io::Write;
use std::os::fd::AsFd;

use nix::errno::Errno;
use nix::fcntl::{splice, OFlag, SpliceFFlags};
use sockmap_fastpath::{Accelerator, BlockingSockets, Error, FastpathGuard, SpliceGuard};

/// The default (guard on) either refuses splice reads with EINVAL, losing
/// nothing, or, where the kernel refuses LSM programs, fails attach with an
/// error that names the feature and the opt-out, leaving nothing loaded.
#[test]
fn default_splice_guard_blocks_splice_or_fails_attach_clearly() {
    let Some(env) = privileged_env() else { return };
    let baseline = loaded_programs();
    match Accelerator::builder().cgroup(env.cgroup.cgroup()).attach() {
        Err(err) => {
            assert!(matches!(err, Error::KernelFeature { .. }), "{err:?}");
            assert!(err.is_splice_guard_refused(), "{err:?}");
            assert_eq!(err.kind(), sockmap_fastpath::ErrorKind::Unsupported);
            let text = err.to_string();
            assert!(
                text.contains("splice guard") && text.contains("SpliceGuard::Off"),
                "{text}"
            );
            assert_eq!(env.cgroup.cgroup().processes().unwrap().len(), 1);
            let out = std::process::Command::new("bpftool")
                .args(["cgroup", "show"])
                .arg(env.cgroup.path())
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).lines().skip(1).count(),
                0,
                "nothing attached"
            );
            eprintln!("kernel refuses the splice guard here: {text}");
        }
        Ok(guard) => {
            // Accelerated before the process gets caught below.
            let mut lingering = connected_pair("127.0.0.1:0");
            sendfile_into_the_socket_is_untouched(&mut lingering);
            let (mut client, server) = connected_pair("127.0.0.1:0");
            let data = random_bytes(1 << 20, 3);
            client.write_all(&data).unwrap();
            let err = nonblocking_splice_error(&server);
            assert_eq!(
                err,
                Errno::EINVAL,
                "splice from an accelerated socket is refused"
            );
            drop(client);
            let mut server = server;
            assert_bytes_eq(
                &read_all(&mut server),
                &data,
                "fallback read gets every byte",
            );
            let stats = guard.stats().unwrap();
            assert_eq!(stats.splice_blocked, 1, "{stats}");
            assert_eq!(guard.splice_excluded_processes(), vec![std::process::id()]);
            splice_from_a_file_is_untouched();
            // The caught process's later connections stay plain, where the
            // programs know a socket's owner (probe(): not on 6.1).
            let before = guard.stats().unwrap();
            let (c, s) = connected_pair("127.0.0.1:0");
            exchange(c, s, random_bytes(1 << 16, 5), random_bytes(1 << 16, 6));
            let d = guard.stats().unwrap().since(&before);
            if kernel_records_owners() {
                assert_eq!((d.sockets_inserted, d.splice_excluded), (0, 2), "{d}");
                assert_eq!(d.bytes_redirected, 0, "{d}");
            } else {
                assert_eq!((d.sockets_inserted, d.splice_excluded), (2, 0), "{d}");
            }
            drop(server);
            guard_lingers_until_the_last_accelerated_socket_closes(guard, lingering);
            assert_nothing_left(&env.cgroup.cgroup(), &baseline);
        }
    }
}

/// Without the guard the kernel's behaviour shows: a non-blocking splice
/// finds nothing (EAGAIN) while FIONREAD counts the redirected bytes, and
/// recv() still returns them all. docs/known-limits.md names this.
#[test]
fn without_guard_splice_misses_redirected_bytes() {
    let Some(env) = privileged_env() else { return };
    let (_guard, client, mut server, data) = redirected_without_guard(&env, 256 << 10, 4);
    let err = nonblocking_splice_error(&server);
    assert_eq!(
        err,
        Errno::EAGAIN,
        "kernel splice does not see redirected bytes"
    );
    drop(client);
    assert_bytes_eq(&read_all(&mut server), &data, "recv still gets every byte");
}

/// Without the guard, the blocking case: once the peer has closed, a
/// blocking splice returns 0 (a false end of stream) although every byte
/// is still queued, and recv() then returns them all. This is what a Go
/// `io.Copy` proxy would see (docs/guarantees.md, "The splice guard").
#[test]
fn without_guard_a_blocking_splice_sees_a_false_eof() {
    let Some(env) = privileged_env() else { return };
    let (_guard, client, mut server, data) = redirected_without_guard(&env, 64 << 10, 8);
    drop(client);
    let (_r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    let spliced = splice(
        server.as_fd(),
        None,
        w.as_fd(),
        None,
        65536,
        SpliceFFlags::empty(),
    );
    assert_eq!(
        spliced,
        Ok(0),
        "blocking splice: false EOF with 64 KiB queued"
    );
    assert_bytes_eq(&read_all(&mut server), &data, "recv still gets every byte");
}

/// Attaches without the guard and sends `size` bytes over a new pair,
/// every one redirected and unread: (guard, client, server, bytes).
fn redirected_without_guard(
    env: &Env,
    size: usize,
    seed: u64,
) -> (
    sockmap_fastpath::FastpathGuard,
    std::net::TcpStream,
    std::net::TcpStream,
    Vec<u8>,
) {
    let guard = env.attach(|b| b.splice_guard(SpliceGuard::Off));
    let (mut client, server) = connected_pair("127.0.0.1:0");
    let data = random_bytes(size, seed);
    client.write_all(&data).unwrap();
    assert_eq!(guard.stats().unwrap().bytes_redirected, size as u64);
    (guard, client, server, data)
}

/// After detach, a socket that was accelerated may still hold redirected
/// bytes: the guard stays until it closes (then `assert_nothing_left`
/// sees its program gone).
fn guard_lingers_until_the_last_accelerated_socket_closes(
    guard: sockmap_fastpath::FastpathGuard,
    (mut client, mut server): (std::net::TcpStream, std::net::TcpStream),
) {
    drop(guard);
    client.write_all(b"still guarded").unwrap();
    assert_eq!(nonblocking_splice_error(&server), Errno::EINVAL);
    let mut got = [0u8; 13];
    std::io::Read::read_exact(&mut server, &mut got).unwrap();
    assert_eq!(&got, b"still guarded");
}

/// sendfile(2) from a file into an accelerated socket reads the file, not
/// the socket: the guard lets it through and the peer gets the bytes.
fn sendfile_into_the_socket_is_untouched(
    (client, server): &mut (std::net::TcpStream, std::net::TcpStream),
) {
    let path = std::env::temp_dir().join(unique_name("sendfile"));
    std::fs::write(&path, random_bytes(8192, 9)).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let sent = nix::sys::sendfile::sendfile(client.as_fd(), file.as_fd(), None, 8192);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(sent, Ok(8192));
    let mut got = vec![0u8; 8192];
    std::io::Read::read_exact(server, &mut got).unwrap();
    assert_eq!(got, random_bytes(8192, 9));
}

/// The guard looks at sockets only: splicing a regular file into a pipe
/// works while it is attached.
fn splice_from_a_file_is_untouched() {
    let path = std::env::temp_dir().join(unique_name("splice-file"));
    std::fs::write(&path, random_bytes(4096, 7)).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    let moved = splice(
        file.as_fd(),
        None,
        w.as_fd(),
        None,
        4096,
        SpliceFFlags::empty(),
    );
    std::fs::remove_file(&path).unwrap();
    assert_eq!(moved, Ok(4096));
    let mut got = vec![0u8; 4096];
    assert_eq!(nix::unistd::read(&r, &mut got), Ok(4096));
    assert_eq!(got, random_bytes(4096, 7));
}

/// One non-blocking splice of the socket's queued bytes into a pipe; the
/// error it fails with. The socket is blocking again afterwards.
fn nonblocking_splice_error(server: &std::net::TcpStream) -> Errno {
    let (_r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    server.set_nonblocking(true).unwrap();
    let result = splice(
        server.as_fd(),
        None,
        w.as_fd(),
        None,
        65536,
        SpliceFFlags::SPLICE_F_NONBLOCK,
    );
    server.set_nonblocking(false).unwrap();
    result.expect_err("splice read nothing while bytes were queued")
}

/// io_uring runs an `IORING_OP_SPLICE` in a worker thread, with no splice
/// syscall number to see; the guard finds the splice on the kernel stack.
/// Not caught, this splice reads nothing (EAGAIN) while 64 KiB are queued.
/// An io_uring read of the same socket passes the same hook and is let
/// through.
#[test]
fn an_io_uring_splice_cannot_pass_the_guard() {
    use io_uring::{opcode, types::Fd};
    use std::os::fd::AsRawFd;
    let Some(env) = privileged_env() else { return };
    let Some(guard) = attach_guarded(Accelerator::builder().cgroup(env.cgroup.cgroup())) else {
        return;
    };
    let (mut client, mut server) = connected_pair("127.0.0.1:0");
    let data = random_bytes(1 << 16, 10);
    client.write_all(&data).unwrap();
    let (_r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    // The socket's own mode decides whether a splice from it waits.
    server.set_nonblocking(true).unwrap();
    let splice = opcode::Splice::new(Fd(server.as_raw_fd()), -1, Fd(w.as_raw_fd()), -1, 65536)
        .flags(SpliceFFlags::SPLICE_F_NONBLOCK.bits());
    assert_eq!(
        io_uring_once(splice.build()),
        -(Errno::EINVAL as i32),
        "the io_uring splice was refused with EINVAL (-11 would be EAGAIN: not caught)"
    );
    server.set_nonblocking(false).unwrap();
    let mut head = [0u8; 6];
    let read = opcode::Read::new(Fd(server.as_raw_fd()), head.as_mut_ptr(), 6);
    assert_eq!(
        io_uring_once(read.build()),
        6,
        "an io_uring read is let through"
    );
    assert_eq!(head[..], data[..6]);
    drop(client);
    assert_bytes_eq(
        &read_all(&mut server),
        &data[6..],
        "every other byte read afterwards",
    );
    // A socket outside the accelerator's cgroup is plain: its io_uring
    // splice is let through and moves its bytes.
    let (mut client, server) = env.cgroup.outside(|| connected_pair("127.0.0.1:0"));
    client.write_all(b"plain bytes").unwrap();
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    let splice = opcode::Splice::new(Fd(server.as_raw_fd()), -1, Fd(w.as_raw_fd()), -1, 11);
    assert_eq!(io_uring_once(splice.build()), 11, "a plain socket's splice");
    let mut got = [0u8; 11];
    assert_eq!(nix::unistd::read(&r, &mut got), Ok(11));
    assert_eq!(&got, b"plain bytes");
    let stats = guard.stats().unwrap();
    assert_eq!(stats.splice_blocked, 1, "{stats}");
}

/// Submits one io_uring request and waits for it: its result (bytes, or a
/// negative errno).
fn io_uring_once(request: io_uring::squeue::Entry) -> i32 {
    let mut ring = io_uring::IoUring::new(2).expect("io_uring_setup");
    // SAFETY: the fds and the buffer the request names belong to the caller
    // and outlive this call, which waits for the request's completion.
    unsafe { ring.submission().push(&request).expect("an empty queue") };
    ring.submit_and_wait(1).expect("io_uring_enter");
    let completion = ring.completion().next().expect("one completion");
    completion.result()
}

/// Builds `tests/helpers/splice32.s`, a 32-bit x86 program that makes one
/// splice(2) from fd 3 through `int $0x80` (syscall 313, not 275).
#[cfg(target_arch = "x86_64")]
fn splice32_helper() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique_name("splice32"));
    std::fs::create_dir_all(&dir).unwrap();
    let (obj, exe) = (dir.join("splice32.o"), dir.join("splice32"));
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/helpers/splice32.s");
    for (tool, args) in [
        ("as", vec!["--32", "-o", obj.to_str().unwrap(), source]),
        (
            "ld",
            vec![
                "-m",
                "elf_i386",
                "-o",
                exe.to_str().unwrap(),
                obj.to_str().unwrap(),
            ],
        ),
    ] {
        let status = std::process::Command::new(tool).args(&args).status();
        assert!(
            status.as_ref().is_ok_and(|s| s.success()),
            "{tool} {args:?}: {status:?} (binutils builds the 32-bit helper)"
        );
    }
    exe
}

/// Attaches with the splice guard on; `None` (the test does not run) where
/// the kernel refuses the guard itself (this host: lockdown), a refusal
/// `default_splice_guard_blocks_splice_or_fails_attach_clearly` checks.
fn attach_guarded(builder: sockmap_fastpath::AcceleratorBuilder) -> Option<FastpathGuard> {
    match builder.attach() {
        Ok(guard) => Some(guard),
        Err(err) => {
            assert!(err.is_splice_guard_refused(), "{err:?}");
            not_run("the kernel refuses the splice guard (probe(): splice guard)");
            None
        }
    }
}

/// Runs the 32-bit helper on `socket` (its fd 3, non-blocking meanwhile):
/// its pid and how it exited (the errno of a failed splice, 0 if it read).
#[cfg(target_arch = "x86_64")]
fn splice32_from(
    helper: &std::path::Path,
    socket: &std::net::TcpStream,
) -> (u32, std::process::ExitStatus) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    socket.set_nonblocking(true).unwrap();
    let fd = socket.as_raw_fd();
    let mut command = std::process::Command::new(helper);
    // SAFETY: between fork and exec only dup2 runs, which is
    // async-signal-safe; it gives the child the socket as fd 3.
    unsafe {
        command.pre_exec(move || {
            if nix::libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let status = child.wait().unwrap();
    socket.set_nonblocking(false).unwrap();
    (child.id(), status)
}

/// 32-bit programs number splice(2) differently (313 on x86 instead of
/// 275); the guard recognises them too. Without that, this splice reads
/// nothing (EAGAIN) while bytes are queued, as without the guard.
#[cfg(target_arch = "x86_64")]
#[test]
fn a_32_bit_program_cannot_splice_past_the_guard() {
    use std::os::unix::process::ExitStatusExt;
    let Some(env) = privileged_env() else { return };
    let Some(guard) = attach_guarded(Accelerator::builder().cgroup(env.cgroup.cgroup())) else {
        return;
    };
    let helper = splice32_helper();
    let (mut client, mut server) = connected_pair("127.0.0.1:0");
    let data = random_bytes(1 << 16, 8);
    client.write_all(&data).unwrap();
    let (_, status) = splice32_from(&helper, &server);
    drop(client);
    assert_eq!(
        status.code(),
        Some(Errno::EINVAL as i32),
        "the 32-bit splice was refused with EINVAL (11 would be EAGAIN: not caught); {status:?} {:?}",
        status.signal()
    );
    assert_bytes_eq(&read_all(&mut server), &data, "every byte read afterwards");
    let stats = guard.stats().unwrap();
    assert_eq!(stats.splice_blocked, 1, "{stats}");
    let _ = std::fs::remove_dir_all(helper.parent().unwrap());
}

/// A caught process's pid, once it exits, may go to an unrelated process:
/// that one's connections are accelerated, not excluded (the guard keeps
/// the caught process's start time with its pid). The helper is caught,
/// exits, and a shell gets its pid through `ns_last_pid`.
#[cfg(target_arch = "x86_64")]
#[test]
fn a_reused_pid_is_not_excluded() {
    let Some(env) = privileged_env() else { return };
    if !kernel_records_owners() {
        not_run("the programs cannot record a socket's owner (probe(): socket owners)");
        return;
    }
    let Some(guard) = attach_guarded(
        Accelerator::builder()
            .cgroup(env.cgroup.cgroup())
            // The shell below connects with a blocking socket.
            .blocking_sockets(BlockingSockets::Accelerate),
    ) else {
        return;
    };
    let helper = splice32_helper();
    let (mut client, server) = connected_pair("127.0.0.1:0");
    client.write_all(b"queued").unwrap();
    let (caught, status) = splice32_from(&helper, &server);
    assert_eq!(status.code(), Some(Errno::EINVAL as i32), "{status:?}");
    assert_eq!(guard.stats().unwrap().splice_blocked, 1);
    assert!(
        !guard.splice_excluded_processes().contains(&caught),
        "an exited process is not listed"
    );

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let before = guard.stats().unwrap();
    let message = "sent by the process that reuses the pid";
    let script = format!("exec 3<>/dev/tcp/127.0.0.1/{port} && printf '%s' '{message}' >&3");
    let mut shell = spawn_with_pid(caught, || {
        let mut command = std::process::Command::new("bash");
        command.args(["-c", &script]);
        command
    });
    let (mut accepted, _) = listener.accept().unwrap();
    let got = read_all(&mut accepted);
    assert!(shell.wait().unwrap().success());
    assert_bytes_eq(&got, message.as_bytes(), "the shell's bytes");
    let d = guard.stats().unwrap().since(&before);
    assert_eq!((d.splice_excluded, d.sockets_inserted), (0, 2), "{d}");
    assert_eq!(d.bytes_redirected, message.len() as u64, "{d}");
    drop((client, server));
    let _ = std::fs::remove_dir_all(helper.parent().unwrap());
}

/// The process that splices an accepted socket is often not the one that
/// listened (pre-fork workers, socket activation, a listener made before
/// attach): the guard keeps the service's later connections plain, whoever
/// accepts them. Here the test process listens and a helper process
/// splices; a connection to another service stays accelerated.
#[cfg(target_arch = "x86_64")]
#[test]
fn a_service_whose_accepted_socket_was_spliced_stays_plain() {
    let Some(env) = privileged_env() else { return };
    let Some(guard) = attach_guarded(Accelerator::builder().cgroup(env.cgroup.cgroup())) else {
        return;
    };
    let helper = splice32_helper();
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut client, accepted) = connect_to(&service);
    client.write_all(b"queued").unwrap();
    let (splicer, status) = splice32_from(&helper, &accepted);
    assert_eq!(status.code(), Some(Errno::EINVAL as i32), "{status:?}");
    assert_ne!(splicer, std::process::id());
    assert_eq!(
        guard.splice_excluded_services(),
        vec![service.local_addr().unwrap()]
    );

    let before = guard.stats().unwrap();
    let (c, s) = connect_to(&service);
    exchange(c, s, random_bytes(1 << 16, 11), random_bytes(1 << 16, 12));
    let d = guard.stats().unwrap().since(&before);
    assert_eq!(d.bytes_redirected, 0, "the same service stays plain: {d}");
    // The accepting side is kept out; the connecting side, inserted first to
    // wait for it, leaves the map.
    assert_eq!((d.splice_excluded, d.unpaired_removed), (1, 1), "{d}");

    let before = guard.stats().unwrap();
    let (c, s) = connected_pair("127.0.0.1:0");
    exchange(c, s, random_bytes(1 << 16, 13), random_bytes(1 << 16, 14));
    let d = guard.stats().unwrap().since(&before);
    assert_eq!(
        (d.sockets_inserted, d.bytes_redirected),
        (2, 2 << 16),
        "another service is accelerated: {d}"
    );
    drop((client, accepted));
    let _ = std::fs::remove_dir_all(helper.parent().unwrap());
}

/// Spawns `make()`'s command as process `pid` (free: its process exited),
/// by setting the pid the kernel gave out last (`ns_last_pid`, root). Other
/// processes may take it first: a few tries, then the test fails.
#[cfg(target_arch = "x86_64")]
fn spawn_with_pid(pid: u32, make: impl Fn() -> std::process::Command) -> std::process::Child {
    const LAST_PID: &str = "/proc/sys/kernel/ns_last_pid";
    for _ in 0..20 {
        std::fs::write(LAST_PID, (pid - 1).to_string()).expect(LAST_PID);
        let mut child = make().spawn().unwrap();
        if child.id() == pid {
            return child;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("no process got pid {pid} after 20 tries through {LAST_PID}");
}
