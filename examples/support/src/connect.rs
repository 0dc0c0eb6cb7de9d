//! Connecting the way event loops do: a non-blocking `connect()`, then the
//! socket is switched to blocking mode for the simple code that uses it.
//!
//! The default `BlockingSockets::KeepPlain` keeps connections whose
//! connecting socket is blocking at `connect()` on plain TCP (a blocking
//! read on the shortcut can fail with EAGAIN), and `TcpStream::connect` is
//! such a connect. The workloads here measure or check the shortcut, so
//! they connect like an event loop (tokio, Go, curl, nginx) and are
//! accelerated.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use socket2::{Domain, Socket, Type};

pub fn connect_nonblocking(to: SocketAddr) -> io::Result<TcpStream> {
    connect_socket_nonblocking(
        Socket::new(Domain::for_address(to), Type::STREAM, None)?,
        to,
    )
}

/// The same for a socket already set up (bound to a source, say).
pub fn connect_socket_nonblocking(socket: Socket, to: SocketAddr) -> io::Result<TcpStream> {
    socket.set_nonblocking(true)?;
    match socket.connect(&to.into()) {
        Ok(()) => {}
        Err(err) if err.raw_os_error() == Some(nix::libc::EINPROGRESS) => {
            let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLOUT)];
            if poll(&mut fds, PollTimeout::from(10_000u16))? == 0 {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
            }
            if let Some(err) = socket.take_error()? {
                return Err(err);
            }
        }
        Err(err) => return Err(err),
    }
    socket.set_nonblocking(false)?;
    Ok(socket.into())
}
