//! The run configuration: one TOML file per run (`config/*.toml`), overridable from the command
//! line with `--set section.key=value`.
//!
//! Parsing is strict: unknown keys, missing keys and wrong types are errors that name the full
//! key path (`run.steps`, `growth[1].init`; TOML syntax errors name the line instead), and
//! [`Config::validate`] rejects inconsistent values (τ after T, heads not dividing C, a target
//! depth below the starting depth, …) naming the key. Relative paths are relative to the working
//! directory the command runs in (the repository root for every shipped config).

pub mod changes;
mod data;
pub mod memory;
pub use data::{DataConfig, SourceConfig};
mod model;
pub use model::{ModelConfig, MoeConfig};
mod parallel;
pub use parallel::{Collectives, DeviceMap, ParallelConfig};
mod validate;

use crate::model::growth::Expansion;
pub use crate::model::growth::GrowthSpec;
use crate::optim::schedule::Schedule;
use crate::optim::OptimConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub run: RunConfig,
    pub data: DataConfig,
    pub model: ModelConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub schedule: Schedule,
    /// The growth plan: none (the default: a fixed-size run), one, or several expansions.
    #[serde(default)]
    pub growth: Vec<GrowthSpec>,
    #[serde(default)]
    pub eval: EvalConfig,
    /// `taproot plan` (the τ pilot): tolerance, budget, evaluation interval.
    #[serde(default)]
    pub plan: PlanConfig,
    #[serde(default)]
    pub placement: PlacementConfig,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    #[serde(default, skip_serializing_if = "ParallelConfig::is_default")]
    pub parallel: ParallelConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub supervision: SupervisionConfig,
    /// Fault injection, for testing supervision; empty in every real config.
    #[serde(default)]
    pub faults: FaultConfig,
    #[serde(default)]
    pub cuda: CudaConfig,
    /// `[precision]`: what the matrix products compute in (storage stays fp32).
    #[serde(default)]
    pub precision: PrecisionConfig,
    /// `[kernels]`: algorithm choices that do not change the model (attention).
    #[serde(default)]
    pub kernels: KernelsConfig,
    /// `taproot daemon`: the HTTP endpoint, its control token, the MFU reference.
    #[serde(default)]
    pub daemon: DaemonConfig,
}

/// CUDA backend settings (ignored on CPU).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct CudaConfig {
    /// The older spelling of `precision.compute = "tf32"` (kept so existing configs run).
    pub tf32: bool,
}

/// `[kernels]`: which algorithm computes an op, where several compute the same function.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct KernelsConfig {
    /// `"materialized"` (default: the (B, NH, T, T) probabilities are kept for the backward) or
    /// `"flash"` (tiles with an online softmax; only a logsumexp per row is kept). On CUDA, flash
    /// runs on bf16 tensor cores: it needs `precision.compute = "bf16"` and a head size of 64 or
    /// 128.
    pub attention: crate::backend::Attention,
}

/// `[precision]`: the precision of the matrix products (see `backend::precision`). Master
/// weights, optimizer state, checkpoints and every non-product op stay fp32, so a run may be
/// resumed under another precision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PrecisionConfig {
    /// `"fp32"` (default: the verified reference), `"tf32"` or `"bf16"`. The CPU backend
    /// emulates tf32/bf16 by rounding the products' operands (slower than fp32 there).
    pub compute: crate::backend::Precision,
    /// What activations and their gradients are stored in between ops: `"fp32"` (default) or
    /// `"bf16"` (every op's writes to an activation buffer rounded to bf16 as it ends; master
    /// weights, gradients, optimizer state and statistics stay fp32; `backend/cpu/storage.rs`).
    /// The CPU backend only, in this version.
    pub storage: crate::backend::Precision,
}

/// `[daemon]`: only `taproot daemon` reads it (`taproot train` ignores it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Address of the HTTP endpoint (`/metrics`, `/status`, `/control/*`); `--listen` overrides.
    /// Loopback by default: the endpoint has no TLS, and only the control routes need the token.
    pub listen: String,
    /// File holding the bearer token of the control endpoints (surrounding whitespace ignored).
    /// Unset: the `TAPROOT_TOKEN` environment variable; neither: control endpoints answer 403.
    pub token_file: Option<PathBuf>,
    /// Peak FLOP/s of the hardware the run uses, the denominator of `taproot_mfu_ratio`
    /// (FLOPs counted with llm.c's convention). 0: unknown, MFU is reported as 0.
    pub peak_flops: f64,
    /// After the run ends (finished or failed), keep serving `/metrics` and `/status` this many
    /// seconds so that Prometheus scrapes the final values, then exit (0 if finished, 1 if failed).
    pub linger_s: u64,
    /// Open HTTP connections at most. A new connection beyond it closes the oldest idle one (one
    /// not in the middle of a request), or is refused when every one is busy: idle clients can
    /// neither take the run's file descriptors nor lock out a scrape.
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers.
    pub header_timeout_s: u64,
    /// Seconds a connection may stay open without a request before it is closed.
    pub idle_timeout_s: u64,
    /// Requests per second each client address may make to `/metrics` and `/status` (a burst of
    /// twice as many is allowed); beyond it, 429. 0: no limit.
    pub rate_limit: f64,
    /// Requests per second all clients together may make to `/metrics`, and as many to
    /// `/status` (a burst of twice as many); beyond it, 429. Many client addresses cannot
    /// multiply the per-client budget into a load on the run. 0: no limit.
    pub global_rate_limit: f64,
    /// Host names the `Host` header may carry besides the listen address itself (and, on a
    /// loopback address, `localhost`): a page in a browser cannot reach the endpoint through
    /// DNS rebinding. Empty on a wildcard address (`0.0.0.0`): any host.
    pub allowed_hosts: Vec<String>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            listen: "127.0.0.1:9464".into(),
            token_file: None,
            peak_flops: 0.0,
            linger_s: 60,
            max_connections: 64,
            header_timeout_s: 5,
            idle_timeout_s: 30,
            rate_limit: 50.0,
            global_rate_limit: 100.0,
            allowed_hosts: Vec::new(),
        }
    }
}

/// Which device each actor runs on (`cpu`, `cpu:N`, `cuda:N`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementConfig {
    /// The devices layers are spread over, in pipeline order (bottom layers on the first).
    pub devices: Vec<String>,
    /// Device of the actor owning both ends (embedding and tied head). Default: the first device.
    pub ends: Option<String>,
    /// `balanced`: after every growth, re-split the stack into contiguous ranges of (near) equal
    /// length, one per device (layers whose device changes are moved, state and all).
    /// `fill`: layers never move; a new layer goes to the first device holding fewer than
    /// ceil(target_depth / devices) layers.
    pub policy: PlacementPolicy,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig { devices: vec!["cpu:0".into()], ends: None, policy: PlacementPolicy::Balanced }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PlacementPolicy {
    #[default]
    Balanced,
    Fill,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Micro-batches in flight at once (1F1B memory bound). 0 = one per stage (depth + 1),
    /// capped by `data.micro_batches`.
    pub max_in_flight: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Write a checkpoint every this many steps (0: only when stopped by a signal or request).
    pub every: u64,
    /// Keep the newest this many checkpoints.
    pub keep: usize,
    /// Where (default `<out_dir>/checkpoints`).
    pub dir: Option<PathBuf>,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { every: 0, keep: 3, dir: None }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisionConfig {
    /// On a failed actor of the pipeline: restart the pipeline from the newest checkpoint (true) or stop
    /// the run with an error naming the layer and step (false).
    pub restart_on_failure: bool,
    pub max_restarts: u32,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        SupervisionConfig { restart_on_failure: false, max_restarts: 3 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct FaultConfig {
    /// Make the layer with this id panic ...
    pub panic_layer: Option<u64>,
    /// ... when it takes the optimizer step with this (0-based) index.
    pub panic_at_step: Option<u64>,
    /// Give the layers this data-parallel replica grows another init seed (the check that every
    /// replica grows the same layers must then stop the run).
    pub diverge_replica: Option<usize>,
    /// Initialise this data-parallel replica's embedding with another seed (the replicas'
    /// comparison of their weights at every checkpoint must then stop the run).
    pub drift_replica: Option<usize>,
    /// Milliseconds `taproot train` waits after reading its config, before anything else: a
    /// slow start-up (a large corpus, a slow file system), to test signals that arrive then.
    pub start_delay_ms: u64,
    /// Hold each NCCL all-reduce's stream this many milliseconds before it, as a stopped replica
    /// would hold the others (the NCCL watchdog must then stop the run within
    /// `parallel.timeout_s`). 0: none.
    pub stall_collectives_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub name: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Total optimizer steps T.
    pub steps: u64,
    /// Where logs, checkpoints and results go (default `runs/<name>`).
    #[serde(default)]
    pub out_dir: Option<PathBuf>,
    /// Print a training-loss line every this many steps (0: never).
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Seconds a stop signal waits for the current step to finish before the stop is forced
    /// (at the next micro-batch boundary, dropping the step).
    #[serde(default = "default_stop_grace_s")]
    pub stop_grace_s: u64,
    /// The memory the run may need at its largest (`"24GiB"`, `"512MiB"`, or bytes); the config
    /// is refused when the estimate exceeds it (see `config::memory`). Default: the host's memory
    /// on CPU devices, no check on CUDA devices.
    #[serde(default)]
    pub max_memory: Option<String>,
}

fn default_stop_grace_s() -> u64 {
    30
}

fn default_seed() -> u64 {
    1337
}
fn default_log_every() -> u64 {
    50
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate every this many steps (and always at the last step).
    pub every: u64,
    /// Validation batches (of B sequences of T tokens) per evaluation.
    pub batches: usize,
    /// Print a sample of this many tokens at each evaluation (0: none), drawn from the model
    /// as it is then (temperature 1, top-k 40, the run's seed), so that the text shows the model
    /// learn and grow.
    #[serde(skip_serializing_if = "is_zero")]
    pub sample_tokens: usize,
    /// The sample's prompt.
    #[serde(skip_serializing_if = "is_newline")]
    pub sample_prompt: String,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_newline(s: &str) -> bool {
    s == "\n"
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig { every: 250, batches: 16, sample_tokens: 0, sample_prompt: "\n".into() }
    }
}

/// The pilot of `taproot plan` (docs/METHOD.md, "Expansion timing and mixing time"); every key is
/// also a flag of the command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlanConfig {
    /// Relative tolerance of "mixed": progressive eval loss <= (1 + tol) · fixed eval loss.
    pub mix_tolerance: f64,
    /// Steps the two pilot runs train for (the run's schedule, truncated). Default: up to the
    /// start of the decay phase.
    pub budget: Option<u64>,
    /// Evaluation interval of the pilot runs (the resolution of t_mix). Default: 1% of
    /// `run.steps`, at least 1.
    pub eval_every: Option<u64>,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig { mix_tolerance: 0.005, budget: None, eval_every: None }
    }
}

impl Config {
    /// Whether the run is placed on CUDA devices (validation makes a placement all-CUDA or
    /// all-CPU, so any CUDA device means every stage is on one).
    pub fn on_cuda(&self) -> bool {
        self.placement.devices.iter().chain(self.placement.ends.iter()).any(|d| d.starts_with("cuda"))
    }

    /// The precision the run's products compute in (`precision.compute`, or tf32 where only the
    /// older `cuda.tf32 = true` asks for it).
    pub fn compute_precision(&self) -> crate::backend::Precision {
        use crate::backend::Precision;
        match self.precision.compute {
            Precision::Fp32 if self.cuda.tf32 => Precision::Tf32,
            p => p,
        }
    }

    /// Read, apply `--set` overrides, parse strictly, validate.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = crate::userfile::read_to_string(path, "config", crate::userfile::TEXT_MAX)?;
        Self::parse(&text, overrides).with_context(|| format!("in config {}", path.display()))
    }

    /// Parse a config's TOML text, apply `--set` overrides (`section.key=value`, the value read
    /// as TOML or else as a string), then validate. `schedule.total_steps` is `run.steps`.
    ///
    /// ```
    /// use taproot::config::Config;
    ///
    /// let text = r#"
    /// [run]
    /// name = "tiny"
    /// steps = 100
    /// [data]
    /// dir = "data/tiny"
    /// tokenizer = "bytes"
    /// batch_size = 4
    /// seq_len = 16
    /// [model]
    /// channels = 32
    /// heads = 2
    /// depth = 0
    /// target_depth = 2
    /// [[growth]]
    /// at = 0.5
    /// to_depth = 2
    /// "#;
    /// let cfg = Config::parse(text, &[]).unwrap();
    /// assert_eq!((cfg.model.channels, cfg.data.micro_batches, cfg.max_seq()), (32, 1, 16));
    /// assert_eq!(cfg.out_dir(), std::path::Path::new("runs/tiny"));
    /// assert_eq!(cfg.expansions()[0].at_step, 50); // at = 0.5 of 100 steps
    ///
    /// // An override changes T, and what follows from it.
    /// let cfg = Config::parse(text, &["run.steps=300".to_string()]).unwrap();
    /// assert_eq!((cfg.run.steps, cfg.schedule.total_steps, cfg.expansions()[0].at_step), (300, 300, 150));
    ///
    /// // Unknown keys are errors that name the key.
    /// let err = Config::parse(&text.replace("seq_len = 16", "seq_len = 16\nepochs = 3"), &[]).unwrap_err();
    /// assert!(format!("{err:#}").contains("data.epochs"));
    /// ```
    pub fn parse(text: &str, overrides: &[String]) -> Result<Config> {
        let mut value: toml::Table = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        // Growth entries one by one first, so that an error names its entry (`growth[1].init`):
        // the toml crate's key path does not record array indices.
        if let Some(toml::Value::Array(items)) = value.get("growth") {
            for (i, item) in items.iter().enumerate() {
                GrowthSpec::deserialize(item.clone()).map_err(|e| key_error(&e, &format!("growth[{i}]")))?;
            }
        }
        let mut cfg: Config = Config::deserialize(toml::Value::Table(value)).map_err(|e| key_error(&e, ""))?;
        cfg.schedule.total_steps = cfg.run.steps;
        if cfg.data.tokenizer.starts_with("hf:") && cfg.data.vocab_size.is_none() {
            let tok = crate::data::Tokenizer::from_name(&cfg.data.tokenizer).context("`data.tokenizer`")?;
            cfg.data.vocab_size = Some(tok.vocab_size());
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn target_depth(&self) -> usize {
        self.model.target_depth.unwrap_or_else(|| self.growth.iter().map(|g| g.to_depth).max().unwrap_or(self.model.depth))
    }

    /// How the blocks of this run are initialised (scheme, parameterisation, target depth, seed).
    pub fn init_config(&self) -> crate::model::init::InitConfig {
        crate::model::init::InitConfig::new(self.model.init, self.target_depth(), self.run.seed)
            .with_parameterization(self.model.parameterization)
    }

    pub fn max_seq(&self) -> usize {
        self.model.max_seq.unwrap_or(self.data.seq_len)
    }

    pub fn out_dir(&self) -> PathBuf {
        self.run.out_dir.clone().unwrap_or_else(|| PathBuf::from("runs").join(&self.run.name))
    }

    pub fn checkpoint_dir(&self) -> PathBuf {
        self.checkpoint.dir.clone().unwrap_or_else(|| self.out_dir().join("checkpoints"))
    }

    /// The config as TOML text (stored in checkpoints).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// The growth plan as expansions at absolute steps, in order.
    pub fn expansions(&self) -> Vec<Expansion> {
        self.growth.iter().map(|g| g.resolve(self.run.steps)).collect()
    }
}

/// `cpu`, `cpu:N` or `cuda:N`.
pub fn valid_device_name(d: &str) -> bool {
    d == "cpu"
        || d.strip_prefix("cpu:").is_some_and(|i| i.parse::<usize>().is_ok())
        || d.strip_prefix("cuda:").is_some_and(|i| i.parse::<usize>().is_ok())
}

/// Apply `a.b.c=value` to a TOML table; the value is parsed as TOML (falls back to a string).
fn apply_override(root: &mut toml::Table, spec: &str) -> Result<()> {
    let (path, raw) = spec.split_once('=').with_context(|| format!("--set {spec:?}: expected key=value"))?;
    let keys: Vec<&str> = path.trim().split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        bail!("--set {spec:?}: empty key in {path:?}");
    }
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed a table with key v"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let mut table = root;
    for (j, k) in keys[..keys.len() - 1].iter().enumerate() {
        let prefix = keys[..=j].join(".");
        // `growth[N]`: entry N of an array of tables (N = its length appends a new entry).
        if let Some((name, idx)) = k.strip_suffix(']').and_then(|k| k.split_once('[')) {
            let i: usize = idx.parse().map_err(|_| anyhow::anyhow!("--set {spec:?}: `{prefix}`: {idx:?} is not an index"))?;
            let entry = table.entry(name.to_string()).or_insert_with(|| toml::Value::Array(Vec::new()));
            let items = entry.as_array_mut().with_context(|| format!("--set {spec:?}: `{name}` is not a list"))?;
            if i == items.len() {
                items.push(toml::Value::Table(toml::Table::new()));
            }
            let n = items.len();
            let item =
                items.get_mut(i).with_context(|| format!("--set {spec:?}: `{name}` has {n} entries, so `{prefix}` is out of range"))?;
            table = item.as_table_mut().with_context(|| format!("--set {spec:?}: `{prefix}` is not a table"))?;
            continue;
        }
        let entry = table.entry(k.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().with_context(|| format!("--set {spec:?}: `{prefix}` is not a table"))?;
    }
    table.insert(keys[keys.len() - 1].to_string(), value);
    Ok(())
}

/// A serde error from deserializing the parsed TOML, reworded to start with the full key path:
/// "`run.epochs`: unknown key in `run`, expected one of …", "`run.steps`: missing required key",
/// "`growth[1].init`: unknown variant `xavier`, expected one of …".
///
/// The toml crate keeps the path only in its `Display` (a last line "in `a.b`", printed when the
/// error has no source span, which is always the case for a value that was already parsed), and
/// serde names the key of an unknown or missing field in the message rather than in the path.
fn key_error(e: &toml::de::Error, prefix: &str) -> anyhow::Error {
    let message = e.message().trim_end();
    let shown = e.to_string();
    let keys = shown
        .trim_end()
        .strip_prefix(message)
        .and_then(|rest| rest.trim_start().strip_prefix("in `"))
        .and_then(|rest| rest.strip_suffix('`'))
        .unwrap_or("");
    let join = |a: &str, b: &str| match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}.{b}"),
    };
    let path = join(prefix, keys);
    // serde's words for TOML's: tables and arrays, not maps, sequences and Rust structs.
    let mut message = message
        .replace("invalid type: map,", "invalid type: table,")
        .replace("invalid type: sequence,", "invalid type: array,")
        .replace("expected a sequence", "expected an array");
    if let Some(i) = message.find("expected struct ") {
        message.replace_range(i.., "expected a table");
    }
    let named = |rest: &str| rest.split_once('`').map(|(name, rest)| (name.to_string(), rest.to_string()));
    if let Some((name, rest)) = message.strip_prefix("unknown field `").and_then(named) {
        let rest = rest.trim_start_matches(',').trim_start();
        let within = if path.is_empty() { "at the top level".to_string() } else { format!("in `{path}`") };
        return anyhow::anyhow!("`{}`: unknown key {within}, {rest}", join(&path, &name));
    }
    if let Some((name, _)) = message.strip_prefix("missing field `").and_then(named) {
        return anyhow::anyhow!("`{}`: missing required key", join(&path, &name));
    }
    if path.is_empty() {
        anyhow::anyhow!("{message}")
    } else {
        anyhow::anyhow!("`{path}`: {message}")
    }
}
