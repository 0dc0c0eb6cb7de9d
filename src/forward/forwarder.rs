//! One thread (or as many as `with_threads` asks) for any number of
//! forwarded pairs: on each, an epoll loop over its pairs' sockets that
//! runs the same steps as `Forwarding::wait`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::TcpStream;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::PollFlags;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::pump::Scratch;
use super::relay::KernelSlots;
use super::{
    relay, ForwardEnd, ForwardMaps, ForwardPath, ForwardStats, Forwarding, NotEstablished, DOWN, UP,
};
use crate::error::{Error, Result};

/// Serves any number of forwarded pairs from one thread (named
/// `fastpath-fwd`), or from as many as [`with_threads`](Self::with_threads)
/// asks, for proxies with many connections; get one from
/// [`FastpathGuard::forwarder`](crate::FastpathGuard::forwarder). Each
/// pair is served by one thread, the one with the fewest pairs when it
/// was handed over.
///
/// [`forward`](Self::forward) takes the pair's two streams: from then on
/// the forwarder owns them, passes half-closes and resets on exactly as
/// [`Forwarding::wait`] does, copies bytes left in their own queues, and
/// closes them when the pair ends. A pair the kernel will not take because
/// a socket is no longer established (a client that sent its request and
/// half-closed before the proxy accepted it) is copied in user space
/// instead ([`ForwardStats::in_kernel`] says which). Each pair's [`ForwardedPair`] tells
/// when, blocking ([`ForwardedPair::wait`]) or as a `Future` (any async
/// runtime; no `spawn_blocking`).
///
/// With [`ForwardPath::Adaptive`] ([`with_path`](Self::with_path)) it
/// relays each pair itself first (long runs with splice(2), short reads
/// copied) and hands it to the kernel
/// once its traffic shows request/response turns: bulk pairs stay on the
/// relay, where they move fastest.
///
/// Dropping the forwarder takes no new pairs; its threads serve the pairs
/// they have until the last one ends, then exit.
#[must_use = "a forwarder forwards nothing until pairs are handed to it"]
pub struct Forwarder {
    threads: Vec<Arc<Shared>>,
    /// The pairs in the kernel, counted across the threads.
    slots: Arc<KernelSlots>,
    maps: Arc<ForwardMaps>,
    path: ForwardPath,
}

/// One serving thread's epoll loop and pairs.
struct Shared {
    epoll: Epoll,
    /// Wakes the thread when it is closed (the forwarder dropped, or
    /// fewer threads asked for).
    wake: EventFd,
    state: Mutex<State>,
    slots: Arc<KernelSlots>,
}

#[derive(Default)]
struct State {
    pairs: HashMap<u64, Entry>,
    /// Pairs that wait for the kernel, by when they are stepped again
    /// (`Forwarding::retry_in`), events or not.
    retries: BTreeSet<(Instant, u64)>,
    next_id: u64,
    /// The `Forwarder` was dropped (or shrunk by `with_threads`): the
    /// thread ends with its last pair.
    closed: bool,
}

struct Entry {
    forwarding: Forwarding,
    interest: [PollFlags; 2],
    /// Its place in `State::retries`.
    retry_at: Option<Instant>,
    done: Arc<Done>,
}

/// Where the thread leaves a pair's result for its `ForwardedPair`.
#[derive(Default)]
struct Done {
    state: Mutex<DoneState>,
    changed: Condvar,
}

#[derive(Default)]
struct DoneState {
    result: Option<Result<ForwardStats>>,
    finished: bool,
    waker: Option<Waker>,
}

/// The epoll token of the wake-up eventfd; pair `id`'s sockets are `2 * id`
/// (downstream) and `2 * id + 1` (upstream).
const WAKE_TOKEN: u64 = u64::MAX;

/// Events the thread takes from epoll at once.
const EVENTS_PER_WAIT: usize = 256;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic on the thread cannot leave a pair half-updated in a way a
    // waiter could observe: keep serving.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn epoll_flags(events: PollFlags) -> EpollFlags {
    // poll(2) and epoll(7) share these bit values on Linux.
    EpollFlags::from_bits_retain(i32::from(events.bits()))
}

fn poll_flags(events: EpollFlags) -> PollFlags {
    PollFlags::from_bits_retain(events.bits() as i16)
}

impl Forwarder {
    pub(crate) fn new(maps: ForwardMaps) -> Result<Self> {
        Forwarder {
            threads: Vec::new(),
            slots: Arc::new(KernelSlots::new()),
            maps: Arc::new(maps),
            path: ForwardPath::Kernel,
        }
        .with_threads(NonZeroUsize::MIN)
    }

    /// How pairs handed over from now on are served: see [`ForwardPath`].
    /// In both mode, [`ForwardPath::Adaptive`] serves them as
    /// [`ForwardPath::Kernel`] does.
    pub fn with_path(mut self, path: ForwardPath) -> Self {
        if let ForwardPath::Adaptive { max_in_kernel, .. } = path {
            self.slots.set_max(relay::kernel_pair_limit(max_in_kernel));
        }
        self.path = path;
        self
    }

    /// How many threads serve pairs handed over from now on (default: one).
    /// More threads serve more busy relayed pairs at once
    /// ([`ForwardPath::Adaptive`]); pairs the kernel forwards need almost
    /// none of their time. Measured on a 2-CPU machine shared with the
    /// clients and server (docs/benchmarks.md, "Forwarder threads"): with
    /// two threads, 100 request/response pairs had a round-trip p99 of
    /// 0.59-0.62x the best user-space proxy's instead of 1.18-1.51x, at
    /// about the same rate, while bulk streams through 100 pairs were
    /// 0.79-1.11x of it instead of 0.92-1.10x (the threads compete for the
    /// CPUs). A thread given up serves its pairs until they end.
    ///
    /// # Errors
    /// [`Error::Io`] naming the call (`epoll_create1`, `eventfd`, spawning
    /// the thread) if a new thread cannot be set up; the forwarder is
    /// dropped then (pairs it already serves stay served).
    pub fn with_threads(mut self, threads: NonZeroUsize) -> Result<Self> {
        while self.threads.len() > threads.get() {
            if let Some(shared) = self.threads.pop() {
                shared.close();
            }
        }
        while self.threads.len() < threads.get() {
            self.threads.push(Shared::spawn(&self.slots)?);
        }
        Ok(self)
    }

    /// The thread with the fewest pairs.
    fn least_busy(&self) -> &Arc<Shared> {
        self.threads
            .iter()
            .min_by_key(|shared| lock(&shared.state).pairs.len())
            .expect("a forwarder has at least one thread")
    }

    /// Hands a proxy's pair of connections to the kernel, as
    /// [`FastpathGuard::forward`](crate::FastpathGuard::forward) does
    /// (follow the hand-over protocol in the [module docs](super)), and
    /// takes the two streams (std `TcpStream`; from tokio, use
    /// `into_std()`).
    ///
    /// # Errors
    /// [`Refused`] with the two streams given back untouched, so the proxy
    /// can still copy them itself: for what `FastpathGuard::forward` refuses
    /// (a socket already forwarded, a full map) and I/O errors from dup or
    /// getsockopt. `?` turns it into an [`Error`].
    pub fn forward(
        &self,
        downstream: TcpStream,
        upstream: TcpStream,
    ) -> std::result::Result<ForwardedPair, Refused> {
        let dups = downstream
            .try_clone()
            .and_then(|down| Ok((down, upstream.try_clone()?)))
            .map_err(|err| Error::io("dup", "forwarded socket", err));
        let maps = Arc::clone(&self.maps);
        let forwarding = match dups.and_then(|(down, up)| match self.path {
            ForwardPath::Adaptive {
                turns,
                max_turn_bytes,
                ..
            } if maps.direct.is_none() => {
                Forwarding::start_relay(maps, down, up, turns, max_turn_bytes)
            }
            _ => Forwarding::start(maps, down, up, NotEstablished::Copy),
        }) {
            Ok(forwarding) => forwarding,
            Err(error) => {
                return Err(Refused {
                    error,
                    downstream,
                    upstream,
                })
            }
        };
        // The forwarder's copies are the only ones from now on.
        drop((downstream, upstream));
        let done = Arc::new(Done::default());
        let shared = self.least_busy();
        let mut state = lock(&shared.state);
        let id = state.next_id;
        state.next_id += 1;
        let interest = forwarding.interest();
        match shared.register(&forwarding, id, interest) {
            Ok(()) => {
                if forwarding.in_kernel {
                    self.slots.take();
                }
                state.pairs.insert(
                    id,
                    Entry {
                        forwarding,
                        interest,
                        retry_at: None,
                        done: Arc::clone(&done),
                    },
                );
            }
            Err(err) => {
                // epoll is full (fs.epoll.max_user_watches): the pair is in
                // the maps already, so it is served on its own thread.
                drop(state);
                let for_thread = Arc::clone(&done);
                let spawned = std::thread::Builder::new()
                    .name("fastpath-fwd-1".into())
                    .spawn(move || for_thread.finish(forwarding.wait()));
                if spawned.is_err() {
                    done.finish(Err(err));
                }
            }
        }
        Ok(ForwardedPair { done })
    }

    /// How many pairs it serves now.
    pub fn pairs(&self) -> usize {
        self.threads
            .iter()
            .map(|shared| lock(&shared.state).pairs.len())
            .sum()
    }

    /// How many threads serve its pairs (see [`with_threads`](Self::with_threads)).
    pub fn threads(&self) -> usize {
        self.threads.len()
    }
}

impl Shared {
    /// A thread of its own with an epoll set, serving the pairs it is given.
    fn spawn(slots: &Arc<KernelSlots>) -> Result<Arc<Shared>> {
        let io = |call| move |err: Errno| Error::io(call, "the forwarder", err.into());
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io("epoll_create1"))?;
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(io("eventfd"))?;
        epoll
            .add(
                wake.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN),
            )
            .map_err(io("epoll_ctl(EPOLL_CTL_ADD)"))?;
        let shared = Arc::new(Shared {
            epoll,
            wake,
            state: Mutex::default(),
            slots: Arc::clone(slots),
        });
        let serving = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("fastpath-fwd".into())
            .spawn(move || serve(&serving))
            .map_err(|err| Error::io("spawning the forwarder's thread", "the forwarder", err))?;
        Ok(shared)
    }

    /// Takes no new pairs: the thread ends with its last one.
    fn close(&self) {
        lock(&self.state).closed = true;
        let _ = self.wake.write(1);
    }

    fn register(&self, forwarding: &Forwarding, id: u64, interest: [PollFlags; 2]) -> Result<()> {
        let epoll = &self.epoll;
        let fds = forwarding.fds();
        for i in [DOWN, UP] {
            let event = EpollEvent::new(epoll_flags(interest[i]), 2 * id + i as u64);
            if let Err(err) = epoll.add(fds[i], event) {
                if i == UP {
                    let _ = epoll.delete(fds[DOWN]);
                }
                return Err(Error::io(
                    "epoll_ctl(EPOLL_CTL_ADD)",
                    "forwarded socket",
                    err.into(),
                ));
            }
        }
        Ok(())
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        for shared in &self.threads {
            shared.close();
        }
    }
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("pairs", &self.pairs())
            .field("threads", &self.threads())
            .field("path", &self.path)
            .finish()
    }
}

/// A thread: waits on its pairs' sockets and steps the pairs that have
/// events (or wait for the kernel to drain), until it is closed and its
/// last pair has ended.
fn serve(shared: &Shared) {
    let mut events = vec![EpollEvent::empty(); EVENTS_PER_WAIT];
    let mut scratch = Scratch::new();
    loop {
        let timeout = {
            let state = lock(&shared.state);
            if state.closed && state.pairs.is_empty() {
                return;
            }
            match state.retries.first() {
                None => EpollTimeout::NONE,
                Some(&(due, _)) => timeout_until(due, Instant::now()),
            }
        };
        let ready = match shared.epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(err) => {
                fail_all(shared, err);
                return;
            }
        };
        let mut revents: BTreeMap<u64, [PollFlags; 2]> = BTreeMap::new();
        for event in &events[..ready] {
            if event.data() == WAKE_TOKEN {
                let _ = shared.wake.read();
                continue;
            }
            let (id, side) = (event.data() / 2, (event.data() % 2) as usize);
            revents.entry(id).or_insert([PollFlags::empty(); 2])[side] |=
                poll_flags(event.events());
        }
        let mut state = lock(&shared.state);
        // Only the pairs that are due, not every waiting pair per wake-up:
        // with many pairs busy, that would cost in proportion to both.
        let now = Instant::now();
        while let Some(&(due, id)) = state.retries.first() {
            if due > now {
                break;
            }
            state.retries.pop_first();
            if let Some(entry) = state.pairs.get_mut(&id) {
                entry.retry_at = None;
            }
            revents.entry(id).or_insert([PollFlags::empty(); 2]);
        }
        for (id, revents) in revents {
            step_pair(shared, &mut state, id, revents, &mut scratch);
        }
        if state.pairs.is_empty() {
            scratch.idle();
        }
    }
}

/// epoll's timeout until `due`, in whole milliseconds rounded up: rounded
/// down, the last fraction of a millisecond became a zero timeout and the
/// thread spun until it passed (measured: a whole core with 10 stalled
/// pairs).
fn timeout_until(due: Instant, now: Instant) -> EpollTimeout {
    let left = due.saturating_duration_since(now);
    EpollTimeout::from(left.as_micros().div_ceil(1000).min(u16::MAX.into()) as u16)
}

fn step_pair(
    shared: &Shared,
    state: &mut State,
    id: u64,
    revents: [PollFlags; 2],
    scratch: &mut Scratch,
) {
    let Some(entry) = state.pairs.get_mut(&id) else {
        return;
    };
    let stepped = entry.forwarding.step(revents, scratch, Some(&shared.slots));
    let end = match stepped {
        Ok(None) => match update_interest(shared, entry, id) {
            Ok(retry_in) => {
                if let Some(at) = entry.retry_at.take() {
                    state.retries.remove(&(at, id));
                }
                if let Some(retry_in) = retry_in {
                    let at = Instant::now() + retry_in;
                    entry.retry_at = Some(at);
                    state.retries.insert((at, id));
                }
                return;
            }
            Err(err) => Err(err),
        },
        Ok(Some(end)) => Ok(end),
        Err(err) => Err(err),
    };
    end_pair(shared, state, id, end);
}

/// Tells epoll what the pair waits for now; how soon it must be stepped
/// again without an event, if at all.
fn update_interest(shared: &Shared, entry: &mut Entry, id: u64) -> Result<Option<Duration>> {
    let interest = entry.forwarding.interest();
    let fds = entry.forwarding.fds();
    for i in [DOWN, UP] {
        if interest[i] != entry.interest[i] {
            let mut event = EpollEvent::new(epoll_flags(interest[i]), 2 * id + i as u64);
            shared.epoll.modify(fds[i], &mut event).map_err(|err| {
                Error::io("epoll_ctl(EPOLL_CTL_MOD)", "forwarded socket", err.into())
            })?;
        }
    }
    entry.interest = interest;
    Ok(entry.forwarding.retry_in())
}

/// Takes a pair out: its sockets leave epoll and are closed (with SO_LINGER
/// 0 already set on the other side of a reset), its entries leave the maps,
/// and its waiter gets the result.
fn end_pair(shared: &Shared, state: &mut State, id: u64, end: Result<ForwardEnd>) {
    let Some(mut entry) = state.pairs.remove(&id) else {
        return;
    };
    if entry.forwarding.in_kernel {
        shared.slots.give_back();
    }
    if let Some(at) = entry.retry_at {
        state.retries.remove(&(at, id));
    }
    for fd in entry.forwarding.fds() {
        let _ = shared.epoll.delete(fd);
    }
    let stats = entry.forwarding.finish(end);
    drop(entry.forwarding);
    entry.done.finish(stats);
}

/// epoll itself failed (never seen): every pair ends with that error.
fn fail_all(shared: &Shared, err: Errno) {
    let mut state = lock(&shared.state);
    let ids: Vec<u64> = state.pairs.keys().copied().collect();
    for id in ids {
        let err = Error::io("epoll_wait", "the forwarder", err.into());
        end_pair(shared, &mut state, id, Err(err));
    }
}

impl Done {
    fn finish(&self, result: Result<ForwardStats>) {
        let mut state = lock(&self.state);
        state.result = Some(result);
        state.finished = true;
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
        self.changed.notify_all();
    }
}

/// A pair a [`Forwarder`] serves. [`wait`](Self::wait) blocks until it
/// ends; `.await` on it does the same in async code. Dropping it leaves
/// the pair served.
#[must_use = "wait() or .await it to learn how the pair ended"]
pub struct ForwardedPair {
    done: Arc<Done>,
}

impl ForwardedPair {
    /// Blocks until the pair has ended; what it moved and how it ended.
    ///
    /// # Errors
    /// An I/O error the forwarder met serving the pair (poll, getsockopt).
    pub fn wait(self) -> Result<ForwardStats> {
        let mut state = lock(&self.done.state);
        while !state.finished {
            state = self
                .done
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        state
            .result
            .take()
            .expect("the forwarder leaves each pair's result once")
    }

    /// Whether the pair has ended.
    pub fn is_finished(&self) -> bool {
        lock(&self.done.state).finished
    }
}

impl Future for ForwardedPair {
    type Output = Result<ForwardStats>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = lock(&self.done.state);
        if state.finished {
            return Poll::Ready(
                state
                    .result
                    .take()
                    .expect("a ForwardedPair is not polled after it completed"),
            );
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl std::fmt::Debug for ForwardedPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardedPair")
            .field("finished", &self.is_finished())
            .finish()
    }
}

/// A pair a [`Forwarder`] did not take: why, and the two streams, untouched.
#[derive(Debug)]
#[non_exhaustive]
pub struct Refused {
    /// Why (see [`FastpathGuard::forward`](crate::FastpathGuard::forward)).
    pub error: Error,
    /// The downstream stream, given back.
    pub downstream: TcpStream,
    /// The upstream stream, given back.
    pub upstream: TcpStream,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The cause is `source()`: chain printers show it once.
        f.write_str("the forwarder refused the pair (both streams are given back)")
    }
}

impl std::error::Error for Refused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<Refused> for Error {
    fn from(refused: Refused) -> Self {
        refused.error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeout_never_rounds_a_wait_down_to_zero() {
        let now = Instant::now();
        let after = |micros| timeout_until(now + Duration::from_micros(micros), now);
        assert_eq!(after(300), EpollTimeout::from(1u16));
        assert_eq!(after(1000), EpollTimeout::from(1u16));
        assert_eq!(after(1001), EpollTimeout::from(2u16));
        assert_eq!(after(0), EpollTimeout::ZERO);
        assert_eq!(
            timeout_until(now, now + Duration::from_millis(5)),
            EpollTimeout::ZERO
        );
    }
}
