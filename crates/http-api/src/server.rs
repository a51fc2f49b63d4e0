//! The HTTP server: our own accept loop over hyper, so every connection is bounded in number and
//! in time (axum's `serve` bounds neither).
//!
//! Invariants:
//! - At most [`ConnectionLimits::max_connections`] connections are open, and at most
//!   [`ConnectionLimits::max_connections_per_ip`] from one client address (IPv6 addresses count
//!   by their /64 prefix, which one client usually holds whole).
//! - A new connection that would exceed a limit first sheds an idle connection (one with no
//!   request being served): the oldest idle one of the same address for the per-address limit,
//!   the oldest idle one of the address holding the most connections for the overall limit. Only
//!   when nothing idle can be shed is the new connection refused, with a `503` and
//!   `retry-after`. A connection serving a request, or still writing its reply, is never shed.
//! - A connection must deliver a complete request head within
//!   [`ConnectionLimits::header_read_timeout`] of being opened or of its previous response
//!   (hyper's header timer): this closes connections that send nothing, idle keep-alive
//!   connections, and slow-loris headers. Bodies are bounded by the router's
//!   `body_read_timeout` (408). A response the client does not read for
//!   [`ConnectionLimits::send_timeout`] closes the connection.
//! - Every connection closed by the server is counted in `/metrics` with its reason
//!   ([`crate::HttpMetrics`]) and logged, at most one line per reason every
//!   [`SHED_LOG_INTERVAL`].

use crate::HttpMetrics;
use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tower::ServiceExt;

/// Limits on the HTTP server's connections.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Most connections open at once; `None` derives it from the process's file limit
    /// ([`default_max_connections`]).
    pub max_connections: Option<usize>,
    /// Most connections open at once from one client address (/64 for IPv6); `None` is a quarter
    /// of `max_connections`.
    pub max_connections_per_ip: Option<usize>,
    /// Time a connection has to send a complete request head, counted from its opening or from
    /// its previous response.
    pub header_read_timeout: Duration,
    /// Longest a response may wait for the client to read it.
    pub send_timeout: Duration,
}

/// Default [`ConnectionLimits::header_read_timeout`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(20);

/// Default [`ConnectionLimits::send_timeout`].
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// The most connections [`default_max_connections`] allows, whatever the file limit: each open
/// connection holds buffers and a task (tens of KiB), so more would be memory rather than service.
pub const MAX_DEFAULT_CONNECTIONS: usize = 10_000;

/// File descriptors kept for everything but client connections (block log, checkpoints, peers),
/// on top of a tenth of the limit.
pub const RESERVED_FILE_DESCRIPTORS: u64 = 256;

/// At most one log line per reason for shed or refused connections in this interval.
pub const SHED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How often send timeouts are checked.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// How long shutdown waits for connections to finish their requests before closing them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: None,
            max_connections_per_ip: None,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            send_timeout: DEFAULT_SEND_TIMEOUT,
        }
    }
}

/// The default connection cap for a process allowed `file_limit` open files: what is left after
/// [`RESERVED_FILE_DESCRIPTORS`] and a tenth of the limit, at most [`MAX_DEFAULT_CONNECTIONS`],
/// at least 16.
pub fn default_max_connections(file_limit: u64) -> usize {
    let left = file_limit
        .saturating_sub(RESERVED_FILE_DESCRIPTORS)
        .saturating_sub(file_limit / 10);
    usize::try_from(left)
        .unwrap_or(usize::MAX)
        .clamp(16, MAX_DEFAULT_CONNECTIONS)
}

/// The limits in force: `limits` with its defaults resolved for `file_limit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResolvedLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Most connections open at once from one address.
    pub max_connections_per_ip: usize,
}

impl ConnectionLimits {
    /// The caps in force for a process allowed `file_limit` open files.
    pub fn resolve(&self, file_limit: u64) -> ResolvedLimits {
        let max_connections = self
            .max_connections
            .unwrap_or_else(|| default_max_connections(file_limit))
            .max(1);
        let max_connections_per_ip = self
            .max_connections_per_ip
            .unwrap_or(max_connections / 4)
            .clamp(1, max_connections);
        ResolvedLimits {
            max_connections,
            max_connections_per_ip,
        }
    }
}

/// Why the server closed (or refused) a connection: the `reason` label of the metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum CloseReason {
    /// No complete request head within `header_read_timeout`.
    HeaderTimeout,
    /// A response waited longer than `send_timeout` for the client to read it.
    SendTimeout,
    /// Idle, and its address was at its limit when the same address opened another.
    ShedPerIp,
    /// Idle, and the server was full when another connection arrived.
    ShedFull,
    /// Refused at once: its address was at its limit with nothing idle to shed.
    RefusedPerIp,
    /// Refused at once: the server was full with nothing idle to shed.
    RefusedFull,
}

impl CloseReason {
    pub(crate) fn label(self) -> &'static str {
        match self {
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::SendTimeout => "send_timeout",
            CloseReason::ShedPerIp => "shed_idle_per_ip",
            CloseReason::ShedFull => "shed_idle_full",
            CloseReason::RefusedPerIp => "refused_per_ip",
            CloseReason::RefusedFull => "refused_full",
        }
    }
}

/// The client address connections are counted by: the address itself for IPv4, its /64 prefix
/// for IPv6 (IPv4-mapped IPv6 addresses count as IPv4).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
        },
    }
}

/// What the server watches of one connection, shared with its task.
struct ConnState {
    /// Requests being served on it (hyper's HTTP/1 serves one at a time).
    in_flight: AtomicU32,
    /// Milliseconds since the epoch plus one when a write started waiting for the client; 0 when
    /// no write waits.
    write_blocked_since_ms: AtomicU64,
}

struct Entry {
    client: IpAddr,
    state: Arc<ConnState>,
    abort: Option<AbortHandle>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    /// Open connections by id; ids grow, so this is oldest first.
    connections: BTreeMap<u64, Entry>,
    /// Each client's connections, oldest first.
    per_client: BTreeMap<IpAddr, BTreeSet<u64>>,
    /// Clients by how many connections they hold (most last).
    by_count: BTreeSet<(usize, IpAddr)>,
    /// Per reason: when it was last logged and how many went unlogged since.
    log: BTreeMap<CloseReason, (Instant, u64)>,
}

impl Registry {
    fn client_count(&self, client: IpAddr) -> usize {
        self.per_client.get(&client).map_or(0, BTreeSet::len)
    }

    fn insert(&mut self, id: u64, entry: Entry) {
        let client = entry.client;
        let before = self.client_count(client);
        self.by_count.remove(&(before, client));
        self.by_count.insert((before + 1, client));
        self.per_client.entry(client).or_default().insert(id);
        self.connections.insert(id, entry);
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.connections.remove(&id)?;
        let client = entry.client;
        let before = self.client_count(client);
        self.by_count.remove(&(before, client));
        if let Some(ids) = self.per_client.get_mut(&client) {
            ids.remove(&id);
            if ids.is_empty() {
                self.per_client.remove(&client);
            } else {
                self.by_count.insert((ids.len(), client));
            }
        }
        Some(entry)
    }

    /// Idle: no request being served and no reply waiting to be written (hyper may hold a reply
    /// the handler already returned until the client reads it).
    fn is_idle(&self, id: u64) -> bool {
        self.connections.get(&id).is_some_and(|e| {
            e.state.in_flight.load(Ordering::Acquire) == 0
                && e.state.write_blocked_since_ms.load(Ordering::Relaxed) == 0
        })
    }

    /// The oldest idle connection of `client` (of anyone if `None`). The scan stops at the first
    /// idle one, so it costs the number of busy connections older than it (connections serving a
    /// request are few: each holds a request slot or a synchronous call).
    fn oldest_idle(&self, client: Option<IpAddr>) -> Option<u64> {
        match client {
            Some(client) => self
                .per_client
                .get(&client)?
                .iter()
                .copied()
                .find(|id| self.is_idle(*id)),
            None => self
                .connections
                .keys()
                .copied()
                .find(|id| self.is_idle(*id)),
        }
    }

    /// The client holding the most connections.
    fn busiest(&self) -> Option<IpAddr> {
        self.by_count.last().map(|(_, client)| *client)
    }
}

/// The server's view of its connections.
struct Tracker {
    limits: ResolvedLimits,
    send_timeout: Duration,
    epoch: Instant,
    metrics: Arc<HttpMetrics>,
    registry: Mutex<Registry>,
}

enum Admission {
    Admitted(u64, Arc<ConnState>),
    Refused(CloseReason),
}

impl Tracker {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while holding the lock cannot leave the registry half-updated in a way that
        // matters more than refusing service would, so a poisoned lock is used as is.
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes room for a connection from `peer` (shedding an idle one if a limit is reached) and
    /// registers it, or says why it is refused.
    fn admit(&self, peer: SocketAddr) -> Admission {
        let client = client_key(peer.ip());
        let mut registry = self.registry();
        if registry.client_count(client) >= self.limits.max_connections_per_ip {
            match registry.oldest_idle(Some(client)) {
                Some(victim) => self.shed(&mut registry, victim, CloseReason::ShedPerIp),
                None => {
                    self.log(&mut registry, CloseReason::RefusedPerIp, peer);
                    return Admission::Refused(CloseReason::RefusedPerIp);
                }
            }
        } else if registry.connections.len() >= self.limits.max_connections {
            // The address holding the most connections gives one up first, so one client cannot
            // crowd the others out; anyone's idle connection if that address has none idle.
            let victim = registry
                .busiest()
                .and_then(|ip| registry.oldest_idle(Some(ip)))
                .or_else(|| registry.oldest_idle(None));
            match victim {
                Some(victim) => self.shed(&mut registry, victim, CloseReason::ShedFull),
                None => {
                    self.log(&mut registry, CloseReason::RefusedFull, peer);
                    return Admission::Refused(CloseReason::RefusedFull);
                }
            }
        }
        let id = registry.next_id;
        registry.next_id += 1;
        let state = Arc::new(ConnState {
            in_flight: AtomicU32::new(0),
            write_blocked_since_ms: AtomicU64::new(0),
        });
        registry.insert(
            id,
            Entry {
                client,
                state: state.clone(),
                abort: None,
            },
        );
        self.metrics.connection_opened(registry.connections.len());
        Admission::Admitted(id, state)
    }

    fn set_abort(&self, id: u64, abort: AbortHandle) {
        if let Some(entry) = self.registry().connections.get_mut(&id) {
            entry.abort = Some(abort);
        }
    }

    /// Closes connection `id` now (its task is aborted, which drops the socket).
    fn shed(&self, registry: &mut Registry, id: u64, reason: CloseReason) {
        if let Some(entry) = registry.remove(id) {
            if let Some(abort) = entry.abort {
                abort.abort();
            }
            self.metrics
                .connection_closed(reason.label(), registry.connections.len());
            let peer = SocketAddr::new(entry.client, 0);
            self.log(registry, reason, peer);
        }
    }

    /// A connection's task ended by itself.
    fn finished(&self, id: u64, reason: Option<CloseReason>) {
        let mut registry = self.registry();
        if let Some(entry) = registry.remove(id) {
            let label = reason.map_or("client_or_done", CloseReason::label);
            self.metrics
                .connection_closed(label, registry.connections.len());
            if let Some(reason) = reason {
                self.log(&mut registry, reason, SocketAddr::new(entry.client, 0));
            }
        }
    }

    /// Closes connections whose responses waited longer than `send_timeout` for the client.
    fn sweep(&self) {
        let now = self.now_ms();
        let limit = u64::try_from(self.send_timeout.as_millis()).unwrap_or(u64::MAX);
        let mut registry = self.registry();
        let stalled: Vec<u64> = registry
            .connections
            .iter()
            .filter(|(_, e)| {
                let since = e.state.write_blocked_since_ms.load(Ordering::Relaxed);
                since != 0 && now.saturating_sub(since - 1) > limit
            })
            .map(|(id, _)| *id)
            .collect();
        for id in stalled {
            self.shed(&mut registry, id, CloseReason::SendTimeout);
        }
    }

    fn log(&self, registry: &mut Registry, reason: CloseReason, peer: SocketAddr) {
        let now = Instant::now();
        let open = registry.connections.len();
        match registry.log.get_mut(&reason) {
            Some((last, unlogged)) if now.duration_since(*last) < SHED_LOG_INTERVAL => {
                *unlogged += 1;
            }
            slot => {
                let unlogged = slot.map_or(0, |(_, n)| *n);
                tracing::warn!(
                    reason = reason.label(),
                    client = %peer.ip(),
                    open,
                    max_connections = self.limits.max_connections,
                    max_connections_per_ip = self.limits.max_connections_per_ip,
                    more_since_last_report = unlogged,
                    "HTTP connection closed by the server"
                );
                registry.log.insert(reason, (now, 0));
            }
        }
    }

    fn open(&self) -> usize {
        self.registry().connections.len()
    }

    /// Closes every connection still open (at the end of shutdown's grace period).
    fn abort_all(&self) {
        let mut registry = self.registry();
        let ids: Vec<u64> = registry.connections.keys().copied().collect();
        for id in ids {
            if let Some(entry) = registry.remove(id) {
                if let Some(abort) = entry.abort {
                    abort.abort();
                }
                self.metrics
                    .connection_closed("shutdown", registry.connections.len());
            }
        }
    }
}

/// The TCP stream of one connection, noting when a write waits for the client.
struct TrackedStream {
    inner: TcpStream,
    state: Arc<ConnState>,
    tracker: Arc<Tracker>,
}

impl TrackedStream {
    fn note_write<T>(&self, poll: &Poll<io::Result<T>>) {
        let blocked = &self.state.write_blocked_since_ms;
        if poll.is_pending() {
            if blocked.load(Ordering::Relaxed) == 0 {
                blocked.store(self.tracker.now_ms() + 1, Ordering::Relaxed);
            }
        } else {
            blocked.store(0, Ordering::Relaxed);
        }
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note_write(&poll);
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note_write(&poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The router as a hyper service on one connection: marks the connection busy while a request is
/// served, and gives handlers the peer address (`ConnectInfo<SocketAddr>`).
#[derive(Clone)]
struct ConnectionService {
    router: Router,
    peer: SocketAddr,
    state: Arc<ConnState>,
}

/// Marks a connection idle again when its request is done (or abandoned).
struct Busy {
    state: Arc<ConnState>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<axum::response::Response, Infallible>> + Send>>;

impl hyper::service::Service<hyper::Request<Incoming>> for ConnectionService {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, mut request: hyper::Request<Incoming>) -> Self::Future {
        self.state.in_flight.fetch_add(1, Ordering::AcqRel);
        let busy = Busy {
            state: self.state.clone(),
        };
        request.extensions_mut().insert(ConnectInfo(self.peer));
        let router = self.router.clone();
        Box::pin(async move {
            let response = router.oneshot(request.map(axum::body::Body::new)).await;
            drop(busy);
            response
        })
    }
}

/// A running server's handle: its address, and a way to stop it.
pub struct ServerHandle {
    /// The address it listens on.
    pub local_addr: SocketAddr,
    /// The caps in force.
    pub limits: ResolvedLimits,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// Stops accepting, lets requests in progress finish (closing idle connections at once), and
    /// closes what is left after a grace period.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// Serves `router` on `listener` with `limits` (defaults resolved for `file_limit`, the process's
/// open-file limit). Connection metrics go to `metrics`.
pub fn serve(
    listener: TcpListener,
    router: Router,
    limits: &ConnectionLimits,
    file_limit: u64,
    metrics: Arc<HttpMetrics>,
) -> io::Result<ServerHandle> {
    let local_addr = listener.local_addr()?;
    let resolved = limits.resolve(file_limit);
    let tracker = Arc::new(Tracker {
        limits: resolved,
        send_timeout: limits.send_timeout,
        epoch: Instant::now(),
        metrics,
        registry: Mutex::new(Registry::default()),
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
    tracing::info!(
        %local_addr,
        max_connections = resolved.max_connections,
        max_connections_per_ip = resolved.max_connections_per_ip,
        header_read_timeout_ms = limits.header_read_timeout.as_millis(),
        send_timeout_ms = limits.send_timeout.as_millis(),
        "HTTP server listening"
    );
    let task = tokio::spawn(accept_loop(listener, router, builder, tracker, shutdown_rx));
    Ok(ServerHandle {
        local_addr,
        limits: resolved,
        shutdown,
        task,
    })
}

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    builder: http1::Builder,
    tracker: Arc<Tracker>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_accept_error: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = sweep.tick() => tracker.sweep(),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    accept(stream, peer, &router, &builder, &tracker, &shutdown);
                }
                Err(error) => {
                    // Out of file descriptors or memory: the connection caps should prevent it,
                    // but if another part of the process took the descriptors, back off rather
                    // than spin on a listener that stays readable.
                    if last_accept_error.is_none_or(|t| t.elapsed() >= SHED_LOG_INTERVAL) {
                        tracing::warn!(%error, open = tracker.open(), "accepting an HTTP connection failed");
                        last_accept_error = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while tracker.open() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracker.abort_all();
}

/// The answer to a connection that cannot be admitted.
fn refusal(reason: CloseReason, limits: ResolvedLimits) -> Vec<u8> {
    let body = match reason {
        CloseReason::RefusedPerIp => format!(
            "too many connections from your address (at most {} at once, none idle); close some or retry after 1 s",
            limits.max_connections_per_ip
        ),
        _ => format!(
            "the node has too many connections open (at most {} at once, none idle); retry after 1 s",
            limits.max_connections
        ),
    };
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    router: &Router,
    builder: &http1::Builder,
    tracker: &Arc<Tracker>,
    shutdown: &tokio::sync::watch::Receiver<bool>,
) {
    let (id, state) = match tracker.admit(peer) {
        Admission::Admitted(id, state) => (id, state),
        Admission::Refused(reason) => {
            tracker
                .metrics
                .connection_closed(reason.label(), tracker.open());
            // A fresh socket's send buffer is empty, so this write does not block; whatever does
            // not fit is dropped with the socket.
            let _ = stream.try_write(&refusal(reason, tracker.limits));
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(TrackedStream {
        inner: stream,
        state: state.clone(),
        tracker: tracker.clone(),
    });
    let service = ConnectionService {
        router: router.clone(),
        peer,
        state,
    };
    let connection = builder.serve_connection(io, service);
    let mut shutdown = shutdown.clone();
    let task_tracker = tracker.clone();
    let task = tokio::spawn(async move {
        let mut connection = std::pin::pin!(connection);
        let served = tokio::select! {
            served = connection.as_mut() => served,
            _ = shutdown.changed() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        let reason = match served {
            Err(error) if error.is_timeout() => Some(CloseReason::HeaderTimeout),
            Err(error) => {
                tracing::debug!(%error, %peer, "HTTP connection ended with an error");
                None
            }
            Ok(()) => None,
        };
        task_tracker.finished(id, reason);
    });
    tracker.set_abort(id, task.abort_handle());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_caps_stay_below_the_file_limit() {
        assert_eq!(default_max_connections(1024), 1024 - 256 - 102);
        assert_eq!(default_max_connections(20_000), MAX_DEFAULT_CONNECTIONS);
        assert_eq!(default_max_connections(100), 16);
        let limits = ConnectionLimits::default().resolve(20_000);
        assert_eq!(limits.max_connections, 10_000);
        assert_eq!(limits.max_connections_per_ip, 2_500);
        let explicit = ConnectionLimits {
            max_connections: Some(10),
            max_connections_per_ip: Some(50),
            ..Default::default()
        };
        assert_eq!(
            explicit.resolve(20_000),
            ResolvedLimits {
                max_connections: 10,
                max_connections_per_ip: 10
            }
        );
    }

    #[test]
    fn ipv6_clients_count_by_their_64_prefix() {
        let a: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:0:0:1".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }
}

#[cfg(test)]
mod connection_tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server with `limits` whose `/` answers at once, `/slow` after two seconds and `/big` with
    /// 64 MiB.
    async fn server(limits: ConnectionLimits) -> (ServerHandle, Arc<HttpMetrics>) {
        let router = Router::new()
            .route("/", get(|| async { "ok" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    "slow"
                }),
            )
            .route("/big", get(|| async { vec![7u8; 64 << 20] }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = Arc::new(HttpMetrics::unregistered());
        let handle = serve(listener, router, &limits, 20_000, metrics.clone()).unwrap();
        (handle, metrics)
    }

    /// A connection to `server` from the loopback address `from` (e.g. "127.0.0.2").
    async fn connect(server: SocketAddr, from: &str) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(from.parse().unwrap(), 0))
            .unwrap();
        socket.connect(server).await.unwrap()
    }

    /// Sends a GET for `path` and reads the response head and body (`content-length` framed).
    async fn get_on(stream: &mut TcpStream, path: &str) -> String {
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer).to_string();
            if n == 0
                || text.ends_with("ok")
                || text.ends_with("slow")
                || text.contains("\r\n\r\ntoo many")
                || text.contains("\r\n\r\nthe node has")
            {
                return text;
            }
        }
    }

    /// Whether the server closed `stream` (EOF or reset) within `wait`.
    async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) => panic!("unexpected data"),
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn silent_and_slow_connections_are_closed_after_the_header_timeout() {
        let (server, metrics) = server(ConnectionLimits {
            header_read_timeout: Duration::from_millis(300),
            ..Default::default()
        })
        .await;
        let addr = server.local_addr;
        // Sends nothing.
        let mut silent = connect(addr, "127.0.0.1").await;
        // Slow-loris: a header byte every 50 ms, never finishing.
        let mut slow = connect(addr, "127.0.0.1").await;
        // Keep-alive after a reply.
        let mut kept = connect(addr, "127.0.0.1").await;
        assert!(get_on(&mut kept, "/").await.ends_with("ok"));
        let loris = tokio::spawn(async move {
            for byte in b"GET / HTTP/1.1\r\nhost: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" {
                if slow.write_all(&[*byte]).await.is_err() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            closed_within(&mut slow, Duration::from_secs(2)).await
        });
        assert!(closed_within(&mut silent, Duration::from_secs(3)).await);
        assert!(closed_within(&mut kept, Duration::from_secs(3)).await);
        assert!(loris.await.unwrap(), "the slow-loris connection was closed");
        assert_eq!(metrics.connections_closed("header_timeout"), 3);
        assert_eq!(metrics.connections_open(), 0);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn one_address_sheds_its_own_idle_connections_and_is_refused_when_all_are_busy() {
        let (server, metrics) = server(ConnectionLimits {
            max_connections: Some(100),
            max_connections_per_ip: Some(3),
            ..Default::default()
        })
        .await;
        let addr = server.local_addr;
        let mut idle = Vec::new();
        for _ in 0..3 {
            idle.push(connect(addr, "127.0.0.2").await);
            // Admission is in accept order; let each be accepted before the next.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Another address is not affected by 127.0.0.2's limit.
        let mut other = connect(addr, "127.0.0.3").await;
        assert!(get_on(&mut other, "/").await.ends_with("ok"));
        // The fourth from 127.0.0.2 sheds its oldest idle connection (the first) and is served.
        let mut fourth = connect(addr, "127.0.0.2").await;
        assert!(get_on(&mut fourth, "/").await.ends_with("ok"));
        assert!(closed_within(&mut idle[0], Duration::from_secs(2)).await);
        assert!(!closed_within(&mut idle[1], Duration::from_millis(100)).await);
        assert_eq!(metrics.connections_closed("shed_idle_per_ip"), 1);

        // With all three of 127.0.0.2's connections serving requests, a fourth is refused.
        let mut busy = Vec::new();
        for _ in 0..3 {
            let mut stream = connect(addr, "127.0.0.2").await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            stream
                .write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            busy.push(stream);
        }
        let mut refused = connect(addr, "127.0.0.2").await;
        let answer = get_on(&mut refused, "/").await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("retry-after: 1"), "{answer}");
        assert!(
            answer.contains("too many connections from your address (at most 3"),
            "{answer}"
        );
        assert_eq!(metrics.connections_closed("refused_per_ip"), 1);
        // The busy ones are answered.
        for stream in &mut busy {
            let mut buf = vec![0u8; 4096];
            let n = stream.read(&mut buf).await.unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).ends_with("slow"));
        }
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_connection_still_sending_its_reply_is_not_shed_as_idle() {
        let (server, metrics) = server(ConnectionLimits {
            max_connections: Some(100),
            max_connections_per_ip: Some(2),
            ..Default::default()
        })
        .await;
        let addr = server.local_addr;
        // The oldest connection asks for 64 MiB and does not read it: its reply is in progress.
        let mut sending = connect(addr, "127.0.0.2").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        sending
            .write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut idle = connect(addr, "127.0.0.2").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        // At the address's limit, the newcomer sheds the idle connection, not the older one
        // whose reply is still being written.
        let mut newcomer = connect(addr, "127.0.0.2").await;
        assert!(get_on(&mut newcomer, "/").await.ends_with("ok"));
        assert!(closed_within(&mut idle, Duration::from_secs(2)).await);
        assert_eq!(metrics.connections_closed("shed_idle_per_ip"), 1);
        let mut head = [0u8; 64];
        let n = sending.read(&mut head).await.unwrap();
        assert!(
            String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"),
            "the reply in progress goes on"
        );
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_full_server_sheds_an_idle_connection_of_the_address_holding_most() {
        let (server, metrics) = server(ConnectionLimits {
            max_connections: Some(4),
            max_connections_per_ip: Some(4),
            ..Default::default()
        })
        .await;
        let addr = server.local_addr;
        let mut light = connect(addr, "127.0.0.3").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut heavy = Vec::new();
        for _ in 0..3 {
            heavy.push(connect(addr, "127.0.0.2").await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // 127.0.0.3's connection is the oldest, but 127.0.0.2 holds the most: it gives one up.
        let mut newcomer = connect(addr, "127.0.0.4").await;
        assert!(get_on(&mut newcomer, "/").await.ends_with("ok"));
        assert!(closed_within(&mut heavy[0], Duration::from_secs(2)).await);
        assert!(get_on(&mut light, "/").await.ends_with("ok"));
        assert_eq!(metrics.connections_closed("shed_idle_full"), 1);
        assert_eq!(metrics.connections_open(), 4);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_its_response_is_closed_after_the_send_timeout() {
        let (server, metrics) = server(ConnectionLimits {
            send_timeout: Duration::from_millis(300),
            ..Default::default()
        })
        .await;
        let mut stream = connect(server.local_addr, "127.0.0.1").await;
        stream
            .write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        // Never read: the 64 MiB reply fills the socket buffers and the server's write waits.
        let deadline = Instant::now() + Duration::from_secs(5);
        while metrics.connections_closed("send_timeout") == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(metrics.connections_closed("send_timeout"), 1);
        assert_eq!(metrics.connections_open(), 0);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_and_lets_a_request_finish() {
        let (server, _metrics) = server(ConnectionLimits::default()).await;
        let addr = server.local_addr;
        let mut idle = connect(addr, "127.0.0.1").await;
        let mut busy = connect(addr, "127.0.0.1").await;
        busy.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let stopping = tokio::spawn(server.shutdown());
        assert!(closed_within(&mut idle, Duration::from_secs(1)).await);
        let mut buf = vec![0u8; 4096];
        let n = busy.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("slow"));
        tokio::time::timeout(Duration::from_secs(5), stopping)
            .await
            .expect("shutdown ends once the request is answered")
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
