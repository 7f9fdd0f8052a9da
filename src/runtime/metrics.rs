//! The metrics actor: turns the runtime's [`Event`]s into Prometheus metrics.
//!
//! The run's observer casts every event to this actor ([`observer`]); the actor publishes them
//! with the `metrics` crate into the process-wide recorder that [`install_recorder`] installs
//! (`metrics-exporter-prometheus`), and whoever serves HTTP renders that recorder's
//! [`PrometheusHandle`] on `GET /metrics` (the daemon does, `crate::daemon`). Every metric of
//! [`CATALOG`] is registered with its initial value when the actor starts, so every series
//! exists from the first scrape (losses and the gradient norm start as NaN: not yet known).
//!
//! Naming follows Prometheus: prefix `taproot_`, base units (seconds, bytes, ratios 0–1),
//! counters end in `_total`, and label values are bounded (layer ids and devices, bounded by the
//! model depth; `state` and `kind` by a fixed list).
//!
//! Decisions:
//! - Counters (`taproot_tokens_total`, `taproot_flops_*_total`, …) count what *this process* did,
//!   as Prometheus counters do (a restart resets them; `rate()`/`increase()` handle that).
//! - Gauges about the *run* (step, depth, losses, `taproot_compute_saved_ratio`) are about the
//!   whole run, across daemon restarts: the compute saved at step s is computed from the depth
//!   history (the growth records of the checkpoint the run resumed from, then live growth
//!   events) as `1 − Σ_k flops_ne(depth_k) / (s · flops_ne(target_depth))` over the updates
//!   k < s, the same FLOPs as `Event::Step`'s `flops_ne / fixed_flops_ne` for a fresh process.
//! - MFU is the last step's FLOPs in llm.c's convention (6N + 6·L·T·C per token) over its wall
//!   seconds, divided by `daemon.peak_flops`; 0 when no peak is configured.
//! - `taproot_tokens_per_second` is the last step's tokens over its wall seconds (the step's
//!   micro-batches, barrier and optimizer; not evaluations or checkpoints). `rate()` over
//!   `taproot_tokens_total` gives the long-run figure, evaluations included.
//! - Time-dependent gauges (checkpoint age, resident memory) are refreshed at scrape time
//!   ([`refresh_scrape_gauges`]) and every 5 s by the actor's timer, which also runs the
//!   exporter's upkeep (draining histogram samples when nobody scrapes).
//! - Memory: `taproot_resident_memory_bytes` is the process's VmRSS. Device memory of a GPU
//!   backend goes through [`DeviceMemoryProbe`] (none on CPU): when one is set, the series
//!   `taproot_device_memory_used_bytes{device}` appear.

use super::events::{Event, Observer};
use crate::flops;
use crate::model::Dims;
use ::metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One exported metric: name, type, help text.
#[derive(Clone, Copy, Debug)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

const fn m(name: &'static str, kind: Kind, help: &'static str) -> MetricDef {
    MetricDef { name, kind, help }
}

use Kind::{Counter as C, Gauge as G, Histogram as H};

/// Every metric the exporter emits (the README's "Monitoring" section and the dashboard use
/// exactly these).
pub const CATALOG: &[MetricDef] = &[
    m("taproot_info", G, "Always 1; labels name the run and the taproot version."),
    m(
        "taproot_state",
        G,
        "1 for the run's current state (label state: running, paused, restarting, stopping, finished, failed), 0 for the others.",
    ),
    m("taproot_start_time_seconds", G, "Unix time at which this daemon process started the run."),
    m("taproot_step", G, "Optimizer updates done in the run (across restarts)."),
    m("taproot_total_steps", G, "Optimizer updates the run is configured for (run.steps)."),
    m(
        "taproot_eta_seconds",
        G,
        "Estimated seconds until the last step, from this process's mean time per step (0 until two steps have run).",
    ),
    m("taproot_train_loss", G, "Mean training loss of the last step (nats per token)."),
    m("taproot_validation_loss", G, "Validation loss of the last evaluation (nats per token)."),
    m("taproot_learning_rate", G, "Learning rate of the last step."),
    m("taproot_gradient_norm", G, "Global L2 norm of the gradient of the last step, before the update."),
    m("taproot_steps_total", C, "Optimizer steps done by this process."),
    m("taproot_tokens_total", C, "Training tokens processed by this process."),
    m("taproot_source_tokens_total", C, "Training tokens drawn from each source of the data (label source), over all replicas."),
    m("taproot_tokens_per_second", G, "Training tokens per second of the last step."),
    m("taproot_step_duration_seconds", H, "Wall seconds per optimizer step (micro-batches, barrier, optimizer)."),
    m("taproot_layer_forward_seconds", H, "Compute seconds of one layer's forward pass for one micro-batch (labels: layer id, device)."),
    m("taproot_layer_backward_seconds", H, "Compute seconds of one layer's backward pass for one micro-batch (labels: layer id, device)."),
    m("taproot_model_depth", G, "Transformer blocks in the model now."),
    m("taproot_target_depth", G, "Transformer blocks at the end of the growth plan."),
    m("taproot_parameters", G, "Parameters of the model now (embeddings included)."),
    m("taproot_parameters_non_embedding", G, "Parameters of the model now, embeddings excluded."),
    m("taproot_growth_events_total", C, "Expansions of the model applied by this process."),
    m("taproot_growth_duration_seconds", H, "Wall seconds per expansion (spawning and linking the new layers)."),
    m("taproot_flops_llmc_total", C, "Training FLOPs done by this process, llm.c convention (6N + 6LTC per token)."),
    m(
        "taproot_flops_non_embedding_total",
        C,
        "Training FLOPs done by this process, non-embedding convention (6N per token, N without embeddings).",
    ),
    m("taproot_peak_flops_per_second", G, "The configured peak FLOP/s of the hardware (daemon.peak_flops; 0: unknown)."),
    m("taproot_mfu_ratio", G, "Model FLOPs utilisation of the last step: llm.c FLOPs per second over daemon.peak_flops (0 when unknown)."),
    m(
        "taproot_compute_saved_ratio",
        G,
        "1 - non-embedding FLOPs spent by the run so far / FLOPs the fixed target-depth model would have spent for the same steps.",
    ),
    m("taproot_checkpoint_duration_seconds", H, "Wall seconds per checkpoint (gather state, write, fsync, rename)."),
    m(
        "taproot_checkpoint_age_seconds",
        G,
        "Seconds since the newest checkpoint was written (since the process started if the run has none): the work a crash would lose.",
    ),
    m("taproot_checkpoint_step", G, "Step of the newest checkpoint (0: none)."),
    m("taproot_checkpoint_size_bytes", G, "Size of the newest checkpoint written by this process."),
    m("taproot_resident_memory_bytes", G, "Resident memory of the process (VmRSS)."),
    m("taproot_micro_batches_in_flight", G, "Micro-batches in the pipeline right after the last change."),
    m("taproot_actor_restarts_total", C, "Pipeline restarts by the supervisor (from the newest checkpoint) in this process."),
    m("taproot_non_finite_events_total", C, "Non-finite training losses or gradient norms (label kind: loss, gradient_norm)."),
    m("taproot_paused", G, "1 while the run is paused by a control request."),
    m(
        "taproot_activation_buffers",
        G,
        "Activation/gradient buffers allocated by a device's pool (label device); flat after the first steps.",
    ),
    m("taproot_peer_copy_bytes_total", C, "Bytes of activations and gradients copied into a device from other devices (label device)."),
    m(
        "taproot_allreduce_duration_seconds",
        H,
        "Seconds per all-reduce over the data-parallel replicas: one unit's gradients, or the step's loss (none with one replica).",
    ),
    m(
        "taproot_allreduce_wait_seconds",
        H,
        "Seconds a unit waited for its gradient sum at the optimizer step: the part of the all-reduce backward did not hide.",
    ),
    m("taproot_allreduce_bytes_total", C, "Gradient bytes this process summed over the data-parallel replicas."),
];

/// Metrics of a pipeline over several processes, emitted only there (label peer_stage: the
/// other end of the link, within this process's replica).
pub const LINK_METRICS: &[MetricDef] = &[
    m("taproot_link_bytes_sent_total", C, "Frame bytes (activations, gradients, control) this process sent to another pipeline stage."),
    m("taproot_link_bytes_received_total", C, "Frame bytes this process received from another pipeline stage."),
];

/// Run states of `taproot_state` (and of the daemon's `/status`).
pub const STATES: &[&str] = &["running", "paused", "restarting", "stopping", "finished", "failed"];

/// Buckets of the step-duration histogram, in seconds.
pub const STEP_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Buckets of the per-layer forward/backward histograms, in seconds.
pub const LAYER_BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
/// Buckets of the checkpoint and growth histograms, in seconds.
pub const SLOW_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// Build the Prometheus recorder with this module's histogram buckets, install it as the
/// process's global `metrics` recorder, and return the handle that renders it. Once per process.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let mut b = PrometheusBuilder::new();
    for d in CATALOG.iter().filter(|d| d.kind == Kind::Histogram) {
        let buckets = match d.name {
            "taproot_step_duration_seconds" => STEP_BUCKETS,
            "taproot_layer_forward_seconds"
            | "taproot_layer_backward_seconds"
            | "taproot_allreduce_duration_seconds"
            | "taproot_allreduce_wait_seconds" => LAYER_BUCKETS,
            _ => SLOW_BUCKETS,
        };
        b = b.set_buckets_for_metric(Matcher::Full(d.name.to_string()), buckets)?;
    }
    // Several processes: every series says which one it comes from.
    let t = crate::dist::topology();
    if t.size() > 1 {
        b = b
            .add_global_label("rank", t.rank().to_string())
            .add_global_label("replica", t.replica.to_string())
            .add_global_label("stage", t.stage.to_string());
    }
    let recorder = b.build_recorder();
    let handle = recorder.handle();
    ::metrics::set_global_recorder(recorder).map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))?;
    for d in CATALOG.iter().chain(LINK_METRICS) {
        match d.kind {
            Kind::Counter => describe_counter!(d.name, d.help),
            Kind::Gauge => describe_gauge!(d.name, d.help),
            Kind::Histogram => describe_histogram!(d.name, d.help),
        }
    }
    Ok(handle)
}

/// Reads device memory of a GPU backend: (device, bytes used). None on CPU; a CUDA backend sets
/// one with [`set_device_memory_probe`] and `taproot_device_memory_used_bytes{device}` appears.
pub type DeviceMemoryProbe = Arc<dyn Fn() -> Vec<(String, u64)> + Send + Sync>;

static DEVICE_MEMORY_PROBE: Mutex<Option<DeviceMemoryProbe>> = Mutex::new(None);

pub fn set_device_memory_probe(p: DeviceMemoryProbe) {
    *DEVICE_MEMORY_PROBE.lock().expect("probe lock") = Some(p);
}

/// What the scrape handler needs without asking the actor.
#[derive(Debug)]
pub struct Shared {
    started: Instant,
    /// Unix milliseconds of the newest checkpoint (0: none).
    last_checkpoint_unix_ms: AtomicU64,
}

impl Shared {
    pub fn new() -> Arc<Shared> {
        Arc::new(Shared { started: Instant::now(), last_checkpoint_unix_ms: AtomicU64::new(0) })
    }
    pub fn set_last_checkpoint_unix_ms(&self, ms: u64) {
        self.last_checkpoint_unix_ms.store(ms, Ordering::Relaxed);
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Resident memory of this process in bytes (Linux `VmRSS`).
pub fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Set the gauges whose value depends on the time of reading: checkpoint age, memory.
pub fn refresh_scrape_gauges(shared: &Shared) {
    let last = shared.last_checkpoint_unix_ms.load(Ordering::Relaxed);
    let age = if last == 0 { shared.started.elapsed().as_secs_f64() } else { unix_ms().saturating_sub(last) as f64 / 1e3 };
    gauge!("taproot_checkpoint_age_seconds").set(age);
    if let Some(rss) = resident_memory_bytes() {
        gauge!("taproot_resident_memory_bytes").set(rss as f64);
    }
    refresh_process_metrics();
    let probe = DEVICE_MEMORY_PROBE.lock().expect("probe lock").clone();
    if let Some(p) = probe {
        for (device, bytes) in p() {
            gauge!("taproot_device_memory_used_bytes", "device" => device).set(bytes as f64);
        }
    }
}

/// The collectives and links of this process (`crate::dist`), as counters. (The durations of
/// all-reduces are recorded as they happen, into the two histograms.)
pub fn refresh_process_metrics() {
    counter!("taproot_allreduce_bytes_total").absolute(crate::dist::stats().bytes);
    for (q, sent, received) in crate::dist::link_bytes() {
        counter!("taproot_link_bytes_sent_total", "peer_stage" => q.to_string()).absolute(sent);
        counter!("taproot_link_bytes_received_total", "peer_stage" => q.to_string()).absolute(received);
    }
}

/// Where the run stands when the actor starts (or after the daemon learns where it resumed).
#[derive(Clone, Debug)]
pub struct Seed {
    pub step: u64,
    pub depth: usize,
    /// (layer id, device), bottom to top (may be empty: layers are then registered when they
    /// first report a time).
    pub stack: Vec<(u64, String)>,
    /// Depth history: (first update index at this depth, depth): `(0, model.depth)` and one entry
    /// per growth record.
    pub history: Vec<(u64, usize)>,
    /// Step and unix milliseconds of the checkpoint resumed from.
    pub checkpoint: Option<(u64, u64)>,
}

pub struct MetricsArgs {
    pub run: String,
    pub dims: Dims,
    pub seq_len: usize,
    /// Tokens per optimizer step: B · T · micro-batches.
    pub tokens_per_step: u64,
    pub target_depth: usize,
    pub total_steps: u64,
    pub peak_flops: f64,
    pub seed: Seed,
    pub handle: PrometheusHandle,
    pub shared: Arc<Shared>,
}

pub enum MetricsMsg {
    Event(Event),
    /// Correct the starting point (the run resumed from another checkpoint than expected).
    Seed(Seed),
    /// A run state decided outside the runtime (stopping, finished, failed); answered, if asked, once set.
    State(&'static str, Option<ractor::RpcReplyPort<()>>),
    /// Timer: refresh time-dependent gauges and run the exporter's upkeep.
    Tick,
}

pub struct MetricsState {
    a: MetricsArgs,
    /// First update index at a depth → that depth.
    history: BTreeMap<u64, usize>,
    /// Whether a step event or a checkpoint event has arrived (then they are newer than a seed).
    seen_step: bool,
    seen_checkpoint: bool,
    layer: HashMap<(u64, String, bool), Histogram>,
    /// (when, step) of the first step event of this process, for the ETA.
    first_step: Option<(Instant, u64)>,
    paused: bool,
    state: &'static str,
}

/// The observer to hand to `runtime::start`: every event goes to the metrics actor (a cast:
/// cheap, never blocks), then to `also`.
pub fn observer(actor: ActorRef<MetricsMsg>, also: Option<Observer>) -> Observer {
    Arc::new(move |e: &Event| {
        let _ = actor.cast(MetricsMsg::Event(e.clone()));
        if let Some(f) = &also {
            f(e);
        }
    })
}

pub struct MetricsActor;

impl MetricsState {
    fn set_state(&mut self, st: &'static str) {
        self.state = st;
        for s in STATES {
            gauge!("taproot_state", "state" => *s).set(if *s == st { 1.0 } else { 0.0 });
        }
    }

    fn set_depth(&self, depth: usize) {
        gauge!("taproot_model_depth").set(depth as f64);
        gauge!("taproot_parameters").set(flops::total_params(&self.a.dims, depth) as f64);
        gauge!("taproot_parameters_non_embedding").set(flops::non_embedding_params(&self.a.dims, depth) as f64);
    }

    fn layer_histogram(&mut self, layer: u64, device: &str, backward: bool) -> &Histogram {
        self.layer.entry((layer, device.to_string(), backward)).or_insert_with(|| {
            let name = if backward { "taproot_layer_backward_seconds" } else { "taproot_layer_forward_seconds" };
            histogram!(name, "layer" => layer.to_string(), "device" => device.to_string())
        })
    }

    /// Merge what the daemon learned at start; events that already arrived are newer and win.
    fn seed(&mut self, s: Seed) {
        for (at, depth) in s.history {
            self.history.insert(at, depth);
        }
        for (id, device) in &s.stack {
            self.layer_histogram(*id, device, false);
            self.layer_histogram(*id, device, true);
        }
        if !self.seen_step {
            gauge!("taproot_step").set(s.step as f64);
            self.set_depth(s.depth);
            self.compute_saved(s.step);
        }
        if let (Some((step, ms)), false) = (s.checkpoint, self.seen_checkpoint) {
            gauge!("taproot_checkpoint_step").set(step as f64);
            self.a.shared.set_last_checkpoint_unix_ms(ms);
        }
    }

    /// Depth of update `k` according to the history.
    fn depth_at(&self, k: u64) -> Option<usize> {
        self.history.range(..=k).next_back().map(|(_, d)| *d)
    }

    fn compute_saved(&self, step: u64) {
        let fixed = flops::flops_per_token_non_embedding(&self.a.dims, self.a.target_depth) * (self.a.tokens_per_step * step) as f64;
        let ratio = if fixed > 0.0 {
            1.0 - flops::run_flops_non_embedding(&self.a.dims, &self.history, self.a.tokens_per_step, step) / fixed
        } else {
            0.0
        };
        gauge!("taproot_compute_saved_ratio").set(ratio);
    }

    fn on_event(&mut self, e: Event) {
        match e {
            Event::Step { step, total_steps, depth, lr, train_loss, tokens, seconds, grad_norm, params, sources, .. } => {
                for (name, seen) in sources {
                    counter!("taproot_source_tokens_total", "source" => name).absolute(seen);
                }
                // The history must say `depth` for update `step - 1` (a restart from an older
                // checkpoint replays growth; a history seeded from nothing learns it here).
                let k = step.saturating_sub(1);
                if self.depth_at(k) != Some(depth) {
                    self.history.split_off(&k);
                    self.history.insert(k, depth);
                }
                self.seen_step = true;
                gauge!("taproot_step").set(step as f64);
                gauge!("taproot_total_steps").set(total_steps as f64);
                gauge!("taproot_learning_rate").set(lr as f64);
                gauge!("taproot_train_loss").set(train_loss as f64);
                gauge!("taproot_gradient_norm").set(grad_norm);
                counter!("taproot_steps_total").increment(1);
                counter!("taproot_tokens_total").increment(tokens);
                let secs = seconds.max(1e-9);
                gauge!("taproot_tokens_per_second").set(tokens as f64 / secs);
                histogram!("taproot_step_duration_seconds").record(seconds);
                let llmc = flops::flops_per_token_llmc(&self.a.dims, depth, self.a.seq_len) * tokens as f64;
                let ne = flops::flops_per_token_non_embedding(&self.a.dims, depth) * tokens as f64;
                counter!("taproot_flops_llmc_total").increment(llmc as u64);
                counter!("taproot_flops_non_embedding_total").increment(ne as u64);
                let mfu = if self.a.peak_flops > 0.0 { llmc / secs / self.a.peak_flops } else { 0.0 };
                gauge!("taproot_mfu_ratio").set(mfu);
                gauge!("taproot_model_depth").set(depth as f64);
                gauge!("taproot_parameters").set(params.0 as f64);
                gauge!("taproot_parameters_non_embedding").set(params.1 as f64);
                self.compute_saved(step);
                match self.first_step {
                    None => self.first_step = Some((Instant::now(), step)),
                    Some((t0, s0)) if step > s0 => {
                        let per_step = t0.elapsed().as_secs_f64() / (step - s0) as f64;
                        gauge!("taproot_eta_seconds").set(per_step * total_steps.saturating_sub(step) as f64);
                    }
                    Some(_) => {}
                }
                if matches!(self.state, "restarting") || (self.state == "paused" && !self.paused) {
                    self.set_state("running");
                }
            }
            Event::Eval { val_loss, .. } => gauge!("taproot_validation_loss").set(val_loss as f64),
            Event::Sample { .. } => {}
            Event::Growth { record, seconds } => {
                self.history.split_off(&record.at_step);
                self.history.insert(record.at_step, record.to_depth);
                counter!("taproot_growth_events_total").increment(1);
                histogram!("taproot_growth_duration_seconds").record(seconds);
                self.set_depth(record.to_depth);
            }
            Event::Checkpoint { step, seconds, bytes, .. } => {
                histogram!("taproot_checkpoint_duration_seconds").record(seconds);
                gauge!("taproot_checkpoint_step").set(step as f64);
                gauge!("taproot_checkpoint_size_bytes").set(bytes as f64);
                self.a.shared.set_last_checkpoint_unix_ms(unix_ms());
                self.seen_checkpoint = true;
                gauge!("taproot_checkpoint_age_seconds").set(0.0);
            }
            Event::LayerTime { layer, device, backward, seconds } => self.layer_histogram(layer, &device, backward).record(seconds),
            Event::InFlight(n) => gauge!("taproot_micro_batches_in_flight").set(n as f64),
            Event::ExpertLoad { layer, load, .. } => {
                // Each expert's share of the layer's routed tokens in the step (1/E when balanced).
                let total = load.iter().sum::<u64>().max(1) as f64;
                for (e, l) in load.iter().enumerate() {
                    gauge!("taproot_expert_load", "layer" => layer.to_string(), "expert" => e.to_string()).set(*l as f64 / total);
                }
            }
            Event::Buffers { device, allocated, peer_bytes_in } => {
                gauge!("taproot_activation_buffers", "device" => device.clone()).set(allocated as f64);
                counter!("taproot_peer_copy_bytes_total", "device" => device).absolute(peer_bytes_in);
            }
            Event::NonFinite { what, .. } => {
                let kind = if what.starts_with("gradient") { "gradient_norm" } else { "loss" };
                counter!("taproot_non_finite_events_total", "kind" => kind).increment(1);
            }
            Event::Restart { .. } => {
                counter!("taproot_actor_restarts_total").increment(1);
                self.first_step = None;
                if self.state == "running" || self.state == "paused" {
                    self.set_state("restarting");
                }
            }
            Event::Paused(p) => {
                self.paused = p;
                gauge!("taproot_paused").set(if p { 1.0 } else { 0.0 });
                if matches!(self.state, "running" | "paused" | "restarting") {
                    self.set_state(if p { "paused" } else { "running" });
                }
            }
        }
    }
}

impl Actor for MetricsActor {
    type Msg = MetricsMsg;
    type State = MetricsState;
    type Arguments = MetricsArgs;

    async fn pre_start(&self, me: ActorRef<MetricsMsg>, a: MetricsArgs) -> Result<MetricsState, ActorProcessingErr> {
        // Every series once, with its initial value.
        let start_unix = unix_ms() as f64 / 1e3;
        gauge!("taproot_info", "run" => a.run.clone(), "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        gauge!("taproot_start_time_seconds").set(start_unix);
        gauge!("taproot_total_steps").set(a.total_steps as f64);
        gauge!("taproot_target_depth").set(a.target_depth as f64);
        gauge!("taproot_peak_flops_per_second").set(a.peak_flops);
        for name in ["taproot_train_loss", "taproot_validation_loss", "taproot_gradient_norm"] {
            gauge!(name).set(f64::NAN);
        }
        for name in [
            "taproot_learning_rate",
            "taproot_tokens_per_second",
            "taproot_mfu_ratio",
            "taproot_eta_seconds",
            "taproot_checkpoint_step",
            "taproot_checkpoint_size_bytes",
            "taproot_micro_batches_in_flight",
            "taproot_paused",
        ] {
            gauge!(name).set(0.0);
        }
        for name in [
            "taproot_steps_total",
            "taproot_tokens_total",
            "taproot_growth_events_total",
            "taproot_flops_llmc_total",
            "taproot_flops_non_embedding_total",
            "taproot_actor_restarts_total",
            "taproot_allreduce_bytes_total",
        ] {
            counter!(name).absolute(0);
        }
        for kind in ["loss", "gradient_norm"] {
            counter!("taproot_non_finite_events_total", "kind" => kind).absolute(0);
        }
        for name in [
            "taproot_step_duration_seconds",
            "taproot_growth_duration_seconds",
            "taproot_checkpoint_duration_seconds",
            "taproot_allreduce_duration_seconds",
            "taproot_allreduce_wait_seconds",
        ] {
            let _ = histogram!(name);
        }
        let seed = a.seed.clone();
        let mut s = MetricsState {
            a,
            history: BTreeMap::new(),
            seen_step: false,
            seen_checkpoint: false,
            layer: HashMap::new(),
            first_step: None,
            paused: false,
            state: "running",
        };
        s.set_state("running");
        s.seed(seed);
        refresh_scrape_gauges(&s.a.shared);
        me.send_interval(Duration::from_secs(5), || MetricsMsg::Tick);
        Ok(s)
    }

    async fn handle(&self, _me: ActorRef<MetricsMsg>, msg: MetricsMsg, s: &mut MetricsState) -> Result<(), ActorProcessingErr> {
        match msg {
            MetricsMsg::Event(e) => s.on_event(e),
            MetricsMsg::Seed(seed) => s.seed(seed),
            MetricsMsg::State(st, reply) => {
                s.set_state(st);
                let _ = reply.map(|r| r.send(()));
            }
            MetricsMsg::Tick => {
                refresh_scrape_gauges(&s.a.shared);
                s.a.handle.run_upkeep();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_follows_prometheus_naming() {
        let mut seen = std::collections::HashSet::new();
        for d in CATALOG {
            assert!(d.name.starts_with("taproot_"), "{}", d.name);
            assert!(seen.insert(d.name), "{} twice", d.name);
            assert_eq!(d.kind == Kind::Counter, d.name.ends_with("_total"), "{}: counters and only counters end in _total", d.name);
            assert!(!d.help.is_empty());
        }
    }
}
