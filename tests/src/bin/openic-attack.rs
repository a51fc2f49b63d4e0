//! Opens and holds many hostile HTTP connections against a node, for the attack tests and the
//! longer runs in docs/RELIABILITY.md. Standard library plus socket2 (to choose the source
//! address), one thread, so one process holds ten thousand connections cheaply.
//!
//! ```text
//! openic-attack --target 127.0.0.1:8000 --kind half-open --connections 10000 \
//!     --from 127.0.0.2 --sources 4 --hold-secs 30
//! ```
//!
//! Kinds: `idle` (connect, send nothing), `half-open` (send part of a request head, never finish),
//! `slowloris` (send a request head one byte per second, never finishing), `keep-alive` (a
//! well-formed `GET /api/v2/status` once a second on each connection, kept open between them). Connections are spread
//! round-robin over `--sources` consecutive loopback source addresses starting at `--from`. Once a
//! second every connection is checked; one the server closed is opened again, so the pressure
//! lasts for the whole `--hold-secs`. At the end one line of `key=value` counts is printed:
//! `open_ms` (time to open them all once), `opened`, `reopened`, `closed_by_server`, `connect_failed`, `held_at_end`.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Idle,
    HalfOpen,
    Slowloris,
    KeepAlive,
}

/// The request a `keep-alive` connection sends once a second.
const STATUS_REQUEST: &[u8] = b"GET /api/v2/status HTTP/1.1\r\nhost: openic\r\n\r\n";

struct Options {
    target: SocketAddr,
    kind: Kind,
    connections: usize,
    from: Ipv4Addr,
    sources: u8,
    hold: Duration,
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "openic-attack: {problem}\nusage: openic-attack --target ADDR:PORT --kind idle|half-open|slowloris|keep-alive \
         --connections N [--from 127.0.0.2] [--sources 1] [--hold-secs 10]"
    );
    std::process::exit(2)
}

fn options() -> Options {
    let mut options = Options {
        target: SocketAddr::from(([127, 0, 0, 1], 8000)),
        kind: Kind::HalfOpen,
        connections: 1000,
        from: Ipv4Addr::new(127, 0, 0, 2),
        sources: 1,
        hold: Duration::from_secs(10),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let bad = |what: &str| -> ! { usage(&format!("{flag}: not {what}: {value}")) };
        match flag.as_str() {
            "--target" => options.target = value.parse().unwrap_or_else(|_| bad("an address")),
            "--kind" => {
                options.kind = match value.as_str() {
                    "idle" => Kind::Idle,
                    "half-open" => Kind::HalfOpen,
                    "slowloris" => Kind::Slowloris,
                    "keep-alive" => Kind::KeepAlive,
                    _ => bad("a kind"),
                }
            }
            "--connections" => {
                options.connections = value.parse().unwrap_or_else(|_| bad("a count"))
            }
            "--from" => options.from = value.parse().unwrap_or_else(|_| bad("an IPv4 address")),
            "--sources" => options.sources = value.parse().unwrap_or_else(|_| bad("1-255")),
            "--hold-secs" => {
                options.hold =
                    Duration::from_secs(value.parse().unwrap_or_else(|_| bad("seconds")));
            }
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    options.sources = options.sources.max(1);
    options
}

/// Raises the soft open-file limit to the hard one, so one process can hold its connections.
fn raise_file_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    );
}

struct Attacker {
    options: Options,
    /// The request head bytes each connection sends (part of it, or one byte a second).
    head: &'static [u8],
}

/// One held connection: its stream and how many bytes of the head it sent.
struct Held {
    stream: TcpStream,
    sent: usize,
}

impl Attacker {
    fn source(&self, index: usize) -> IpAddr {
        let base = u32::from(self.options.from);
        let offset = u32::try_from(index % usize::from(self.options.sources)).unwrap_or(0);
        IpAddr::V4(Ipv4Addr::from(base.wrapping_add(offset)))
    }

    fn open(&self, index: usize) -> Option<Held> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).ok()?;
        socket
            .bind(&SockAddr::from(SocketAddr::new(self.source(index), 0)))
            .ok()?;
        socket
            .connect_timeout(&SockAddr::from(self.options.target), Duration::from_secs(3))
            .ok()?;
        let mut stream: TcpStream = socket.into();
        let sent = match self.options.kind {
            Kind::Idle => 0,
            // Everything but the head's end: the server waits for the rest.
            Kind::HalfOpen => {
                stream.write_all(self.head).ok()?;
                self.head.len()
            }
            Kind::Slowloris => {
                stream.write_all(&self.head[..1]).ok()?;
                1
            }
            Kind::KeepAlive => {
                stream.write_all(STATUS_REQUEST).ok()?;
                0
            }
        };
        stream.set_nonblocking(true).ok()?;
        Some(Held { stream, sent })
    }

    /// Whether the server closed `held`: end of stream or a reset; for the kinds that never
    /// finish a request, any answer (a 503 or 408) too. A `keep-alive` connection's answers are
    /// read and dropped.
    fn closed(&self, held: &mut Held) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match held.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) if self.options.kind == Kind::KeepAlive => {}
                Ok(_) => return true,
                Err(error) => return error.kind() != ErrorKind::WouldBlock,
            }
        }
    }
}

fn main() {
    let options = options();
    raise_file_limit();
    let attacker = Attacker {
        options,
        head: b"POST /api/v2/status HTTP/1.1\r\nhost: openic\r\nx-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    };
    let (mut opened, mut reopened, mut closed_by_server, mut connect_failed) =
        (0u64, 0u64, 0u64, 0u64);
    let started = Instant::now();
    let mut held: Vec<Option<Held>> = Vec::with_capacity(attacker.options.connections);
    for index in 0..attacker.options.connections {
        let connection = attacker.open(index);
        match connection {
            Some(_) => opened += 1,
            None => connect_failed += 1,
        }
        held.push(connection);
    }
    let open_ms = started.elapsed().as_millis();
    let end = Instant::now() + attacker.options.hold;
    while Instant::now() < end {
        let pass = Instant::now();
        for (index, slot) in held.iter_mut().enumerate() {
            if let Some(connection) = slot {
                if attacker.closed(connection) {
                    closed_by_server += 1;
                    *slot = None;
                } else if attacker.options.kind == Kind::KeepAlive {
                    // A would-block write is a client slower than its requests; skip a beat.
                    let _ = connection.stream.write(STATUS_REQUEST);
                } else if attacker.options.kind == Kind::Slowloris
                    && connection.sent < attacker.head.len()
                {
                    let byte = [attacker.head[connection.sent]];
                    if connection.stream.write(&byte).is_ok() {
                        connection.sent += 1;
                    }
                }
            }
            if slot.is_none() && Instant::now() < end {
                *slot = attacker.open(index);
                match slot {
                    Some(_) => reopened += 1,
                    None => connect_failed += 1,
                }
            }
        }
        let rest = Duration::from_secs(1).saturating_sub(pass.elapsed());
        std::thread::sleep(rest.min(end.saturating_duration_since(Instant::now())));
    }
    let held_at_end = held
        .iter_mut()
        .flatten()
        .filter_map(|connection| (!attacker.closed(connection)).then_some(()))
        .count();
    println!(
        "open_ms={open_ms} opened={opened} reopened={reopened} closed_by_server={closed_by_server} \
         connect_failed={connect_failed} held_at_end={held_at_end}"
    );
}
