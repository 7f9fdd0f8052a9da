//! The paper's experiments at our scale (`taproot experiment NAME`) and the τ pilot
//! (`taproot plan`).
//!
//! - [`mixing`]: t_mix on two loss curves (docs/METHOD.md's definition).
//! - [`report`]: what a run leaves behind ([`report::RunResult`]), cost at a loss, speed-up at
//!   matched final loss, CSV and markdown tables.
//! - [`plot`]: PNG line charts with a built-in font.
//! - [`plan`]: the pilot — fixed-size run and a run grown right after warmup, t_mix, and
//!   τ = T_decay_start − t_mix.
//! - [`suite`]: the experiments themselves (`progressive-vs-fixed`, `tau-sweep`,
//!   `init-ablation`, `stages`, `optimizer-state`).
//!
//! Every run goes through the actor runtime users run (`runtime::train::<CpuBackend>`), one run
//! at a time (runs are timed; two at once would share the cores). A [`Runner`] keeps each
//! finished run in a cache (`runs/_cache/<key>.json`, the key a hash of the run's whole config
//! and the crate version) so that a baseline shared by several experiments — the fixed-size
//! WSD run — is trained once per suite; `--fresh` ignores the cache.

pub mod commands;
pub mod mixing;
pub mod plan;
pub mod plot;
pub mod report;
pub mod suite;

use crate::backend::cpu::CpuBackend;
use crate::config::{Config, GrowthSpec};
use crate::data::Dataset;
use crate::model::growth::{CopyOrder, GrowInit, OptStatePolicy};
use crate::optim::schedule::ScheduleKind;
use crate::runtime::{self, RunOptions};
use anyhow::{Context, Result};
use report::RunResult;
use std::path::{Path, PathBuf};

/// Runs configs on the actor runtime (on the CPU, or on CUDA when the config's placement names
/// CUDA devices), with an optional on-disk cache of results.
pub struct Runner {
    pub data: Dataset,
    /// Where cached results live (None: no cache).
    pub cache: Option<PathBuf>,
    /// Ignore cached results (they are still written).
    pub fresh: bool,
    /// Where each run streams its `steps.csv` / `evals.csv` (`<logs>/<label>/`).
    pub logs: PathBuf,
    /// Print one line per run.
    pub verbose: bool,
}

impl Runner {
    pub fn new(data: Dataset, logs: PathBuf) -> Runner {
        Runner { data, cache: None, fresh: false, logs, verbose: true }
    }

    /// Train `cfg` (stopping after `stop_after` steps if given: the schedule still spans
    /// `run.steps`) and condense the report. `label` names the run in tables and plots.
    pub fn run(&self, label: &str, cfg: &Config, stop_after: Option<u64>) -> Result<RunResult> {
        let key = cache_key(cfg, stop_after);
        let cached = self.cache.as_ref().map(|d| d.join(format!("{key}.json")));
        if let (Some(path), false) = (&cached, self.fresh) {
            if let Ok(text) = std::fs::read_to_string(path) {
                if let Ok(mut r) = serde_json::from_str::<RunResult>(&text) {
                    r.label = label.to_string();
                    r.passes = self.passes(cfg, &r);
                    self.say(label, &r, true);
                    return Ok(r);
                }
            }
        }
        let mut cfg = cfg.clone();
        cfg.run.out_dir = Some(self.logs.join(sanitize(label)));
        cfg.run.log_every = 0;
        let opts = RunOptions { quiet: true, stop_after, ..Default::default() };
        // A config placed on CUDA devices runs there (scripts/gpu-science.sh); others on the CPU.
        let rep = if cfg.on_cuda() {
            runtime::train::<crate::backend::cuda::CudaBackend>(&cfg, self.data.clone(), opts, false)
        } else {
            runtime::train::<CpuBackend>(&cfg, self.data.clone(), opts, false)
        }
        .with_context(|| format!("run {label}"))?;
        let mut r = RunResult::from_report(label, &rep);
        r.passes = self.passes(&cfg, &r);
        if let Some(path) = cached {
            std::fs::create_dir_all(path.parent().expect("cache file has a parent"))?;
            std::fs::write(&path, serde_json::to_string(&r)?)?;
        }
        self.say(label, &r, false);
        Ok(r)
    }

    /// Passes over the training split a run of `cfg` made by its last evaluation.
    fn passes(&self, cfg: &Config, r: &RunResult) -> f64 {
        let steps = r.evals.last().map_or(0, |e| e.step) as f64;
        let per_step = (cfg.data.batch_size * cfg.data.seq_len * cfg.data.micro_batches) as f64;
        steps * per_step / (self.data.train_tokens().max(1) as f64)
    }

    fn say(&self, label: &str, r: &RunResult, cached: bool) {
        if self.verbose {
            println!(
                "  {label:<28} final_val_loss={:.4} train_s={:.1} wall_s={:.1} flops_llmc={:.3e}{}",
                r.final_val_loss(),
                r.train_s,
                r.wall_s,
                r.flops_llmc,
                if cached { " (cached)" } else { "" }
            );
        }
    }
}

/// A file-name-safe form of a run label.
pub fn sanitize(label: &str) -> String {
    label.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' }).collect()
}

/// The cache key of a run: FNV-1a of the config (name, output and logging left out: they do not
/// change the numbers), the stop step and the crate version.
pub fn cache_key(cfg: &Config, stop_after: Option<u64>) -> String {
    let mut c = cfg.clone();
    c.run.name = "run".into();
    c.run.out_dir = None;
    c.run.log_every = 0;
    let text = format!("{}\nstop_after={stop_after:?}\nversion={}", c.to_toml(), env!("CARGO_PKG_VERSION"));
    let mut h: u64 = 0xcbf29ce484222325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// The fixed-size model of a config: target depth from step 0, no growth.
pub fn fixed(base: &Config) -> Config {
    let mut c = base.clone();
    let l = base.target_depth();
    c.model.depth = l;
    c.model.target_depth = Some(l);
    c.growth.clear();
    c
}

/// One expansion at fraction `at` of the run (or at an absolute step with [`at_step`]).
pub fn grow(at: f64, to_depth: usize, init: GrowInit) -> GrowthSpec {
    GrowthSpec {
        at: Some(at),
        at_step: None,
        to_depth,
        position: Default::default(),
        init,
        order: CopyOrder::Stack,
        opt_state: OptStatePolicy::Inherit,
        init_scale: 1.0,
    }
}

/// One expansion at an absolute step.
pub fn at_step(step: u64, to_depth: usize, init: GrowInit) -> GrowthSpec {
    GrowthSpec { at: None, at_step: Some(step), ..grow(0.5, to_depth, init) }
}

/// A progressive model of a config: `from` blocks at step 0, then the expansions of `plan`.
pub fn progressive(base: &Config, from: usize, plan: Vec<GrowthSpec>) -> Config {
    let mut c = fixed(base);
    c.model.depth = from;
    c.growth = plan;
    c
}

/// The config with another schedule kind (warmup, peak rate and decay keys unchanged).
pub fn with_schedule(base: &Config, kind: ScheduleKind) -> Config {
    let mut c = base.clone();
    c.schedule.kind = kind;
    c
}

/// What `--quick` does to a base config: a run of at most `steps` steps, evaluated every
/// `steps / 12` steps on at most 4 batches; expansions given at absolute steps keep their place
/// as a fraction of the run.
pub fn quick(base: &Config, steps: u64) -> Config {
    let mut c = base.clone();
    let t = c.run.steps as f64;
    for g in &mut c.growth {
        if let Some(s) = g.at_step.take() {
            g.at = Some(s as f64 / t);
        }
    }
    c.run.steps = c.run.steps.min(steps);
    c.schedule.total_steps = c.run.steps;
    c.eval.every = (c.run.steps / 12).max(1);
    c.eval.batches = c.eval.batches.min(4);
    c
}

/// Check a derived config the way a loaded one is checked.
pub fn checked(c: Config) -> Result<Config> {
    c.validate().with_context(|| format!("derived config for run {:?}", c.run.name))?;
    Ok(c)
}

/// Open the dataset a config names.
pub fn open_data(cfg: &Config) -> Result<Dataset> {
    let tok = crate::data::Tokenizer::from_name(&cfg.data.tokenizer)?;
    Dataset::open_config(&cfg.data, &tok).with_context(|| {
        format!(
            "loading data for {:?} (data.dir or data.sources; run scripts/fetch-data.sh and `taproot data prepare` first)",
            cfg.run.name
        )
    })
}

/// Create `dir` (and parents) and return it.
pub fn ensure_dir(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.to_path_buf())
}
