// SPDX-License-Identifier: Apache-2.0
//! A minimal HTTP/1.1 server for `/healthz`, `/readyz` and `/metrics`.
//!
//! Probes and Prometheus send one small GET per connection; the server reads
//! the request head (bounded in size and time), answers and closes. Nothing
//! else is supported, so no HTTP framework is needed.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::AgentState;

const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// An answer: status line, content type and body.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    pub fn to_bytes(&self, head_only: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            503 => "Service Unavailable",
            _ => "Error",
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if !head_only {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

/// The method and path of a request head, if it is one.
pub fn parse_request_line(head: &str) -> Option<(&str, &str)> {
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    let method = parts.next()?;
    let target = parts.next()?;
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target);
    Some((method, path))
}

/// What the agent answers; `metrics` renders the Prometheus text (it reads
/// the pinned maps, so it is only called for `/metrics`).
pub fn respond(
    method: &str,
    path: &str,
    state: &AgentState,
    metrics: impl FnOnce() -> String,
) -> Response {
    if method != "GET" && method != "HEAD" {
        return Response::text(405, "only GET\n");
    }
    match path {
        "/healthz" => Response::text(200, "ok\n"),
        "/readyz" => {
            let s = state.snapshot();
            if s.ready {
                Response::text(200, "ready\n")
            } else {
                let mut waiting = Vec::new();
                if !s.conflist_written {
                    waiting.push("conflist not written");
                }
                if !s.routes_synced {
                    waiting.push("first route sync not done");
                }
                Response::text(503, format!("not ready: {}\n", waiting.join(", ")))
            }
        }
        "/metrics" => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: metrics(),
        },
        _ => Response::text(404, "not found\n"),
    }
}

/// Serves forever.
pub async fn serve(listener: TcpListener, state: Arc<AgentState>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of descriptors, or a connection reset before accept:
            // transient, and the probes must keep working afterwards.
            Err(e) => {
                log::warn!("http: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, state).await {
                log::debug!("http: {e}");
            }
        });
    }
}

async fn handle(mut stream: TcpStream, state: Arc<AgentState>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<(), std::io::Error>(())
    };
    if tokio::time::timeout(READ_TIMEOUT, read).await.is_err() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&head);
    let response = match parse_request_line(&text) {
        None => (Response::text(400, "bad request\n"), false),
        Some((method, path)) => {
            let head_only = method == "HEAD";
            let wants_metrics = path == "/metrics";
            let body = if wants_metrics && (method == "GET" || head_only) {
                // Reading the maps is a few syscalls per pod: off the
                // async threads.
                let s = state.clone();
                Some(
                    tokio::task::spawn_blocking(move || s.render())
                        .await
                        .unwrap_or_default(),
                )
            } else {
                None
            };
            (
                respond(method, path, &state, || body.unwrap_or_default()),
                head_only,
            )
        }
    };
    stream.write_all(&response.0.to_bytes(response.1)).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn parses_request_lines() {
        assert_eq!(
            parse_request_line("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(
            parse_request_line("GET /readyz?verbose HTTP/1.0\r\n\r\n"),
            Some(("GET", "/readyz"))
        );
        assert_eq!(parse_request_line("garbage"), None);
        assert_eq!(parse_request_line("GET / SPDY/3\r\n"), None);
    }

    #[test]
    fn health_readiness_and_metrics() {
        let state = AgentState::default();
        assert_eq!(respond("GET", "/healthz", &state, String::new).status, 200);
        let r = respond("GET", "/readyz", &state, String::new);
        assert_eq!(r.status, 503);
        assert_eq!(
            r.body,
            "not ready: conflist not written, first route sync not done\n"
        );
        state.conflist_written.store(true, Ordering::Relaxed);
        let r = respond("GET", "/readyz", &state, String::new);
        assert_eq!(r.body, "not ready: first route sync not done\n");
        state.routes_synced.store(true, Ordering::Relaxed);
        assert_eq!(respond("GET", "/readyz", &state, String::new).status, 200);
        let m = respond("GET", "/metrics", &state, || "x 1\n".into());
        assert_eq!((m.status, m.body.as_str()), (200, "x 1\n"));
        assert!(m.content_type.starts_with("text/plain; version=0.0.4"));
        assert_eq!(respond("GET", "/", &state, String::new).status, 404);
        assert_eq!(respond("POST", "/healthz", &state, String::new).status, 405);
    }

    #[test]
    fn response_bytes() {
        let r = Response::text(200, "ok\n");
        assert_eq!(
            String::from_utf8(r.to_bytes(false)).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
        );
        assert!(String::from_utf8(r.to_bytes(true))
            .unwrap()
            .ends_with("\r\n\r\n"));
    }

    #[test]
    fn serves_over_tcp() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let state = Arc::new(AgentState::default());
            tokio::spawn(serve(listener, state.clone()));
            let get = |path: &'static str| async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).await.unwrap();
                out
            };
            assert!(get("/healthz").await.starts_with("HTTP/1.1 200 OK\r\n"));
            assert!(get("/readyz").await.starts_with("HTTP/1.1 503 "));
            let m = get("/metrics").await;
            assert!(m.contains("\r\n\r\n# HELP ferrite_agent_ready"), "{m}");
        });
    }
}
