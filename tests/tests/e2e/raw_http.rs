//! The HTTP layer's envelope checks, exercised with raw HTTP/1.1 over a `TcpStream`.
//!
//! Envelopes are made by ic-agent's own signer (`UpdateBuilder::sign`, so they are byte-for-byte what the
//! real client sends) and then spoiled in exactly one way. Each test first sends the unspoiled envelope and
//! checks it is accepted, so a rejection of the spoiled one can only be caused by the spoiled part.

use crate::support::*;
use candid::Principal;
use ic_agent::identity::BasicIdentity;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime};

/// The IC's limit on an ingress message (and on an HTTP request body).
const INGRESS_BYTES_MAX: usize = 2 * 1024 * 1024;
/// The self-describe CBOR tag 55799 that clients put in front of every body.
const CBOR_SELF_DESCRIBE_TAG: [u8; 3] = [0xd9, 0xd9, 0xf7];
/// Timeout for each raw HTTP exchange.
const RAW_HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// An HTTP response: status code and body.
struct RawResponse {
    status: u16,
    body: Vec<u8>,
}

impl RawResponse {
    fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// POSTs `body` as `application/cbor` to `path` and reads the whole response (`Connection: close`).
///
/// The body is written on another thread while this one reads, so an early answer (413 before the body was
/// read) is still received even if the server closes the connection before reading everything.
fn post_cbor(url: &str, path: &str, body: Vec<u8>) -> RawResponse {
    let authority = url
        .strip_prefix("http://")
        .expect("the node serves plain http")
        .trim_end_matches('/');
    let mut stream = TcpStream::connect(authority)
        .unwrap_or_else(|error| panic!("connect to {authority}: {error}"));
    stream
        .set_read_timeout(Some(RAW_HTTP_TIMEOUT))
        .expect("set_read_timeout");
    stream
        .set_write_timeout(Some(RAW_HTTP_TIMEOUT))
        .expect("set_write_timeout");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/cbor\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut writer = stream.try_clone().expect("clone the TCP stream");
    let write_thread = std::thread::spawn(move || {
        // The server may answer and close before reading the whole body; a failed write is then expected.
        let _ = writer
            .write_all(head.as_bytes())
            .and_then(|()| writer.write_all(&body));
    });
    let mut raw = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => raw.extend_from_slice(&buffer[..read]),
            // A reset after the response arrived (server closed with unread request bytes) ends the response.
            Err(error)
                if !raw.is_empty() && error.kind() == std::io::ErrorKind::ConnectionReset =>
            {
                break;
            }
            Err(error) => panic!("reading the response to POST {path}: {error}"),
        }
    }
    let _ = write_thread.join();
    parse_response(&raw).unwrap_or_else(|error| {
        panic!(
            "bad HTTP response to POST {path}: {error}: {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

fn parse_response(raw: &[u8]) -> Result<RawResponse, String> {
    let head_end = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..head_end])
        .map_err(|error| format!("headers are not UTF-8: {error}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("empty response")?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let chunked = lines.any(|line| {
        let lower = line.to_ascii_lowercase();
        lower.starts_with("transfer-encoding:") && lower.contains("chunked")
    });
    let mut body = raw[head_end + 4..].to_vec();
    if chunked {
        body = decode_chunked(&body)?;
    }
    Ok(RawResponse { status, body })
}

fn decode_chunked(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|window| window == b"\r\n")
            .ok_or("unterminated chunk size")?;
        let size_text =
            std::str::from_utf8(&data[..line_end]).map_err(|_| "chunk size is not text")?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|error| format!("bad chunk size {size_text:?}: {error}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if data.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

fn call_path(canister_id: Principal) -> String {
    format!("/api/v4/canister/{canister_id}/call")
}

/// A node with a `counter` and an Ed25519 agent (so envelopes carry a real signature).
async fn setup() -> (TestNode, ic_agent::Agent, Principal) {
    let node = TestNode::start().await;
    let identity = BasicIdentity::from_raw_key(&[7u8; 32]);
    let agent = connect(&node.url(), Some(Box::new(identity))).await;
    let counter = deploy(&agent, "counter", args(())).await;
    (node, agent, counter)
}

/// A signed `inc` call envelope (CBOR) that expires at `expiry`.
fn signed_inc(
    agent: &ic_agent::Agent,
    counter: Principal,
    expiry: SystemTime,
    arg: Vec<u8>,
) -> Vec<u8> {
    agent
        .update(&counter, "inc")
        .with_arg(arg)
        .expire_at(expiry)
        .sign()
        .expect("ic-agent signs the envelope")
        .signed_update
}

/// Waits until the counter reaches `value` (an accepted call may have been answered 202 before it executed).
async fn wait_for_counter(agent: &ic_agent::Agent, counter: Principal, value: u64) {
    wait_until(&format!("the counter to reach {value}"), || async move {
        counter_value(agent, counter).await >= value
    })
    .await;
}

fn in_two_minutes() -> SystemTime {
    SystemTime::now() + Duration::from_secs(120)
}

fn assert_accepted(response: &RawResponse, what: &str) {
    assert!(
        response.status == 200 || response.status == 202,
        "{what}: the unspoiled envelope must be accepted, got {} {:?}",
        response.status,
        response.body_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signature_is_400() {
    let (mut node, agent, counter) = setup().await;
    let url = node.url();

    let good = signed_inc(&agent, counter, in_two_minutes(), args(()));
    let response = tokio::task::spawn_blocking({
        let (url, good) = (url.clone(), good.clone());
        move || post_cbor(&url, &call_path(counter), good)
    })
    .await
    .expect("raw HTTP thread");
    assert_accepted(&response, "valid signature");

    // Flip one bit of `sender_sig` (a fresh nonce makes it a different request than the one just sent).
    let fresh = signed_inc(&agent, counter, in_two_minutes(), args(()));
    let mut envelope: serde_cbor::Value =
        serde_cbor::from_slice(&fresh).expect("the envelope is CBOR");
    let serde_cbor::Value::Map(fields) = &mut envelope else {
        panic!("the envelope is a CBOR map")
    };
    let Some(serde_cbor::Value::Bytes(signature)) =
        fields.get_mut(&serde_cbor::Value::Text("sender_sig".into()))
    else {
        panic!("a signed envelope has sender_sig bytes")
    };
    signature[10] ^= 0x01;
    let mut spoiled = CBOR_SELF_DESCRIBE_TAG.to_vec();
    spoiled.extend(serde_cbor::to_vec(&envelope).expect("re-encode the envelope"));
    let response =
        tokio::task::spawn_blocking(move || post_cbor(&url, &call_path(counter), spoiled))
            .await
            .expect("raw HTTP thread");
    assert_eq!(
        response.status,
        400,
        "a bad signature must be refused with 400; body: {:?}",
        response.body_text()
    );

    wait_for_counter(&agent, counter, 1).await;
    assert_eq!(
        counter_value(&agent, counter).await,
        1,
        "only the validly signed call ran"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_expiry_out_of_range_is_400() {
    let (mut node, agent, counter) = setup().await;
    let url = node.url();
    let cases = [
        ("valid expiry", in_two_minutes(), true),
        (
            "expired 10 minutes ago",
            SystemTime::now() - Duration::from_secs(600),
            false,
        ),
        (
            "expiring in 1 hour",
            SystemTime::now() + Duration::from_secs(3600),
            false,
        ),
    ];
    for (what, expiry, accepted) in cases {
        let envelope = signed_inc(&agent, counter, expiry, args(()));
        let response = tokio::task::spawn_blocking({
            let url = url.clone();
            move || post_cbor(&url, &call_path(counter), envelope)
        })
        .await
        .expect("raw HTTP thread");
        if accepted {
            assert_accepted(&response, what);
        } else {
            assert_eq!(
                response.status,
                400,
                "{what}: body {:?}",
                response.body_text()
            );
            assert!(
                response.body_text().starts_with("Invalid request expiry: "),
                "{what}: the body must start with \"Invalid request expiry: \" (JS agents look for it to resync \
                 their clock), got {:?}",
                response.body_text()
            );
        }
    }
    wait_for_counter(&agent, counter, 1).await;
    assert_eq!(
        counter_value(&agent, counter).await,
        1,
        "only the call with a valid expiry ran"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_413() {
    let (mut node, agent, counter) = setup().await;
    let url = node.url();

    // An argument just under the 2 MiB limit passes the HTTP layer (whatever the canister makes of it), so
    // the 413 below is about the size, not about big bodies in general.
    let near_limit = signed_inc(
        &agent,
        counter,
        in_two_minutes(),
        args((vec![0u8; INGRESS_BYTES_MAX - 64 * 1024],)),
    );
    assert!(near_limit.len() < INGRESS_BYTES_MAX);
    let response = tokio::task::spawn_blocking({
        let url = url.clone();
        move || post_cbor(&url, &call_path(counter), near_limit)
    })
    .await
    .expect("raw HTTP thread");
    assert_accepted(&response, "an envelope just under 2 MiB");

    // An argument just over 2 MiB (the body is within the envelope allowance), and a body far over the limit.
    for arg_bytes in [INGRESS_BYTES_MAX + 1024, 3 * INGRESS_BYTES_MAX / 2] {
        let oversized = signed_inc(
            &agent,
            counter,
            in_two_minutes(),
            args((vec![0u8; arg_bytes],)),
        );
        let body_bytes = oversized.len();
        let response = tokio::task::spawn_blocking({
            let url = url.clone();
            move || post_cbor(&url, &call_path(counter), oversized)
        })
        .await
        .expect("raw HTTP thread");
        assert_eq!(
            response.status,
            413,
            "a {body_bytes}-byte body (argument {arg_bytes} bytes) must be refused with 413; body: {:?}",
            response.body_text()
        );
    }
    node.shutdown().await;
}
