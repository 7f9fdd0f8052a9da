//! `taproot daemon`, through the real binary on tiny synthetic-data runs:
//! - a real Prometheus server on loopback scrapes a daemon every second; its HTTP API shows every
//!   `taproot_` metric, the step increasing and the depth changing after a growth;
//! - a real scrape passes `promtool check metrics` with no finding, and holds every metric the
//!   Grafana dashboard queries;
//! - control requests without the token, or with a wrong one, get 401 and change nothing; with
//!   it, `grow` grows the live run and `checkpoint` writes a checkpoint that a restarted daemon
//!   resumes from (past the planned step of the expansion it already applied);
//! - killed with SIGKILL and restarted with the same command, the daemon continues from its
//!   newest checkpoint; SIGTERM checkpoints and exits 0; SIGHUP reopens the log file;
//! - without a token the control endpoints are disabled (403), `/metrics` and `/status` are not;
//! - a finished run lingers (`finished`, control 409) and exits 0 by itself;
//! - `/metrics` answers within 100 ms while steps of ≥ 300 ms compute.
//!
//! Prometheus and promtool come from Debian's `prometheus` package (`.ci/run` installs it).
//! Without them the tests that need them print a SKIP line and pass, unless
//! `TAPROOT_REQUIRE_PROMETHEUS=1` (CI), where a missing binary is a failure.
//!
//! Every server listens on 127.0.0.1 on a free port; every process is stopped by its pid.

mod common;

use common::{synthetic_dataset, TestConfig};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::RwLock;
use std::time::{Duration, Instant};
use taproot::checkpoint;

const BIN: &str = env!("CARGO_BIN_EXE_taproot");

/// The latency test takes this for writing (alone), every other test for reading: a concurrent
/// test's training would load the 2 cores the measurement is about.
static CPU: RwLock<()> = RwLock::new(());

fn shared_cpu() -> std::sync::RwLockReadGuard<'static, ()> {
    CPU.read().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// HTTP (a minimal HTTP/1.1 client: one request per connection)

struct Reply {
    code: u16,
    body: String,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn request(addr: SocketAddr, method: &str, path: &str, auth: Option<&str>) -> Reply {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Length: 0\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{method} {path}: no HTTP response: {text:?}"));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("bad status line: {head}"));
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { unchunk(body) } else { body.to_string() };
    Reply { code, body }
}

fn unchunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, None)
}

fn post(addr: SocketAddr, path: &str, token: Option<&str>) -> Reply {
    let auth = token.map(|t| format!("Bearer {t}"));
    request(addr, "POST", path, auth.as_deref())
}

fn status(addr: SocketAddr) -> serde_json::Value {
    let r = get(addr, "/status");
    assert_eq!(r.code, 200, "/status: {}", r.body);
    r.json()
}

fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// Poll `f` every 20 ms until it returns Some, for at most `limit`.
fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Daemons

/// A tiny progressive run (0 -> 2 blocks) far longer than any test.
fn run_config(dir: &Path, name: &str) -> TestConfig {
    TestConfig::new(dir).name(name).steps(1_000_000).micro_batches(2).target_depth(2).lr(0.01).eval(200, 2)
}

/// The step of an expansion planned long after any test ends (so that `grow now` has one to apply).
const FAR_GROWTH: u64 = 900_000;

struct Daemon {
    child: Option<Child>,
    addr: SocketAddr,
    log: PathBuf,
}

/// How a daemon gets its token.
enum Token<'a> {
    None,
    Env(&'a str),
    /// Already in the config (`daemon.token_file`).
    File,
}

fn spawn_daemon(config: &Path, token: Token, extra: &[&str]) -> Daemon {
    spawn_daemon_limited(config, token, extra, None)
}

/// As [`spawn_daemon`], with the process's open-file limit lowered to `nofile` (`ulimit -n`).
fn spawn_daemon_limited(config: &Path, token: Token, extra: &[&str], nofile: Option<u32>) -> Daemon {
    let log = config.with_extension("log");
    let before = std::fs::read_to_string(&log).map(|t| t.len()).unwrap_or(0);
    let mut cmd = match nofile {
        Some(n) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(format!("ulimit -n {n} && exec \"$0\" \"$@\"")).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    cmd.arg("daemon").arg("--config").arg(config).arg("--listen").arg("127.0.0.1:0").arg("--log-file").arg(&log).args(extra);
    cmd.env_remove("TAPROOT_TOKEN").stdout(Stdio::null()).stderr(Stdio::inherit());
    if let Token::Env(t) = token {
        cmd.env("TAPROOT_TOKEN", t);
    }
    let mut child = cmd.spawn().unwrap();
    // The log names the port the daemon bound (port 0: no race for a free port).
    let addr = wait_for("the daemon's listening line", Duration::from_secs(60), || {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the daemon exited with {st} before listening:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        let text = std::fs::read_to_string(&log).ok()?;
        let line = text[before.min(text.len())..].lines().find(|l| l.contains("listening on http://"))?.to_string();
        line.split("http://").nth(1)?.split_whitespace().next()?.parse().ok()
    });
    Daemon { child: Some(child), addr, log }
}

impl Daemon {
    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn signal(&self, sig: &str) {
        assert!(Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().unwrap().success());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn alive(&mut self) -> bool {
        self.child.as_mut().expect("running").try_wait().unwrap().is_none()
    }

    /// Wait (bounded) for the process to exit; its exit code.
    fn wait_exit(&mut self, limit: Duration) -> i32 {
        let mut child = self.child.take().expect("running");
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            if t0.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the daemon did not exit within {limit:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn checkpoints(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    checkpoint::list(&run_dir.join("checkpoints")).unwrap()
}

/// The value of an unlabelled sample in a Prometheus text scrape.
fn sample(scrape: &str, name: &str) -> Option<f64> {
    scrape.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// Series names (metric names of sample lines) of a Prometheus text scrape.
fn series_names(scrape: &str) -> std::collections::BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

/// Every `taproot_…` name in the PromQL expressions of the dashboard.
fn dashboard_metrics() -> std::collections::BTreeSet<String> {
    fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                        ("query", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => exprs(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/taproot.json");
    let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    assert!(all.len() >= 20, "too few queries found in the dashboard: {all:?}");
    let mut names = std::collections::BTreeSet::new();
    for e in all {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("taproot_") {
            let tail = &rest[i..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names
}

/// Whether `tool` is installed; if not, SKIP (print and return false) or, under
/// TAPROOT_REQUIRE_PROMETHEUS=1, fail.
fn have(tool: &str) -> bool {
    let found =
        Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false);
    if !found {
        let required = std::env::var("TAPROOT_REQUIRE_PROMETHEUS").is_ok_and(|v| v == "1");
        assert!(!required, "`{tool}` is not installed and TAPROOT_REQUIRE_PROMETHEUS=1 (apt-get install prometheus)");
        println!("SKIP: `{tool}` is not installed (Debian package `prometheus`); set TAPROOT_REQUIRE_PROMETHEUS=1 to make this a failure");
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Tests

/// A real Prometheus 2.x scrapes the daemon every second; its query API shows the series.
#[test]
fn prometheus_scrapes_the_daemon_and_the_series_move() {
    let _cpu = shared_cpu();
    if !have("prometheus") {
        return;
    }
    let dir = synthetic_dataset("daemon-prom");
    let cfg = run_config(&dir, "prom").checkpoint_every(500).grow_at_step(FAR_GROWTH, 2).write();
    let mut d = spawn_daemon(&cfg, Token::Env("prom-token"), &[]);

    // Prometheus on loopback, its own config and storage, scraping the daemon every second.
    let pdir = dir.join("prometheus");
    std::fs::create_dir_all(pdir.join("data")).unwrap();
    let pport = free_port();
    let pcfg = pdir.join("prometheus.yml");
    std::fs::write(&pcfg, format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: taproot\n    scrape_interval: 1s\n    scrape_timeout: 900ms\n    static_configs:\n      - targets: [\"{}\"]\n", d.addr)).unwrap();
    let plog = std::fs::File::create(pdir.join("prometheus.log")).unwrap();
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", pcfg.display()))
        .arg(format!("--storage.tsdb.path={}", pdir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{pport}"))
        .stdout(Stdio::null())
        .stderr(plog)
        .spawn()
        .unwrap();
    let paddr: SocketAddr = format!("127.0.0.1:{pport}").parse().unwrap();
    let prom_log = || std::fs::read_to_string(pdir.join("prometheus.log")).unwrap_or_default();

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("Prometheus to be ready", Duration::from_secs(60), || {
            assert!(prom.try_wait().unwrap().is_none(), "prometheus exited:\n{}", prom_log());
            TcpStream::connect(paddr).ok().and_then(|_| (get(paddr, "/-/ready").code == 200).then_some(()))
        });
        let version = get(paddr, "/api/v1/status/buildinfo").json()["data"]["version"].as_str().unwrap_or("?").to_string();
        println!("Prometheus {version} on {paddr}, scraping the daemon on {}", d.addr);
        assert!(version.starts_with("2."), "expected Prometheus 2.x, got {version}");
        // One instant query: {metric labels → value}.
        let query = |q: &str| -> Vec<(serde_json::Value, f64)> {
            let r = get(paddr, &format!("/api/v1/query?query={}", percent_encode(q)));
            assert_eq!(r.code, 200, "query {q}: {}", r.body);
            let v = r.json();
            v["data"]["result"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| (s["metric"].clone(), s["value"][1].as_str().unwrap().parse::<f64>().unwrap_or(f64::NAN)))
                .collect()
        };
        let scalar = |q: &str| -> Option<f64> { query(q).first().map(|s| s.1) };

        // The step moves, as Prometheus stored it.
        let s1 = wait_for("a first scrape of taproot_step", Duration::from_secs(60), || scalar("taproot_step"));
        let s2 = wait_for("taproot_step to increase in Prometheus", Duration::from_secs(30), || scalar("taproot_step").filter(|s| *s > s1));
        println!("taproot_step in Prometheus: {s1} then {s2}");
        assert_eq!(scalar("taproot_model_depth"), Some(0.0));

        // Growth now: Prometheus sees the depth change, and has both depths in its history.
        let g = post(d.addr, "/control/grow", Some("prom-token"));
        assert_eq!((g.code, g.json()["depth"].as_u64()), (200, Some(2)), "{}", g.body);
        wait_for("taproot_model_depth = 2 in Prometheus", Duration::from_secs(30), || scalar("taproot_model_depth").filter(|d| *d == 2.0));
        assert_eq!(scalar("min_over_time(taproot_model_depth[5m])"), Some(0.0));
        assert_eq!(scalar("max_over_time(taproot_model_depth[5m])"), Some(2.0));
        assert_eq!(scalar("taproot_growth_events_total"), Some(1.0));
        let s3 = wait_for("taproot_step to increase after growth", Duration::from_secs(30), || scalar("taproot_step").filter(|s| *s > s2));
        println!("after growth: taproot_model_depth 0 -> 2, taproot_step {s3}");
        let layers = query("taproot_layer_forward_seconds_count");
        assert_eq!(layers.len(), 2, "one forward-time series per layer: {layers:?}");

        // Every metric of the catalog is in Prometheus's storage (histograms as _bucket/_sum/_count).
        let stored: std::collections::BTreeSet<String> = query("group by (__name__) ({__name__=~\"taproot_.+\"})")
            .iter()
            .map(|(m, _)| m["__name__"].as_str().unwrap().to_string())
            .collect();
        for m in taproot::runtime::metrics::CATALOG {
            let want = if m.kind == taproot::runtime::metrics::Kind::Histogram { format!("{}_bucket", m.name) } else { m.name.to_string() };
            assert!(stored.contains(&want), "{want} not in Prometheus; stored: {stored:?}");
        }
        let up = scalar("up{job=\"taproot\"}");
        assert_eq!(up, Some(1.0), "the scrape target is not up");
        println!("{} taproot_ series names stored by Prometheus; target up", stored.len());
    }));

    // Stop both by pid, with bounded waits.
    let _ = Command::new("kill").arg("-TERM").arg(prom.id().to_string()).status();
    let t0 = Instant::now();
    while prom.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(15) {
            let _ = prom.kill();
            let _ = prom.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    d.signal("TERM");
    let code = d.wait_exit(Duration::from_secs(30));
    if let Err(p) = result {
        eprintln!("prometheus log:\n{}", prom_log());
        std::panic::resume_unwind(p);
    }
    assert_eq!(code, 0, "SIGTERM: {}", d.log_text());
}

/// A real scrape: `promtool check metrics` reports nothing, every metric of the catalog and of
/// the dashboard's queries is there.
#[test]
fn scrape_passes_promtool_and_holds_every_dashboard_metric() {
    let _cpu = shared_cpu();
    let dir = synthetic_dataset("daemon-scrape");
    let cfg = run_config(&dir, "scrape").checkpoint_every(100).grow_at_step(FAR_GROWTH, 2).write();
    let mut d = spawn_daemon(&cfg, Token::Env("t"), &[]);
    // After some steps at depth 0, a growth (per-layer series exist), a checkpoint and an
    // evaluation.
    wait_for("50 steps", Duration::from_secs(60), || (num(&status(d.addr), "step") >= 50).then_some(()));
    assert_eq!(post(d.addr, "/control/grow", Some("t")).code, 200);
    wait_for("a checkpoint and an evaluation after growth", Duration::from_secs(60), || {
        let s = status(d.addr);
        (num(&s, "step") > 250).then_some(())
    });
    let scrape = get(d.addr, "/metrics");
    assert_eq!(scrape.code, 200);
    let names = series_names(&scrape.body);
    let mut missing = Vec::new();
    for m in dashboard_metrics() {
        // GPU memory exists only on CUDA runs (the CUDA daemon test checks that it is emitted),
        // pipeline links only between processes (the multi-process daemon test checks them).
        // Expert load only from mixture-of-experts layers (tests/arch.rs checks its events).
        let elsewhere = [
            "taproot_device_memory_used_bytes",
            "taproot_link_bytes_sent_total",
            "taproot_link_bytes_received_total",
            "taproot_expert_load",
        ];
        if !names.contains(&m) && !elsewhere.contains(&m.as_str()) {
            missing.push(m);
        }
    }
    assert!(missing.is_empty(), "the dashboard queries metrics the daemon does not emit: {missing:?}\nemitted: {names:?}");
    for m in taproot::runtime::metrics::CATALOG {
        let want = if m.kind == taproot::runtime::metrics::Kind::Histogram { format!("{}_bucket", m.name) } else { m.name.to_string() };
        assert!(names.contains(&want), "{want} missing from the scrape");
        assert!(scrape.body.contains(&format!("# HELP {} ", m.name)), "no HELP for {}", m.name);
    }
    assert!(names.iter().all(|n| n.starts_with("taproot_")), "{names:?}");
    assert_eq!(sample(&scrape.body, "taproot_model_depth"), Some(2.0));
    assert!(sample(&scrape.body, "taproot_checkpoint_step").unwrap() >= 100.0);
    assert!(sample(&scrape.body, "taproot_validation_loss").unwrap().is_finite());
    let saved = sample(&scrape.body, "taproot_compute_saved_ratio").unwrap();
    assert!(saved > 0.0 && saved < 1.0, "compute saved {saved}");
    println!("scrape: {} series names, {} dashboard metrics all present", names.len(), dashboard_metrics().len());

    promtool_check(&scrape.body, "the daemon");
    d.signal("TERM");
    assert_eq!(d.wait_exit(Duration::from_secs(30)), 0);
}

/// Without the token (or with a wrong one) nothing changes; with it, grow and checkpoint act on
/// the live run, and the checkpoint resumes in a restarted daemon.
#[test]
fn control_needs_the_token_grow_and_checkpoint_act_and_the_checkpoint_resumes() {
    let _cpu = shared_cpu();
    let dir = synthetic_dataset("daemon-control");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "c0ntrol-t0ken\n").unwrap();
    // The planned expansion (step 4000) comes after the test's grow-now, and after the restart.
    let cfg = run_config(&dir, "control").grow_at_step(4000, 2).set("daemon.token_file", format!("\"{}\"", token_file.display())).write();
    let run = dir.join("control");
    let mut d = spawn_daemon(&cfg, Token::File, &[]);
    let tok = Some("c0ntrol-t0ken");
    let bad = [None, Some("wrong"), Some("c0ntrol-t0ke"), Some("c0ntrol-t0ken-")];

    // Refused pause: the run keeps stepping, unpaused.
    for t in bad {
        let r = post(d.addr, "/control/pause", t);
        assert_eq!(r.code, 401, "pause with {t:?}: {}", r.body);
    }
    let s0 = num(&status(d.addr), "step");
    let s = wait_for("steps after the refused pause", Duration::from_secs(30), || Some(status(d.addr)).filter(|s| num(s, "step") > s0));
    assert_eq!((s["paused"].as_bool(), s["state"].as_str()), (Some(false), Some("running")));

    // Paused with the token (so that the status below is frozen).
    assert_eq!(post(d.addr, "/control/pause", tok).code, 200);
    let frozen = wait_for("the pause to take effect", Duration::from_secs(30), || {
        let a = status(d.addr);
        std::thread::sleep(Duration::from_millis(100));
        let b = status(d.addr);
        (a["paused"] == true && a["step"] == b["step"]).then_some(b)
    });
    let step = num(&frozen, "step");
    assert!(step < 4000, "the run reached the planned growth (step {step}) before the test paused it");
    assert_eq!(frozen["state"], "paused");

    // Every refused request changes nothing: same status, no checkpoint, no growth, still alive.
    let keys = ["step", "depth", "stack", "paused", "state"];
    for action in ["resume", "grow", "checkpoint", "stop", "pause"] {
        for t in bad {
            let r = post(d.addr, &format!("/control/{action}"), t);
            assert_eq!(r.code, 401, "{action} with {t:?}: {}", r.body);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = status(d.addr);
    for k in keys {
        assert_eq!(after[k], frozen[k], "{k} changed after refused requests");
    }
    assert!(d.alive(), "a refused stop stopped the daemon");
    assert!(checkpoints(&run).is_empty(), "a refused checkpoint wrote one");
    assert!(!d.log_text().contains("grow step="), "a refused grow grew");
    assert_eq!(d.log_text().matches("refused (401").count(), 4 + 5 * 4);

    // With the token: grow now (paused runs grow too; the answer is the new depth).
    let g = post(d.addr, "/control/grow", tok);
    assert_eq!((g.code, g.json()["depth"].as_u64()), (200, Some(2)), "{}", g.body);
    let s = status(d.addr);
    assert_eq!(num(&s, "depth"), 2);
    assert_eq!(s["stack"].as_array().unwrap().len(), 2);
    let again = post(d.addr, "/control/grow", tok);
    assert_eq!(again.code, 409, "no expansion left: {}", again.body);

    // Checkpoint now: the answer names the file, at the current step, with the grown model.
    let c = post(d.addr, "/control/checkpoint", tok);
    assert_eq!(c.code, 200, "{}", c.body);
    let path = PathBuf::from(c.json()["path"].as_str().unwrap());
    assert_eq!(c.json()["step"].as_u64(), Some(step));
    let ck = checkpoint::load(&path).unwrap();
    assert_eq!((ck.meta.step, ck.meta.depth), (step, 2));

    // Resume, then kill -9; the same command resumes from that checkpoint and trains past the
    // planned expansion it has already applied.
    assert_eq!(post(d.addr, "/control/resume", tok).code, 200);
    wait_for("steps after resume", Duration::from_secs(30), || (num(&status(d.addr), "step") > step).then_some(()));
    d.kill9();
    let mut d = spawn_daemon(&cfg, Token::File, &[]);
    let log = d.log_text();
    assert!(
        log.contains(&format!("resume from={} step={step} depth=2", path.display())),
        "did not resume from the control checkpoint:\n{log}"
    );
    let s = status(d.addr);
    assert!(num(&s, "step") >= step && num(&s, "depth") == 2, "{s}");
    wait_for("the run to pass step 4000 (the planned expansion)", Duration::from_secs(120), || {
        let s = status(d.addr);
        assert_eq!(s["state"], "running", "{s}\n{}", d.log_text());
        (num(&s, "step") > 4100).then_some(())
    });
    assert_eq!(num(&status(d.addr), "depth"), 2);
    println!(
        "paused at step {step}; 24 refused requests changed nothing; grew 0 -> 2; checkpoint {} resumed after kill -9, ran past step 4000",
        path.display()
    );
    assert_eq!(post(d.addr, "/control/stop", tok).code, 202);
    assert_eq!(d.wait_exit(Duration::from_secs(30)), 0);
}

/// kill -9, then the same command: the run continues from its newest checkpoint (no flag).
/// SIGTERM: checkpoint at the stopping step, exit 0. SIGHUP: the log file is reopened.
#[test]
fn sigkill_restart_continues_from_the_newest_checkpoint_sigterm_exits_0_sighup_reopens_the_log() {
    let _cpu = shared_cpu();
    let dir = synthetic_dataset("daemon-kill");
    let cfg = run_config(&dir, "kill").checkpoint_every(100).checkpoint_keep(2).grow_at_step(250, 2).write();
    let run = dir.join("kill");
    let mut d = spawn_daemon(&cfg, Token::None, &[]);
    wait_for("a checkpoint past the growth", Duration::from_secs(120), || checkpoints(&run).last().filter(|c| c.0 >= 400).map(|_| ()));
    d.kill9();
    let (newest, path) = checkpoints(&run).last().unwrap().clone();

    let mut d = spawn_daemon(&cfg, Token::None, &[]);
    let log = d.log_text();
    assert!(
        log.contains(&format!("resume from={} step={newest} depth=2", path.display())),
        "did not resume from the newest checkpoint:\n{log}"
    );
    let s = status(d.addr);
    assert!(num(&s, "step") >= newest, "{s}");
    assert_eq!(num(&s, "depth"), 2);
    // The metrics start where the run is, not at zero.
    let m = get(d.addr, "/metrics").body;
    assert!(sample(&m, "taproot_step").unwrap() >= newest as f64);
    assert!(sample(&m, "taproot_checkpoint_step").unwrap() >= newest as f64);
    let saved = sample(&m, "taproot_compute_saved_ratio").unwrap();
    assert!(saved > 0.0 && saved < 1.0, "compute saved after resume: {saved}");
    wait_for("steps after the restart", Duration::from_secs(60), || (num(&status(d.addr), "step") > newest + 20).then_some(()));

    // SIGHUP: the log moved away (logrotate) is recreated.
    let rotated = d.log.with_extension("log.1");
    std::fs::rename(&d.log, &rotated).unwrap();
    d.signal("HUP");
    wait_for("the log file to be reopened", Duration::from_secs(30), || d.log_text().contains("SIGHUP: log file reopened").then_some(()));
    assert!(d.alive());

    // SIGTERM: finish the step, checkpoint, exit 0.
    d.signal("TERM");
    assert_eq!(d.wait_exit(Duration::from_secs(30)), 0, "{}", d.log_text());
    let log = d.log_text();
    let last = checkpoints(&run).last().unwrap().0;
    assert!(log.contains(&format!("stopped step={last}")), "no checkpoint at the stopping step {last}:\n{log}");
    println!(
        "killed after checkpoint {newest}; restarted and resumed there; SIGHUP reopened the log; SIGTERM: checkpoint at {last}, exit 0"
    );
}

/// No token configured: control is disabled (403), `/metrics` and `/status` are readable.
#[test]
fn without_a_token_control_is_disabled_but_metrics_and_status_are_readable() {
    let _cpu = shared_cpu();
    let dir = synthetic_dataset("daemon-notoken");
    let cfg = run_config(&dir, "notoken").unset("model.target_depth").write();
    let mut d = spawn_daemon(&cfg, Token::None, &[]);
    for action in ["pause", "resume", "checkpoint", "grow", "stop"] {
        for t in [None, Some("anything")] {
            assert_eq!(post(d.addr, &format!("/control/{action}"), t).code, 403, "{action}");
        }
    }
    assert_eq!(get(d.addr, "/metrics").code, 200);
    let s = status(d.addr);
    assert_eq!((s["control"].as_bool(), s["state"].as_str(), s["run"].as_str()), (Some(false), Some("running"), Some("notoken")));
    assert_eq!(s["placement"], serde_json::json!(["cpu:0"]));
    assert!(d.alive());
    assert_eq!(post(d.addr, "/control/nonsense", None).code, 404);
    d.signal("TERM");
    assert_eq!(d.wait_exit(Duration::from_secs(30)), 0);
}

/// A finished run is served as `finished` for daemon.linger_s, refuses control with 409, and the
/// daemon exits 0 by itself; restarted, it finishes at once (never trains past run.steps).
#[test]
fn a_finished_run_lingers_then_exits_0() {
    let _cpu = shared_cpu();
    let dir = synthetic_dataset("daemon-finish");
    let cfg = run_config(&dir, "finish").unset("model.target_depth").checkpoint_every(100).set("daemon.linger_s", 4).write();
    let sets = ["--set", "run.steps=300"];
    let mut d = spawn_daemon(&cfg, Token::Env("f"), &sets);
    let s = wait_for("the run to finish", Duration::from_secs(60), || Some(status(d.addr)).filter(|s| s["state"] == "finished"));
    assert_eq!(num(&s, "step"), 300);
    assert_eq!(post(d.addr, "/control/grow", Some("f")).code, 409);
    let m = get(d.addr, "/metrics").body;
    assert!(m.contains("taproot_state{state=\"finished\"} 1"), "{m}");
    assert_eq!(d.wait_exit(Duration::from_secs(30)), 0, "{}", d.log_text());

    let mut d = spawn_daemon(&cfg, Token::Env("f"), &sets);
    let s = wait_for("the restarted run to finish", Duration::from_secs(60), || Some(status(d.addr)).filter(|s| s["state"] == "finished"));
    assert_eq!(num(&s, "step"), 300);
    assert_eq!(post(d.addr, "/control/stop", Some("f")).code, 202, "stop ends the linger");
    assert_eq!(d.wait_exit(Duration::from_secs(10)), 0);
}

/// `/metrics` stays fast while the pipeline computes: scrapes during steps of ≥ 300 ms.
#[test]
fn metrics_answer_within_100_ms_while_a_cpu_heavy_step_runs() {
    let _alone = CPU.write().unwrap_or_else(|e| e.into_inner());
    let dir = synthetic_dataset("daemon-latency");
    let cfg = run_config(&dir, "latency").write();
    // A 4-block, 256-channel model on 24 x 128 tokens: about 0.6 s per step on an idle 2-core
    // machine of this kind (0.3 s at 12 x 128 once the CPU kernels got faster), more when loaded.
    let sets = [
        "--set",
        "model.channels=256",
        "--set",
        "model.heads=4",
        "--set",
        "model.depth=4",
        "--set",
        "model.target_depth=4",
        "--set",
        "data.batch_size=24",
        "--set",
        "data.seq_len=128",
        "--set",
        "data.micro_batches=1",
        "--set",
        "eval.every=0",
        "--set",
        "eval.batches=1",
    ];
    let mut d = spawn_daemon(&cfg, Token::None, &sets);
    wait_for("the first step", Duration::from_secs(120), || (sample(&get(d.addr, "/metrics").body, "taproot_step")? >= 1.0).then_some(()));
    let before = get(d.addr, "/metrics").body;
    let step0 = sample(&before, "taproot_step").unwrap();
    let mut lat = Vec::new();
    let mut last = before.clone();
    let t0 = Instant::now();
    // At least 40 scrapes, spanning at least 3 whole steps (bounded: 120 s).
    while lat.len() < 40 || sample(&last, "taproot_step").unwrap() < step0 + 4.0 {
        assert!(t0.elapsed() < Duration::from_secs(120), "fewer than 4 steps in 120 s");
        let t = Instant::now();
        let r = get(d.addr, "/metrics");
        lat.push(t.elapsed());
        assert_eq!(r.code, 200);
        last = r.body;
        std::thread::sleep(Duration::from_millis(50));
    }
    let span = t0.elapsed();
    let steps = sample(&last, "taproot_step").unwrap() - step0;
    let mean_step =
        sample(&last, "taproot_step_duration_seconds_sum").unwrap() / sample(&last, "taproot_step_duration_seconds_count").unwrap();
    let n = lat.len();
    lat.sort();
    let (p50, p99, max) = (lat[n / 2], lat[n * 99 / 100], lat[n - 1]);
    println!("{n} scrapes over {span:?} while {steps} steps of {mean_step:.3} s (mean) ran: /metrics latency p50 {p50:?}, p99 {p99:?}, max {max:?}");
    assert!(mean_step >= 0.3, "steps of {mean_step:.3} s: not CPU-heavy enough for the measurement");
    assert!(max < Duration::from_millis(100), "a scrape took {max:?}");
    d.signal("TERM");
    assert_eq!(d.wait_exit(Duration::from_secs(60)), 0);
}

/// A config that places layers on `cuda:N` reaches the CUDA backend: on a machine without a GPU
/// the daemon exits 1 with the backend's own error (naming LD_LIBRARY_PATH), before serving.
/// (On a GPU machine the CUDA tests run the daemon on the GPU instead.)
#[test]
fn a_cuda_config_reaches_the_cuda_backend() {
    if taproot::backend::cuda::device_count().map(|n| n > 0).unwrap_or(false) {
        println!("SKIP: this machine has a GPU; tests/cuda.rs runs the daemon on it");
        return;
    }
    let dir = synthetic_dataset("daemon-cuda");
    let cfg = run_config(&dir, "cuda").unset("model.target_depth").devices(&["cuda:0"]).write();
    let out = Command::new(BIN)
        .arg("daemon")
        .arg("--config")
        .arg(&cfg)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .env_remove("TAPROOT_TOKEN")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("cuda:0") && text.contains("LD_LIBRARY_PATH"), "not the CUDA backend's error: {text}");
    println!("{}", text.trim());
}

/// A daemon whose layers span two CPU devices shows, per device, the buffers its pool holds and
/// the bytes copied into it from the other device (the dashboard's device panels).
#[test]
fn a_two_device_run_reports_buffers_and_cross_device_traffic_per_device() {
    let _cpu = shared_cpu();
    let dir = synthetic_dataset("daemon-2dev");
    // depth 2 from the start: one layer per device, the ends on cpu:0
    let cfg = run_config(&dir, "two-devices").devices(&["cpu:0", "cpu:1"]).depth(2).write();
    let d = spawn_daemon(&cfg, Token::None, &[]);
    wait_for("20 steps", Duration::from_secs(60), || (num(&status(d.addr), "step") >= 20).then_some(()));
    let scrape = get(d.addr, "/metrics").body;
    for dev in ["cpu:0", "cpu:1"] {
        let buffers = sample(&scrape, &format!("taproot_activation_buffers{{device=\"{dev}\"}}"))
            .unwrap_or_else(|| panic!("no buffers series for {dev}:\n{scrape}"));
        let copied = sample(&scrape, &format!("taproot_peer_copy_bytes_total{{device=\"{dev}\"}}"))
            .unwrap_or_else(|| panic!("no traffic series for {dev}"));
        println!("{dev}: {buffers} buffers, {copied} bytes copied in");
        assert!(buffers >= 1.0 && copied > 0.0, "{dev}: {buffers} buffers, {copied} bytes");
        // one (B, T, C) = 4 x 16 x 32 f32 buffer at a time
        assert_eq!(copied % (4.0 * 16.0 * 32.0 * 4.0), 0.0, "{dev}: {copied} bytes is not whole buffers");
    }
}

// ---------------------------------------------------------------------------------------------
// The endpoint's limits: connections, timeouts, request rate, Host.

const TOKEN: &str = "l1mits-t0ken";

fn limited_config(dir: &Path, name: &str, sets: &[(&str, &str)]) -> PathBuf {
    let token_file = dir.join(format!("{name}.token"));
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut c = run_config(dir, name).unset("model.target_depth").set("daemon.token_file", format!("\"{}\"", token_file.display()));
    for (k, v) in sets {
        c = c.set(k, v);
    }
    c.write()
}

/// More idle, half-sent connections than the cap (and than the process's file limit): scrapes
/// are still answered and a checkpoint is still written.
#[test]
fn idle_connections_beyond_the_cap_leave_scrapes_and_checkpoints_working() {
    let _cpu = shared_cpu();
    let dir = synthetic_dataset("daemon-idle");
    let cfg = limited_config(&dir, "idle", &[("daemon.max_connections", "16"), ("checkpoint.every", "0")]);
    let mut d = spawn_daemon_limited(&cfg, Token::File, &[], Some(96));
    wait_for("a few steps", Duration::from_secs(60), || (num(&status(d.addr), "step") >= 3).then_some(()));
    let mut idle = Vec::new();
    for _ in 0..300 {
        if let Ok(mut s) = TcpStream::connect_timeout(&d.addr, Duration::from_secs(2)) {
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1");
            idle.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        let r = get(d.addr, "/metrics");
        assert_eq!(r.code, 200, "a scrape failed with {} idle connections open", idle.len());
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = post(d.addr, "/control/checkpoint", Some(TOKEN));
    assert_eq!(r.code, 200, "checkpoint: {}\n{}", r.body, d.log_text());
    let path = r.json()["path"].as_str().unwrap().to_string();
    assert!(Path::new(&path).exists(), "{path}");
    assert!(d.alive(), "the daemon died:\n{}", d.log_text());
    drop(idle);
    d.signal("TERM");
    assert_eq!(d.wait_exit(Duration::from_secs(60)), 0, "{}", d.log_text());
}

#[test]
fn a_connection_that_sends_nothing_is_closed_after_the_idle_timeout() {
    let _cpu = shared_cpu();
    let dir = synthetic_dataset("daemon-timeout");
    let cfg = limited_config(&dir, "timeout", &[("daemon.idle_timeout_s", "1"), ("daemon.header_timeout_s", "1")]);
    let d = spawn_daemon(&cfg, Token::File, &[]);
    for partial in [&b""[..], b"GET /status HTTP/1.1\r\nHost: 127.0"] {
        let mut s = TcpStream::connect_timeout(&d.addr, Duration::from_secs(2)).unwrap();
        s.write_all(partial).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let t0 = Instant::now();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf); // returns when the server closes
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(5), "{partial:?}: open for {took:?}");
    }
}

#[test]
fn scrapes_beyond_the_rate_limit_get_429_and_control_does_not() {
    let _cpu = shared_cpu();
    let dir = synthetic_dataset("daemon-rate");
    let cfg = limited_config(&dir, "rate", &[("daemon.rate_limit", "5")]);
    let d = spawn_daemon(&cfg, Token::File, &[]);
    let codes: Vec<u16> = (0..40).map(|_| get(d.addr, "/metrics").code).collect();
    assert!(codes.contains(&429), "no 429 in a flood: {codes:?}");
    assert!(codes[..8].iter().all(|c| *c == 200), "the burst was not allowed: {codes:?}");
    assert_eq!(post(d.addr, "/control/pause", Some(TOKEN)).code, 200, "control is rate-limited");
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(get(d.addr, "/metrics").code, 200, "the budget did not refill");
}

#[test]
fn the_host_header_must_name_this_endpoint() {
    let _cpu = shared_cpu();
    let dir = synthetic_dataset("daemon-host");
    let cfg = limited_config(&dir, "host", &[]);
    let d = spawn_daemon(&cfg, Token::File, &[]);
    let with_host = |host: &str| -> u16 {
        let mut s = TcpStream::connect_timeout(&d.addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(s, "GET /status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
        let mut raw = String::new();
        let _ = s.read_to_string(&mut raw);
        raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
    };
    let port = d.addr.port();
    // A DNS-rebinding page reaches 127.0.0.1 under its own name.
    assert_eq!(with_host(&format!("attacker.example:{port}")), 403);
    assert_eq!(with_host("attacker.example"), 403);
    assert_eq!(with_host(&format!("localhost:{}", port + 1)), 403, "another port");
    assert_eq!(with_host(&format!("localhost:{port}")), 200);
    assert_eq!(with_host(&format!("127.0.0.1:{port}")), 200);
}

/// A token file deleted (or emptied) and SIGHUP: the old token no longer opens control.
#[test]
fn a_deleted_token_file_on_sighup_revokes_the_token() {
    let _cpu = shared_cpu();
    let dir = synthetic_dataset("daemon-revoke");
    let cfg = limited_config(&dir, "revoke", &[]);
    let mut d = spawn_daemon(&cfg, Token::File, &[]);
    assert_eq!(post(d.addr, "/control/pause", Some(TOKEN)).code, 200);
    std::fs::remove_file(dir.join("revoke.token")).unwrap();
    d.signal("HUP");
    let code = wait_for("the revocation", Duration::from_secs(20), || {
        let c = post(d.addr, "/control/resume", Some(TOKEN)).code;
        (c != 200).then_some(c)
    });
    assert_eq!(code, 403, "{}", d.log_text());
    assert!(d.log_text().contains("control is disabled"), "{}", d.log_text());
    // A new token file and SIGHUP: control with the new token only.
    std::fs::write(dir.join("revoke.token"), "n3w-t0ken\n").unwrap();
    d.signal("HUP");
    wait_for("the new token", Duration::from_secs(20), || (post(d.addr, "/control/resume", Some("n3w-t0ken")).code == 200).then_some(()));
    assert_eq!(post(d.addr, "/control/pause", Some(TOKEN)).code, 401);
    assert!(d.alive());
}

// ---------------------------------------------------------------------------------------------
// Several processes

/// The first sample of `name` whatever its labels (the ranks of a multi-process run label every
/// series with rank, replica and stage).
fn sample_any(scrape: &str, name: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let value = if rest.starts_with('{') { rest.rsplit_once(' ')?.1 } else { rest.strip_prefix(' ')? };
        value.trim().parse().ok()
    })
}

fn promtool_check(scrape: &str, what: &str) {
    if !have("promtool") {
        return;
    }
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(scrape.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    let findings = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && findings.trim().is_empty(), "promtool check metrics of {what}: {:?}\n{findings}", out.status);
}

fn mpi_ready() -> bool {
    let ready = cfg!(feature = "mpi") && Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ready {
        assert!(std::env::var("TAPROOT_REQUIRE_MPI").is_err(), "TAPROOT_REQUIRE_MPI is set but MPI is not usable");
        println!("SKIP: no MPI (a build without the `mpi` feature, or no mpirun)");
    }
    ready
}

/// `taproot daemon` under `mpirun -np 4`: 2 data-parallel replicas × 2 pipeline stages. Every
/// rank serves `/metrics` labelled with its rank and stage (promtool-clean), a real Prometheus
/// scrapes all four, control goes to rank 0 only, and a growth asked of rank 0 happens in both
/// replicas and puts a layer on each stage.
#[test]
fn a_daemon_under_mpirun_serves_every_rank_and_takes_control_at_rank_0() {
    let _cpu = shared_cpu();
    if !mpi_ready() {
        return;
    }
    let dir = synthetic_dataset("daemon-mpi");
    let cfg = run_config(&dir, "mpi").checkpoint_every(500).grow_at_step(FAR_GROWTH, 2).write();
    let log = cfg.with_extension("log");
    let mut child = Command::new("mpirun")
        .args(["-np", "4", "--oversubscribe"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("TAPROOT_TOKEN", "t")
        .arg(BIN)
        .args(["daemon", "--config", cfg.to_str().unwrap(), "--listen", "127.0.0.1:0", "--log-file", log.to_str().unwrap()])
        .args(["--set", "parallel.data=2", "--set", "parallel.pipeline=2"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let logs: Vec<PathBuf> =
        (0..4).map(|r| if r == 0 { log.clone() } else { PathBuf::from(format!("{}.rank{r}", log.display())) }).collect();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // Each rank names the port it bound (port 0: one free port each).
        let addrs: Vec<SocketAddr> = logs
            .iter()
            .map(|l| {
                wait_for("a rank's listening line", Duration::from_secs(90), || {
                    let text = std::fs::read_to_string(l).ok()?;
                    let line = text.lines().find(|x| x.contains("listening on http://"))?.to_string();
                    line.split("http://").nth(1)?.split_whitespace().next()?.parse().ok()
                })
            })
            .collect();
        wait_for("20 steps at rank 0", Duration::from_secs(90), || (num(&status(addrs[0]), "step") >= 20).then_some(()));
        let st = status(addrs[0]);
        assert_eq!((st["rank"].as_u64(), st["processes"].as_u64()), (Some(0), Some(4)), "{st}");
        // A pipeline stage's listener has the same HTTP front as rank 0's: a Host check, and
        // more idle, half-sent connections than its cap leave its scrapes answered.
        let stage1 = addrs[1];
        let bad_host = {
            let mut s = TcpStream::connect(stage1).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(s, "GET /metrics HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n").unwrap();
            let mut raw = String::new();
            let _ = s.read_to_string(&mut raw);
            raw
        };
        assert!(bad_host.starts_with("HTTP/1.1 403"), "stage 1 answered a foreign Host: {bad_host}");
        let idle: Vec<TcpStream> = (0..200)
            .filter_map(|_| {
                let mut s = TcpStream::connect_timeout(&stage1, Duration::from_secs(2)).ok()?;
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1").ok()?;
                Some(s)
            })
            .collect();
        let t0 = Instant::now();
        assert_eq!(get(stage1, "/metrics").code, 200, "stage 1 with {} idle connections open", idle.len());
        assert!(t0.elapsed() < Duration::from_secs(5), "stage 1's scrape took {:?}", t0.elapsed());
        drop(idle);
        // Control goes to rank 0: the other ranks refuse it, naming rank 0.
        for (r, a) in addrs.iter().enumerate().skip(1) {
            let c = post(*a, "/control/grow", Some("t"));
            assert!(c.code == 421 && c.body.contains("go to rank 0"), "rank {r}: {} {}", c.code, c.body);
        }
        let g = post(addrs[0], "/control/grow", Some("t"));
        assert_eq!((g.code, g.json()["depth"].as_u64()), (200, Some(2)), "{}", g.body);
        // The other replica grew at the same step (its own metrics say so), and each stage
        // hosts one layer of each replica: stage 1's ranks time their layer and send frames.
        wait_for("depth 2 at rank 2", Duration::from_secs(60), || {
            (sample_any(&get(addrs[2], "/metrics").body, "taproot_model_depth") == Some(2.0)).then_some(())
        });
        for r in [1, 3] {
            wait_for("stage 1 timing its layer", Duration::from_secs(60), || {
                let m = get(addrs[r], "/metrics").body;
                (sample_any(&m, "taproot_layer_forward_seconds_count").is_some_and(|n| n > 0.0)
                    && sample_any(&m, "taproot_link_bytes_sent_total").is_some_and(|b| b > 0.0))
                .then_some(())
            });
        }
        for (r, a) in addrs.iter().enumerate() {
            let m = get(*a, "/metrics");
            assert_eq!(m.code, 200);
            let (replica, stage) = (r / 2, r % 2);
            let labels = format!("rank=\"{r}\"");
            assert!(
                m.body.contains(&labels)
                    && m.body.contains(&format!("stage=\"{stage}\""))
                    && m.body.contains(&format!("replica=\"{replica}\"")),
                "rank {r}:\n{}",
                m.body
            );
            if stage == 0 {
                assert!(
                    sample_any(&m.body, "taproot_allreduce_duration_seconds_count").is_some_and(|n| n > 0.0),
                    "rank {r} reduced nothing"
                );
            }
            promtool_check(&m.body, &format!("rank {r}"));
        }
        // A real Prometheus scrapes all four ranks.
        if have("prometheus") {
            let pdir = dir.join("prometheus");
            std::fs::create_dir_all(pdir.join("data")).unwrap();
            let pport = free_port();
            let targets = addrs.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
            let pcfg = pdir.join("prometheus.yml");
            std::fs::write(&pcfg, format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: taproot\n    scrape_interval: 1s\n    scrape_timeout: 900ms\n    static_configs:\n      - targets: [{targets}]\n")).unwrap();
            let mut prom = Command::new("prometheus")
                .arg(format!("--config.file={}", pcfg.display()))
                .arg(format!("--storage.tsdb.path={}", pdir.join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{pport}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let paddr: SocketAddr = format!("127.0.0.1:{pport}").parse().unwrap();
            let count = |q: &str| -> Option<f64> {
                let r = get(paddr, &format!("/api/v1/query?query={}", percent_encode(q)));
                (r.code == 200).then(|| r.json()["data"]["result"][0]["value"][1].as_str().and_then(|v| v.parse().ok())).flatten()
            };
            let seen = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                wait_for("Prometheus to scrape the four ranks", Duration::from_secs(90), || {
                    (TcpStream::connect(paddr).is_ok()
                        && count("count(count by (rank) (taproot_info))") == Some(4.0)
                        && count("count(up == 1)") == Some(4.0))
                    .then_some(())
                });
                assert_eq!(
                    count("count(count by (stage) (taproot_layer_forward_seconds_count))"),
                    Some(2.0),
                    "layer times from both stages"
                );
            }));
            let _ = prom.kill();
            let _ = prom.wait();
            if let Err(p) = seen {
                std::panic::resume_unwind(p);
            }
            println!("Prometheus scraped all four ranks");
        }
    }));
    // SIGTERM to mpirun reaches every rank: each stops after the same step, rank 0 checkpoints.
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the daemons did not stop within 60 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Err(p) = result {
        for l in &logs {
            eprintln!("{}:\n{}", l.display(), std::fs::read_to_string(l).unwrap_or_default());
        }
        std::panic::resume_unwind(p);
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("stopped step="), "{text}");
    assert!(!checkpoints(&dir.join("mpi")).is_empty(), "rank 0 wrote the final checkpoint");
}

/// One request, with errors returned (a reset or a timeout counts as not answered).
fn try_request(addr: SocketAddr, method: &str, path: &str, auth: Option<&str>, timeout: Duration) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Length: 0\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line in {:?}", &text[..text.len().min(80)]))?;
    Ok((code, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

/// Steps per second of the daemon's run over `secs` seconds (from `/status`).
fn steps_per_second(addr: SocketAddr, secs: f64) -> f64 {
    let (s0, t0) = (num(&status(addr), "step"), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(secs));
    let s1 = num(&status(addr), "step");
    (s1 - s0) as f64 / t0.elapsed().as_secs_f64()
}

/// The soak test of the HTTP front: a daemon under `ulimit -n 256` trains and checkpoints every
/// 20 steps while a bounded flood runs for 40 s — 400 idle connections (reopened as they are
/// closed), 40 slow-header connections (a byte every 400 ms) and unauthenticated `/status`
/// loops from 20 loopback addresses (at most 50 requests a second each). Throughout, a
/// `/metrics` scrape every second and a token-holding `POST /control/checkpoint` every 5 s must
/// be answered 200; afterwards every checkpoint verifies, and the steps per second under the
/// flood stay at least half those without it (the flood's own client runs on the same 2 cores).
#[test]
fn a_daemon_under_a_connection_flood_keeps_scrapes_control_and_checkpoints() {
    let _alone = CPU.write().unwrap_or_else(|e| e.into_inner());
    let dir = synthetic_dataset("daemon-soak");
    let cfg = limited_config(&dir, "soak", &[("checkpoint.every", "20"), ("checkpoint.keep", "100"), ("eval.every", "20")]);
    let mut d = spawn_daemon_limited(&cfg, Token::File, &[], Some(256));
    let addr = d.addr;
    wait_for("a few steps", Duration::from_secs(60), || (num(&status(addr), "step") >= 3).then_some(()));
    let quiet = steps_per_second(addr, 8.0);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood_for = Duration::from_secs(40);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let flood = {
        let stop = stop.clone();
        rt.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut tasks = Vec::new();
            // Idle, half-sent connections, kept at 400 (bounded: one reconnect per 5 ms).
            let s = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut idle = std::collections::VecDeque::new();
                while !s.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(Ok(mut c)) = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await {
                        let _ = c.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1").await;
                        idle.push_back(c);
                        if idle.len() > 400 {
                            idle.pop_front();
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
            // Slow headers: a byte every 400 ms.
            for _ in 0..40 {
                let s = stop.clone();
                tasks.push(tokio::spawn(async move {
                    while !s.load(std::sync::atomic::Ordering::Relaxed) {
                        let Ok(Ok(mut c)) = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await else {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        };
                        for b in b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" {
                            if s.load(std::sync::atomic::Ordering::Relaxed) || c.write_all(&[*b]).await.is_err() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(400)).await;
                        }
                    }
                }));
            }
            // /status loops from 20 loopback addresses, keep-alive, at most 50 a second each.
            for n in 0..20u8 {
                let s = stop.clone();
                tasks.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while !s.load(std::sync::atomic::Ordering::Relaxed) {
                        let sock = tokio::net::TcpSocket::new_v4().unwrap();
                        if sock.bind(SocketAddr::from(([127, 0, 1, 10 + n], 0))).is_err() {
                            return;
                        }
                        let Ok(Ok(mut c)) = tokio::time::timeout(Duration::from_secs(1), sock.connect(addr)).await else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        };
                        while !s.load(std::sync::atomic::Ordering::Relaxed) {
                            if c.write_all(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.is_err() {
                                break;
                            }
                            match tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf)).await {
                                Ok(Ok(n)) if n > 0 => {}
                                _ => break,
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        })
    };

    // Throughout the flood: scrapes every second, a checkpoint by control every 5 s.
    let t0 = Instant::now();
    let mut failures = Vec::new();
    let (mut scrapes, mut controls) = (0, 0);
    // The run's step, from the scrapes (/status is the flood's, and its budget is spent).
    let rate_from = Instant::now() + Duration::from_secs(5);
    let (mut first, mut last) = (None, None);
    while t0.elapsed() < flood_for {
        match try_request(addr, "GET", "/metrics", None, Duration::from_secs(5)) {
            Ok((200, body)) => {
                scrapes += 1;
                if let Some(step) = sample_any(&body, "taproot_step") {
                    let now = Instant::now();
                    if first.is_none() && now >= rate_from {
                        first = Some((step, now));
                    }
                    last = Some((step, now));
                }
            }
            other => failures.push(format!("{:.1} s: /metrics {:?}", t0.elapsed().as_secs_f64(), other.map(|(c, _)| c))),
        }
        if t0.elapsed().as_secs() / 5 >= controls as u64 {
            match try_request(addr, "POST", "/control/checkpoint", Some(&format!("Bearer {TOKEN}")), Duration::from_secs(30)) {
                Ok((200, _)) => controls += 1,
                other => {
                    failures.push(format!("{:.1} s: POST /control/checkpoint {:?}", t0.elapsed().as_secs_f64(), other.map(|(c, _)| c)))
                }
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let flooded = match (first, last) {
        (Some((s0, a)), Some((s1, b))) if b > a => (s1 - s0) / (b - a).as_secs_f64(),
        _ => panic!("no step read from the scrapes during the flood ({failures:?})"),
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), flood).await }).ok();
    rt.shutdown_timeout(Duration::from_secs(2));

    assert!(d.alive(), "the daemon died under the flood:\n{}", d.log_text());
    assert!(
        failures.is_empty(),
        "not answered during the flood ({scrapes} scrapes and {controls} checkpoints were):\n{}",
        failures.join("\n")
    );
    // Stopped before its checkpoints are read: a running daemon keeps writing them and rotating
    // the oldest away (`checkpoint.keep`), which could delete one between the listing and its
    // verification.
    d.signal("TERM");
    assert_eq!(d.wait_exit(Duration::from_secs(60)), 0, "{}", d.log_text());
    let cks = checkpoints(&dir.join("soak"));
    assert!(cks.len() >= controls, "{} checkpoints for {controls} control requests", cks.len());
    for (_, p) in &cks {
        checkpoint::verify(p).unwrap_or_else(|e| panic!("{e:#}"));
    }
    let log = d.log_text();
    assert!(!log.contains("Too many open files") && !log.contains("warning: the checkpoint of step"), "{log}");
    let ratio = flooded / quiet;
    println!(
        "soak: {scrapes} scrapes and {controls} control checkpoints answered, {} checkpoints verified; steps/s {quiet:.1} quiet, {flooded:.1} flooded ({ratio:.2}x)",
        cks.len()
    );
    assert!(ratio >= 0.5, "the flood cut training to {ratio:.2} of its speed ({quiet:.1} -> {flooded:.1} steps/s)");
}
