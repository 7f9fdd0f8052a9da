//! The HTTP endpoint's limits, the same for every listener of a run (rank 0's daemon and each
//! pipeline stage's): a cap on open connections, with reserved slots for scrapes and control; header
//! and idle timeouts; a request rate per client address and one for all clients together; a
//! `Host` check against DNS rebinding; and a cap lowered to what the process's file limit
//! leaves after a reserve for checkpoints (`[daemon]` keys `max_connections`,
//! `header_timeout_s`, `idle_timeout_s`, `rate_limit`, `global_rate_limit`, `allowed_hosts`).
//!
//! **Room for a new connection.** Under the cap it is admitted. At the cap, an idle connection
//! (not in the middle of a request) is closed for it: one of the client address that holds the
//! most connections, preferring one that never sent a whole request (a slow or half-sent
//! header), then the oldest. So a flood of connections from some addresses closes its own, never
//! the scraper's one keep-alive connection, and never locks a scrape out until timeouts run.
//! When every connection is busy, the new one takes one of [`RESERVED`] extra slots, which serve
//! only `/metrics` and `/control/*` (control checks its token as always); anything else there is
//! answered 503 at once. Only when those are full too is the connection refused.
//!
//! **Requests.** `/metrics` and `/status` take one token from their client address's budget
//! (`rate_limit` per second, burst 2×) and one from a budget of all clients together
//! (`global_rate_limit`, per route, so a flood of `/status` cannot spend the scrapes' budget);
//! beyond either, 429. Control requests are never rate-limited: they carry the token.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Extra connection slots for `/metrics` and `/control/*` when every regular one is busy.
pub const RESERVED: usize = 8;

/// One open connection, as the server and its watchdog see it.
pub struct Conn {
    pub id: u64,
    /// The client's address.
    pub peer: IpAddr,
    /// Admitted into a reserved slot: serves `/metrics` and `/control/*` only.
    pub reserved: bool,
    /// Inside a request (from the head read to the response written).
    pub busy: AtomicBool,
    /// Requests answered on this connection.
    pub served: AtomicU64,
    /// Milliseconds since the guard started, at the connection's last activity.
    pub last_active_ms: AtomicU64,
    /// Notified to close the connection (room for a new one).
    pub close: tokio::sync::Notify,
}

/// What a request's path costs: which global budget it draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    Metrics,
    Status,
}

/// A token bucket: `rate` per second, burst 2·rate.
#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(b: &mut Bucket, rate: f64, now: Instant) -> bool {
        let burst = (2.0 * rate).max(1.0);
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The open connections and the request budgets.
pub struct Guard {
    max: usize,
    started: Instant,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
    rate: f64,
    global_rate: f64,
    buckets: Mutex<HashMap<(IpAddr, Route), Bucket>>,
    global: Mutex<HashMap<Route, Bucket>>,
}

impl Guard {
    /// `max` regular connections (and [`RESERVED`] more), `rate` requests per second per client
    /// address and `global_rate` for all together, per route (0: no limit).
    pub fn new(max: usize, rate: f64, global_rate: f64) -> Self {
        Guard {
            max,
            started: Instant::now(),
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            rate,
            global_rate,
            buckets: Mutex::new(HashMap::new()),
            global: Mutex::new(HashMap::new()),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Admit a new connection from `peer` (see the module docs for the policy); None: refuse.
    pub fn admit(&self, peer: IpAddr) -> Option<Arc<Conn>> {
        let mut open = self.open.lock().expect("guard lock");
        let regular = open.values().filter(|c| !c.reserved).count();
        let mut reserved = false;
        if regular >= self.max {
            let mut per_peer: HashMap<IpAddr, usize> = HashMap::new();
            for c in open.values() {
                *per_peer.entry(c.peer).or_default() += 1;
            }
            let victim = open
                .values()
                .filter(|c| !c.reserved && !c.busy.load(Ordering::Acquire))
                .max_by_key(|c| {
                    let never = c.served.load(Ordering::Relaxed) == 0;
                    (per_peer[&c.peer], never, std::cmp::Reverse((c.last_active_ms.load(Ordering::Relaxed), c.id)))
                })
                .cloned();
            match victim {
                Some(c) => {
                    open.remove(&c.id);
                    c.close.notify_one();
                }
                None if open.len() - regular < RESERVED => reserved = true,
                None => return None,
            }
        }
        let c = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            peer,
            reserved,
            busy: AtomicBool::new(false),
            served: AtomicU64::new(0),
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

    /// Take one request of `route` from `client`'s budget and from the global one; false when
    /// either is spent (the client's token is not returned: a flood pays for its own 429s).
    pub fn allow(&self, client: IpAddr, route: Route) -> bool {
        let now = Instant::now();
        if self.rate > 0.0 {
            let mut b = self.buckets.lock().expect("guard lock");
            if b.len() > 10_000 {
                // Forget clients whose budget has refilled.
                let burst = (2.0 * self.rate).max(1.0);
                b.retain(|_, x| now.duration_since(x.at).as_secs_f64() * self.rate < burst);
            }
            let x = b.entry((client, route)).or_insert(Bucket { tokens: (2.0 * self.rate).max(1.0), at: now });
            if !Bucket::take(x, self.rate, now) {
                return false;
            }
        }
        if self.global_rate > 0.0 {
            let mut g = self.global.lock().expect("guard lock");
            let x = g.entry(route).or_insert(Bucket { tokens: (2.0 * self.global_rate).max(1.0), at: now });
            if !Bucket::take(x, self.global_rate, now) {
                return false;
            }
        }
        true
    }
}

/// Descriptors kept free for checkpoints, logs and the run's own files, whatever the clients do.
pub const FD_RESERVE: u64 = 48;

/// `max_connections` lowered to what the process's open-file limit leaves: the soft limit, less
/// the descriptors open now, less [`FD_RESERVE`], less the [`RESERVED`] slots (at least 1).
/// Returns the cap and, when it was lowered, why.
pub fn fd_budget(max_connections: usize) -> (usize, Option<String>) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        return (max_connections, None);
    }
    let open = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(64);
    let room = lim.rlim_cur.saturating_sub(open + FD_RESERVE + RESERVED as u64).max(1) as usize;
    if room < max_connections {
        let why = format!(
            "daemon.max_connections lowered from {max_connections} to {room}: the open-file limit is {} with {open} open and {FD_RESERVE} kept for checkpoints",
            lim.rlim_cur
        );
        (room, Some(why))
    } else {
        (max_connections, None)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    #[test]
    fn a_flood_of_connections_closes_its_own_not_the_scrapers() {
        let g = Guard::new(4, 0.0, 0.0);
        let scraper = g.admit(ip(1)).unwrap();
        scraper.served.store(3, Ordering::Relaxed); // a keep-alive connection, the oldest
        let flood: Vec<_> = (0..3).map(|_| g.admit(ip(9)).unwrap()).collect();
        for _ in 0..50 {
            let c = g.admit(ip(9)).expect("room made for a new connection");
            assert!(!c.reserved);
        }
        assert!(g.open.lock().unwrap().contains_key(&scraper.id), "the scraper's connection was closed for the flood");
        assert!(flood.iter().all(|c| !g.open.lock().unwrap().contains_key(&c.id)), "the flood's first connections are still open");
        // Many flooding addresses: still the ones holding most, never the scraper's.
        for n in 10..60 {
            g.admit(ip(n)).unwrap();
        }
        assert!(g.open.lock().unwrap().contains_key(&scraper.id));
    }

    #[test]
    fn when_every_connection_is_busy_reserved_slots_take_new_ones_then_refuse() {
        let g = Guard::new(2, 0.0, 0.0);
        for _ in 0..2 {
            g.admit(ip(2)).unwrap().busy.store(true, Ordering::Release);
        }
        for _ in 0..RESERVED {
            let c = g.admit(ip(3)).unwrap();
            assert!(c.reserved);
            c.busy.store(true, Ordering::Release);
        }
        assert!(g.admit(ip(4)).is_none(), "more than the reserved slots");
        // A regular slot that frees up is taken before any reserved one.
        let one = g.open.lock().unwrap().values().find(|c| !c.reserved).cloned().unwrap();
        g.release(&one);
        assert!(!g.admit(ip(4)).unwrap().reserved);
    }

    #[test]
    fn many_addresses_cannot_multiply_the_budget_and_routes_have_their_own() {
        let g = Guard::new(8, 1000.0, 5.0);
        let allowed = (0..100u8).filter(|&n| g.allow(ip(n), Route::Status)).count();
        assert_eq!(allowed, 10, "the global burst is 2 × global_rate_limit");
        // /status spent its budget; /metrics has its own.
        assert!(g.allow(ip(200), Route::Metrics));
        // Per client: a client beyond its own budget is refused whatever the global one says.
        let g = Guard::new(8, 2.0, 0.0);
        assert_eq!((0..10).filter(|_| g.allow(ip(1), Route::Metrics)).count(), 4);
        assert!(g.allow(ip(2), Route::Metrics));
    }
}
