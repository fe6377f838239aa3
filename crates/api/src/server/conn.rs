//! Connections whose protocol errors also get the OpenAI error body.
//!
//! hyper answers some requests itself, before the router sees them, with an empty body: 400
//! for a malformed request line, header or URI, 414 for a URI too long, 431 for headers past
//! its buffer or header-count limit (hyper 1 offers no hook for these replies, and
//! `axum::serve` none to raise its limits). [`JsonErrorListener`] wraps each accepted
//! connection so that such a reply (recognised by its status and its missing `content-type`:
//! every reply the router makes has one) is written with the JSON body instead, and counted in
//! `infermux_http_requests_total` under `route="other"`. hyper closes the connection after it.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::StatusCode;
use axum::serve::Listener;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::error::ApiError;
use super::metrics::Metrics;

/// A TCP listener whose connections are [`JsonErrorIo`]s.
pub(crate) struct JsonErrorListener {
    inner: TcpListener,
    metrics: Option<Arc<Metrics>>,
}

impl JsonErrorListener {
    /// Wraps `inner`; protocol errors are counted in `metrics` when given.
    pub(crate) fn new(inner: TcpListener, metrics: Option<Arc<Metrics>>) -> Self {
        Self { inner, metrics }
    }
}

impl Listener for JsonErrorListener {
    type Io = JsonErrorIo<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = Listener::accept(&mut self.inner).await;
        (
            JsonErrorIo {
                inner: io,
                metrics: self.metrics.clone(),
                replacement: None,
                mid_buffer: false,
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection that rewrites hyper's bodiless protocol-error replies (see the module docs).
pub(crate) struct JsonErrorIo<T> {
    inner: T,
    metrics: Option<Arc<Metrics>>,
    /// The reply being written instead of hyper's: bytes, how many are written, and how many
    /// bytes of hyper's buffer to report written once it is.
    replacement: Option<(Vec<u8>, usize, usize)>,
    /// The last write took only part of hyper's buffer, so the next one starts inside a
    /// message, where no reply head can begin.
    mid_buffer: bool,
}

/// The status of hyper's own error reply, if `buf` starts with one: a 400, 414 or 431 head
/// without `content-type` and without a body.
fn automatic_reply(buf: &[u8]) -> Option<StatusCode> {
    // Cheap first: hyper's own replies are a 4xx status line and a head of a few lines, so
    // a buffer that starts otherwise (every body, every other reply) is not scanned.
    if !(buf.starts_with(b"HTTP/1.1 4") || buf.starts_with(b"HTTP/1.0 4")) {
        return None;
    }
    let head = &buf[..buf.len().min(MAX_AUTOMATIC_HEAD)];
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let rest = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))?;
    let status: u16 = rest.get(..3)?.parse().ok()?;
    if ![400, 414, 431].contains(&status) {
        return None;
    }
    for line in lines {
        let line = line.to_ascii_lowercase();
        let (name, value) = line.split_once(':')?;
        match (name.trim(), value.trim()) {
            ("content-type" | "transfer-encoding", _) => return None,
            ("content-length", v) if v != "0" => return None,
            _ => {}
        }
    }
    StatusCode::from_u16(status).ok()
}

/// hyper's error heads are under 200 bytes; nothing longer is looked at.
const MAX_AUTOMATIC_HEAD: usize = 1024;

/// The JSON reply that replaces hyper's `status`.
fn json_reply(status: StatusCode) -> Vec<u8> {
    let message = match status.as_u16() {
        414 => "the request URI is too long",
        431 => "the request headers are too large (size or count)",
        _ => "the request could not be parsed (malformed request line, header or URI)",
    };
    let body = serde_json::to_string(&ApiError::status(status, message).body).unwrap_or_default();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error"),
        body.len()
    )
    .into_bytes()
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonErrorIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonErrorIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.replacement.is_none()
            && !this.mid_buffer
            && let Some(status) = automatic_reply(buf)
        {
            if let Some(m) = &this.metrics {
                m.count_reply("other", status.as_u16());
            }
            this.replacement = Some((json_reply(status), 0, buf.len()));
        }
        let Some((bytes, written, claimed)) = &mut this.replacement else {
            let result = Pin::new(&mut this.inner).poll_write(cx, buf);
            if let Poll::Ready(Ok(n)) = result {
                this.mid_buffer = n < buf.len();
            }
            return result;
        };
        while *written < bytes.len() {
            match Pin::new(&mut this.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        let claimed = *claimed;
        this.replacement = None;
        Poll::Ready(Ok(claimed))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    /// Not vectored: hyper then writes each reply head as the start of one buffer, where
    /// [`automatic_reply`] looks for it.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_bodiless_error_heads_are_replaced() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Mon, 01 Dec 2025 00:00:00 GMT\r\n\r\n";
        assert_eq!(
            automatic_reply(hyper_431),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        assert_eq!(
            automatic_reply(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"),
            Some(StatusCode::BAD_REQUEST)
        );
        // The router's replies have a content type (and a body).
        assert_eq!(
            automatic_reply(
                b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 9\r\n\r\n{\"a\":1}"
            ),
            None
        );
        assert_eq!(
            automatic_reply(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
            None
        );
        assert_eq!(automatic_reply(b"data: HTTP/1.1 400"), None);
        let reply = String::from_utf8(json_reply(StatusCode::URI_TOO_LONG)).unwrap();
        let (head, body) = reply.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "uri_too_long");
    }

    /// Takes at most `chunk` bytes per write.
    struct Trickle {
        out: Vec<u8>,
        chunk: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.chunk);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Writes `buf` the way hyper does: again with the rest after each short write.
    fn write_all(io: &mut JsonErrorIo<Trickle>, mut buf: &[u8]) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        while !buf.is_empty() {
            match Pin::new(&mut *io).poll_write(&mut cx, buf) {
                Poll::Ready(Ok(n)) => buf = &buf[n..],
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_body_resumed_after_a_short_write_is_never_taken_for_a_reply_head() {
        let mut io = JsonErrorIo {
            inner: Trickle {
                out: Vec::new(),
                chunk: 17,
            },
            metrics: None,
            replacement: None,
            mid_buffer: false,
        };
        // A reply whose rest, after the first 17-byte write, reads like hyper's bodiless 400.
        let mut reply = b"HTTP/1.1 200 OK\r\n".to_vec();
        reply.extend_from_slice(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
        write_all(&mut io, &reply);
        assert_eq!(io.inner.out, reply);
        // A fresh buffer that is hyper's reply is still replaced.
        io.inner.out.clear();
        write_all(
            &mut io,
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
        );
        assert!(
            io.inner
                .out
                .starts_with(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json")
        );
    }
}
