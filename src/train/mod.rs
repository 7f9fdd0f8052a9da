//! Training loops and what they report.
//!
//! [`sequential`] is the plain loop (embed → blocks → head → backward → step, growth included). It
//! is the reference the actor runtime is tested against, and the baseline of its overhead
//! benchmark. Every loop takes the same [`RunOptions`], keeps its books with the same
//! [`log::RunLog`] (records, CSV files, log lines, FLOPs, early stop) and reports the same
//! [`TrainReport`].

pub mod log;
pub mod sequential;

use crate::config::Config;
use crate::model::Dims;
use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// Knobs of a run that are not part of the experiment (logging, early stops, resuming).
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Print nothing.
    pub quiet: bool,
    /// Stop after this many steps (the schedule still spans `run.steps`).
    pub stop_after: Option<u64>,
    /// Stop at the first evaluation whose validation loss is below this.
    pub stop_below_val: Option<f32>,
    /// Start from the newest valid checkpoint of the run (fresh if there is none). The actor
    /// runtime only: the sequential trainer refuses it.
    pub resume: bool,
    /// Disarm the `[faults]` of the config (the supervisor does so after a restart, so that an
    /// injected fault fires once). The actor runtime only.
    pub faults_disarmed: bool,
    /// Config keys (or section prefixes) a resumed run may change although they change its
    /// trajectory (`--allow-config-change`; see `config::changes`).
    pub allow_config_change: Vec<String>,
    /// This process's place in the run (`dist::init`'s; one process by default).
    pub topology: crate::dist::Topology,
}

/// The header of `steps.csv`; [`StepRecord::csv_row`] writes its rows.
pub const STEPS_CSV_HEADER: &str = "step,depth,lr,train_loss,flops_llmc,flops_ne,elapsed_s";
/// The header of `evals.csv`; [`EvalRecord::csv_row`] writes its rows.
pub const EVALS_CSV_HEADER: &str = "step,depth,val_loss,flops_llmc,flops_ne,elapsed_s";

/// One optimizer step.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StepRecord {
    /// Updates done after this step (1-based).
    pub step: u64,
    pub depth: usize,
    pub lr: f32,
    pub train_loss: f32,
    /// Cumulative FLOPs, llm.c convention and non-embedding convention.
    pub flops_llmc: f64,
    pub flops_ne: f64,
    pub elapsed_s: f64,
}

impl StepRecord {
    /// The record as a row of `steps.csv`.
    pub fn csv_row(&self) -> String {
        let s = self;
        format!("{},{},{},{},{:e},{:e},{:.3}", s.step, s.depth, s.lr, s.train_loss, s.flops_llmc, s.flops_ne, s.elapsed_s)
    }
}

impl EvalRecord {
    /// The record as a row of `evals.csv`.
    pub fn csv_row(&self) -> String {
        let e = self;
        format!("{},{},{},{:e},{:e},{:.3}", e.step, e.depth, e.val_loss, e.flops_llmc, e.flops_ne, e.elapsed_s)
    }
}

/// One evaluation on the validation split.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EvalRecord {
    pub step: u64,
    pub depth: usize,
    pub val_loss: f32,
    pub flops_llmc: f64,
    pub flops_ne: f64,
    pub elapsed_s: f64,
}

#[derive(Clone, Debug, Default)]
pub struct TrainReport {
    pub steps: Vec<StepRecord>,
    pub evals: Vec<EvalRecord>,
    pub growth: Vec<crate::model::growth::GrowthRecord>,
    /// Wall time of each growth event (drain excluded: growth happens at a step boundary).
    pub growth_wall_s: Vec<f64>,
    /// The checkpoint written when the run ended (the actor runtime), if any.
    pub final_checkpoint: Option<std::path::PathBuf>,
    pub wall_s: f64,
    /// Where the run ended: updates done and the model's depth (also when this process trained
    /// no step, e.g. a run resumed at its last step).
    pub final_step: u64,
    pub final_depth: usize,
}

impl TrainReport {
    pub fn final_val_loss(&self) -> Option<f32> {
        self.evals.last().map(|e| e.val_loss)
    }

    /// Write `steps.csv` and `evals.csv` into `dir`.
    /// (The runtime streams both files as it goes, through `log::RunLog`, in the same format.)
    pub fn write_csv(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut f = std::fs::File::create(dir.join("steps.csv"))?;
        writeln!(f, "{STEPS_CSV_HEADER}")?;
        for s in &self.steps {
            writeln!(f, "{}", s.csv_row())?;
        }
        let mut f = std::fs::File::create(dir.join("evals.csv"))?;
        writeln!(f, "{EVALS_CSV_HEADER}")?;
        for e in &self.evals {
            writeln!(f, "{}", e.csv_row())?;
        }
        Ok(())
    }
}

/// The model shape a config describes.
pub fn dims_of(cfg: &Config, vocab: usize) -> Dims {
    let m = &cfg.model;
    // The kind's shape, then the optional `[model]` keys (validation refuses those a kind does
    // not take).
    let mut d = crate::model::kinds::spec(m.arch).base_dims(vocab, cfg.max_seq(), m.channels, m.heads);
    d.kv_heads = m.kv_heads.unwrap_or(d.kv_heads);
    d.ffn_hidden = m.ffn_hidden.unwrap_or(d.ffn_hidden);
    d.rope_theta = m.rope_theta.unwrap_or(d.rope_theta);
    d.norm_eps = m.norm_eps.unwrap_or(d.norm_eps);
    let tied = m.tie_embeddings.unwrap_or(d.tied);
    let mut d = d.with_tied(tied).with_residual(m.parameterization.residual_multiplier(cfg.target_depth()));
    if let Some(x) = &m.moe {
        d.moe = Some(crate::model::moe::Moe {
            experts: x.experts,
            top_k: x.top_k,
            shared: x.shared_experts,
            hidden: x.expert_hidden.unwrap_or(d.ffn_hidden),
            routing: x.routing,
            bias_rate: x.bias_update_rate,
            first_dense: x.first_dense_layers,
            aux: x.aux_loss / cfg.data.micro_batches.max(1) as f32,
        });
    }
    d
}

/// Whether to evaluate after `done` updates.
pub fn eval_due(cfg: &Config, done: u64) -> bool {
    done == cfg.run.steps || (cfg.eval.every > 0 && done.is_multiple_of(cfg.eval.every))
}
