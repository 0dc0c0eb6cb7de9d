//! Loopback workloads shared by the demo and the benchmarks: each runs for
//! a fixed time on one connection and reports a rate.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// What a workload measured.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    /// Operations (round trips or bytes) per second.
    pub per_second: f64,
    /// Bytes moved in either direction.
    pub bytes: u64,
}

/// Pins the calling thread to one CPU (both ends on one CPU avoids the
/// cross-CPU wake-up latency that dominates on small VMs).
pub fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

fn connect(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let client = TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    (client, server)
}

/// Ping-pong of `size`-byte messages; returns round trips per second.
pub fn request_response(
    listener: &TcpListener,
    size: usize,
    duration: Duration,
    cpu: Option<usize>,
) -> Rate {
    let (mut client, mut server) = connect(listener);
    let echo = thread::spawn(move || {
        if let Some(cpu) = cpu {
            pin_to_cpu(cpu);
        }
        let mut buf = vec![0u8; size];
        while server.read_exact(&mut buf).is_ok() {
            if server.write_all(&buf).is_err() {
                break;
            }
        }
    });
    if let Some(cpu) = cpu {
        pin_to_cpu(cpu);
    }
    let mut buf = vec![7u8; size];
    let start = Instant::now();
    let mut trips = 0u64;
    while start.elapsed() < duration {
        for _ in 0..64 {
            client.write_all(&buf).unwrap();
            client.read_exact(&mut buf).unwrap();
        }
        trips += 64;
    }
    let secs = start.elapsed().as_secs_f64();
    client.shutdown(Shutdown::Both).ok();
    echo.join().unwrap();
    Rate {
        per_second: trips as f64 / secs,
        bytes: 2 * trips * size as u64,
    }
}

/// One-way stream of `write_size`-byte writes; returns bits per second.
pub fn bulk(
    listener: &TcpListener,
    write_size: usize,
    duration: Duration,
    cpu: Option<usize>,
) -> Rate {
    let (mut client, mut server) = connect(listener);
    let sink = thread::spawn(move || {
        if let Some(cpu) = cpu {
            pin_to_cpu(cpu);
        }
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            match server.read(&mut buf) {
                Ok(0) => return total,
                Ok(n) => total += n as u64,
                // Spurious EAGAIN from tcp_bpf_recvmsg (see README).
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    });
    if let Some(cpu) = cpu {
        pin_to_cpu(cpu);
    }
    let buf = vec![7u8; write_size];
    let start = Instant::now();
    while start.elapsed() < duration {
        for _ in 0..16 {
            client.write_all(&buf).unwrap();
        }
    }
    client.shutdown(Shutdown::Write).unwrap();
    let total = sink.join().unwrap();
    let secs = start.elapsed().as_secs_f64();
    Rate {
        per_second: total as f64 * 8.0 / secs,
        bytes: total,
    }
}
