//! What an experiment keeps of a run, and the comparisons it reports.
//!
//! - [`RunResult`]: the evaluation curve of one run with its cost on three axes — FLOPs in the
//!   llm.c convention, FLOPs in the paper's non-embedding convention, and **training wall time**
//!   (evaluation time excluded: evaluations are the measurement, not the training, and an
//!   experiment evaluates far more often than a production run would).
//! - [`cost_at_loss`]: the cost at which a curve first reaches a loss, interpolated linearly
//!   between the two evaluations around the crossing.
//! - [`Speedup`] / [`matched_speedup`]: **speed-up at matched final loss**. The matched loss is
//!   the worse (higher) of the two final validation losses. The run that ends there is charged its
//!   whole cost; the other is charged its cost to first reach that loss. When the progressive run
//!   ends worse, the speed-up is "what the fixed run needs to do as well as the progressive run
//!   did" over the progressive run's whole cost; when it ends better, the fixed run's whole cost
//!   over what the progressive run needed to match it. (Charging the worse run only up to its
//!   first crossing would credit a grown run with its small model's early losses.) Beside it we
//!   always quote the plain same-steps ratio (fixed total / progressive total).
//!   Under WSD this **overstates** the saving when the progressive run ends worse: the fixed run
//!   is read mid-curve, at peak learning rate, where no fixed run of that length would stop.
//! - [`frontier_cost`] / [`frontier_saving`]: **the saving at equal loss against the frontier**
//!   of fixed runs — fixed-depth runs of several lengths, each with its own full schedule. The
//!   frontier's cost to reach a loss is interpolated between the two fixed runs whose final
//!   losses bracket it, linearly in log cost; the saving is that cost over the progressive run's
//!   whole cost. This is the figure to quote; the matched-loss speed-up is kept, labelled.
//! - [`write_csv`], [`markdown_table`]: the files under `runs/NAME/`.

use super::mixing::relative_gap;
use crate::train::TrainReport;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// One evaluation of a run, with the cumulative cost up to it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalPoint {
    pub step: u64,
    pub depth: usize,
    pub val_loss: f64,
    pub flops_llmc: f64,
    pub flops_ne: f64,
    /// Training wall seconds up to this evaluation (evaluation time excluded).
    pub train_s: f64,
}

/// The cost axes an experiment compares on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    FlopsLlmc,
    FlopsNe,
    TrainWall,
}

impl Axis {
    pub const ALL: [Axis; 3] = [Axis::FlopsLlmc, Axis::FlopsNe, Axis::TrainWall];

    pub fn of(self, p: &EvalPoint) -> f64 {
        match self {
            Axis::FlopsLlmc => p.flops_llmc,
            Axis::FlopsNe => p.flops_ne,
            Axis::TrainWall => p.train_s,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Axis::FlopsLlmc => "FLOPs (llm.c 6N+6LTC)",
            Axis::FlopsNe => "FLOPs (non-embedding 6N)",
            Axis::TrainWall => "training wall time (s)",
        }
    }
}

/// What an experiment keeps of one run (also the on-disk cache entry, as JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub label: String,
    pub evals: Vec<EvalPoint>,
    /// The final training-set loss (last step).
    pub final_train_loss: f64,
    /// Totals at the end of the run.
    pub flops_llmc: f64,
    pub flops_ne: f64,
    pub train_s: f64,
    /// Wall seconds of the whole run, evaluations included.
    pub wall_s: f64,
    /// (step, from depth, to depth) of each expansion.
    pub growth: Vec<(u64, usize, usize)>,
    /// (depth, median seconds of one training step at that depth, steps measured).
    pub step_s_by_depth: Vec<(usize, f64, usize)>,
    /// Passes over the training split the run made (tokens trained on / training tokens).
    #[serde(default)]
    pub passes: f64,
}

impl RunResult {
    /// Condense a runtime report. Evaluation time is measured as the gap between the end of the
    /// step an evaluation follows and the end of the evaluation, and taken out of the clock.
    pub fn from_report(label: &str, rep: &TrainReport) -> RunResult {
        let step_end = |s: u64| rep.steps.iter().find(|r| r.step == s).map(|r| r.elapsed_s);
        // evaluation seconds, keyed by the step after which it ran
        let eval_s: Vec<(u64, f64)> =
            rep.evals.iter().map(|e| (e.step, step_end(e.step).map_or(0.0, |t| (e.elapsed_s - t).max(0.0)))).collect();
        let evals_before = |s: u64| eval_s.iter().filter(|(es, _)| *es < s).map(|(_, t)| t).sum::<f64>();
        let train_s_at = |s: u64| step_end(s).map_or(0.0, |t| t - evals_before(s));
        let evals = rep
            .evals
            .iter()
            .map(|e| EvalPoint {
                step: e.step,
                depth: e.depth,
                val_loss: e.val_loss as f64,
                flops_llmc: e.flops_llmc,
                flops_ne: e.flops_ne,
                train_s: train_s_at(e.step),
            })
            .collect();
        // per-step durations, evaluation excluded
        let mut by_depth: Vec<(usize, Vec<f64>)> = Vec::new();
        let mut prev_end = 0.0;
        for r in &rep.steps {
            let eval_before = eval_s.iter().filter(|(es, _)| *es + 1 == r.step).map(|(_, t)| t).sum::<f64>();
            let dt = r.elapsed_s - prev_end - eval_before;
            prev_end = r.elapsed_s;
            if r.step == 1 {
                continue; // includes starting the pipeline
            }
            match by_depth.iter_mut().find(|(d, _)| *d == r.depth) {
                Some((_, v)) => v.push(dt),
                None => by_depth.push((r.depth, vec![dt])),
            }
        }
        let step_s_by_depth = by_depth.into_iter().map(|(d, v)| (d, median(&v), v.len())).collect();
        let last = rep.steps.last();
        let mut growth = Vec::new();
        let mut prev_depth = rep.steps.first().map_or(0, |s| s.depth);
        for r in &rep.steps {
            if r.depth != prev_depth {
                growth.push((r.step - 1, prev_depth, r.depth));
                prev_depth = r.depth;
            }
        }
        let final_step = last.map_or(0, |s| s.step);
        RunResult {
            label: label.to_string(),
            evals,
            final_train_loss: last.map_or(f64::NAN, |s| s.train_loss as f64),
            flops_llmc: last.map_or(0.0, |s| s.flops_llmc),
            flops_ne: last.map_or(0.0, |s| s.flops_ne),
            train_s: train_s_at(final_step),
            wall_s: rep.wall_s,
            growth,
            step_s_by_depth,
            passes: 0.0,
        }
    }

    pub fn final_val_loss(&self) -> f64 {
        self.evals.last().map_or(f64::NAN, |e| e.val_loss)
    }

    /// Total cost on an axis.
    pub fn total(&self, axis: Axis) -> f64 {
        match axis {
            Axis::FlopsLlmc => self.flops_llmc,
            Axis::FlopsNe => self.flops_ne,
            Axis::TrainWall => self.train_s,
        }
    }

    /// `(step, val_loss)` pairs, for [`super::mixing`].
    pub fn curve(&self) -> Vec<(u64, f64)> {
        self.evals.iter().map(|e| (e.step, e.val_loss)).collect()
    }

    /// Where the run grew, as points on its curve: x is the step (`axis` None) or the cost on
    /// `axis` at the growth step, y the validation loss there, both interpolated linearly between
    /// the evaluations around it.
    pub fn growth_marks(&self, axis: Option<Axis>) -> Vec<(f64, f64)> {
        let x_of = |e: &EvalPoint| axis.map_or(e.step as f64, |a| a.of(e));
        self.growth
            .iter()
            .filter_map(|&(step, _, _)| {
                let j = self.evals.iter().position(|e| e.step >= step)?;
                let b = &self.evals[j];
                if j == 0 || b.step == step {
                    return Some((x_of(b), b.val_loss));
                }
                let a = &self.evals[j - 1];
                let w = (step - a.step) as f64 / (b.step - a.step) as f64;
                Some((x_of(a) + w * (x_of(b) - x_of(a)), a.val_loss + w * (b.val_loss - a.val_loss)))
            })
            .collect()
    }

    /// Median seconds of one training step at `depth`, if measured.
    pub fn step_seconds(&self, depth: usize) -> Option<f64> {
        self.step_s_by_depth.iter().find(|(d, _, _)| *d == depth).map(|(_, s, _)| *s)
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

/// The cost on `axis` at which `run` first reaches validation loss `target` or lower,
/// interpolated linearly between the evaluation before the crossing and the one at it
/// (from cost 0 at the first evaluation, if that one already reaches it). None: never reached.
pub fn cost_at_loss(run: &RunResult, target: f64, axis: Axis) -> Option<f64> {
    let i = run.evals.iter().position(|e| e.val_loss <= target)?;
    let b = &run.evals[i];
    if i == 0 {
        return Some(axis.of(b));
    }
    let a = &run.evals[i - 1];
    let (la, lb) = (a.val_loss, b.val_loss);
    let w = if la > lb { ((la - target) / (la - lb)).clamp(0.0, 1.0) } else { 1.0 };
    Some(axis.of(a) + w * (axis.of(b) - axis.of(a)))
}

/// Speed-up of `prog` over `fixed` at matched final loss, on one axis.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Speedup {
    /// The matched loss: the higher of the two final validation losses.
    pub loss: f64,
    /// Cost of each run to first reach it.
    pub fixed_cost: f64,
    pub prog_cost: f64,
    /// fixed_cost / prog_cost.
    pub ratio: f64,
    /// The plain ratio of total costs over the same steps.
    pub same_steps_ratio: f64,
}

pub fn matched_speedup(fixed: &RunResult, prog: &RunResult, axis: Axis) -> Option<Speedup> {
    let prog_worse = prog.final_val_loss() >= fixed.final_val_loss();
    let loss = fixed.final_val_loss().max(prog.final_val_loss());
    let (fixed_cost, prog_cost) = if prog_worse {
        (cost_at_loss(fixed, loss, axis)?, prog.total(axis))
    } else {
        (fixed.total(axis), cost_at_loss(prog, loss, axis)?)
    };
    Some(Speedup { loss, fixed_cost, prog_cost, ratio: fixed_cost / prog_cost, same_steps_ratio: fixed.total(axis) / prog.total(axis) })
}

/// What the frontier of fixed runs costs to reach a loss.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FrontierCost {
    /// Interpolated between two fixed runs of the frontier.
    Within(f64),
    /// The loss is lower than every fixed run's final loss: the frontier needs more than its
    /// longest run's cost (this one).
    Beyond(f64),
    /// The loss is higher than every fixed run's final loss: less than its shortest run's cost.
    Below(f64),
}

/// The cost on `axis` at which the frontier of fixed runs `fixed` (each trained with its own
/// full schedule) reaches final loss `loss`: interpolated linearly in log cost between the two
/// runs whose final losses bracket it (after taking the lower envelope: a longer run that ends
/// worse than a shorter one does not raise the frontier). None without a run.
pub fn frontier_cost(fixed: &[&RunResult], loss: f64, axis: Axis) -> Option<FrontierCost> {
    let mut pts: Vec<(f64, f64)> =
        fixed.iter().map(|r| (r.total(axis), r.final_val_loss())).filter(|(c, l)| *c > 0.0 && l.is_finite()).collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    // lower envelope: the best loss reachable at each cost
    let mut env: Vec<(f64, f64)> = Vec::with_capacity(pts.len());
    for (c, l) in pts {
        let best = env.last().map_or(f64::INFINITY, |p: &(f64, f64)| p.1);
        if l < best {
            env.push((c, l));
        }
    }
    let (first, last) = (*env.first()?, *env.last()?);
    if loss >= first.1 {
        return Some(if loss == first.1 { FrontierCost::Within(first.0) } else { FrontierCost::Below(first.0) });
    }
    if loss < last.1 {
        return Some(FrontierCost::Beyond(last.0));
    }
    let i = env.iter().position(|p| p.1 <= loss).expect("bracketed above");
    if env[i].1 == loss {
        return Some(FrontierCost::Within(env[i].0));
    }
    let (a, b) = (env[i - 1], env[i]);
    let w = (a.1 - loss) / (a.1 - b.1);
    Some(FrontierCost::Within((a.0.ln() + w * (b.0.ln() - a.0.ln())).exp()))
}

/// The saving of `prog` at equal loss against the frontier on `axis`: the frontier's cost to
/// reach `prog`'s final loss over `prog`'s whole cost, as text (`2.31×`, or a bound `> 1.20×` /
/// `< 0.80×` when the loss lies outside the frontier).
pub fn frontier_saving(fixed: &[&RunResult], prog: &RunResult, axis: Axis) -> Option<String> {
    let own = prog.total(axis);
    Some(match frontier_cost(fixed, prog.final_val_loss(), axis)? {
        FrontierCost::Within(c) => format!("{:.2}×", c / own),
        FrontierCost::Beyond(c) => format!("> {:.2}×", c / own),
        FrontierCost::Below(c) => format!("< {:.2}×", c / own),
    })
}

/// Final validation-loss gap of `run` over `fixed`, relative.
pub fn final_gap(run: &RunResult, fixed: &RunResult) -> f64 {
    relative_gap(run.final_val_loss(), fixed.final_val_loss())
}

/// Every evaluation of every run, one row each (long format).
pub fn write_csv(path: &Path, runs: &[&RunResult]) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path)?;
    writeln!(f, "run,step,depth,val_loss,flops_llmc,flops_ne,train_s")?;
    for r in runs {
        for e in &r.evals {
            writeln!(f, "{},{},{},{:.6},{:e},{:e},{:.3}", r.label, e.step, e.depth, e.val_loss, e.flops_llmc, e.flops_ne, e.train_s)?;
        }
    }
    Ok(())
}

/// A summary CSV: `header` then `rows`, comma-separated (cells must not contain commas).
pub fn write_table_csv(path: &Path, header: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path)?;
    writeln!(f, "{}", header.join(","))?;
    for r in rows {
        writeln!(f, "{}", r.join(","))?;
    }
    Ok(())
}

/// A GitHub markdown table.
pub fn markdown_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!("| {} |\n|{}\n", header.join(" | "), "---|".repeat(header.len()));
    for r in rows {
        s.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    s
}

/// `1.23e15` style, for FLOPs in tables.
pub fn sci(x: f64) -> String {
    format!("{x:.3e}")
}

/// A relative gap as a signed percentage.
pub fn pct(x: f64) -> String {
    format!("{:+.2}%", 100.0 * x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(label: &str, pts: &[(u64, f64, f64)]) -> RunResult {
        let evals: Vec<EvalPoint> = pts
            .iter()
            .map(|&(step, val_loss, cost)| EvalPoint {
                step,
                depth: 1,
                val_loss,
                flops_llmc: cost,
                flops_ne: cost / 2.0,
                train_s: cost / 10.0,
            })
            .collect();
        let last = evals.last().unwrap().clone();
        RunResult {
            label: label.into(),
            evals,
            final_train_loss: 0.0,
            flops_llmc: last.flops_llmc,
            flops_ne: last.flops_ne,
            train_s: last.train_s,
            wall_s: last.train_s,
            growth: vec![],
            step_s_by_depth: vec![],
            passes: 0.0,
        }
    }

    #[test]
    fn frontier_cost_interpolates_in_log_cost_and_bounds_outside() {
        // three fixed runs, each ending where its own schedule ends
        let a = run("T/4", &[(0, 5.5, 0.0), (25, 2.4, 100.0)]);
        let b = run("T/2", &[(0, 5.5, 0.0), (50, 2.0, 200.0)]);
        let c = run("T", &[(0, 5.5, 0.0), (100, 1.8, 400.0)]);
        let f = [&a, &b, &c];
        // halfway in loss between 2.4 and 2.0: the geometric mean of 100 and 200
        match frontier_cost(&f, 2.2, Axis::FlopsLlmc).unwrap() {
            FrontierCost::Within(x) => assert!((x - (100.0f64 * 200.0).sqrt()).abs() < 1e-9, "{x}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(frontier_cost(&f, 1.8, Axis::FlopsLlmc), Some(FrontierCost::Within(400.0)));
        assert_eq!(frontier_cost(&f, 1.7, Axis::FlopsLlmc), Some(FrontierCost::Beyond(400.0)));
        assert_eq!(frontier_cost(&f, 2.5, Axis::FlopsLlmc), Some(FrontierCost::Below(100.0)));
        // a longer run that ends worse does not lower the frontier's cost
        let worse = run("T/2 bad", &[(0, 5.5, 0.0), (50, 2.5, 150.0)]);
        assert_eq!(frontier_cost(&[&a, &worse, &b, &c], 2.0, Axis::FlopsLlmc), Some(FrontierCost::Within(200.0)));
        // the saving: a progressive run ending at 2.0 for 50 (non-emb: cost/2 per the helper)
        let p = run("prog", &[(0, 5.5, 0.0), (100, 2.0, 50.0)]);
        assert_eq!(frontier_saving(&f, &p, Axis::FlopsLlmc).unwrap(), "4.00×");
        let q = run("prog better", &[(0, 5.5, 0.0), (100, 1.7, 50.0)]);
        assert_eq!(frontier_saving(&f, &q, Axis::FlopsLlmc).unwrap(), "> 8.00×");
        assert!(frontier_cost(&[], 2.0, Axis::FlopsLlmc).is_none());
    }

    #[test]
    fn growth_marks_sit_on_the_curve_at_the_growth_step() {
        let mut r = run("0→6", &[(0, 5.5, 0.0), (10, 2.5, 100.0), (20, 2.0, 300.0)]);
        r.growth = vec![(15, 0, 6), (20, 6, 8)];
        let m = r.growth_marks(None);
        assert_eq!(m, vec![(15.0, 2.25), (20.0, 2.0)]);
        let m = r.growth_marks(Some(Axis::FlopsLlmc));
        assert_eq!(m[0], (200.0, 2.25));
        assert!(run("fixed", &[(0, 5.5, 0.0), (10, 2.0, 1.0)]).growth_marks(None).is_empty());
    }

    #[test]
    fn cost_at_loss_interpolates_between_evaluations() {
        let r = run("a", &[(10, 3.0, 100.0), (20, 2.0, 200.0), (30, 1.5, 300.0)]);
        assert_eq!(cost_at_loss(&r, 2.5, Axis::FlopsLlmc), Some(150.0));
        assert_eq!(cost_at_loss(&r, 2.0, Axis::FlopsLlmc), Some(200.0));
        assert_eq!(cost_at_loss(&r, 1.75, Axis::FlopsNe), Some(125.0));
        assert_eq!(cost_at_loss(&r, 3.5, Axis::TrainWall), Some(10.0));
        assert_eq!(cost_at_loss(&r, 1.0, Axis::FlopsLlmc), None);
    }

    #[test]
    fn matched_speedup_uses_the_worse_final_loss() {
        let fixed = run("fixed", &[(10, 3.0, 1000.0), (20, 2.0, 2000.0), (30, 1.5, 3000.0)]);
        // the progressive run passed 1.75 early (its small model), but ends there: charged in full
        let prog = run("prog", &[(10, 4.0, 10.0), (20, 1.7, 20.0), (25, 2.5, 300.0), (30, 1.75, 600.0)]);
        let s = matched_speedup(&fixed, &prog, Axis::FlopsLlmc).unwrap();
        assert_eq!(s.loss, 1.75);
        assert_eq!(s.fixed_cost, 2500.0);
        assert_eq!(s.prog_cost, 600.0);
        assert!((s.ratio - 2500.0 / 600.0).abs() < 1e-12);
        assert_eq!(s.same_steps_ratio, 5.0);
        // the other way round: the progressive run ends better
        let s = matched_speedup(&prog, &fixed, Axis::FlopsLlmc).unwrap();
        assert_eq!((s.fixed_cost, s.prog_cost), (600.0, 2500.0));
        // equal final losses: the progressive run is charged in full, the fixed one to the crossing
        let twin = run("twin", &[(10, 3.0, 100.0), (20, 1.5, 200.0)]);
        let s = matched_speedup(&fixed, &twin, Axis::FlopsLlmc).unwrap();
        assert_eq!((s.fixed_cost, s.prog_cost), (3000.0, 200.0));
        assert!((final_gap(&prog, &fixed) - 0.25 / 1.5).abs() < 1e-12);
    }

    #[test]
    fn tables() {
        let t = markdown_table(&["a", "b"], &[vec!["1".into(), "2".into()]]);
        assert_eq!(t, "| a | b |\n|---|---|\n| 1 | 2 |\n");
        assert_eq!(pct(0.0123), "+1.23%");
    }
}
