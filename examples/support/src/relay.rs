//! The user-space copy a plain proxy does, for the benchmarks' and the
//! tproxy example's "copy" mode.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};

/// Copies `from` to `to` with read/write (never splice) until EOF or an
/// error on either side, then passes the EOF on; returns the bytes copied.
pub fn copy_until_eof(mut from: TcpStream, mut to: TcpStream) -> u64 {
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0;
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                total += n as u64;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    total
}
