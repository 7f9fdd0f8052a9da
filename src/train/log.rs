//! [`RunLog`]: the bookkeeping of a run's steps, written once and used by every loop — the
//! sequential trainer, the actor runtime's scheduler — and, for its line formats, the daemon's
//! log.
//!
//! Per step it accumulates FLOPs (llm.c's and the non-embedding convention, and what the fixed
//! target-depth model would have spent), keeps the [`StepRecord`]s and [`EvalRecord`]s of the
//! report, streams `steps.csv` / `evals.csv` (flushed per row, appended to on resume), prints
//! the log line every `run.log_every` steps (above a progress bar on a terminal), and decides the
//! early stop of `RunOptions::stop_below_val`. The formats:
//!
//! ```text
//! step=250/3000 depth=0 train_loss=2.4512 lr=0.020000 tok/s=51234 elapsed_s=12.3
//! step=250/3000 depth=0 val_loss=2.4301 flops_llmc=1.200e12 flops_ne=3.400e11 elapsed_s=12.5
//! grow step=2400 depth=0->6 new_ids=[0, 1, 2, 3, 4, 5] stack=[0, 1, 2, 3, 4, 5] wall_ms=20.7
//! ```

use super::{EvalRecord, RunOptions, StepRecord, TrainReport, EVALS_CSV_HEADER, STEPS_CSV_HEADER};
use crate::config::Config;
use crate::flops;
use crate::model::growth::GrowthRecord;
use crate::model::Dims;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// Cumulative FLOPs of a run (this process).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Flops {
    /// llm.c's convention (6N + 6·L·T·C per token).
    pub llmc: f64,
    /// Non-embedding (the paper's convention).
    pub ne: f64,
    /// Non-embedding FLOPs the fixed model at target depth would have spent on the same tokens.
    pub fixed_ne: f64,
}

pub struct RunLog {
    dims: Dims,
    seq_len: usize,
    target_depth: usize,
    total_steps: u64,
    log_every: u64,
    quiet: bool,
    stop_below_val: Option<f32>,
    pub flops: Flops,
    started: Instant,
    last_log: (Instant, u64),
    csv: Option<(std::fs::File, std::fs::File)>,
    report: TrainReport,
    bar: Option<indicatif::ProgressBar>,
}

impl RunLog {
    /// The log of a run of `cfg` on a model of shape `dims`, starting after `start_step` updates.
    pub fn new(cfg: &Config, dims: &Dims, opts: &RunOptions, start_step: u64) -> Self {
        let now = Instant::now();
        RunLog {
            dims: dims.clone(),
            seq_len: cfg.data.seq_len,
            target_depth: cfg.target_depth(),
            total_steps: cfg.run.steps,
            log_every: cfg.run.log_every,
            quiet: opts.quiet,
            stop_below_val: opts.stop_below_val,
            flops: Flops::default(),
            started: now,
            last_log: (now, start_step),
            csv: None,
            report: TrainReport::default(),
            bar: None,
        }
    }

    /// Stream `steps.csv` and `evals.csv` into `dir`: appended to when `append` and they exist
    /// (a resumed run), started afresh with their header otherwise.
    pub fn with_csv(mut self, dir: &Path, append: bool) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        let steps = open_csv(&dir.join("steps.csv"), append, STEPS_CSV_HEADER)?;
        let evals = open_csv(&dir.join("evals.csv"), append, EVALS_CSV_HEADER)?;
        self.csv = Some((steps, evals));
        Ok(self)
    }

    /// A progress bar (step, loss, lr, tok/s, depth, ETA) when stdout is a terminal and the run
    /// is not quiet; log lines are then printed above it.
    pub fn with_progress_bar(mut self, start_step: u64, end_step: u64) -> Self {
        // The bar draws on stderr and prints lines above itself there; where either stream is not
        // a terminal (mpirun gives ranks a pty for stdout and a pipe for stderr) lines said
        // through a hidden bar would be lost, so there is no bar.
        use std::io::IsTerminal;
        if !self.quiet && std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(end_step);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} ETA {eta}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_position(start_step);
            self.bar = Some(bar);
        }
        self
    }

    /// Print a line (unless quiet): above the progress bar on a terminal, plainly otherwise.
    pub fn say(&self, line: impl AsRef<str>) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(bar) => bar.println(line.as_ref()),
            None => println!("{}", line.as_ref()),
        }
    }

    pub fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Steps recorded by this process so far.
    pub fn steps_done(&self) -> usize {
        self.report.steps.len()
    }

    /// Count a finished optimizer step: `step` updates are now done, the model had `depth`
    /// blocks, `tokens` were trained on and the step took `seconds`. Accumulates FLOPs, records
    /// the step, writes its CSV row and prints the log line when due.
    pub fn step(&mut self, step: u64, depth: usize, lr: f32, loss: f32, tokens: f64, seconds: f64) -> StepRecord {
        self.flops.llmc += flops::flops_per_token_llmc(&self.dims, depth, self.seq_len) * tokens;
        self.flops.ne += flops::flops_per_token_non_embedding(&self.dims, depth) * tokens;
        self.flops.fixed_ne += flops::flops_per_token_non_embedding(&self.dims, self.target_depth) * tokens;
        let rec = StepRecord {
            step,
            depth,
            lr,
            train_loss: loss,
            flops_llmc: self.flops.llmc,
            flops_ne: self.flops.ne,
            elapsed_s: self.elapsed_s(),
        };
        if let Some((f, _)) = self.csv.as_mut() {
            // Flushed per row, so a killed run leaves its trajectory behind.
            let _ = writeln!(f, "{}", rec.csv_row());
            let _ = f.flush();
        }
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            bar.set_message(format!("depth={depth} loss={loss:.4} lr={lr:.2e} tok/s={:.0}", tokens / seconds.max(1e-9)));
        }
        if self.log_every > 0 && step.is_multiple_of(self.log_every) {
            let dt = self.last_log.0.elapsed().as_secs_f64();
            let toks = step.saturating_sub(self.last_log.1) as f64 * tokens / dt.max(1e-9);
            self.say(step_line(step, self.total_steps, depth, loss, lr, toks, Some(rec.elapsed_s)));
            self.last_log = (Instant::now(), step);
        }
        self.report.steps.push(rec.clone());
        rec
    }

    /// Record an evaluation after `step` updates. Returns true when the run should stop here
    /// (the validation loss fell below `RunOptions::stop_below_val`).
    pub fn eval(&mut self, step: u64, depth: usize, val_loss: f32) -> bool {
        let e = EvalRecord { step, depth, val_loss, flops_llmc: self.flops.llmc, flops_ne: self.flops.ne, elapsed_s: self.elapsed_s() };
        self.say(eval_line(e.step, self.total_steps, e.depth, e.val_loss, Some((e.flops_llmc, e.flops_ne)), Some(e.elapsed_s)));
        if let Some((_, f)) = self.csv.as_mut() {
            let _ = writeln!(f, "{}", e.csv_row());
            let _ = f.flush();
        }
        self.report.evals.push(e);
        match self.stop_below_val {
            Some(target) if val_loss < target => {
                self.say(format!("stop step={step} val_loss={val_loss:.4} below {target}"));
                true
            }
            _ => false,
        }
    }

    /// Record an expansion that took `wall_s` seconds; `note` is appended to its log line.
    pub fn growth(&mut self, rec: &GrowthRecord, wall_s: f64, note: &str) {
        self.say(format!("{}{note}", growth_line(rec, Some(wall_s))));
        self.report.growth.push(rec.clone());
        self.report.growth_wall_s.push(wall_s);
    }

    /// End of the run: clear the progress bar and hand over the report.
    pub fn finish(&mut self) -> TrainReport {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let mut r = std::mem::take(&mut self.report);
        r.wall_s = self.elapsed_s();
        r
    }
}

/// A CSV log: appended to when `append` and it exists, started afresh (with `header`) otherwise.
fn open_csv(path: &Path, append: bool, header: &str) -> anyhow::Result<std::fs::File> {
    let append = append && path.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if !append {
        writeln!(f, "{header}").map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    Ok(f)
}

/// The step line: `step=S/T depth=D train_loss=… lr=… tok/s=… [elapsed_s=…]`.
pub fn step_line(step: u64, total: u64, depth: usize, loss: f32, lr: f32, tok_s: f64, elapsed_s: Option<f64>) -> String {
    let tail = elapsed_s.map(|e| format!(" elapsed_s={e:.1}")).unwrap_or_default();
    format!("step={step}/{total} depth={depth} train_loss={loss:.4} lr={lr:.6} tok/s={tok_s:.0}{tail}")
}

/// The evaluation line: `step=S/T depth=D val_loss=… [flops_llmc=… flops_ne=…] [elapsed_s=…]`.
pub fn eval_line(step: u64, total: u64, depth: usize, val_loss: f32, flops: Option<(f64, f64)>, elapsed_s: Option<f64>) -> String {
    let f = flops.map(|(l, n)| format!(" flops_llmc={l:.3e} flops_ne={n:.3e}")).unwrap_or_default();
    let e = elapsed_s.map(|e| format!(" elapsed_s={e:.1}")).unwrap_or_default();
    format!("step={step}/{total} depth={depth} val_loss={val_loss:.4}{f}{e}")
}

/// The growth line: `grow step=S depth=A->B new_ids=[…] stack=[…] [wall_ms=…]`.
pub fn growth_line(rec: &GrowthRecord, wall_s: Option<f64>) -> String {
    let w = wall_s.map(|s| format!(" wall_ms={:.1}", s * 1e3)).unwrap_or_default();
    format!("grow step={} depth={}->{} new_ids={:?} stack={:?}{w}", rec.at_step, rec.from_depth, rec.to_depth, rec.new_ids, rec.stack)
}
