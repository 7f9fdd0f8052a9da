//! The daemon's HTTP endpoint (axum, on the run's tokio runtime).
//!
//! | route | what |
//! |---|---|
//! | `GET /metrics` | Prometheus text format (`runtime::metrics::CATALOG`) |
//! | `GET /status` | JSON: run, state, step, total steps, depth, stack (layer ids, devices), placement, paused, ETA |
//! | `POST /control/pause` | stop issuing steps at the next step boundary |
//! | `POST /control/resume` | continue |
//! | `POST /control/checkpoint` | write a checkpoint at the next step boundary; answers its path and step |
//! | `POST /control/grow` | apply the next expansion of the growth plan now; answers the new depth |
//! | `POST /control/stop` | finish the step, checkpoint, exit 0 |
//!
//! `/metrics` never waits for the run: it renders the recorder (the metrics actor writes to it),
//! so it answers within milliseconds while a step computes (training compute runs in
//! `block_in_place` and the rayon pool, not on the async workers). `/status` asks the runtime,
//! which answers between micro-batches.
//!
//! Control routes: `Authorization: Bearer <token>` or 401 (nothing is forwarded to the run);
//! 403 when no token is configured; 409 when the run has ended or the request cannot be done
//! (no expansion left in the plan); 504 when the run does not answer in time.

use super::guard::{host_allowed, Guard, Route};
use super::state::{Daemon, Live, Phase};
use crate::runtime::supervisor::SupervisorMsg;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

type Shared = Arc<Daemon>;

pub fn router(d: Shared) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/control/{action}", post(control))
        .with_state(d)
}

/// Serve the endpoint on `listener` until the task is aborted (see [`serve_app`]).
pub async fn serve(listener: tokio::net::TcpListener, d: Shared) {
    let log = d.log.clone();
    serve_app(listener, router(d.clone()), &d.cfg.daemon, move |m| log.say(m)).await
}

/// Serve `app` on `listener` until the task is aborted, within the limits of [`super::guard`]
/// (the one HTTP front of every listener of a run): every connection holds a slot of
/// `daemon.max_connections` (lowered to what the file limit leaves after a reserve for
/// checkpoints), must send its headers within `daemon.header_timeout_s` and is closed after
/// `daemon.idle_timeout_s` without a request; requests pass the `Host` check and the budgets.
pub async fn serve_app(listener: tokio::net::TcpListener, app: Router, dc: &crate::config::DaemonConfig, say: impl Fn(String)) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let (max, lowered) = super::guard::fd_budget(dc.max_connections);
    if let Some(why) = lowered {
        say(format!("note: {why}"));
    }
    let guard = Arc::new(Guard::new(max, dc.rate_limit, dc.global_rate_limit));
    let listen = listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
    let idle_ms = dc.idle_timeout_s * 1000;
    let allowed_hosts: Arc<[String]> = dc.allowed_hosts.clone().into();
    let mut last_warning: Option<std::time::Instant> = None;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors or a transient error: wait, never spin or end the server
                // (and say so at most once a minute).
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    say(format!("warning: HTTP accept: {e}"));
                    last_warning = Some(std::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(conn) = guard.admit(peer.ip()) else {
            drop(stream); // every connection, reserved ones too, is in the middle of a request
            continue;
        };
        let (app, guard, allowed) = (app.clone(), guard.clone(), allowed_hosts.clone());
        let header_timeout = Duration::from_secs(dc.header_timeout_s);
        tokio::spawn(async move {
            let c = conn.clone();
            let g = guard.clone();
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (app, conn, guard, allowed) = (app.clone(), c.clone(), g.clone(), allowed.clone());
                async move {
                    conn.busy.store(true, std::sync::atomic::Ordering::Release);
                    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string);
                    let path = req.uri().path().to_string();
                    let route = match path.as_str() {
                        "/metrics" => Some(Route::Metrics),
                        p if p.starts_with("/control/") => None,
                        _ => Some(Route::Status),
                    };
                    let resp = if !host_allowed(host.as_deref(), listen, &allowed) {
                        let msg = format!("host {:?} is not this endpoint (daemon.allowed_hosts)", host.unwrap_or_default());
                        reply(StatusCode::FORBIDDEN, json!({ "error": msg }))
                    } else if conn.reserved && route == Some(Route::Status) {
                        let msg = "every connection is busy: this reserved one serves /metrics and /control only";
                        reply(StatusCode::SERVICE_UNAVAILABLE, json!({ "error": msg }))
                    } else if route.is_some_and(|r| !guard.allow(peer.ip(), r)) {
                        reply(
                            StatusCode::TOO_MANY_REQUESTS,
                            json!({ "error": "too many requests (daemon.rate_limit, daemon.global_rate_limit)" }),
                        )
                    } else {
                        let mut req = req.map(axum::body::Body::new);
                        req.extensions_mut().insert(ConnectInfo(peer));
                        match tower::ServiceExt::oneshot(app, req).await {
                            Ok(r) => r,
                            Err(e) => match e {},
                        }
                    };
                    conn.served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    conn.last_active_ms.store(guard.now_ms(), std::sync::atomic::Ordering::Relaxed);
                    conn.busy.store(false, std::sync::atomic::Ordering::Release);
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            // Closed when it has been idle too long, or when a new connection needs its slot.
            let idle = async {
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let quiet = guard.now_ms().saturating_sub(conn.last_active_ms.load(std::sync::atomic::Ordering::Relaxed));
                    if !conn.busy.load(std::sync::atomic::Ordering::Acquire) && quiet > idle_ms {
                        break;
                    }
                }
            };
            tokio::select! {
                _ = served => {}
                _ = idle => {}
                _ = conn.close.notified() => {}
            }
            guard.release(&conn);
        });
    }
}

async fn index() -> &'static str {
    "taproot daemon\nGET /metrics\nGET /status\nPOST /control/{pause,resume,checkpoint,grow,stop} (Authorization: Bearer <token>)\n"
}

async fn metrics(State(d): State<Shared>) -> Response {
    crate::runtime::metrics::refresh_scrape_gauges(&d.shared);
    let body = d.prometheus.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

/// The `/status` document.
pub async fn status_json(d: &Daemon) -> serde_json::Value {
    let live = d.live_status().await;
    let phase = d.phase();
    let st = match &live {
        Live::Status(s) => Some(s.clone()),
        _ => d.last_status.lock().expect("status lock").clone(),
    };
    let (state, error) = match &phase {
        Phase::Running if matches!(live, Live::Restarting) => ("restarting", None),
        Phase::Running if st.as_ref().is_some_and(|s| s.paused) => ("paused", None),
        Phase::Running => ("running", None),
        Phase::Stopping => ("stopping", None),
        Phase::Finished => ("finished", None),
        Phase::Failed(e) => ("failed", Some(e.clone())),
    };
    let cfg = &d.cfg;
    let mut doc = json!({
        "run": cfg.run.name,
        "state": state,
        "error": error,
        "pid": std::process::id(),
        "listen": d.listen.lock().expect("listen lock").clone(),
        "total_steps": cfg.run.steps,
        "target_depth": cfg.target_depth(),
        "control": d.token.lock().expect("token lock").is_some(),
        // true: the run did not answer in time (busy with a long checkpoint or growth); the
        // fields below are the last status it gave.
        "stale": matches!(live, Live::NoAnswer),
    });
    if d.topo.size() > 1 {
        let m = doc.as_object_mut().expect("object");
        m.insert("rank".into(), json!(d.topo.rank()));
        m.insert("replica".into(), json!(d.topo.replica));
        m.insert("stage".into(), json!(d.topo.stage));
        m.insert("processes".into(), json!(d.topo.size()));
    }
    if let Some(s) = st {
        let m = doc.as_object_mut().expect("object");
        m.insert("step".into(), json!(s.step));
        m.insert("depth".into(), json!(s.depth));
        m.insert("stack".into(), json!(s.stack.iter().map(|(id, dev)| json!({"id": id, "device": dev})).collect::<Vec<_>>()));
        m.insert("placement".into(), json!(s.placement));
        m.insert("paused".into(), json!(s.paused));
        m.insert("in_flight".into(), json!(s.in_flight));
        m.insert("elapsed_s".into(), json!(s.elapsed_s));
        m.insert("eta_s".into(), json!(s.eta_s));
    }
    doc
}

async fn status(State(d): State<Shared>) -> Response {
    Json(status_json(&d).await).into_response()
}

fn reply(code: StatusCode, body: serde_json::Value) -> Response {
    (code, Json(body)).into_response()
}

/// Constant-time comparison (the token must not leak through response timing).
fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

async fn control(
    State(d): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(action): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !matches!(action.as_str(), "pause" | "resume" | "checkpoint" | "grow" | "stop") {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": format!("unknown control action {action:?} (pause, resume, checkpoint, grow, stop)")}),
        );
    }
    if !d.topo.is_lead() {
        return reply(
            StatusCode::MISDIRECTED_REQUEST,
            json!({"error": format!("this is rank {} of a {}-process run: control requests go to rank 0, which passes them to every rank", d.topo.rank(), d.topo.size())}),
        );
    }
    let expected = d.token.lock().expect("token lock").clone();
    let Some(expected) = expected else {
        d.log.say(format!("control {action} from {peer}: refused (403: control is disabled, no token configured)"));
        return reply(
            StatusCode::FORBIDDEN,
            json!({"error": "control endpoints are disabled: no token configured (daemon.token_file or TAPROOT_TOKEN)"}),
        );
    };
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    if !given.is_some_and(|g| same(g.as_bytes(), expected.as_bytes())) {
        d.log.say(format!("control {action} from {peer}: refused (401: {} token)", if given.is_some() { "wrong" } else { "no" }));
        let mut r = reply(StatusCode::UNAUTHORIZED, json!({"error": "missing or wrong bearer token"}));
        r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer realm=\"taproot\""));
        return r;
    }
    let phase = d.phase();
    if action == "stop" {
        d.log.say(format!("control stop from {peer}"));
        d.request_stop("POST /control/stop");
        return reply(
            StatusCode::ACCEPTED,
            json!({"stopping": true, "note": "the current step finishes, a checkpoint is written, then the daemon exits"}),
        );
    }
    if phase != Phase::Running {
        let state = match phase {
            Phase::Stopping => "stopping",
            Phase::Finished => "finished",
            _ => "failed",
        };
        return reply(StatusCode::CONFLICT, json!({"error": format!("the run is {state}")}));
    }
    d.log.say(format!("control {action} from {peer}"));
    let t = &d.supervisor;
    let wait = Some(Duration::from_secs(600));
    match action.as_str() {
        "pause" => {
            let _ = t.cast(SupervisorMsg::Pause);
            reply(StatusCode::OK, json!({"paused": true, "note": "takes effect at the next step boundary"}))
        }
        "resume" => {
            let _ = t.cast(SupervisorMsg::Resume);
            reply(StatusCode::OK, json!({"paused": false}))
        }
        "checkpoint" => match t.call(SupervisorMsg::CheckpointNow, wait).await {
            Ok(ractor::rpc::CallResult::Success(Ok(path))) => {
                let step = crate::checkpoint::read_meta(&path).map(|m| m.step).ok();
                reply(StatusCode::OK, json!({"path": path, "step": step}))
            }
            Ok(ractor::rpc::CallResult::Success(Err(e))) => reply(StatusCode::CONFLICT, json!({"error": e.to_string()})),
            other => reply(StatusCode::GATEWAY_TIMEOUT, json!({"error": format!("the run did not answer: {}", describe(other))})),
        },
        "grow" => match t.call(SupervisorMsg::GrowNow, wait).await {
            Ok(ractor::rpc::CallResult::Success(Ok(depth))) => reply(StatusCode::OK, json!({"depth": depth})),
            Ok(ractor::rpc::CallResult::Success(Err(e))) => reply(StatusCode::CONFLICT, json!({"error": e.to_string()})),
            other => reply(StatusCode::GATEWAY_TIMEOUT, json!({"error": format!("the run did not answer: {}", describe(other))})),
        },
        _ => unreachable!("checked above"),
    }
}

fn describe<T>(r: Result<ractor::rpc::CallResult<T>, ractor::MessagingErr<SupervisorMsg>>) -> String {
    match r {
        Ok(ractor::rpc::CallResult::Success(_)) => "answered".into(),
        Ok(ractor::rpc::CallResult::Timeout) => "timed out".into(),
        Ok(ractor::rpc::CallResult::SenderError) => "the run ended before answering".into(),
        Err(e) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_comparison() {
        assert!(super::same(b"abc", b"abc"));
        assert!(!super::same(b"abc", b"abd"));
        assert!(!super::same(b"abc", b"ab"));
        assert!(!super::same(b"", b"a"));
        assert!(super::same(b"", b""));
    }
}
