//! Moving a stream from one socket to another without copying it through
//! this process: the receiver relays QEMU's encrypted stream (most of guest
//! RAM) from the sender's TCP connection into its QEMU's unix socket.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use super::PIPE_BUFFER;

/// Moves everything `from` sends into `to`, until `from` ends, with
/// splice(2) through a pipe of `PIPE_BUFFER` bytes; returns how many
/// bytes moved. Both are blocking sockets.
///
/// # Errors
/// The first error of either socket (or of making the pipe).
pub fn splice_all(from: BorrowedFd<'_>, to: BorrowedFd<'_>) -> io::Result<u64> {
    let (r, w) = super::pipe().map_err(|e| io::Error::other(e.to_string()))?;
    let (r, w) = (r.as_fd().as_raw_fd(), w.as_fd().as_raw_fd());
    let splice = |fd_in: i32, fd_out: i32, len: usize| loop {
        // SAFETY: splice between descriptors borrowed for this call; null
        // offsets, as sockets and pipes have none.
        let n = unsafe {
            libc::splice(
                fd_in,
                std::ptr::null_mut(),
                fd_out,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        if n >= 0 {
            return Ok(n.unsigned_abs());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut total = 0u64;
    loop {
        let n = splice(from.as_raw_fd(), w, PIPE_BUFFER)?;
        if n == 0 {
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            let m = splice(r, to.as_raw_fd(), left)?;
            if m == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            left -= m;
        }
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_stream_arrives_whole_through_the_splice() {
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (c, mut d) = std::os::unix::net::UnixStream::pair().unwrap();
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            a.write_all(&sent).unwrap();
        });
        let relay = std::thread::spawn(move || {
            let n = splice_all(b.as_fd(), c.as_fd()).unwrap();
            drop(c);
            n
        });
        let mut got = Vec::new();
        let reader = std::thread::spawn(move || {
            d.read_to_end(&mut got).unwrap();
            got
        });
        writer.join().unwrap();
        assert_eq!(relay.join().unwrap(), data.len() as u64);
        assert_eq!(reader.join().unwrap(), data);
    }
}
