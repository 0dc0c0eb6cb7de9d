//! The splice(2) baseline: one epoll thread relaying every pair through
//! pipes, never copying through user memory (what a tuned C proxy does;
//! its sockets are in no socket map, so splice works on them).
//!
//! A pipe is held only while it has bytes the destination could not take
//! yet, and returned to a pool when empty, so idle pairs cost two sockets
//! and no pipe (HAProxy does the same). When the pool may not grow, a
//! direction waits for a pipe. The pool is closed when the last pair ends.

use std::collections::VecDeque;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{splice, OFlag, SpliceFFlags};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use support::connect::connect_nonblocking;

/// What a direction moves per splice (a pipe's default capacity).
const CHUNK: usize = 64 << 10;
const LISTENER: u64 = u64::MAX;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

/// Bytes from `sockets[from]` to `sockets[1 - from]`.
#[derive(Default)]
struct Direction {
    pipe: Option<Pipe>,
    in_pipe: usize,
    /// Waiting in the pool's queue for a pipe.
    starved: bool,
    /// EOF read and passed on, or the pair failed.
    done: bool,
}

struct Pair {
    sockets: [TcpStream; 2],
    directions: [Direction; 2],
    /// Registered epoll interest per socket (None: not registered yet).
    interest: [Option<EpollFlags>; 2],
}

enum Step {
    Continue,
    Close,
}

pub struct SpliceRelay {
    epoll: Epoll,
    listener: TcpListener,
    upstream: std::net::SocketAddr,
    pairs: Vec<Option<Pair>>,
    free_slots: Vec<usize>,
    pool: Vec<Pipe>,
    pipes_made: usize,
    max_pipes: usize,
    starved: VecDeque<(usize, usize)>,
}

impl SpliceRelay {
    /// Relays each connection accepted on `listener` to `upstream`, using
    /// at most `max_pipes` pipes at once.
    pub fn new(
        listener: TcpListener,
        upstream: std::net::SocketAddr,
        max_pipes: usize,
    ) -> nix::Result<Self> {
        listener.set_nonblocking(true).map_err(io_errno)?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))?;
        Ok(SpliceRelay {
            epoll,
            listener,
            upstream,
            pairs: Vec::new(),
            free_slots: Vec::new(),
            pool: Vec::new(),
            pipes_made: 0,
            max_pipes: max_pipes.max(1),
            starved: VecDeque::new(),
        })
    }

    /// Serves until the process exits.
    pub fn run(mut self) -> ! {
        let mut events = vec![EpollEvent::empty(); 1024];
        loop {
            let n = match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(err) => panic!("epoll_wait: {err}"),
            };
            for event in &events[..n] {
                match event.data() {
                    LISTENER => self.accept_all(),
                    token => self.on_ready(token as usize / 2, token as usize % 2, event.events()),
                }
            }
        }
    }

    fn accept_all(&mut self) {
        while let Ok((down, _)) = self.listener.accept() {
            let Ok(up) = connect_nonblocking(self.upstream) else {
                continue;
            };
            let ready = [&down, &up]
                .iter()
                .all(|s| s.set_nodelay(true).is_ok() && s.set_nonblocking(true).is_ok());
            if !ready {
                continue;
            }
            let slot = self.free_slots.pop().unwrap_or_else(|| {
                self.pairs.push(None);
                self.pairs.len() - 1
            });
            let pair = Pair {
                sockets: [down, up],
                directions: Default::default(),
                interest: [None; 2],
            };
            self.pairs[slot] = Some(pair);
            self.update_interest(slot);
        }
    }

    /// Socket `side` of pair `slot` is readable (bytes from it move on)
    /// or writable (bytes waiting for it move on).
    fn on_ready(&mut self, slot: usize, side: usize, events: EpollFlags) {
        let failed = EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR;
        let mut directions = Vec::with_capacity(2);
        if events.intersects(EpollFlags::EPOLLIN | failed) {
            directions.push(side);
        }
        if events.intersects(EpollFlags::EPOLLOUT | failed) {
            directions.push(1 - side);
        }
        let close = directions
            .into_iter()
            .any(|from| matches!(self.pump(slot, from), Step::Close));
        let finished = self.pairs[slot]
            .as_ref()
            .is_some_and(|p| p.directions.iter().all(|d| d.done));
        if close || finished {
            self.close(slot);
        } else {
            self.update_interest(slot);
        }
    }

    fn pump(&mut self, slot: usize, from: usize) -> Step {
        let Some(pair) = self.pairs[slot].as_mut() else {
            return Step::Continue;
        };
        let dir = &mut pair.directions[from];
        if dir.done || dir.starved {
            return Step::Continue;
        }
        let (src, dst) = (&pair.sockets[from], &pair.sockets[1 - from]);
        if dir.in_pipe > 0 && !drain(dir, dst) {
            return Step::Close;
        }
        if dir.in_pipe > 0 {
            return Step::Continue;
        }
        if dir.pipe.is_none() {
            match self.pool.pop() {
                Some(pipe) => dir.pipe = Some(pipe),
                None if self.pipes_made < self.max_pipes => {
                    match nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) {
                        Ok((read, write)) => {
                            self.pipes_made += 1;
                            dir.pipe = Some(Pipe { read, write });
                        }
                        Err(_) => return Step::Close,
                    }
                }
                None => {
                    dir.starved = true;
                    self.starved.push_back((slot, from));
                    return Step::Continue;
                }
            }
        }
        let pipe = dir.pipe.as_ref().unwrap();
        let step = match splice(src, None, &pipe.write, None, CHUNK, flags()) {
            Ok(0) => {
                let _ = dst.shutdown(Shutdown::Write);
                dir.done = true;
                Step::Continue
            }
            Ok(n) => {
                dir.in_pipe = n;
                if drain(dir, dst) {
                    Step::Continue
                } else {
                    Step::Close
                }
            }
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => Step::Continue,
            Err(_) => Step::Close,
        };
        if dir.in_pipe == 0 {
            if let Some(pipe) = dir.pipe.take() {
                self.release(pipe);
            }
        }
        step
    }

    /// An empty pipe goes back to the pool, and a starved direction gets
    /// its turn.
    fn release(&mut self, pipe: Pipe) {
        self.pool.push(pipe);
        while let Some((slot, from)) = self.starved.pop_front() {
            if let Some(pair) = self.pairs[slot].as_mut() {
                pair.directions[from].starved = false;
                self.update_interest(slot);
                break;
            }
        }
    }

    fn update_interest(&mut self, slot: usize) {
        let Some(pair) = self.pairs[slot].as_mut() else {
            return;
        };
        for side in 0..2 {
            let reading = &pair.directions[side];
            let writing = &pair.directions[1 - side];
            let mut wanted = EpollFlags::empty();
            if !reading.done && !reading.starved && reading.in_pipe == 0 {
                wanted |= EpollFlags::EPOLLIN;
            }
            if writing.in_pipe > 0 {
                wanted |= EpollFlags::EPOLLOUT;
            }
            if pair.interest[side] == Some(wanted) {
                continue;
            }
            let mut event = EpollEvent::new(wanted, (slot * 2 + side) as u64);
            let socket = pair.sockets[side].as_fd();
            let result = match pair.interest[side] {
                None => self.epoll.add(socket, event),
                Some(_) => self.epoll.modify(socket, &mut event),
            };
            result.expect("epoll_ctl");
            pair.interest[side] = Some(wanted);
        }
    }

    fn close(&mut self, slot: usize) {
        let Some(pair) = self.pairs[slot].take() else {
            return;
        };
        self.starved.retain(|&(s, _)| s != slot);
        self.free_slots.push(slot);
        for dir in pair.directions {
            match (dir.pipe, dir.in_pipe) {
                (Some(pipe), 0) => self.release(pipe),
                // Bytes of a failed pair: the pipe goes with them.
                (Some(_), _) => self.pipes_made -= 1,
                (None, _) => {}
            }
        }
        // Dropping the sockets closes them and takes them out of epoll.
        // With no pair left, the free pipes are closed too (as the crate's
        // relay does), so the proxy is back to its idle files.
        if self.free_slots.len() == self.pairs.len() {
            self.pipes_made -= self.pool.len();
            self.pool.clear();
        }
    }
}

/// Moves what the pipe holds into `dst`; false on a socket error.
fn drain(dir: &mut Direction, dst: &TcpStream) -> bool {
    let pipe = dir.pipe.as_ref().expect("bytes in a pipe");
    while dir.in_pipe > 0 {
        match splice(&pipe.read, None, dst, None, dir.in_pipe, flags()) {
            Ok(n) => dir.in_pipe -= n,
            Err(Errno::EAGAIN) => return true,
            Err(Errno::EINTR) => {}
            Err(_) => {
                dir.done = true;
                return false;
            }
        }
    }
    true
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE
}

fn io_errno(err: std::io::Error) -> Errno {
    Errno::from_raw(err.raw_os_error().unwrap_or(0))
}
