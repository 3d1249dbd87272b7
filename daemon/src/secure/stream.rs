//! An authenticated link's two halves.

use proto::link::{LinkKeys, Opener, Sealer, RECORD_HEADER_BYTES, RECORD_SEALED_BYTES_MAX};
use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{ready, Context, Poll},
};
use tokio::{
    io::{AsyncRead, AsyncWriteExt, ReadBuf},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
};

/// Bytes a reader's buffer grows to at most: two whole records.
pub const READ_BUFFER_BYTES_MAX: usize = 2 * (RECORD_HEADER_BYTES + RECORD_SEALED_BYTES_MAX);
/// A reader's buffer starts this small (an idle link costs little).
const READ_BUFFER_BYTES_MIN: usize = 4 * 1024;
/// A writer keeps at most this much buffer capacity between sends.
pub const WRITE_BUFFER_KEPT_BYTES_MAX: usize = 256 * 1024;

/// An authenticated, encrypted connection.
pub struct Link {
    pub reader: LinkReader,
    pub writer: LinkWriter,
    pub peer: SocketAddr,
}

impl Link {
    pub(crate) fn new(stream: TcpStream, keys: LinkKeys) -> io::Result<Link> {
        if let Err(e) = super::tcp::tune(&stream) {
            // The link works without them; a vanished peer is then found
            // only when a write fails.
            tracing::warn!(error = %e, "cannot set a link's keepalive options");
        }
        let peer = stream.peer_addr()?;
        let (rd, wr) = stream.into_split();
        Ok(Link {
            reader: LinkReader {
                rd,
                opener: keys.opener,
                buf: Vec::new(),
                start: 0,
                end: 0,
                plain: 0..0,
                record_end: 0,
            },
            writer: LinkWriter {
                wr,
                sealer: keys.sealer,
                out: Vec::new(),
                sent: 0,
            },
            peer,
        })
    }

    pub fn into_split(self) -> (LinkReader, LinkWriter) {
        (self.reader, self.writer)
    }
}

/// The receiving half: decrypted bytes as an `AsyncRead`. A record that
/// fails authentication is an `InvalidData` error; the stream ending inside
/// a record is `UnexpectedEof`.
pub struct LinkReader {
    rd: OwnedReadHalf,
    opener: Opener,
    /// Bytes read; `start..end` not consumed yet.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The opened record's plaintext not handed out yet (in `buf`).
    plain: std::ops::Range<usize>,
    /// Where the opened record ends in `buf`.
    record_end: usize,
}

impl LinkReader {
    /// The socket under the link (to read its options).
    pub fn tcp(&self) -> &TcpStream {
        self.rd.as_ref()
    }

    /// Make room to read into: compact, then grow (up to the maximum).
    fn make_room(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end < self.buf.len() {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            return;
        }
        let grown = (self.buf.len() * 2).clamp(READ_BUFFER_BYTES_MIN, READ_BUFFER_BYTES_MAX);
        debug_assert!(grown > self.buf.len(), "a whole record always fits");
        self.buf.resize(grown, 0);
    }
}

impl AsyncRead for LinkReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(out.remaining());
                out.put_slice(&this.buf[this.plain.start..this.plain.start + n]);
                this.plain.start += n;
                if this.plain.is_empty() {
                    this.start = this.record_end;
                }
                return Poll::Ready(Ok(()));
            }
            if out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match this
                .opener
                .open_in_place(&mut this.buf[this.start..this.end])
            {
                Ok(Some(opened)) => {
                    this.plain = this.start + opened.plain.start..this.start + opened.plain.end;
                    this.record_end = this.start + opened.consumed;
                    if this.plain.is_empty() {
                        this.start = this.record_end;
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(super::invalid(e))),
            }
            this.make_room();
            let mut read = ReadBuf::new(&mut this.buf[this.end..]);
            ready!(Pin::new(&mut this.rd).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == 0 {
                return Poll::Ready(if this.start == this.end {
                    Ok(())
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                });
            }
            this.end += n;
        }
    }
}

/// The sending half. Bytes are sealed into records by [`LinkWriter::seal`]
/// and written by [`LinkWriter::flush`] (or, without waiting, by
/// [`LinkWriter::try_flush`]); [`LinkWriter::send`] does both.
pub struct LinkWriter {
    wr: OwnedWriteHalf,
    sealer: Sealer,
    /// Sealed bytes; `sent..` not written yet.
    out: Vec<u8>,
    sent: usize,
}

impl LinkWriter {
    /// Seal `plain` and send it; returns once the socket took all of it.
    pub async fn send(&mut self, plain: &[u8]) -> io::Result<()> {
        self.seal(plain)?;
        self.flush().await
    }

    /// Seal `plain` behind whatever is waiting to be written.
    pub fn seal(&mut self, plain: &[u8]) -> io::Result<()> {
        self.sealer
            .seal(plain, &mut self.out)
            .map_err(super::invalid)
    }

    /// Write what the socket takes now, without waiting; `true` once
    /// nothing sealed is left unwritten.
    pub fn try_flush(&mut self) -> io::Result<bool> {
        while self.sent < self.out.len() {
            match self.wr.try_write(&self.out[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.sent = 0;
        if self.out.capacity() > WRITE_BUFFER_KEPT_BYTES_MAX {
            self.out = Vec::new();
        }
        Ok(true)
    }

    /// Write everything sealed, waiting while the socket is full.
    pub async fn flush(&mut self) -> io::Result<()> {
        while !self.try_flush()? {
            self.wr.writable().await?;
        }
        Ok(())
    }

    /// Bytes sealed and not written yet.
    pub fn unsent_bytes(&self) -> usize {
        self.out.len() - self.sent
    }

    /// Flush, then close the sending direction (the peer reads EOF).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.flush().await?;
        self.wr.shutdown().await
    }
}
