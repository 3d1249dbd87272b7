//! Batched UDP I/O on a tokio `UdpSocket`: `recvmmsg` / `sendmmsg`, up to
//! [`BATCH_DATAGRAMS`] datagrams per system call, into and out of buffers
//! allocated once. Generic over what the datagrams carry: the client
//! driver, the echo server, the gateway and the benchmarks' load
//! generators all use it.
//!
//! Readiness comes from tokio (`async_io` / `try_io`): a call that would
//! block clears the socket's readiness and waits for the next epoll event,
//! so nothing spins. Linux only (the system calls are Linux's).

use proto::session::config::DATAGRAM_BYTES_MAX;
use socket2::{Domain, Protocol, SockAddr, SockAddrStorage, Socket, Type};
use std::{
    io,
    mem::{self, MaybeUninit},
    net::SocketAddr,
    os::fd::AsRawFd,
};
use tokio::{io::Interest, net::UdpSocket};

/// Datagrams per `recvmmsg` / `sendmmsg` call at most.
pub const BATCH_DATAGRAMS: usize = 32;
/// Bytes of one datagram slot: the protocol's largest datagram. A longer
/// datagram arrives truncated and is dropped and counted.
pub const SLOT_BYTES: usize = DATAGRAM_BYTES_MAX;
/// Kernel socket buffer asked for in each direction by [`bind`] (the
/// kernel caps it at `net.core.rmem_max` / `wmem_max`).
pub const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// A UDP socket bound to `addr`, non-blocking, with
/// [`SOCKET_BUFFER_BYTES`] of kernel buffer each way, registered with the
/// current tokio runtime.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    bind_with(addr, false)
}

/// `count` sockets sharing one port with `SO_REUSEPORT` (port 0 in `addr`:
/// the first socket's), to be served by one loop each (one per core); the
/// kernel spreads senders over them by their address, so a client always
/// reaches the same socket. Plain std sockets, so each can be moved to its
/// own thread and registered there with `UdpSocket::from_std`.
pub fn bind_shared(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::UdpSocket>> {
    let first = std_socket(addr, true)?;
    let port_addr = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..count {
        all.push(std_socket(port_addr, true)?);
    }
    Ok(all)
}

fn bind_with(addr: SocketAddr, reuse_port: bool) -> io::Result<UdpSocket> {
    UdpSocket::from_std(std_socket(addr, reuse_port)?)
}

fn std_socket(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    // Best effort: a smaller kernel cap only means more drops under bursts.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Received datagrams: `BATCH_DATAGRAMS` preallocated slots, refilled by
/// each receive.
pub struct RecvBatch {
    bufs: Box<[u8]>,
    addrs: Box<[libc::sockaddr_storage]>,
    addr_lens: [libc::socklen_t; BATCH_DATAGRAMS],
    lens: [usize; BATCH_DATAGRAMS],
    truncated: [bool; BATCH_DATAGRAMS],
    count: usize,
    truncated_total: u64,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    pub fn new() -> Self {
        RecvBatch {
            bufs: vec![0u8; BATCH_DATAGRAMS * SLOT_BYTES].into_boxed_slice(),
            // SAFETY: all zeros is a valid sockaddr_storage.
            addrs: (0..BATCH_DATAGRAMS)
                .map(|_| unsafe { mem::zeroed() })
                .collect(),
            addr_lens: [0; BATCH_DATAGRAMS],
            lens: [0; BATCH_DATAGRAMS],
            truncated: [false; BATCH_DATAGRAMS],
            count: 0,
            truncated_total: 0,
        }
    }

    /// Datagrams the last receive produced (truncated ones included).
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Datagrams longer than [`SLOT_BYTES`] received so far (skipped by
    /// [`iter`](Self::iter)).
    pub fn truncated_total(&self) -> u64 {
        self.truncated_total
    }

    /// The whole datagrams of the last receive: (sender, bytes).
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        (0..self.count)
            .filter(|&i| !self.truncated[i])
            .filter_map(move |i| {
                let from = self.source(i)?;
                Some((
                    from,
                    &self.bufs[i * SLOT_BYTES..i * SLOT_BYTES + self.lens[i]],
                ))
            })
    }

    fn source(&self, i: usize) -> Option<SocketAddr> {
        let mut storage = SockAddrStorage::zeroed();
        // SAFETY: the view is the same type as the storage; the kernel
        // wrote `addr_lens[i]` bytes of a valid address of the socket's
        // family into `addrs[i]`.
        unsafe {
            *storage.view_as::<libc::sockaddr_storage>() = self.addrs[i];
            SockAddr::new(storage, self.addr_lens[i]).as_socket()
        }
    }

    /// One `recvmmsg` without waiting: the number of datagrams received,
    /// `WouldBlock` when none is ready.
    fn recv_now(&mut self, fd: libc::c_int) -> io::Result<usize> {
        self.count = 0;
        let mut iov = [MaybeUninit::<libc::iovec>::uninit(); BATCH_DATAGRAMS];
        // SAFETY: all zeros is a valid mmsghdr (null pointers, zero lengths).
        let mut hdrs: [libc::mmsghdr; BATCH_DATAGRAMS] = unsafe { mem::zeroed() };
        for (i, (hdr, iov)) in hdrs.iter_mut().zip(iov.iter_mut()).enumerate() {
            let name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            let name_len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            let buf = self.bufs[i * SLOT_BYTES..].as_mut_ptr();
            point(hdr, iov, (buf, SLOT_BYTES), (name, name_len));
        }
        // SAFETY: every header points at a live, exclusively borrowed slot
        // of `SLOT_BYTES` bytes and a sockaddr_storage, for the call only.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH_DATAGRAMS as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        assert!(n <= BATCH_DATAGRAMS, "recvmmsg returned more than asked");
        for (i, hdr) in hdrs[..n].iter().enumerate() {
            self.lens[i] = (hdr.msg_len as usize).min(SLOT_BYTES);
            self.addr_lens[i] = hdr.msg_hdr.msg_namelen;
            self.truncated[i] = hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.truncated_total += u64::from(self.truncated[i]);
        }
        self.count = n;
        Ok(n)
    }
}

/// Point one message header at one buffer and one address.
fn point(
    hdr: &mut libc::mmsghdr,
    iov: &mut MaybeUninit<libc::iovec>,
    (buf, len): (*mut u8, usize),
    (name, name_len): (*mut libc::c_void, libc::socklen_t),
) {
    let iov = iov.write(libc::iovec {
        iov_base: buf.cast(),
        iov_len: len,
    });
    hdr.msg_hdr.msg_name = name;
    hdr.msg_hdr.msg_namelen = name_len;
    hdr.msg_hdr.msg_iov = iov;
    hdr.msg_hdr.msg_iovlen = 1;
}

/// Wait until at least one datagram is ready, then receive up to a batch.
pub async fn recv(socket: &UdpSocket, batch: &mut RecvBatch) -> io::Result<usize> {
    let fd = socket.as_raw_fd();
    socket
        .async_io(Interest::READABLE, || batch.recv_now(fd))
        .await
}

/// Receive up to a batch of the datagrams already ready; `Ok(0)` when none
/// is (the socket's readiness is then cleared).
pub fn try_recv(socket: &UdpSocket, batch: &mut RecvBatch) -> io::Result<usize> {
    let fd = socket.as_raw_fd();
    match socket.try_io(Interest::READABLE, || batch.recv_now(fd)) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            batch.count = 0;
            Ok(0)
        }
        r => r,
    }
}

/// The batch is full: send it before adding more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("send batch full ({BATCH_DATAGRAMS} datagrams)")]
pub struct BatchFull;

/// Datagrams to send: `BATCH_DATAGRAMS` preallocated slots.
pub struct SendBatch {
    bufs: Box<[u8]>,
    dests: Vec<SockAddr>,
    lens: [usize; BATCH_DATAGRAMS],
    /// Datagrams the kernel refused (e.g. an unreachable destination);
    /// each is skipped, the rest of the batch still goes out.
    errors_total: u64,
    last_error: Option<io::ErrorKind>,
}

impl Default for SendBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl SendBatch {
    pub fn new() -> Self {
        SendBatch {
            bufs: vec![0u8; BATCH_DATAGRAMS * SLOT_BYTES].into_boxed_slice(),
            dests: Vec::with_capacity(BATCH_DATAGRAMS),
            lens: [0; BATCH_DATAGRAMS],
            errors_total: 0,
            last_error: None,
        }
    }

    pub fn len(&self) -> usize {
        self.dests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dests.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.dests.len() == BATCH_DATAGRAMS
    }

    /// Datagrams refused by the kernel so far, and the last reason.
    pub fn errors(&self) -> (u64, Option<io::ErrorKind>) {
        (self.errors_total, self.last_error)
    }

    /// Copy a datagram of at most [`SLOT_BYTES`] into the batch.
    pub fn push(&mut self, dest: SocketAddr, bytes: &[u8]) -> Result<(), BatchFull> {
        assert!(bytes.len() <= SLOT_BYTES, "datagram longer than a slot");
        self.push_with(|slot| {
            slot[..bytes.len()].copy_from_slice(bytes);
            Some((dest, bytes.len()))
        })
        .map(|_| ())
    }

    /// Let `write` fill the next slot in place (e.g. with `poll_transmit`);
    /// it returns the destination and length, or `None` when it has nothing
    /// to send. Whether a datagram was added.
    pub fn push_with(
        &mut self,
        write: impl FnOnce(&mut [u8]) -> Option<(SocketAddr, usize)>,
    ) -> Result<bool, BatchFull> {
        if self.is_full() {
            return Err(BatchFull);
        }
        let i = self.dests.len();
        let slot = &mut self.bufs[i * SLOT_BYTES..(i + 1) * SLOT_BYTES];
        let Some((dest, len)) = write(slot) else {
            return Ok(false);
        };
        assert!(len <= SLOT_BYTES, "datagram longer than a slot");
        self.lens[i] = len;
        self.dests.push(dest.into());
        Ok(true)
    }

    /// Let `next` fill slots (as in [`push_with`](Self::push_with)) until
    /// the batch is full or `next` has nothing more; how many it added.
    pub fn fill(
        &mut self,
        mut next: impl FnMut(&mut [u8]) -> Option<(SocketAddr, usize)>,
    ) -> usize {
        let mut added = 0;
        while let Ok(true) = self.push_with(&mut next) {
            added += 1;
        }
        added
    }

    /// One `sendmmsg` of the datagrams from `start`: how many the kernel
    /// took (at least one), or the error of the first.
    fn send_now(&mut self, fd: libc::c_int, start: usize) -> io::Result<usize> {
        let count = self.dests.len() - start;
        let mut iov = [MaybeUninit::<libc::iovec>::uninit(); BATCH_DATAGRAMS];
        // SAFETY: all zeros is a valid mmsghdr.
        let mut hdrs: [libc::mmsghdr; BATCH_DATAGRAMS] = unsafe { mem::zeroed() };
        for (k, (hdr, iov)) in hdrs.iter_mut().zip(iov.iter_mut()).take(count).enumerate() {
            let i = start + k;
            let name = self.dests[i].as_ptr() as *mut libc::c_void;
            let buf = self.bufs[i * SLOT_BYTES..].as_mut_ptr();
            point(hdr, iov, (buf, self.lens[i]), (name, self.dests[i].len()));
        }
        // SAFETY: the headers point at live slots and addresses of this
        // batch, which the kernel only reads, for the call only.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                hdrs.as_mut_ptr(),
                count as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// Send every datagram of the batch (waiting for the socket to be
/// writable as needed) and empty it. A datagram the kernel refuses is
/// skipped and counted ([`SendBatch::errors`]); the number sent.
pub async fn send(socket: &UdpSocket, batch: &mut SendBatch) -> usize {
    let fd = socket.as_raw_fd();
    let mut done = 0;
    let mut sent = 0;
    while done < batch.len() {
        match socket
            .async_io(Interest::WRITABLE, || batch.send_now(fd, done))
            .await
        {
            Ok(n) => {
                done += n;
                sent += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                batch.errors_total += 1;
                batch.last_error = Some(e.kind());
                done += 1;
            }
        }
    }
    batch.dests.clear();
    sent
}

/// Send everything `next` produces (see [`SendBatch::fill`]), a batch per
/// `sendmmsg`, until it has nothing more. `batch` must start empty.
pub async fn send_all(
    socket: &UdpSocket,
    batch: &mut SendBatch,
    mut next: impl FnMut(&mut [u8]) -> Option<(SocketAddr, usize)>,
) {
    debug_assert!(batch.is_empty());
    loop {
        batch.fill(&mut next);
        if batch.is_empty() {
            return;
        }
        let more = batch.is_full();
        send(socket, batch).await;
        if !more {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_goes_out_and_comes_back_with_its_sources() {
        let a = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let to = b.local_addr().unwrap();
        let mut out = SendBatch::new();
        for i in 0..BATCH_DATAGRAMS {
            out.push(to, &vec![i as u8; i + 1]).unwrap();
        }
        assert_eq!(out.push(to, b"x"), Err(BatchFull));
        assert_eq!(send(&a, &mut out).await, BATCH_DATAGRAMS);
        assert!(out.is_empty());
        let mut got = Vec::new();
        let mut batch = RecvBatch::new();
        while got.len() < BATCH_DATAGRAMS {
            recv(&b, &mut batch).await.unwrap();
            got.extend(batch.iter().map(|(from, d)| (from, d.to_vec())));
        }
        for (i, (from, d)) in got.iter().enumerate() {
            assert_eq!(*from, a.local_addr().unwrap());
            assert_eq!(*d, vec![i as u8; i + 1]);
        }
        assert_eq!(try_recv(&b, &mut batch).unwrap(), 0);
    }

    #[tokio::test]
    async fn a_datagram_longer_than_a_slot_is_counted_and_skipped() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let to = b.local_addr().unwrap();
        a.send_to(&[7u8; SLOT_BYTES + 1], to).unwrap();
        a.send_to(&[], to).unwrap();
        a.send_to(&[9u8; SLOT_BYTES], to).unwrap();
        let mut batch = RecvBatch::new();
        let mut got = Vec::new();
        let mut received = 0;
        while received < 3 {
            received += recv(&b, &mut batch).await.unwrap();
            got.extend(batch.iter().map(|(_, d)| d.to_vec()));
        }
        assert_eq!(batch.truncated_total(), 1);
        assert_eq!(got, vec![vec![], vec![9u8; SLOT_BYTES]]);
    }

    #[tokio::test]
    async fn an_unsendable_datagram_is_skipped_and_counted() {
        let a = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut out = SendBatch::new();
        // Port 0 is not a valid destination: the kernel refuses it.
        out.push("127.0.0.1:0".parse().unwrap(), b"bad").unwrap();
        out.push(b.local_addr().unwrap(), b"good").unwrap();
        assert_eq!(send(&a, &mut out).await, 1);
        assert_eq!(out.errors().0, 1);
        let mut batch = RecvBatch::new();
        recv(&b, &mut batch).await.unwrap();
        assert_eq!(batch.iter().next().unwrap().1, b"good");
    }
}
