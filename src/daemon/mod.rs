//! `taproot daemon`: one long-running training run, observable and controllable over HTTP.
//!
//! ```text
//!   taproot daemon --config FILE [--set k=v …] [--listen 127.0.0.1:PORT] [--log-file FILE]
//!                  [--allow-config-change KEY …]
//! ```
//!
//! - **Start.** Takes the run folder's lock (`run_folder`: one process per run folder), then
//!   resumes from the newest valid checkpoint of the run's checkpoint directory (fresh when there
//!   is none): restarting the same command after a crash, a `kill -9` or a reboot continues the
//!   run, with no flag. The checkpoint's config must match in every key that changes the
//!   trajectory (`config::changes`), unless `--allow-config-change` names it.
//! - **HTTP** (one server, on the runtime's tokio workers; [`http`]): `GET /metrics`
//!   (Prometheus text format, rendered from the recorder the metrics actor writes to),
//!   `GET /status` (JSON), and `POST /control/{pause,resume,checkpoint,grow,stop}`. The control
//!   routes need `Authorization: Bearer <token>`, the token being the content of
//!   `daemon.token_file` or else the `TAPROOT_TOKEN` environment variable; a missing or wrong
//!   token gets 401 and changes nothing; with no token configured they are disabled (403).
//!   `/metrics` and `/status` need no token. The address is `daemon.listen` (default
//!   `127.0.0.1:9464`), or `--listen`; port 0 picks a free port (the log names it). The
//!   endpoint's limits (connections, timeouts, request rate, `Host`) are in [`guard`].
//! - **Signals.** SIGTERM or SIGINT: finish the current step, write a checkpoint, exit 0. A
//!   second one (or `run.stop_grace_s` passing first): stop at the next micro-batch boundary,
//!   checkpoint the last completed step, exit 1. A third: exit at once (130). SIGHUP: reopen the
//!   log file (for logrotate) and re-read the token file; a token file that is gone or empty
//!   disables control until it is back.
//! - **Log.** Timestamped lines (start, resume point, steps every `run.log_every`, evaluations,
//!   growth, checkpoints, control requests, the end) go to `--log-file` (appended to), or to
//!   stdout without it. Warnings of the runtime itself go to stderr.
//! - **When the run ends** (all steps done, or failed): the daemon keeps serving `/metrics` and
//!   `/status` (state `finished` or `failed`) for `daemon.linger_s` seconds so that Prometheus
//!   scrapes the final values, then exits: 0 if finished, 1 if failed (so a supervisor such as
//!   systemd restarts a failed run, which then resumes from its newest checkpoint). A stop
//!   request (`/control/stop`, SIGTERM) ends the linger at once. Control requests other than
//!   stop answer 409 once the run has ended. A daemon started on a run that is already complete
//!   resumes at its last step, finishes at once and lingers: it never trains past `run.steps`.

pub mod guard;
pub mod http;
pub mod state;

pub use state::{read_token, utc_now, Daemon, Live, Log, Phase};

use crate::backend::cpu::CpuBackend;
use crate::checkpoint;
use crate::config::Config;
use crate::data::{Dataset, Tokenizer};
use crate::runtime::events::{Event, Observer};
use crate::runtime::metrics::{self, MetricsActor, MetricsArgs, MetricsMsg, Seed, Shared};
use crate::runtime::supervisor::StopStep;
use crate::runtime::{self, RunOptions};
use crate::train::log::{eval_line, growth_line, step_line};
use anyhow::{Context, Result};
use ractor::Actor;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The command line of `taproot daemon`.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    pub config: PathBuf,
    pub sets: Vec<String>,
    pub listen: Option<String>,
    pub log_file: Option<PathBuf>,
    /// Trajectory keys a resume may change (`--allow-config-change`).
    pub allow_config_change: Vec<String>,
}

/// The log lines of events (the scheduler runs quiet under the daemon; its lines come from here).
fn event_logger(log: Arc<Log>, log_every: u64, total_steps: u64) -> Observer {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            match e {
                Event::Step { step, depth, lr, train_loss, tokens, seconds, .. } => {
                    if log_every > 0 && step % log_every == 0 {
                        log.say(step_line(step, total_steps, depth, train_loss, lr, tokens as f64 / seconds.max(1e-9), None));
                    }
                }
                Event::Eval { step, depth, val_loss } => log.say(eval_line(step, total_steps, depth, val_loss, None, None)),
                Event::Sample { step, depth, text } => log.say(format!("sample step={step} depth={depth}: {text:?}")),
                Event::Growth { record, seconds } => log.say(growth_line(&record, Some(seconds))),
                Event::Checkpoint { step, path, seconds, bytes } => {
                    log.say(format!("checkpoint step={step} path={path} bytes={bytes} wall_ms={:.1}", seconds * 1e3))
                }
                Event::NonFinite { step, what } => log.say(format!("warning: non-finite {what} at step {step}")),
                Event::Restart { step, reason } => log.say(format!("restart at step {step}: {reason}")),
                Event::Paused(p) => log.say(if p { "paused (at the next step boundary)" } else { "resumed" }),
                Event::LayerTime { .. } | Event::InFlight(_) | Event::Buffers { .. } | Event::ExpertLoad { .. } => {}
            }
        }
    });
    Arc::new(move |e: &Event| {
        if !matches!(e, Event::LayerTime { .. } | Event::InFlight(_) | Event::Buffers { .. } | Event::ExpertLoad { .. }) {
            let _ = tx.send(e.clone());
        }
    })
}

/// The checkpoint the run resumed from, if any: (path, meta), found by the step the run
/// reports (the scheduler skipped newer checkpoints that did not load).
fn resumed_from(cfg: &Config, step: u64) -> Option<(PathBuf, checkpoint::Meta)> {
    let list = checkpoint::list(&cfg.checkpoint_dir()).ok()?;
    let (_, path) = list.into_iter().rev().find(|(s, _)| *s == step)?;
    let meta = checkpoint::read_meta(&path).ok()?;
    Some((path, meta))
}

/// Run the daemon until the run ends (and lingers) or is stopped; returns the exit code.
pub fn run(opts: DaemonOptions) -> Result<i32> {
    let mut cfg = Config::load(&opts.config, &opts.sets)?;
    // Several processes (under mpirun or srun): every rank serves its own /metrics on the
    // configured port plus its local rank; rank 0 owns the run folder and takes control
    // requests (which reach the other replicas with the next step's reduction, and the other
    // pipeline stages as requests of stage 0).
    let facts = || {
        crate::dist::Facts::of_run(
            &cfg,
            &[
                ("command", "daemon".into()),
                ("allow_config_change", format!("{:?}", opts.allow_config_change)),
                ("listen", format!("{:?}", opts.listen)),
            ],
        )
    };
    crate::dist::set_timeout(cfg.parallel.timeout_s);
    crate::dist::set_collectives(cfg.parallel.collectives)?;
    let topo = crate::dist::init(cfg.parallel.data, cfg.parallel.pipeline, facts)?;
    crate::dist::map_devices(&mut cfg);
    if let Some(l) = &opts.listen {
        cfg.daemon.listen = l.clone();
        cfg.validate().context("--listen")?;
    }
    if topo.size() > 1 {
        cfg.daemon.listen = crate::dist::rank_listen(&cfg.daemon.listen, crate::dist::local_rank());
    }
    let (token, token_warning) = read_token(&cfg)?;
    // Held for the daemon's life: one process per run folder (a daemon always resumes).
    let rank = topo.rank();
    let _folder = if rank == 0 { Some(crate::run_folder::RunFolder::open(&cfg, crate::run_folder::Start::Resume)?) } else { None };
    // The other ranks log beside rank 0's file, one file each.
    let log_file = opts.log_file.clone().map(|p| if rank == 0 { p } else { PathBuf::from(format!("{}.rank{rank}", p.display())) });
    let log = Arc::new(Log::open(log_file)?);
    let tok = Tokenizer::from_name(&cfg.data.tokenizer)?;
    let data = Dataset::open_config(&cfg.data, &tok).with_context(|| {
        format!(
            "loading data for run {:?} (data.dir or data.sources; run scripts/fetch-data.sh and `taproot data prepare` first)",
            cfg.run.name
        )
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let code = if topo.stage > 0 {
        rt.block_on(serve_stage(cfg, data, topo, log))
    } else {
        rt.block_on(serve(cfg, data, topo, opts, log, token, token_warning))
    };
    rt.shutdown_timeout(Duration::from_secs(2));
    code
}

/// A pipeline stage q > 0 under the daemon: it hosts the layers stage 0 places on it until
/// stage 0 shuts it down, and serves `GET /metrics` (its layers' times, its links, its memory;
/// labelled with its rank and stage) and `GET /status`.
async fn serve_stage(cfg: Config, data: Dataset, topo: crate::dist::Topology, log: Arc<Log>) -> Result<i32> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(&cfg.daemon.listen)
        .await
        .with_context(|| format!("listening on {} (daemon.listen / --listen, plus the local rank)", cfg.daemon.listen))?;
    let addr = listener.local_addr()?;
    let prometheus = metrics::install_recorder()?;
    ::metrics::gauge!("taproot_info", "run" => cfg.run.name.clone(), "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    let (rank, stage) = (topo.rank(), topo.stage);
    log.say(format!(
        "daemon pid={} run={} rank={rank} stage={stage}: hosts the layers stage 0 places here; listening on http://{addr} (GET /metrics, GET /status)",
        std::process::id(),
        cfg.run.name
    ));
    let status = serde_json::json!({
        "run": cfg.run.name,
        "state": "running",
        "pid": std::process::id(),
        "rank": rank,
        "stage": stage,
        "replica": topo.replica,
        "processes": topo.size(),
        "note": "a pipeline stage: the run's status and control are at rank 0",
    });
    let shared = Shared::new();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let (p, shared) = (prometheus.clone(), shared.clone());
                async move {
                    metrics::refresh_scrape_gauges(&shared);
                    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], p.render())
                }
            }),
        )
        .route("/status", get(move || std::future::ready(axum::Json(status.clone()))))
        .route(
            "/control/{action}",
            axum::routing::post(move || {
                let body = serde_json::json!({"error": format!("this is rank {rank}, pipeline stage {stage}: control requests go to rank 0, which passes them to every rank")});
                std::future::ready((axum::http::StatusCode::MISDIRECTED_REQUEST, axum::Json(body)))
            }),
        );
    // The same HTTP front as rank 0's: connection cap, timeouts, budgets, Host check.
    let server = {
        let (log, dc) = (log.clone(), cfg.daemon.clone());
        tokio::spawn(async move { http::serve_app(listener, app, &dc, move |m| log.say(m)).await })
    };
    // Its layers' compute times, as stage 0's metrics actor records them.
    let observer: Observer = Arc::new(|e: &Event| {
        if let Event::LayerTime { layer, device, backward, seconds } = e {
            let name = if *backward { "taproot_layer_backward_seconds" } else { "taproot_layer_forward_seconds" };
            ::metrics::histogram!(name, "layer" => layer.to_string(), "device" => device.clone()).record(*seconds);
        }
    });
    let r = if cfg.on_cuda() {
        runtime::host::serve_async::<crate::backend::cuda::CudaBackend>(&cfg, data.vocab, topo, observer).await
    } else {
        runtime::host::serve_async::<CpuBackend>(&cfg, data.vocab, topo, observer).await
    };
    server.abort();
    match r {
        Ok(()) => {
            log.say("shut down by stage 0: exit 0");
            Ok(0)
        }
        Err(e) => {
            log.say(format!("failed: {e:#}"));
            Ok(1)
        }
    }
}

async fn serve(
    cfg: Config,
    data: Dataset,
    topo: crate::dist::Topology,
    opts: DaemonOptions,
    log: Arc<Log>,
    token: Option<String>,
    token_warning: Option<String>,
) -> Result<i32> {
    // Signal handlers first: a SIGTERM during start-up waits for the run to exist, then stops it.
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    // Those that came while the process started (`crate::signals`).
    let early_signals = crate::signals::received();
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let listener = tokio::net::TcpListener::bind(&cfg.daemon.listen)
        .await
        .with_context(|| format!("listening on {} (daemon.listen / --listen)", cfg.daemon.listen))?;
    let addr = listener.local_addr()?;
    log.say(format!(
        "daemon pid={} run={} config={} steps={} depth={} target_depth={} version={}",
        std::process::id(),
        cfg.run.name,
        opts.config.display(),
        cfg.run.steps,
        cfg.model.depth,
        cfg.target_depth(),
        env!("CARGO_PKG_VERSION")
    ));
    if let Some(w) = token_warning {
        log.say(w);
    }
    if token.is_none() {
        log.say("no control token (daemon.token_file, TAPROOT_TOKEN): control endpoints are disabled (403)");
    }
    if !addr.ip().is_loopback() {
        log.say(format!(
            "warning: listening on the non-loopback address {addr}: /metrics and /status are readable by anyone who reaches it"
        ));
    }

    let prometheus = metrics::install_recorder()?;
    let shared = Shared::new();
    let dims = crate::train::dims_of(&cfg, data.vocab);
    let seed0 = Seed { step: 0, depth: cfg.model.depth, stack: Vec::new(), history: vec![(0, cfg.model.depth)], checkpoint: None };
    let margs = MetricsArgs {
        run: cfg.run.name.clone(),
        dims,
        seq_len: cfg.data.seq_len,
        tokens_per_step: (cfg.data.batch_size * cfg.data.seq_len * cfg.data.micro_batches) as u64,
        target_depth: cfg.target_depth(),
        total_steps: cfg.run.steps,
        peak_flops: cfg.daemon.peak_flops,
        seed: seed0,
        handle: prometheus.clone(),
        shared: shared.clone(),
    };
    let (metrics_actor, metrics_join) =
        Actor::spawn(None, MetricsActor, margs).await.map_err(|e| anyhow::anyhow!("starting the metrics actor: {e}"))?;
    let observer = metrics::observer(metrics_actor.clone(), Some(event_logger(log.clone(), cfg.run.log_every, cfg.run.steps)));

    let sched = RunOptions {
        quiet: true,
        resume: true,
        allow_config_change: opts.allow_config_change.clone(),
        topology: topo,
        ..Default::default()
    };
    let run = if cfg.on_cuda() {
        metrics::set_device_memory_probe(Arc::new(crate::backend::cuda::memory_used));
        runtime::start::<crate::backend::cuda::CudaBackend>(&cfg, data, sched, observer).await?
    } else {
        runtime::start::<CpuBackend>(&cfg, data, sched, observer).await?
    };
    let d = Arc::new(Daemon {
        topo,
        cfg: cfg.clone(),
        supervisor: run.supervisor.clone(),
        metrics: metrics_actor.clone(),
        prometheus,
        shared,
        token: Mutex::new(token),
        phase: Mutex::new(Phase::Running),
        last_status: Mutex::new(None),
        log: log.clone(),
        stop: tokio::sync::Notify::new(),
        listen: Mutex::new(addr.to_string()),
    });

    // Where the run starts: resumed or fresh.
    match d.live_status().await {
        Live::Status(st) => {
            let resumed = if st.step > 0 { resumed_from(&cfg, st.step) } else { None };
            let mut seed =
                Seed { step: st.step, depth: st.depth, stack: st.stack.clone(), history: vec![(0, cfg.model.depth)], checkpoint: None };
            match &resumed {
                Some((path, meta)) => {
                    log.say(format!("resume from={} step={} depth={}", path.display(), meta.step, meta.depth));
                    seed.history.extend(meta.growth.iter().map(|g| (g.at_step, g.to_depth)));
                    let ms = std::fs::metadata(path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_millis() as u64);
                    seed.checkpoint = Some((meta.step, ms.unwrap_or(meta.created_unix_s * 1000)));
                }
                None if st.step > 0 => {
                    log.say(format!("resume step={} depth={} (checkpoint file not found for its metadata)", st.step, st.depth))
                }
                None => log.say(format!("fresh start: no checkpoint in {}", cfg.checkpoint_dir().display())),
            }
            let _ = metrics_actor.cast(MetricsMsg::Seed(seed));
        }
        other => log.say(format!("warning: the run did not answer its first status request ({other:?})")),
    }

    // HTTP, signals, and a status poll that keeps the cached status fresh.
    let server = tokio::spawn(http::serve(listener, d.clone()));
    log.say(format!("listening on http://{addr} (GET /metrics, GET /status, POST /control/{{pause,resume,checkpoint,grow,stop}})"));
    let signals = {
        let d = d.clone();
        let grace = Duration::from_secs(cfg.run.stop_grace_s);
        // Stop signals escalate as `runtime::supervisor::watch_stop_signals` says: finish the
        // step; then (a second signal, or the grace period) stop at the next micro-batch
        // boundary; a third exits at once.
        let on = {
            let d = d.clone();
            move |step: StopStep| match step {
                StopStep::Finish(name) => d.request_stop(name),
                StopStep::Force(why) => d.force_stop(&why),
            }
        };
        let log = d.log.clone();
        let stops = crate::runtime::supervisor::watch_stop_signals(term, int, early_signals, grace, on, move |m| log.say(m));
        let hups = tokio::spawn(async move {
            while hup.recv().await.is_some() {
                d.reload();
            }
        });
        (stops, hups)
    };
    let poll = {
        let d = d.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                d.live_status().await;
            }
        })
    };

    let result = run.wait().await;
    poll.abort();
    let stopped = d.phase() == Phase::Stopping;
    let code = match result {
        Ok(report) => {
            {
                // Where the run ended, from its report: also when it ended before any status
                // was taken (a restart at the last step ends within the first poll).
                let mut last_status = d.last_status.lock().expect("status lock");
                let st = last_status.get_or_insert_with(|| crate::runtime::Status {
                    run: d.cfg.run.name.clone(),
                    step: 0,
                    total_steps: d.cfg.run.steps,
                    depth: 0,
                    stack: Vec::new(),
                    in_flight: 0,
                    paused: false,
                    elapsed_s: report.wall_s,
                    eta_s: None,
                    placement: d.cfg.placement.devices.clone(),
                });
                (st.step, st.depth, st.in_flight, st.eta_s) = (report.final_step, report.final_depth, 0, Some(0.0));
            }
            let steps = report.steps.last().map_or(0, |s| s.step);
            let val = report.final_val_loss().map(|v| format!(" final_val_loss={v:.4}")).unwrap_or_default();
            let how = if stopped { "stopped" } else { "finished" };
            let ck = report.final_checkpoint.as_ref().map(|p| format!(" checkpoint={}", p.display())).unwrap_or_default();
            log.say(format!("{how} step={steps}{val} wall_s={:.1}{ck}", report.wall_s));
            // The metrics first, then the phase `/status` reports: once a client sees
            // `finished` there, `/metrics` says it too.
            state_now(&metrics_actor, "finished").await;
            *d.phase.lock().expect("phase lock") = Phase::Finished;
            0
        }
        Err(e) => {
            log.say(format!("failed: {e:#}"));
            state_now(&metrics_actor, "failed").await;
            *d.phase.lock().expect("phase lock") = Phase::Failed(format!("{e:#}"));
            1
        }
    };
    if !stopped {
        let linger = cfg.daemon.linger_s;
        log.say(format!(
            "serving /metrics and /status for {linger} s more (daemon.linger_s); stop earlier with SIGTERM or POST /control/stop"
        ));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(linger)) => {}
            _ = d.stop.notified() => {}
        }
    }
    log.say(format!("exit {code}"));
    signals.0.abort();
    signals.1.abort();
    server.abort();
    metrics_actor.stop(None);
    let _ = metrics_join.await;
    Ok(code)
}

/// Set the metrics' run state and wait (at most 5 s) until the gauges say it.
async fn state_now(metrics: &ractor::ActorRef<MetricsMsg>, state: &'static str) {
    let _ = metrics.call(|reply| MetricsMsg::State(state, Some(reply)), Some(Duration::from_secs(5))).await;
}
