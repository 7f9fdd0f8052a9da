//! `taproot plan`: the paper's pilot for choosing τ, automated (docs/METHOD.md, "Expansion timing and
//! mixing time").
//!
//! Given a progressive config (one expansion), run
//! - the **fixed-size** model (the target depth from step 0), and
//! - the **pilot**: the progressive model grown right after warmup (τ₀ = the first step after
//!   warmup, at least 1),
//!
//! both for a budget of steps, measure t_mix of the pilot against the fixed run
//! ([`super::mixing`]), and recommend τ = T_decay_start − t_mix, never before warmup ends.
//!
//! Decisions:
//! - **The config's own schedule, truncated** (not a shorter schedule of the same shape): the
//!   pilot runs see exactly the warmup length and the stable learning rate the real run sees
//!   between τ and the decay, which is the regime in which t_mix is spent. The default budget is
//!   therefore the start of the decay (the whole stable phase; under cosine, whose decay starts
//!   after warmup, the whole run). A smaller `--budget` is cheaper and can only find shorter
//!   mixing times.
//! - **Resolution**: both pilot runs evaluate every `plan.eval_every` steps (default 1% of
//!   `run.steps`); t_mix is a multiple of it and an upper bound on the true crossing, so τ errs
//!   early.
//! - **No mixing, no τ**: if the pilot never gets within the tolerance, or does not stay within
//!   it to the end of the budget, [`recommend`] returns the finding instead of a τ and the command
//!   fails without writing a config.
//! - If T_decay_start − t_mix falls before the end of warmup, τ is the end of warmup and the plan
//!   says that the run is too short to mix before its decay.

use super::mixing::{mixing_time, Mixing};
use super::report::{self, RunResult};
use super::{plot, Runner};
use crate::config::Config;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// The two pilot runs of a plan, ready to train.
#[derive(Clone, Debug)]
pub struct Pilot {
    pub fixed: Config,
    pub progressive: Config,
    /// τ₀ of the pilot: the first step after warmup.
    pub tau0: u64,
    /// Steps both runs train for.
    pub budget: u64,
    pub eval_every: u64,
    pub tolerance: f64,
}

/// What `taproot plan` recommends.
#[derive(Clone, Debug, PartialEq)]
pub struct Recommendation {
    pub tau: u64,
    pub t_mix: u64,
    pub decay_start: u64,
    pub warmup_end: u64,
    /// τ = T_decay_start − t_mix fell before warmup ended and was moved to its end.
    pub clamped: bool,
    /// t_mix as a fraction of the stable phase (T_decay_start − warmup end).
    pub mix_fraction: f64,
    /// The compute saving τ supports, in the non-embedding convention: the fixed run's
    /// non-embedding FLOPs over the progressive run's, T·L / (τ·L_s + (T − τ)·L) for growth from
    /// L_s to L blocks at τ (every step costs the same tokens).
    pub saving_ne: f64,
}

/// The pilot's budget is in the mixing regime when the progressive model catches up within this
/// fraction of the stable phase: τ then sits late in the run and the saving is large.
pub const MIXING_REGIME: f64 = 0.25;

impl Recommendation {
    pub fn in_mixing_regime(&self) -> bool {
        self.mix_fraction <= MIXING_REGIME
    }

    /// The regime verdict, said before τ.
    pub fn regime(&self, total_steps: u64) -> String {
        let at = 100.0 * self.tau as f64 / total_steps as f64;
        if self.in_mixing_regime() {
            format!(
                "In the mixing regime: t_mix = {} is {:.0}% of the stable phase, so τ can be late ({at:.0}% of T), a non-embedding compute saving of {:.2}×.",
                self.t_mix,
                100.0 * self.mix_fraction,
                self.saving_ne
            )
        } else {
            format!(
                "Not in the mixing regime: t_mix = {} is {:.0}% of the stable phase (more than {:.0}%), so τ can be no later than {at:.0}% of T and the saving is small: {:.2}× in non-embedding compute. A longer run (more tokens per parameter) mixes in a smaller share of it.",
                self.t_mix,
                100.0 * self.mix_fraction,
                100.0 * MIXING_REGIME,
                self.saving_ne
            )
        }
    }
}

/// The outcome of a plan: the runs, the mixing finding and τ if there is one.
#[derive(Clone, Debug)]
pub struct PlanOutcome {
    pub pilot: Pilot,
    pub fixed: RunResult,
    pub progressive: RunResult,
    pub mixing: Mixing,
    pub recommendation: Option<Recommendation>,
}

/// Build the two pilot configs from a progressive config.
pub fn pilot(cfg: &Config) -> Result<Pilot> {
    if cfg.growth.len() != 1 {
        bail!("`taproot plan` plans a single-stage growth: the config must have exactly one [[growth]] entry, it has {}", cfg.growth.len());
    }
    let t = cfg.run.steps;
    let warmup_end = cfg.schedule.warmup_steps().max(1);
    let decay_start = cfg.schedule.decay_start();
    let budget = cfg.plan.budget.unwrap_or(if decay_start > warmup_end + 1 { decay_start } else { t });
    if budget <= warmup_end {
        bail!("the plan's budget ({budget} steps) ends before warmup does (step {warmup_end}): nothing to measure after the expansion");
    }
    let eval_every = cfg.plan.eval_every.unwrap_or((t / 100).max(1));
    let mut fixed = super::fixed(cfg);
    fixed.run.name = format!("{}-plan-fixed", cfg.run.name);
    fixed.eval.every = eval_every;
    let mut progressive = cfg.clone();
    progressive.run.name = format!("{}-plan-pilot", cfg.run.name);
    progressive.eval.every = eval_every;
    progressive.growth[0].at = None;
    progressive.growth[0].at_step = Some(warmup_end);
    Ok(Pilot {
        fixed: super::checked(fixed)?,
        progressive: super::checked(progressive)?,
        tau0: warmup_end,
        budget,
        eval_every,
        tolerance: cfg.plan.mix_tolerance,
    })
}

/// τ from a mixing finding: T_decay_start − t_mix, never before warmup ends. None when the
/// pilot did not mix.
pub fn recommend(cfg: &Config, mixing: &Mixing) -> Option<Recommendation> {
    let t_mix = mixing.t_mix()?;
    let warmup_end = cfg.schedule.warmup_steps().max(1);
    let decay_start = cfg.schedule.decay_start();
    let raw = decay_start.saturating_sub(t_mix);
    let tau = raw.max(warmup_end).min(cfg.run.steps - 1);
    let stable = decay_start.saturating_sub(warmup_end).max(1);
    let (t, l, ls) = (cfg.run.steps as f64, cfg.target_depth() as f64, cfg.model.depth as f64);
    let saving_ne = t * l / (tau as f64 * ls + (t - tau as f64) * l);
    Some(Recommendation {
        tau,
        t_mix,
        decay_start,
        warmup_end,
        clamped: raw < warmup_end,
        mix_fraction: t_mix as f64 / stable as f64,
        saving_ne,
    })
}

/// Train the pilot and measure.
pub fn run(runner: &Runner, cfg: &Config) -> Result<PlanOutcome> {
    let p = pilot(cfg)?;
    let fixed = runner.run("fixed", &p.fixed, Some(p.budget))?;
    let progressive = runner.run(&format!("pilot (grown at {})", p.tau0), &p.progressive, Some(p.budget))?;
    let mixing = mixing_time(&fixed.curve(), &progressive.curve(), p.tau0, p.tolerance);
    let recommendation = recommend(cfg, &mixing);
    Ok(PlanOutcome { pilot: p, fixed, progressive, mixing, recommendation })
}

/// The planned config: the input config's text with its expansion's step set to τ (`at_step`;
/// the rest of the file, comments included, unchanged). When `overrides` were applied, the text
/// no longer describes the run, so the whole resolved config is written instead.
pub fn planned_config_text(original: &str, cfg: &Config, overrides: &[String], rec: &Recommendation, note: &str) -> Result<String> {
    let header = format!("# τ set by `taproot plan`: {note}\n");
    let text = match (overrides.is_empty(), set_growth_step(original, rec.tau)) {
        (true, Some(t)) => format!("{header}{t}"),
        _ => {
            let mut c = cfg.clone();
            c.growth[0].at = None;
            c.growth[0].at_step = Some(rec.tau);
            format!("{header}{}", c.to_toml())
        }
    };
    let check = Config::parse(&text, &[]).context("the planned config does not parse (a bug)")?;
    if check.expansions().first().map(|e| e.at_step) != Some(rec.tau) {
        bail!("the planned config does not grow at step {} (a bug)", rec.tau);
    }
    Ok(text)
}

/// Replace the `at = …` / `at_step = …` line of the first `[[growth]]` table with
/// `at_step = tau`. None if the file does not have that shape.
fn set_growth_step(text: &str, tau: u64) -> Option<String> {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_growth = false;
    let mut seen_growth = false;
    let mut done = false;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with('[') {
            in_growth = t.starts_with("[[growth]]") && !seen_growth;
            seen_growth |= t.starts_with("[[growth]]");
        }
        let key = t.split('=').next().map(str::trim);
        if in_growth && !done && matches!(key, Some("at") | Some("at_step")) && t.contains('=') {
            out.push_str(&format!("at_step = {tau}\n"));
            done = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    done.then_some(out)
}

/// The plan's files under `dir`: `curves.csv`, `plan.md`, `plan.png`. Returns the markdown.
pub fn write_report(o: &PlanOutcome, dir: &Path) -> Result<String> {
    super::ensure_dir(dir)?;
    report::write_csv(&dir.join("curves.csv"), &[&o.fixed, &o.progressive])?;
    let gaps = super::mixing::gaps(&o.fixed.curve(), &o.progressive.curve(), o.pilot.tau0);
    let rows: Vec<Vec<String>> = gaps
        .iter()
        .map(|(s, g)| vec![s.to_string(), report::pct(*g), if *g <= o.pilot.tolerance { "yes".into() } else { "no".into() }])
        .collect();
    report::write_table_csv(&dir.join("gaps.csv"), &["step", "gap", "within"], &rows)?;
    let mut md = format!(
        "Pilot: fixed vs grown at step {} (end of warmup), {} steps, evaluated every {} steps, tolerance {:.2}%.\n\n{}\n\n",
        o.pilot.tau0,
        o.pilot.budget,
        o.pilot.eval_every,
        100.0 * o.pilot.tolerance,
        o.mixing.describe()
    );
    match &o.recommendation {
        Some(r) => md.push_str(&format!(
            "{}\n\nRecommended τ = T_decay_start − t_mix = {} − {} = {}{}.\n",
            r.regime(o.pilot.fixed.run.steps),
            r.decay_start,
            r.t_mix,
            r.tau,
            if r.clamped {
                format!(" (clamped to the end of warmup, step {}: the stable phase is shorter than t_mix)", r.warmup_end)
            } else {
                String::new()
            }
        )),
        None => md.push_str("No τ recommended.\n"),
    }
    std::fs::write(dir.join("plan.md"), &md)?;
    let series = |r: &RunResult| plot::Series {
        label: r.label.clone(),
        points: r.evals.iter().map(|e| (e.step as f64, e.val_loss)).collect(),
        marks: r.growth_marks(None),
    };
    let chart = plot::Chart {
        title: "taproot plan: pilot".into(),
        x_label: "step".into(),
        y_label: "validation loss (nats/token)".into(),
        x_scale: plot::XScale::Linear,
        series: vec![series(&o.fixed), series(&o.progressive)],
        markers: false,
        legend: plot::Legend::UpperRight,
        y_range: plot::YRange::Whole,
    };
    plot::render(&chart, &dir.join("plan.png"), plot::SIZE)?;
    Ok(md)
}
