//! Run the daemon in-process and talk to it over HTTP as a client would.
//!
//! The example writes a config and a control token to a temporary directory, starts
//! [`taproot::daemon::run`] on a background thread (listening on 127.0.0.1, port 0: the daemon
//! picks a free port and names it in its log), then acts as a client with nothing but
//! `std::net::TcpStream`:
//! - reads `GET /metrics` (Prometheus text format) a few times a second and prints the
//!   `taproot_step`, `taproot_train_loss`, `taproot_validation_loss` and `taproot_model_depth`
//!   series as they move (the tiny run grows 0 -> 2 blocks at step 400);
//! - reads `GET /status` (JSON);
//! - sends `POST /control/stop` without the token (401, nothing happens), then with
//!   `Authorization: Bearer <token>`; the daemon finishes the step, writes a checkpoint and exits 0;
//! - waits for the daemon thread to end and prints its exit code and log.
//!
//! Every wait is bounded, so the example always ends.
//!
//! ```sh
//! cargo run --release --example metrics_client              # tiny model, synthetic data (a few seconds)
//! cargo run --release --example metrics_client -- CONFIG [KEY=VALUE ...]   # your config
//! ```
//!
//! With a config, the daemon resumes from the run's newest checkpoint (as `taproot daemon` does)
//! and still listens on a free loopback port; the token is the config's `daemon.token_file` or
//! `TAPROOT_TOKEN`, or else a token this example makes up and puts in `TAPROOT_TOKEN`.

mod common;

use anyhow::{bail, Context, Result};
use common::{scratch_dir, synthetic_corpus, toml_path};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use taproot::config::Config;
use taproot::daemon::DaemonOptions;

/// How long the client watches `/metrics` at most, and how many samples it takes once the model
/// has its target depth.
const WATCH: Duration = Duration::from_secs(20);
const SAMPLES_AT_TARGET: usize = 4;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scratch = scratch_dir("metrics_client")?;
    let (config, sets, token) = match args.split_first() {
        Some((path, sets)) => {
            let cfg = Config::load(Path::new(path), sets)?;
            let token = match taproot::daemon::read_token(&cfg)?.0 {
                Some(t) => t,
                None => {
                    let t = make_token();
                    std::env::set_var("TAPROOT_TOKEN", &t); // before any thread reads the environment
                    t
                }
            };
            (PathBuf::from(path), sets.to_vec(), token)
        }
        None => {
            let data = synthetic_corpus(&scratch)?;
            let token = make_token();
            let token_file = scratch.join("token");
            write_private(&token_file, &token)?;
            let config = scratch.join("metrics-client.toml");
            std::fs::write(&config, tiny_config(&scratch, &data, &token_file))?;
            (config, Vec::new(), token)
        }
    };

    // The daemon, on a thread of its own (it builds its own tokio runtime), logging to a file.
    let log = scratch.join("daemon.log");
    let opts = DaemonOptions { config, sets, listen: Some("127.0.0.1:0".into()), log_file: Some(log.clone()), allow_config_change: vec![] };
    let daemon = std::thread::Builder::new().name("daemon".into()).spawn(move || taproot::daemon::run(opts))?;

    let result = wait_for_address(&daemon, &log).and_then(|addr| {
        let r = client(addr, &daemon, &token);
        if r.is_err() {
            let _ = request(addr, "POST", "/control/stop", Some(&token)); // best effort: the daemon must end
        }
        r
    });

    // Whatever the client did, wait (bounded) for the daemon to end, then show its log.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !daemon.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let exit = if daemon.is_finished() {
        match daemon.join() {
            Ok(Ok(code)) => Ok(code),
            Ok(Err(e)) => Err(e.context("the daemon failed")),
            Err(_) => Err(anyhow::anyhow!("the daemon thread panicked")),
        }
    } else {
        Err(anyhow::anyhow!("the daemon did not exit within 60 s of the stop request"))
    };
    println!("\n== daemon log");
    print!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    let code = exit?;
    println!("daemon exit code {code}");
    if code != 0 {
        bail!("the daemon exited with code {code}");
    }
    Ok(())
}

/// The client's part: watch `/metrics`, read `/status`, stop the daemon.
fn client(addr: SocketAddr, daemon: &std::thread::JoinHandle<Result<i32>>, token: &str) -> Result<()> {
    println!("daemon listening on http://{addr}");

    println!("\n== GET /metrics (every 100 ms, until the model has its target depth, or {} s)", WATCH.as_secs());
    let t0 = Instant::now();
    let mut last: Option<(String, String)> = None;
    let mut at_target = 0;
    loop {
        let r = request(addr, "GET", "/metrics", None)?;
        if r.code != 200 {
            bail!("/metrics answered {}: {}", r.code, r.body);
        }
        let [step, train, val, depth, target] =
            ["taproot_step", "taproot_train_loss", "taproot_validation_loss", "taproot_model_depth", "taproot_target_depth"]
                .map(|name| series(&r.body, name));
        let show = |v: Option<f64>| v.map_or("absent".to_string(), |v| format!("{v}"));
        let now = (show(step), show(depth));
        if last.as_ref() != Some(&now) {
            println!(
                "{:6.2} s  taproot_step={} taproot_model_depth={} taproot_train_loss={} taproot_validation_loss={}",
                t0.elapsed().as_secs_f64(),
                now.0,
                now.1,
                train.map_or("absent".to_string(), |v| format!("{v:.4}")),
                val.map_or("absent".to_string(), |v| format!("{v:.4}"))
            );
            if last.as_ref().is_some_and(|l| l.1 != now.1) {
                println!("          ^ taproot_model_depth changed: the run grew");
            }
            last = Some(now);
        }
        // A few samples once the depth reached the plan's target (at once for a run that never grows).
        if depth.is_some() && depth == target {
            at_target += 1;
        }
        if at_target >= SAMPLES_AT_TARGET || t0.elapsed() > WATCH || daemon.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let lines = request(addr, "GET", "/metrics", None)?.body.lines().filter(|l| l.starts_with("taproot_")).count();
    println!("(the last scrape held {lines} taproot_ samples)");

    println!("\n== GET /status");
    let r = request(addr, "GET", "/status", None)?;
    let st: serde_json::Value = serde_json::from_str(&r.body).with_context(|| format!("/status is not JSON: {}", r.body))?;
    for key in ["run", "state", "step", "total_steps", "depth", "stack", "placement", "eta_s"] {
        if let Some(v) = st.get(key) {
            println!("  {key}: {v}");
        }
    }

    println!("\n== POST /control/stop");
    let r = request(addr, "POST", "/control/stop", None)?;
    println!("  without the token: {} {}", r.code, r.body.trim());
    let r = request(addr, "POST", "/control/stop", Some(token))?;
    println!("  with the token:    {} {}", r.code, r.body.trim());
    if !(200..300).contains(&r.code) {
        bail!("the stop request was refused ({})", r.code);
    }
    Ok(())
}

/// The address from the daemon's "listening on http://…" log line (at most 60 s).
fn wait_for_address(daemon: &std::thread::JoinHandle<Result<i32>>, log: &Path) -> Result<SocketAddr> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let addr = text.lines().find_map(|l| l.split("listening on http://").nth(1)?.split_whitespace().next()?.parse().ok());
        if let Some(addr) = addr {
            return Ok(addr);
        }
        if daemon.is_finished() {
            bail!("the daemon ended before it listened");
        }
        if Instant::now() > deadline {
            bail!("the daemon did not listen within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of an unlabelled series (the first sample named `name`) in a Prometheus text page.
fn series(page: &str, name: &str) -> Option<f64> {
    page.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (metric, value) = l.split_once(' ')?;
        (metric == name).then(|| value.trim().parse().ok())?
    })
}

struct Reply {
    code: u16,
    body: String,
}

/// One HTTP/1.1 request on a fresh connection (loopback only), bounded by timeouts.
fn request(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> Result<Reply> {
    if !addr.ip().is_loopback() {
        bail!("{addr} is not a loopback address");
    }
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Length: 0\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).with_context(|| format!("{method} {path}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").with_context(|| format!("{method} {path}: not an HTTP response"))?;
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).with_context(|| format!("bad status line: {head}"))?;
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    Ok(Reply { code, body: if chunked { unchunk(body) } else { body.to_string() } })
}

/// The body of a `Transfer-Encoding: chunked` response.
fn unchunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// A token for this run only (not a secret worth the name: the daemon listens on loopback).
fn make_token() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("example-{:x}-{nanos:x}", std::process::id())
}

/// Write a file readable by its owner only (the daemon warns about a token others can read).
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// A tiny progressive run far longer than the example (it is stopped over HTTP): 0 blocks,
/// grown to 2 at step 400, the control token in a file.
fn tiny_config(dir: &Path, data: &Path, token_file: &Path) -> String {
    format!(
        r#"
[run]
name = "metrics-client"
steps = 100000
log_every = 100
out_dir = {out}
[data]
dir = {data}
tokenizer = "bytes"
batch_size = 4
seq_len = 32
micro_batches = 2
[model]
channels = 32
heads = 2
depth = 0
target_depth = 2
[schedule]
lr = 0.01
warmup = 0.0
[eval]
every = 200
batches = 2
[[growth]]
at_step = 400
to_depth = 2
[daemon]
listen = "127.0.0.1:0"
token_file = {token}
linger_s = 5
"#,
        out = toml_path(&dir.join("run")),
        data = toml_path(data),
        token = toml_path(token_file),
    )
}
