//! Copying between a TCP connection and an HBONE stream, with end-to-end flow control.
//!
//! Memory per connection stays bounded in both directions: bytes from TCP are read only once
//! the stream has send capacity for them, and stream window is released to the peer only after
//! the bytes were written to TCP. An idle connection holds no buffer at all: one is allocated
//! when the socket is readable.

use std::future::poll_fn;
use std::io;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use socket2::SockRef;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use crate::sockets;
use crate::telemetry::Meter;

/// The first read from TCP; doubled while reads fill the buffer, for bulk transfers.
const INITIAL_READ: usize = 16 * 1024;
const MAX_READ: usize = 256 * 1024;

/// Bytes copied in each direction over one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the TCP connection into the tunnel.
    pub sent: u64,
    /// From the tunnel to the TCP connection.
    pub received: u64,
}

/// Why copying stopped before both sides closed cleanly.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("failed to read from the TCP connection")]
    ReadTcp(#[source] io::Error),
    #[error("failed to write to the TCP connection")]
    WriteTcp(#[source] io::Error),
    #[error("the HBONE stream failed")]
    Stream(#[source] h2::Error),
    #[error("the HBONE stream closed while data was pending")]
    StreamClosed,
}

/// Both halves of one CONNECT stream.
#[derive(Debug)]
pub(crate) struct H2Stream {
    pub(crate) send: SendStream<Bytes>,
    pub(crate) recv: RecvStream,
}

/// Copies both ways until both sides have closed, passing each half-close on; `meter` counts
/// the bytes as they go (sent: from `tcp`).
pub(crate) async fn copy_bidirectional(
    tcp: &mut TcpStream,
    stream: H2Stream,
    meter: &Meter,
) -> Result<Transferred, CopyError> {
    let (read, write) = tcp.split();
    let copied = tokio::try_join!(
        tcp_to_stream(read, stream.send, meter),
        stream_to_tcp(stream.recv, write, meter)
    );
    match copied {
        Ok((sent, received)) => Ok(Transferred { sent, received }),
        Err(error) => {
            // The tunnel broke (reset, or its connection lost): the TCP side is reset rather
            // than closed, so that its app does not take what it got for all there was.
            if matches!(error, CopyError::Stream(_) | CopyError::StreamClosed) {
                sockets::reset_on_close(tcp);
            }
            Err(error)
        }
    }
}

async fn tcp_to_stream(
    tcp: ReadHalf<'_>,
    mut send: SendStream<Bytes>,
    meter: &Meter,
) -> Result<u64, CopyError> {
    let tcp = tcp.as_ref();
    let mut read_size = INITIAL_READ;
    let mut total = 0;
    loop {
        tcp.readable().await.map_err(CopyError::ReadTcp)?;
        let Some(buf) = read_available(tcp, read_size).map_err(CopyError::ReadTcp)? else {
            continue;
        };
        let n = buf.len();
        if n == 0 {
            send.send_data(Bytes::new(), true)
                .map_err(CopyError::Stream)?;
            return Ok(total);
        }
        if n == read_size {
            read_size = (read_size * 2).min(MAX_READ);
        }
        total += n as u64;
        send_all(&mut send, buf.freeze()).await?;
        meter.sent(n);
    }
}

/// Reads what `tcp` has, up to `capacity`, into a new buffer: empty at end of stream, `None`
/// when it had nothing after all.
fn read_available(tcp: &TcpStream, capacity: usize) -> io::Result<Option<BytesMut>> {
    let mut buf = BytesMut::with_capacity(capacity);
    // A short read emptied the socket: its readiness is cleared, as tokio's own `poll_read`
    // does, so that the next wait does not cost a read that says `EAGAIN`. Answering
    // `WouldBlock` to `try_io` clears it as of before the read: bytes that arrive meanwhile
    // still wake the task.
    let read = tcp.try_io(Interest::READABLE, || {
        let n = tcp.try_read_buf(&mut buf)?;
        if n > 0 && n < capacity {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match read {
        Ok(()) => Ok(Some(buf)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok((!buf.is_empty()).then_some(buf)),
        Err(e) => Err(e),
    }
}

/// What `tcp` holds already, up to one first read, without waiting: empty when it holds
/// nothing, or when the client closed without sending. Read past the runtime's readiness, which
/// for a socket just accepted may not have caught up yet.
pub(crate) fn read_early(tcp: &TcpStream) -> io::Result<Bytes> {
    // On the stack, so that what is kept until the tunnel opens is what was read.
    let mut buf = [0; INITIAL_READ];
    match io::Read::read(&mut &*SockRef::from(tcp), &mut buf) {
        Ok(n) => Ok(Bytes::copy_from_slice(&buf[..n])),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Bytes::new()),
        Err(e) => Err(e),
    }
}

/// Sends `data` as the peer's window allows, so that h2 never buffers more than that.
async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), CopyError> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let mut capacity = send.capacity();
        if capacity == 0 {
            capacity = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(capacity)) => capacity,
                Some(Err(e)) => return Err(CopyError::Stream(e)),
                None => return Err(CopyError::StreamClosed),
            };
        }
        let chunk = data.split_to(capacity.min(data.len()));
        send.send_data(chunk, false).map_err(CopyError::Stream)?;
    }
    Ok(())
}

async fn stream_to_tcp(
    mut recv: RecvStream,
    mut tcp: WriteHalf<'_>,
    meter: &Meter,
) -> Result<u64, CopyError> {
    let mut total = 0;
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(CopyError::Stream)?;
        tcp.write_all(&chunk).await.map_err(CopyError::WriteTcp)?;
        total += chunk.len() as u64;
        meter.received(chunk.len());
        // Only now may the peer send more: the bytes have left this process.
        recv.flow_control()
            .release_capacity(chunk.len())
            .map_err(CopyError::Stream)?;
    }
    tcp.shutdown().await.map_err(CopyError::WriteTcp)?;
    Ok(total)
}

/// A CONNECT stream as a byte stream, for what reads and writes rather than copies (a
/// waypoint's HTTP server, or one stream copied into another). Flow control holds as in
/// [`copy_bidirectional`]: window is released once a chunk has been read out, and writes wait
/// for send capacity.
#[derive(Debug)]
pub(crate) struct H2Io {
    stream: H2Stream,
    /// What is left of the last chunk received.
    pending: Bytes,
}

impl H2Io {
    pub(crate) fn new(stream: H2Stream) -> Self {
        Self {
            stream,
            pending: Bytes::new(),
        }
    }
}

fn stream_error(error: h2::Error) -> io::Error {
    if error.is_io() {
        error
            .into_io()
            .unwrap_or_else(|| io::Error::other("HBONE stream failed"))
    } else {
        io::Error::other(error)
    }
}

impl tokio::io::AsyncRead for H2Io {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        if self.pending.is_empty() {
            match self.stream.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                // End of stream: the peer half-closed.
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(stream_error(error))),
                Poll::Ready(Some(Ok(chunk))) => self.pending = chunk,
            }
        }
        let n = self.pending.len().min(buf.remaining());
        let chunk = self.pending.split_to(n);
        buf.put_slice(&chunk);
        self.stream
            .recv
            .flow_control()
            .release_capacity(n)
            .map_err(stream_error)?;
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for H2Io {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        use std::task::Poll;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.stream.send;
        send.reserve_capacity(buf.len());
        let mut capacity = send.capacity();
        while capacity == 0 {
            capacity = match send.poll_capacity(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(stream_error(error))),
                Poll::Ready(Some(Ok(capacity))) => capacity,
            };
        }
        let n = capacity.min(buf.len());
        send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(stream_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        // h2 writes out what was sent on its own.
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let result = self.stream.send.send_data(Bytes::new(), true);
        std::task::Poll::Ready(result.map_err(stream_error))
    }
}
