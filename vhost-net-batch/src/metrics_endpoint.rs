//! The `/metrics` HTTP endpoint: one thread, bounded.
//!
//! It answers `GET /metrics` (anything else gets 404, a malformed request 400) and closes the
//! connection. Nothing a client does can take more than its share:
//! - at most [`MAX_CONNECTIONS`] connections are open; a new one beyond that closes the oldest
//!   (which cannot have sent a whole request yet: complete ones are answered at once), so idle
//!   connections never lock others out and never exhaust descriptors;
//! - a request head must arrive whole within [`REQUEST_TIMEOUT`] and fit in
//!   [`MAX_REQUEST`] bytes (else 431 and close);
//! - a reply is written without blocking: a client that does not read keeps only its own
//!   connection waiting, until the same timeout closes it.
//!
//! A thread per connection (what tiny_http did) let a thousand idle connections cost a thousand
//! threads and descriptors. A maintained async server (hyper on a small runtime) was weighed:
//! it brings the timeouts, but the eviction of idle connections under a limit still has to be
//! written, and the endpoint serves one GET; this loop is smaller than the glue would be.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Connections open at once; a new one closes the oldest.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest request head accepted.
pub const MAX_REQUEST: usize = 8192;
/// How long a connection may take to send its request and read the reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

enum State {
    Reading(Vec<u8>),
    Writing(Vec<u8>, usize),
}

struct Conn {
    stream: TcpStream,
    since: Instant,
    state: State,
}

/// The reply to a request head.
fn respond(head: &[u8], body: &dyn Fn() -> String) -> Vec<u8> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (status, ctype, body) = match (words.next(), words.next(), words.next()) {
        (Some("GET"), Some("/metrics"), Some(v)) if v.starts_with("HTTP/") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body(),
        ),
        (Some(_), Some(_), Some(v)) if v.starts_with("HTTP/") => {
            ("404 Not Found", "text/plain", "see /metrics\n".into())
        }
        _ => ("400 Bad Request", "text/plain", "bad request\n".into()),
    };
    format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn head_complete(buf: &[u8]) -> bool {
    buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
}

/// Advances one connection; false when it is done (answered, closed by the peer, or failed).
fn step(c: &mut Conn, body: &dyn Fn() -> String) -> bool {
    loop {
        match &mut c.state {
            State::Reading(buf) => {
                let mut chunk = [0u8; 2048];
                match c.stream.read(&mut chunk) {
                    Ok(0) => return false,
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        if head_complete(buf) {
                            c.state = State::Writing(respond(buf, body), 0);
                        } else if buf.len() >= MAX_REQUEST {
                            c.state = State::Writing(
                                b"HTTP/1.0 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".to_vec(),
                                0,
                            );
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return false,
                }
            }
            State::Writing(out, pos) => match c.stream.write(&out[*pos..]) {
                Ok(n) => {
                    *pos += n;
                    if *pos == out.len() {
                        return false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            },
        }
    }
}

/// Runs the endpoint on `listener` forever, answering with `body()`.
pub fn run(listener: TcpListener, body: &dyn Fn() -> String) {
    let _ = listener.set_nonblocking(true);
    let mut conns: VecDeque<Conn> = VecDeque::new();
    loop {
        let now = Instant::now();
        conns.retain(|c| now.duration_since(c.since) < REQUEST_TIMEOUT);
        let mut pfds = Vec::with_capacity(conns.len() + 1);
        pfds.push(libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        for c in &conns {
            let events = match c.state {
                State::Reading(_) => libc::POLLIN,
                State::Writing(..) => libc::POLLOUT,
            };
            pfds.push(libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events,
                revents: 0,
            });
        }
        let wait = conns
            .iter()
            .map(|c| REQUEST_TIMEOUT.saturating_sub(now.duration_since(c.since)))
            .min()
            .unwrap_or(REQUEST_TIMEOUT);
        // SAFETY: `pfds` is a valid array of pollfd for the call.
        let rc = unsafe {
            libc::poll(
                pfds.as_mut_ptr(),
                pfds.len() as libc::nfds_t,
                wait.as_millis().min(1000) as i32 + 1,
            )
        };
        if rc <= 0 {
            continue;
        }
        // Connections first (their indices shift once new ones arrive).
        let ready: Vec<bool> = pfds[1..].iter().map(|p| p.revents != 0).collect();
        let mut i = 0;
        conns.retain_mut(|c| {
            let keep = !ready[i] || step(c, body);
            i += 1;
            keep
        });
        if pfds[0].revents != 0 {
            loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if stream.set_nonblocking(true).is_err() {
                            continue;
                        }
                        if conns.len() >= MAX_CONNECTIONS {
                            conns.pop_front();
                        }
                        conns.push_back(Conn {
                            stream,
                            since: Instant::now(),
                            state: State::Reading(Vec::new()),
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // WouldBlock: all taken; EMFILE and the like: try again next round.
                    Err(_) => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_answered_by_their_first_line() {
        let body = || "x 1\n".to_string();
        let r =
            String::from_utf8(respond(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n", &body)).unwrap();
        assert!(
            r.starts_with("HTTP/1.0 200 OK\r\n") && r.ends_with("\r\n\r\nx 1\n"),
            "{r}"
        );
        assert!(r.contains("Content-Length: 4\r\n"));
        let r = String::from_utf8(respond(b"GET / HTTP/1.0\r\n\r\n", &body)).unwrap();
        assert!(r.starts_with("HTTP/1.0 404"), "{r}");
        let r = String::from_utf8(respond(b"\x00\x01garbage\n\n", &body)).unwrap();
        assert!(r.starts_with("HTTP/1.0 400"), "{r}");
        assert!(head_complete(b"GET / HTTP/1.0\n\n"));
        assert!(!head_complete(b"GET / HTTP/1.0\r\nHost: a\r\n"));
    }
}
