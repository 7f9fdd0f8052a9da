//! The HTTP endpoint's limits: a cap on open connections (closing the oldest idle one to make
//! room), header and idle timeouts, a per-client request rate for `/metrics` and `/status`, and a
//! `Host` check against DNS rebinding (`[daemon]` keys `max_connections`, `header_timeout_s`,
//! `idle_timeout_s`, `rate_limit`, `allowed_hosts`).
//!
//! Why close the oldest idle connection rather than refuse the new one: a local client holding
//! `max_connections` idle or half-sent connections would otherwise lock every scrape out until
//! its connections time out, and reconnect at once. A connection in the middle of a request is
//! never closed for room: when every connection is busy, the new one is refused.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One open connection, as the server and its watchdog see it.
pub struct Conn {
    pub id: u64,
    /// Inside a request (from the head read to the response written).
    pub busy: AtomicBool,
    /// Milliseconds since the guard started, at the connection's last activity.
    pub last_active_ms: AtomicU64,
    /// Notified to close the connection (room for a new one).
    pub close: tokio::sync::Notify,
}

/// The open connections and the per-client request budgets.
pub struct Guard {
    max: usize,
    started: Instant,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
    rate: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl Guard {
    pub fn new(max_connections: usize, rate_limit: f64) -> Self {
        Guard {
            max: max_connections,
            started: Instant::now(),
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            rate: rate_limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Admit a new connection: a slot if one is free, else the oldest idle connection is told to
    /// close and the new one takes its place; None (refuse) when every connection is busy.
    pub fn admit(&self) -> Option<Arc<Conn>> {
        let mut open = self.open.lock().expect("guard lock");
        if open.len() >= self.max {
            let oldest =
                open.values().filter(|c| !c.busy.load(Ordering::Acquire)).min_by_key(|c| c.last_active_ms.load(Ordering::Relaxed)).cloned();
            match oldest {
                Some(c) => {
                    open.remove(&c.id);
                    c.close.notify_one();
                }
                None => return None,
            }
        }
        let c = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            busy: AtomicBool::new(false),
            last_active_ms: AtomicU64::new(self.now_ms()),
            close: tokio::sync::Notify::new(),
        });
        open.insert(c.id, c.clone());
        Some(c)
    }

    /// The connection has closed.
    pub fn release(&self, c: &Conn) {
        self.open.lock().expect("guard lock").remove(&c.id);
    }

    /// Take one request from `client`'s budget (a token bucket of `rate` per second, burst
    /// 2·rate); false when it is spent.
    pub fn allow(&self, client: IpAddr) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let burst = (2.0 * self.rate).max(1.0);
        let now = Instant::now();
        let mut b = self.buckets.lock().expect("guard lock");
        if b.len() > 10_000 {
            b.retain(|_, (_, t)| now.duration_since(*t).as_secs_f64() * self.rate < burst);
            // forget refilled clients
        }
        let (tokens, at) = b.entry(client).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Whether a request's `Host` header may reach an endpoint listening on `listen`: the listen
/// address itself, loopback names for a loopback address, or one of `allowed`; any host on a
/// wildcard address with no `allowed` list. A request without a `Host` header (HTTP/1.0 tools)
/// is let through: browsers always send one.
pub fn host_allowed(host: Option<&str>, listen: SocketAddr, allowed: &[String]) -> bool {
    let Some(host) = host else { return true };
    let host = host.trim().to_ascii_lowercase();
    // Split off the port: `[::1]:9464`, `127.0.0.1:9464`, `localhost`.
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, tail)) => (ip.to_string(), tail.strip_prefix(':').map(str::to_string)),
            None => return false,
        },
        None => match host.rsplit_once(':') {
            Some((n, p)) => (n.to_string(), Some(p.to_string())),
            None => (host.clone(), None),
        },
    };
    if port.as_deref().is_some_and(|p| p != listen.port().to_string()) {
        return false;
    }
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(&name)) {
        return true;
    }
    let ip = listen.ip();
    if ip.is_unspecified() {
        return allowed.is_empty();
    }
    if name.parse::<IpAddr>().ok() == Some(ip) {
        return true;
    }
    ip.is_loopback() && matches!(name.as_str(), "localhost" | "127.0.0.1" | "::1")
}
