//! Plumbing shared by the provider fakes: a loopback server whose handlers
//! can drop their own connection, and the failure-injection knobs.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Serves `router` on 127.0.0.1 (any free port). Must be called inside a
/// tokio runtime. Returns the base URL and the server task.
pub fn serve(router: Router) -> (String, JoinHandle<()>) {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    std_listener.set_nonblocking(true).expect("nonblocking listener");
    let addr = std_listener.local_addr().expect("local addr");
    let listener = KillableListener(TcpListener::from_std(std_listener).expect("tokio listener (inside a runtime?)"));
    let app = router.into_make_service_with_connect_info::<Conn>();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), task)
}

/// Handle on the connection a request came in on; `kill` makes the server
/// close it without writing a response.
#[derive(Clone, Debug)]
pub struct Conn(Arc<AtomicBool>);

impl Conn {
    pub fn kill(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Connected<IncomingStream<'_, KillableListener>> for Conn {
    fn connect_info(stream: IncomingStream<'_, KillableListener>) -> Self {
        Conn(stream.io().killed.clone())
    }
}

pub struct KillableListener(TcpListener);

impl Listener for KillableListener {
    type Io = KillableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((inner, addr)) => {
                    return (KillableStream { inner, killed: Arc::new(AtomicBool::new(false)) }, addr);
                }
                // Transient accept errors (e.g. out of descriptors): try again.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// A TCP stream that fails every write once killed, so hyper gives up on the
/// connection and drops (closes) the socket before any response byte leaves.
pub struct KillableStream {
    inner: TcpStream,
    killed: Arc<AtomicBool>,
}

fn killed_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "fake: connection dropped on purpose")
}

impl AsyncRead for KillableStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.killed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.killed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.killed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A verbatim answer: status, headers, body.
type RawAnswer = (StatusCode, Vec<(String, String)>, Vec<u8>);

/// Failures a test asks for, consumed in arrival order by the next requests.
#[derive(Default)]
pub struct Faults {
    fail: Mutex<VecDeque<(StatusCode, Option<String>)>>,
    /// Answers given verbatim instead of the provider's wording: odd bodies
    /// (a NUL byte), redirects (status and Location).
    raw: Mutex<VecDeque<RawAnswer>>,
    delay: Mutex<Duration>,
    resets: AtomicUsize,
}

/// What the fake should do with a request before looking at it.
enum Injected {
    /// Close the connection without answering.
    Reset,
    /// Answer this status (with Retry-After if given).
    Fail(StatusCode, Option<String>),
    /// Answer exactly this.
    Raw(StatusCode, Vec<(String, String)>, Vec<u8>),
    /// Handle it normally.
    None,
}

impl Faults {
    pub fn fail_next(&self, n: usize, status: u16, retry_after: Option<&str>) {
        let status = StatusCode::from_u16(status).expect("valid HTTP status");
        let mut q = self.fail.lock().unwrap();
        for _ in 0..n {
            q.push_back((status, retry_after.map(str::to_string)));
        }
    }

    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().unwrap() = d;
    }

    /// The next request gets exactly this status, these headers and this body.
    pub fn answer_next_raw(&self, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        let status = StatusCode::from_u16(status).expect("valid HTTP status");
        let headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.raw.lock().unwrap().push_back((status, headers, body.to_vec()));
    }

    /// Back to healthy: no queued failures, no delay, no resets.
    pub fn clear(&self) {
        self.fail.lock().unwrap().clear();
        self.raw.lock().unwrap().clear();
        *self.delay.lock().unwrap() = Duration::ZERO;
        self.resets.store(0, Ordering::SeqCst);
    }

    pub fn reset_connections_next(&self, n: usize) {
        self.resets.fetch_add(n, Ordering::SeqCst);
    }

    /// Waits the configured delay, then applies the next injected fault:
    /// `Some(response)` to return at once (for a reset the connection is
    /// dropped and nothing is written), `None` to handle the request normally.
    /// `fail` words an injected failure the way the provider would.
    pub async fn intercept(
        &self,
        conn: &Conn,
        fail: impl FnOnce(StatusCode, Option<String>) -> Response,
    ) -> Option<Response> {
        match self.next().await {
            Injected::Reset => {
                conn.kill();
                Some(StatusCode::INTERNAL_SERVER_ERROR.into_response())
            }
            Injected::Fail(status, retry_after) => Some(fail(status, retry_after)),
            Injected::Raw(status, headers, body) => {
                let mut resp = (status, body).into_response();
                for (k, v) in headers {
                    let name = axum::http::HeaderName::from_bytes(k.as_bytes()).expect("header name");
                    resp.headers_mut().insert(name, HeaderValue::from_str(&v).expect("header value"));
                }
                Some(resp)
            }
            Injected::None => None,
        }
    }

    /// Waits the configured delay, then says which fault (if any) applies.
    async fn next(&self) -> Injected {
        let delay = *self.delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let took_reset = self.resets.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if took_reset {
            return Injected::Reset;
        }
        if let Some((status, headers, body)) = self.raw.lock().unwrap().pop_front() {
            return Injected::Raw(status, headers, body);
        }
        match self.fail.lock().unwrap().pop_front() {
            Some((status, retry_after)) => Injected::Fail(status, retry_after),
            None => Injected::None,
        }
    }
}

/// A response carrying `body` and, if given, a `Retry-After` header.
pub fn with_retry_after(status: StatusCode, retry_after: Option<String>, body: Response) -> Response {
    let mut resp = (status, body).into_response();
    if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
        resp.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
    }
    resp
}

/// `application/x-www-form-urlencoded` decoding of one query component.
pub fn form_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}
