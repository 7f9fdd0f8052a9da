//! The experiments of `taproot experiment NAME`, each a set of runs derived from one base config
//! (the progressive model of `config/experiments/*.toml`: its target depth L, data, schedule and
//! optimizer), compared against the fixed-size model of the same config trained for the same
//! steps with the same schedule.
//!
//! | name | runs |
//! |---|---|
//! | `progressive-vs-fixed` | fixed L; 0→L (`random`) and 1→L (`copying`) at the config's τ and at 0.8T |
//! | `tau-sweep` | 0→L at τ ∈ {0.5, …, 0.9}·T, under WSD and under cosine, each with its fixed L |
//! | `init-ablation` | 1→L at 0.5T with `random`, `copying`, `zero`, `copying_zero`; 2→L at 0.5T copying in order `stack`, `inter`, `last` |
//! | `stages` | 0→L at 0.8T against 0→2 at 0.4T →L at 0.8T |
//! | `optimizer-state` | 1→L (`copying`) at 0.5T with optimizer state `inherit`, `copy`, `reset` |
//! | `pareto` | sources 0, 1, 2, 4 blocks (random from 0, copying from more) grown to L at τ ∈ {0.5, 0.7, 0.8}·T, against the frontier of fixed runs (T/4, T/2, T) |
//! | `recipe` | 0→L (`random`) at 0.8T: today's recipe; a 2% learning-rate re-warmup after growth; new-block init ×0.5 and ×2; optimizer state `reset`; NSGD instead of Muon on the embedding/head; the depth-µP parameterisation — each against the fixed model of its own recipe |
//!
//! Each writes under its output directory: `evals.csv` (every evaluation of every run),
//! `summary.csv` and `table.md` (one row per run), and PNG plots.

use super::mixing::{mixing_time, Mixing};
use super::plot::{self, Chart, Series, XScale, YRange};
use super::report::{self, final_gap, matched_speedup, pct, sci, Axis, RunResult};
use super::{fixed, grow, progressive, with_schedule, Runner};
use crate::config::Config;
use crate::model::growth::{CopyOrder, GrowInit, OptStatePolicy};
use crate::optim::schedule::ScheduleKind;
use anyhow::{bail, Result};
use std::path::Path;
use std::time::Instant;

/// Every experiment, in the order `taproot experiment all` runs them.
pub const NAMES: [&str; 7] = ["progressive-vs-fixed", "tau-sweep", "init-ablation", "stages", "optimizer-state", "pareto", "recipe"];

/// The base config an experiment reads by default.
pub fn default_config(name: &str) -> &'static str {
    match name {
        "progressive-vs-fixed" => "config/experiments/planned.toml",
        _ => "config/experiments/base.toml",
    }
}

/// What an experiment produced.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub name: String,
    /// The markdown table (also in `table.md`).
    pub markdown: String,
    pub seconds: f64,
}

/// Run experiment `name` from `base`, writing under `out`.
pub fn run(name: &str, runner: &Runner, base: &Config, out: &Path) -> Result<Outcome> {
    let t0 = Instant::now();
    super::ensure_dir(out)?;
    println!("experiment {name}: {} steps, L = {}, writing {}", base.run.steps, base.target_depth(), out.display());
    let markdown = match name {
        "progressive-vs-fixed" => progressive_vs_fixed(runner, base, out)?,
        "tau-sweep" => tau_sweep(runner, base, out)?,
        "init-ablation" => init_ablation(runner, base, out)?,
        "stages" => stages(runner, base, out)?,
        "optimizer-state" => optimizer_state(runner, base, out)?,
        "pareto" => pareto(runner, base, out)?,
        "recipe" => recipe(runner, base, out)?,
        _ => bail!("unknown experiment {name:?}: one of {}", NAMES.join(", ")),
    };
    std::fs::write(out.join("table.md"), &markdown)?;
    let seconds = t0.elapsed().as_secs_f64();
    println!("experiment {name}: done in {seconds:.0} s\n{markdown}");
    Ok(Outcome { name: name.to_string(), markdown, seconds })
}

/// A run of an experiment with the step of its last expansion (None: fixed size).
struct Arm {
    run: RunResult,
    tau: Option<u64>,
}

fn arm(runner: &Runner, label: &str, cfg: Config) -> Result<Arm> {
    let cfg = super::checked(cfg)?;
    let tau = cfg.expansions().last().map(|e| e.at_step);
    Ok(Arm { run: runner.run(label, &cfg, None)?, tau })
}

fn tau_of(base: &Config) -> Result<u64> {
    match base.expansions().as_slice() {
        [e] => Ok(e.at_step),
        _ => bail!("progressive-vs-fixed reads τ from the config's single [[growth]] entry (config/experiments/planned.toml)"),
    }
}

const HEADER: [&str; 16] = [
    "run",
    "τ (step)",
    "final val loss",
    "final train loss",
    "passes over data",
    "gap vs fixed",
    "t_mix",
    "FLOPs llm.c",
    "FLOPs non-emb",
    "train s",
    "saving vs frontier llm.c",
    "saving vs frontier non-emb",
    "saving vs frontier wall",
    "matched-loss speed-up llm.c",
    "matched-loss speed-up non-emb",
    "matched-loss speed-up wall",
];

/// One row per arm against `fixed`: final loss and gap, t_mix after the last expansion, totals,
/// the saving at equal loss against the frontier of fixed runs `frontier` on each axis, and the
/// old speed-up at matched final loss against the fixed run's curve (same-steps ratio after it).
fn rows(fixed: &Arm, arms: &[&Arm], tol: f64, frontier: &[&RunResult]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for a in std::iter::once(&fixed).chain(arms.iter()) {
        let r = &a.run;
        let is_fixed = std::ptr::eq(*a, fixed);
        let t_mix = match a.tau {
            None => "–".to_string(),
            Some(tau) => match mixing_time(&fixed.run.curve(), &r.curve(), tau, tol) {
                Mixing::Mixed { t_mix, .. } => t_mix.to_string(),
                Mixing::Never { .. } => "never".into(),
                Mixing::Diverged { .. } => "diverged".into(),
                Mixing::NoData => "n/a".into(),
            },
        };
        let speedup = |axis: Axis| {
            if is_fixed {
                return "1".to_string();
            }
            match matched_speedup(&fixed.run, r, axis) {
                Some(s) => format!("{:.2}× ({:.2}×)", s.ratio, s.same_steps_ratio),
                None => format!("– ({:.2}×)", fixed.run.total(axis) / r.total(axis)),
            }
        };
        let saving = |axis: Axis| {
            if is_fixed {
                return "1".to_string();
            }
            report::frontier_saving(frontier, r, axis).unwrap_or_else(|| "–".into())
        };
        out.push(vec![
            r.label.clone(),
            a.tau.map_or("–".into(), |t| t.to_string()),
            format!("{:.4}", r.final_val_loss()),
            format!("{:.4}", r.final_train_loss),
            format!("{:.2}", r.passes),
            if is_fixed { "–".into() } else { pct(final_gap(r, &fixed.run)) },
            t_mix,
            sci(r.flops_llmc),
            sci(r.flops_ne),
            format!("{:.1}", r.train_s),
            saving(Axis::FlopsLlmc),
            saving(Axis::FlopsNe),
            saving(Axis::TrainWall),
            speedup(Axis::FlopsLlmc),
            speedup(Axis::FlopsNe),
            speedup(Axis::TrainWall),
        ]);
    }
    out
}

/// `summary.csv` (plain numbers) and the markdown table, for arms against one fixed run (and the
/// frontier of fixed runs `frontier`; just the fixed run where an experiment has no other).
fn tables(out: &Path, fixed: &Arm, arms: &[&Arm], tol: f64, file: &str, frontier: &[&RunResult]) -> Result<String> {
    let rows = rows(fixed, arms, tol, frontier);
    let csv_rows: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| c.replace(',', ";")).collect()).collect();
    report::write_table_csv(&out.join(file), &HEADER, &csv_rows)?;
    Ok(report::markdown_table(&HEADER, &rows))
}

fn series(runs: &[&RunResult], axis: Option<Axis>) -> Vec<Series> {
    runs.iter()
        .map(|r| Series {
            label: r.label.clone(),
            marks: r.growth_marks(axis),
            points: r
                .evals
                .iter()
                .map(|e| (axis.map_or(e.step as f64, |a| a.of(e)), e.val_loss))
                .filter(|(x, _)| axis.is_none() || *x > 0.0)
                .collect(),
        })
        .collect()
}

/// Loss against step (linear) and, with `all_axes`, against each cost axis (log x); every run
/// whole, growth marked with a triangle on each grown run's curve. The loss-against-step plot
/// has a `_late` twin whose y axis is cut to the late, close part of the curves.
fn loss_plots(out: &Path, title: &str, prefix: &str, runs: &[&RunResult], all_axes: bool) -> Result<()> {
    let chart = |x_label: &str, x_scale, axis, y_range| Chart {
        title: title.to_string(),
        x_label: x_label.to_string(),
        y_label: "validation loss (nats/byte)".into(),
        x_scale,
        series: series(runs, axis),
        markers: false,
        legend: plot::Legend::UpperRight,
        y_range,
    };
    plot::render(&chart("step", XScale::Linear, None, YRange::Whole), &out.join(format!("{prefix}loss_vs_step.png")), plot::SIZE)?;
    let late = format!("{prefix}loss_vs_step_late.png");
    plot::render(&chart("step (late part: y axis cut)", XScale::Linear, None, YRange::Late), &out.join(late), plot::SIZE)?;
    if all_axes {
        for (axis, file) in
            [(Axis::FlopsLlmc, "loss_vs_flops_llmc"), (Axis::FlopsNe, "loss_vs_flops_ne"), (Axis::TrainWall, "loss_vs_wall")]
        {
            let c = chart(axis.name(), XScale::Log, Some(axis), YRange::Whole);
            plot::render(&c, &out.join(format!("{prefix}{file}.png")), plot::SIZE)?;
        }
    }
    Ok(())
}

fn all_runs<'a>(fixed: &'a Arm, arms: &[&'a Arm]) -> Vec<&'a RunResult> {
    std::iter::once(&fixed.run).chain(arms.iter().map(|a| &a.run)).collect()
}

fn tol(base: &Config) -> f64 {
    base.plan.mix_tolerance
}

fn note(base: &Config) -> String {
    format!(
        "{} steps, L = {}, C = {}, B×T = {}×{}, {} schedule, evaluated every {} steps on {} batches. Saving vs frontier = what the frontier of fixed runs (each with its own full schedule) costs to reach the run's final loss, interpolated in log cost, over the run's whole cost (`>`/`<`: the loss lies outside the frontier; where an experiment has one fixed run, it is the frontier). Matched-loss speed-up = cost of the fixed run to reach the matched final loss on its own curve / cost of the run to reach it (same-steps cost ratio in parentheses): under WSD it overstates the saving, since it reads the fixed run at peak learning rate. t_mix against the fixed run at tolerance {:.1}%.\n\n",
        base.run.steps,
        base.target_depth(),
        base.model.channels,
        base.data.batch_size,
        base.data.seq_len,
        format!("{:?}", base.schedule.kind).to_lowercase(),
        base.eval.every,
        base.eval.batches,
        100.0 * tol(base)
    )
}

/// The lengths, as fractions of T, of the shorter fixed runs that make the frontier with the
/// fixed run of T steps.
const FRONTIER_FRACTIONS: [f64; 2] = [0.25, 0.5];

/// The fixed model trained for `steps` steps with its own full schedule (warmup and decay as
/// fractions of its own length), evaluated about as often, relative to its length.
fn fixed_of_length(base: &Config, steps: u64) -> Config {
    let mut c = fixed(base);
    let t = base.run.steps.max(1);
    c.run.steps = steps;
    c.schedule.total_steps = steps;
    c.eval.every = (base.eval.every * steps / t).max(1);
    c.plan.budget = None;
    c
}

/// Final loss against total cost: the fixed runs of several lengths as the reference curve,
/// each progressive run a point (log x).
/// Each group of `groups` is one series (its runs as points, in order).
fn pareto_plots(out: &Path, frontier: &[&RunResult], groups: &[Vec<&Arm>]) -> Result<()> {
    for (axis, file) in [(Axis::FlopsNe, "pareto_flops_ne"), (Axis::FlopsLlmc, "pareto_flops_llmc"), (Axis::TrainWall, "pareto_wall")] {
        let mut series = vec![Series {
            label: "fixed runs of several lengths".into(),
            points: frontier.iter().map(|r| (r.total(axis), r.final_val_loss())).collect(),
            ..Default::default()
        }];
        for g in groups {
            let label = match g.as_slice() {
                [one] => one.run.label.clone(),
                many => format!(
                    "{} (τ = {})",
                    many[0].run.label.split(" τ=").next().unwrap_or_default(),
                    many.iter().map(|a| a.tau.map_or("–".into(), |t| t.to_string())).collect::<Vec<_>>().join(", ")
                ),
            };
            series.push(Series {
                label,
                points: g.iter().map(|a| (a.run.total(axis), a.run.final_val_loss())).collect(),
                ..Default::default()
            });
        }
        let chart = Chart {
            title: "final loss against cost".into(),
            x_label: axis.name().into(),
            y_label: "final validation loss".into(),
            x_scale: XScale::Log,
            series,
            markers: true,
            legend: plot::Legend::UpperRight,
            y_range: YRange::Whole,
        };
        plot::render(&chart, &out.join(format!("{file}.png")), plot::SIZE)?;
    }
    Ok(())
}

fn progressive_vs_fixed(runner: &Runner, base: &Config, out: &Path) -> Result<String> {
    let l = base.target_depth();
    let tau = tau_of(base)?;
    let paper_tau = (0.8 * base.run.steps as f64).round() as u64;
    let (shorter, f) = frontier_runs(runner, base)?;
    let mut arms = Vec::new();
    // the config's τ (the one `taproot plan` wrote), then the paper's 0.8 T if it differs
    let taus = if tau == paper_tau { vec![tau] } else { vec![tau, paper_tau] };
    for &t in &taus {
        let at = |init| super::at_step(t, l, init);
        arms.push(arm(runner, &format!("0→{l} random τ={t}"), progressive(base, 0, vec![at(GrowInit::Random)]))?);
        arms.push(arm(runner, &format!("1→{l} copying τ={t}"), progressive(base, 1, vec![at(GrowInit::Copying)]))?);
    }
    // The frontier: fixed runs of T/4 and T/2 steps, each with its own full schedule, and T.
    let frontier: Vec<&RunResult> = shorter.iter().map(|a| &a.run).chain(std::iter::once(&f.run)).collect();
    let refs: Vec<&Arm> = arms.iter().collect();
    let runs = all_runs(&f, &refs);
    let frontier_md = frontier_table(out, &frontier)?;
    let mut with_frontier = runs.clone();
    with_frontier.extend(shorter.iter().map(|a| &a.run));
    report::write_csv(&out.join("evals.csv"), &with_frontier)?;
    loss_plots(out, &format!("progressive vs fixed, {} steps", base.run.steps), "", &runs, true)?;
    pareto_plots(out, &frontier, &refs.iter().map(|a| vec![*a]).collect::<Vec<_>>())?;
    let mut md = note(base);
    md.push_str(&format!("τ = {tau} is the config's own (in the default config/experiments/planned.toml, the τ `taproot plan` wrote); τ = {paper_tau} is 0.8 T, the paper's.\n\n"));
    md.push_str(&frontier_md);
    md.push_str(&tables(out, &f, &refs, tol(base), "summary.csv", &frontier)?);
    md.push_str(&step_cost_note(&f.run, &arms[0].run));
    Ok(md)
}

/// The fixed runs of the frontier: `frontier.csv` and its markdown table.
fn frontier_table(out: &Path, frontier: &[&RunResult]) -> Result<String> {
    let frontier_rows: Vec<Vec<String>> = frontier
        .iter()
        .map(|r| {
            vec![
                r.label.clone(),
                format!("{:.4}", r.final_val_loss()),
                format!("{:.4}", r.final_train_loss),
                format!("{:.2}", r.passes),
                sci(r.flops_llmc),
                sci(r.flops_ne),
                format!("{:.1}", r.train_s),
            ]
        })
        .collect();
    let frontier_header =
        ["fixed run", "final val loss", "final train loss", "passes over data", "FLOPs llm.c", "FLOPs non-emb", "train s"];
    report::write_table_csv(&out.join("frontier.csv"), &frontier_header, &frontier_rows)?;
    let mut md = String::from("The frontier of fixed runs (each with its own full schedule):\n\n");
    md.push_str(&report::markdown_table(&frontier_header, &frontier_rows));
    md.push('\n');
    Ok(md)
}

/// The fixed model of `base` at T/4 and T/2 (each with its own full schedule) and at T: the
/// frontier, shortest first, and the fixed run of T steps.
fn frontier_runs(runner: &Runner, base: &Config) -> Result<(Vec<Arm>, Arm)> {
    let l = base.target_depth();
    let f = arm(runner, &format!("fixed {l}"), fixed(base))?;
    let mut shorter = Vec::new();
    for k in FRONTIER_FRACTIONS {
        let steps = ((base.run.steps as f64 * k).round() as u64).max(2);
        shorter.push(arm(runner, &format!("fixed {l} T={steps}"), fixed_of_length(base, steps))?);
    }
    Ok((shorter, f))
}

const PARETO_SOURCES: [usize; 4] = [0, 1, 2, 4];
const PARETO_TAUS: [f64; 3] = [0.5, 0.7, 0.8];

/// The paper's Pareto claim: every (source depth, τ) run as a point of final loss against cost,
/// beside the frontier of fixed runs; one plot per cost axis, one series per source depth.
fn pareto(runner: &Runner, base: &Config, out: &Path) -> Result<String> {
    let l = base.target_depth();
    let (shorter, f) = frontier_runs(runner, base)?;
    let mut groups: Vec<Vec<Arm>> = Vec::new();
    for &from in PARETO_SOURCES.iter().filter(|&&d| d < l) {
        let init = if from == 0 { GrowInit::Random } else { GrowInit::Copying };
        let name = if from == 0 { "random" } else { "copying" };
        let mut g = Vec::new();
        for &t in &PARETO_TAUS {
            g.push(arm(runner, &format!("{from}→{l} {name} τ={t}T"), progressive(base, from, vec![grow(t, l, init)]))?);
        }
        groups.push(g);
    }
    let frontier: Vec<&RunResult> = shorter.iter().map(|a| &a.run).chain(std::iter::once(&f.run)).collect();
    let refs: Vec<&Arm> = groups.iter().flatten().collect();
    let mut runs = all_runs(&f, &refs);
    runs.extend(shorter.iter().map(|a| &a.run));
    report::write_csv(&out.join("evals.csv"), &runs)?;
    pareto_plots(out, &frontier, &groups.iter().map(|g| g.iter().collect()).collect::<Vec<_>>())?;
    let mut md = note(base);
    md.push_str(&frontier_table(out, &frontier)?);
    md.push_str(&tables(out, &f, &refs, tol(base), "summary.csv", &frontier)?);
    md.push_str("\nOn the front: a run whose saving against the frontier is above 1× on an axis sits below the fixed runs' curve there (`pareto_flops_ne.png`, `pareto_flops_llmc.png`, `pareto_wall.png`).\n");
    Ok(md)
}

/// Which recipe choices move the gap (issue: µP, init scale, re-warmup, the embedding's
/// optimizer, optimizer state), each on 0→L `random` at 0.8T and against the fixed model trained
/// with the same recipe (a choice that changes the fixed model too gets its own fixed run).
fn recipe(runner: &Runner, base: &Config, out: &Path) -> Result<String> {
    use crate::model::init::Parameterization;
    use crate::optim::EmbeddingOptimizer;
    let l = base.target_depth();
    let g = |scale: f64, state: OptStatePolicy| {
        let mut e = grow(0.8, l, GrowInit::Random);
        e.init_scale = scale;
        e.opt_state = state;
        e
    };
    let today = g(1.0, OptStatePolicy::Inherit);
    let f = arm(runner, &format!("fixed {l}"), fixed(base))?;
    let mut arms = vec![arm(runner, &format!("0→{l} today's recipe"), progressive(base, 0, vec![today.clone()]))?];
    let mut rewarm = progressive(base, 0, vec![today.clone()]);
    rewarm.schedule.rewarmup = base.schedule.warmup_steps().max(1);
    arms.push(arm(runner, &format!("0→{l} re-warmup {} steps", rewarm.schedule.rewarmup), rewarm)?);
    for scale in [0.5, 2.0] {
        arms.push(arm(runner, &format!("0→{l} new-block init ×{scale}"), progressive(base, 0, vec![g(scale, OptStatePolicy::Inherit)]))?);
    }
    arms.push(arm(runner, &format!("0→{l} optimizer state reset"), progressive(base, 0, vec![g(1.0, OptStatePolicy::Reset)]))?);
    let refs: Vec<&Arm> = arms.iter().collect();
    let mut md = note(base);
    md.push_str("**Choices that leave the fixed model unchanged** (against today's fixed run):\n\n");
    md.push_str(&tables(out, &f, &refs, tol(base), "summary.csv", &[&f.run])?);
    let mut all: Vec<&RunResult> = all_runs(&f, &refs);
    // Choices that change the fixed model too: each against its own fixed run.
    let mut nsgd = base.clone();
    nsgd.optim.embedding_optimizer = EmbeddingOptimizer::Nsgd;
    let mut mup = base.clone();
    mup.model.parameterization = Parameterization::DepthMup;
    let mut other = Vec::new();
    for (b, name, file) in [(&nsgd, "NSGD embedding/head", "nsgd"), (&mup, "depth-µP", "depth_mup")] {
        let fb = arm(runner, &format!("fixed {l} {name}"), fixed(b))?;
        let pb = arm(runner, &format!("0→{l} {name}"), progressive(b, 0, vec![today.clone()]))?;
        md.push_str(&format!("\n**{name}** (against the fixed model with the same choice):\n\n"));
        md.push_str(&tables(out, &fb, &[&pb], tol(base), &format!("summary_{file}.csv"), &[&fb.run])?);
        other.push((fb, pb));
    }
    for (fb, pb) in &other {
        all.push(&fb.run);
        all.push(&pb.run);
    }
    report::write_csv(&out.join("evals.csv"), &all)?;
    loss_plots(out, &format!("recipe ablation: 0→{l} at 0.8T"), "", &all, false)?;
    Ok(md)
}

/// "a 0-layer step took X s, an L-layer step Y s": the per-step cost ratio behind the wall time.
fn step_cost_note(fixed: &RunResult, prog: &RunResult) -> String {
    let mut s = String::from("\nMedian training step (evaluation excluded):");
    for (d, secs, n) in &prog.step_s_by_depth {
        s.push_str(&format!(" depth {d}: {:.1} ms ({n} steps);", secs * 1e3));
    }
    if let Some((d, secs, n)) = fixed.step_s_by_depth.first() {
        s.push_str(&format!(" fixed depth {d}: {:.1} ms ({n} steps).", secs * 1e3));
    }
    s.push('\n');
    s
}

const TAUS: [f64; 5] = [0.5, 0.6, 0.7, 0.8, 0.9];

fn tau_sweep(runner: &Runner, base: &Config, out: &Path) -> Result<String> {
    let l = base.target_depth();
    let mut md = note(base);
    let mut finals: Vec<Series> = Vec::new();
    let mut all: Vec<(String, Arm)> = Vec::new();
    for kind in [ScheduleKind::Wsd, ScheduleKind::Cosine] {
        let sched = format!("{kind:?}").to_lowercase();
        let b = with_schedule(base, kind);
        let f = arm(runner, &format!("fixed {l} {sched}"), fixed(&b))?;
        let mut arms = Vec::new();
        for &t in &TAUS {
            arms.push(arm(runner, &format!("0→{l} τ={t} {sched}"), progressive(&b, 0, vec![grow(t, l, GrowInit::Random)]))?);
        }
        let refs: Vec<&Arm> = arms.iter().collect();
        md.push_str(&format!("**{sched}**\n\n"));
        md.push_str(&tables(out, &f, &refs, tol(base), &format!("summary_{sched}.csv"), &[&f.run])?);
        md.push('\n');
        let runs = all_runs(&f, &refs);
        loss_plots(out, &format!("0→{l} at τ, {sched}"), &format!("{sched}_"), &runs, false)?;
        finals.push(Series {
            label: format!("0→{l} {sched}"),
            points: TAUS.iter().zip(&arms).map(|(&t, a)| (t, a.run.final_val_loss())).collect(),
            ..Default::default()
        });
        finals.push(Series {
            label: format!("fixed {l} {sched}"),
            points: vec![(TAUS[0], f.run.final_val_loss()), (TAUS[TAUS.len() - 1], f.run.final_val_loss())],
            ..Default::default()
        });
        all.push((sched.clone(), f));
        all.extend(arms.into_iter().map(|a| (sched.clone(), a)));
    }
    let runs: Vec<&RunResult> = all.iter().map(|(_, a)| &a.run).collect();
    report::write_csv(&out.join("evals.csv"), &runs)?;
    let chart = Chart {
        title: format!("final validation loss against τ (0→{l})"),
        x_label: "τ / T".into(),
        y_label: "final validation loss (nats/byte)".into(),
        x_scale: XScale::Linear,
        series: finals,
        markers: true,
        legend: plot::Legend::UpperLeft,
        y_range: YRange::Whole,
    };
    plot::render(&chart, &out.join("final_loss_vs_tau.png"), plot::SIZE)?;
    Ok(md)
}

fn init_ablation(runner: &Runner, base: &Config, out: &Path) -> Result<String> {
    let l = base.target_depth();
    if l < 3 {
        bail!("init-ablation grows 2→L: it needs a target depth of at least 3, the config has {l}");
    }
    let f = arm(runner, &format!("fixed {l}"), fixed(base))?;
    let mut arms = Vec::new();
    for (init, name) in
        [(GrowInit::Random, "random"), (GrowInit::Copying, "copying"), (GrowInit::Zero, "zero"), (GrowInit::CopyingZero, "copying_zero")]
    {
        arms.push(arm(runner, &format!("1→{l} {name}"), progressive(base, 1, vec![grow(0.5, l, init)]))?);
    }
    for (order, name) in [(CopyOrder::Stack, "stack"), (CopyOrder::Inter, "inter"), (CopyOrder::Last, "last")] {
        let mut g = grow(0.5, l, GrowInit::Copying);
        g.order = order;
        arms.push(arm(runner, &format!("2→{l} copying {name}"), progressive(base, 2, vec![g]))?);
    }
    let refs: Vec<&Arm> = arms.iter().collect();
    let runs = all_runs(&f, &refs);
    report::write_csv(&out.join("evals.csv"), &runs)?;
    loss_plots(out, &format!("init ablation: 1→{l} and 2→{l} at 0.5T"), "", &runs, false)?;
    Ok(format!("{}{}", note(base), tables(out, &f, &refs, tol(base), "summary.csv", &[&f.run])?))
}

fn stages(runner: &Runner, base: &Config, out: &Path) -> Result<String> {
    let l = base.target_depth();
    if l < 3 {
        bail!("stages grows 0→2→L: it needs a target depth of at least 3, the config has {l}");
    }
    let f = arm(runner, &format!("fixed {l}"), fixed(base))?;
    let single = arm(runner, &format!("0→{l} at 0.8T"), progressive(base, 0, vec![grow(0.8, l, GrowInit::Random)]))?;
    let multi = arm(
        runner,
        &format!("0→2→{l} at 0.4T, 0.8T"),
        progressive(base, 0, vec![grow(0.4, 2, GrowInit::Random), grow(0.8, l, GrowInit::Random)]),
    )?;
    let refs = [&single, &multi];
    let runs = all_runs(&f, &refs);
    report::write_csv(&out.join("evals.csv"), &runs)?;
    loss_plots(out, &format!("single stage 0→{l} against two stages 0→2→{l}"), "", &runs, true)?;
    Ok(format!("{}{}", note(base), tables(out, &f, &refs, tol(base), "summary.csv", &[&f.run])?))
}

fn optimizer_state(runner: &Runner, base: &Config, out: &Path) -> Result<String> {
    let l = base.target_depth();
    let f = arm(runner, &format!("fixed {l}"), fixed(base))?;
    let mut arms = Vec::new();
    for (policy, name) in [(OptStatePolicy::Inherit, "inherit"), (OptStatePolicy::Copy, "copy"), (OptStatePolicy::Reset, "reset")] {
        let mut g = grow(0.5, l, GrowInit::Copying);
        g.opt_state = policy;
        arms.push(arm(runner, &format!("1→{l} copying, state {name}"), progressive(base, 1, vec![g]))?);
    }
    let refs: Vec<&Arm> = arms.iter().collect();
    let runs = all_runs(&f, &refs);
    report::write_csv(&out.join("evals.csv"), &runs)?;
    loss_plots(out, &format!("optimizer state at expansion (1→{l} copying at 0.5T)"), "", &runs, false)?;
    Ok(format!("{}{}", note(base), tables(out, &f, &refs, tol(base), "summary.csv", &[&f.run])?))
}
