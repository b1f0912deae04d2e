//! A forward-only buffered reader that knows its offset, never allocates after
//! construction, and can jump over large regions by seeking when the source allows it.

use std::io::{self, Read, Seek, SeekFrom};

use crate::StreamError;

/// Large enough that skipping 4 KiB pages costs a `memcpy` from the page cache per
/// megabyte rather than a syscall per page.
const BUF_SIZE: usize = 1 << 20;

/// Small inputs (and the many short reads of tests and fuzzing) should not pay for
/// zeroing a megabyte; the buffer grows to `BUF_SIZE` once the stream proves long.
const FIRST_BUF_SIZE: usize = 64 << 10;

/// Below this, reading through the buffer is cheaper than a seek that throws the
/// read-ahead away.
const SEEK_THRESHOLD: u64 = BUF_SIZE as u64;

/// Where bytes come from: anything readable, optionally able to jump forward.
pub(crate) trait Source {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Moves `n` bytes forward without reading them. `Ok(None)` means "cannot seek,
    /// read through instead"; `Ok(Some(k))` with `k < n` means the input ends early.
    fn skip(&mut self, n: u64) -> io::Result<Option<u64>>;
}

pub(crate) struct Plain<R>(pub R);

impl<R: Read> Source for Plain<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
    fn skip(&mut self, _n: u64) -> io::Result<Option<u64>> {
        Ok(None)
    }
}

/// A seekable source of known length; seeking past the end would succeed silently,
/// so the length is what tells a skip into a hole from a truncated file.
pub(crate) struct Seekable<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read + Seek> Seekable<R> {
    pub(crate) fn new(mut inner: R) -> io::Result<Self> {
        let pos = inner.stream_position()?;
        let len = inner.seek(SeekFrom::End(0))?;
        inner.seek(SeekFrom::Start(pos))?;
        Ok(Seekable { inner, pos, len })
    }
}

impl<R: Read + Seek> Source for Seekable<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos = self.pos.saturating_add(n as u64);
        Ok(n)
    }
    fn skip(&mut self, n: u64) -> io::Result<Option<u64>> {
        let avail = self.len.saturating_sub(self.pos);
        let k = n.min(avail);
        let target = self.pos.saturating_add(k);
        self.inner.seek(SeekFrom::Start(target))?;
        self.pos = target;
        Ok(Some(k))
    }
}

pub(crate) struct Input<'a> {
    src: &'a mut dyn Source,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Stream offset of `buf[start]`.
    pos: u64,
    eof: bool,
}

impl<'a> Input<'a> {
    pub(crate) fn new(src: &'a mut dyn Source) -> Self {
        Input {
            src,
            buf: vec![0u8; FIRST_BUF_SIZE],
            start: 0,
            end: 0,
            pos: 0,
            eof: false,
        }
    }

    /// Offset of the next byte to be consumed.
    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }

    fn buffered(&self) -> usize {
        self.end - self.start
    }

    fn io_err(&self, e: io::Error) -> StreamError {
        StreamError::Io {
            offset: self.pos,
            source: e,
        }
    }

    /// Tries to have at least `n` bytes buffered (`n <= BUF_SIZE`); returns how many are.
    fn fill(&mut self, n: usize) -> Result<usize, StreamError> {
        if self.buffered() >= n || self.eof {
            return Ok(self.buffered());
        }
        if self.buf.len() < BUF_SIZE && (n > self.buf.len() || self.pos >= BUF_SIZE as u64) {
            self.buf.resize(BUF_SIZE, 0);
        }
        let n = n.min(self.buf.len());
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.end < n && !self.eof {
            let Some(space) = self.buf.get_mut(self.end..) else {
                break;
            };
            match self.src.read(space) {
                Ok(0) => self.eof = true,
                Ok(k) => self.end = self.end.saturating_add(k).min(self.buf.len()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err(e)),
            }
        }
        Ok(self.buffered())
    }

    /// Up to `n` bytes of what comes next, without consuming them; shorter only at
    /// the end of the input.
    pub(crate) fn peek(&mut self, n: usize) -> Result<&[u8], StreamError> {
        let have = self.fill(n)?;
        let k = have.min(n);
        Ok(self.buf.get(self.start..self.start + k).unwrap_or(&[]))
    }

    /// True when nothing is left.
    pub(crate) fn at_end(&mut self) -> Result<bool, StreamError> {
        Ok(self.fill(1)? == 0)
    }

    fn consume(&mut self, n: usize) {
        let n = n.min(self.buffered());
        self.start += n;
        self.pos = self.pos.saturating_add(n as u64);
    }

    /// Exactly `N` bytes, or `Truncated` naming what was being read and where it starts.
    pub(crate) fn array<const N: usize>(
        &mut self,
        what: impl FnOnce() -> String,
    ) -> Result<[u8; N], StreamError> {
        let at = self.pos;
        let mut out = [0u8; N];
        match self.peek(N)? {
            got if got.len() == N => out.copy_from_slice(got),
            _ => {
                return Err(StreamError::Truncated {
                    offset: at,
                    expected: what(),
                })
            }
        }
        self.consume(N);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, what: impl FnOnce() -> String) -> Result<u8, StreamError> {
        Ok(self.array::<1>(what)?[0])
    }
    pub(crate) fn be16(&mut self, what: impl FnOnce() -> String) -> Result<u16, StreamError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }
    pub(crate) fn be32(&mut self, what: impl FnOnce() -> String) -> Result<u32, StreamError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
    pub(crate) fn be64(&mut self, what: impl FnOnce() -> String) -> Result<u64, StreamError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// Reads `n` bytes (at most 255, so callers never size a buffer from the input)
    /// into `out`.
    pub(crate) fn bytes_into<'b>(
        &mut self,
        n: u8,
        out: &'b mut [u8; 255],
        what: impl FnOnce() -> String,
    ) -> Result<&'b [u8], StreamError> {
        let n = usize::from(n);
        let at = self.pos;
        let got = self.peek(n)?;
        let (Some(dst), true) = (out.get_mut(..n), got.len() == n) else {
            return Err(StreamError::Truncated {
                offset: at,
                expected: what(),
            });
        };
        dst.copy_from_slice(got);
        self.consume(n);
        Ok(dst)
    }

    /// Moves `n` bytes forward; `Truncated` (from the start of the skipped item) if
    /// the input ends first.
    pub(crate) fn skip(
        &mut self,
        n: u64,
        what: impl FnOnce() -> String,
    ) -> Result<(), StreamError> {
        let at = self.pos;
        let mut left = n;
        let from_buf = left.min(self.buffered() as u64);
        self.consume(from_buf as usize);
        left -= from_buf;
        if left >= SEEK_THRESHOLD && !self.eof {
            match self.src.skip(left) {
                Ok(Some(k)) => {
                    self.pos = self.pos.saturating_add(k);
                    left -= k.min(left);
                    if left > 0 {
                        self.eof = true;
                    }
                }
                Ok(None) => {}
                Err(e) => return Err(self.io_err(e)),
            }
        }
        while left > 0 {
            let want = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            let have = self.fill(want)?;
            if have == 0 {
                return Err(StreamError::Truncated {
                    offset: at,
                    expected: what(),
                });
            }
            let k = have.min(want);
            self.consume(k);
            left -= k as u64;
        }
        Ok(())
    }

    /// Streams `n` bytes through `f` in buffer-sized pieces.
    pub(crate) fn stream(
        &mut self,
        n: u64,
        mut f: impl FnMut(&[u8]),
        what: impl FnOnce() -> String,
    ) -> Result<(), StreamError> {
        let at = self.pos;
        let mut left = n;
        while left > 0 {
            let want = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            let have = self.fill(want)?;
            if have == 0 {
                return Err(StreamError::Truncated {
                    offset: at,
                    expected: what(),
                });
            }
            let k = have.min(want);
            if let Some(chunk) = self.buf.get(self.start..self.start + k) {
                f(chunk);
            }
            self.consume(k);
            left -= k as u64;
        }
        Ok(())
    }

    /// Consumes bytes up to the next `byte` (left unconsumed); false at the end of
    /// the input or after `limit` bytes.
    pub(crate) fn scan_to(&mut self, byte: u8, limit: u64) -> Result<bool, StreamError> {
        let mut scanned = 0u64;
        loop {
            let have = self.fill(1)?;
            if have == 0 {
                return Ok(false);
            }
            let window = self.buf.get(self.start..self.end).unwrap_or(&[]);
            match window.iter().position(|&b| b == byte) {
                Some(i) => {
                    self.consume(i);
                    return Ok(true);
                }
                None => {
                    let n = window.len();
                    self.consume(n);
                    scanned = scanned.saturating_add(n as u64);
                    if scanned > limit {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// Consumes one byte (for scanning).
    pub(crate) fn advance_one(&mut self) {
        self.consume(1);
    }

    /// Consumes everything left and returns how many bytes that was.
    pub(crate) fn drain(&mut self) -> Result<u64, StreamError> {
        let mut n = 0u64;
        loop {
            let have = self.fill(self.buf.len())?;
            if have == 0 {
                return Ok(n);
            }
            self.consume(have);
            n = n.saturating_add(have as u64);
        }
    }
}
