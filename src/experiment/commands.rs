//! The bodies of `taproot plan` and `taproot experiment` (the argument parsing is in `cli`).

use super::{plan, suite, Runner};
use crate::config::Config;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Arguments of `taproot plan`.
#[derive(Clone, Debug, Default)]
pub struct PlanArgs {
    pub config: PathBuf,
    pub set: Vec<String>,
    pub budget: Option<u64>,
    pub tolerance: Option<f64>,
    pub eval_every: Option<u64>,
    /// Where to write the planned config.
    pub out: Option<PathBuf>,
    /// Where the pilot's curves, table and plot go (default `runs/<name>/plan`).
    pub report_dir: Option<PathBuf>,
    /// The result cache (the command uses `runs/_cache`; None: no cache).
    pub cache: Option<PathBuf>,
    pub fresh: bool,
    pub quiet: bool,
}

/// `taproot plan`: run the pilot, print t_mix and τ, write the planned config. Fails, writing no
/// config, when the pilot does not mix within the budget.
pub fn plan_command(a: &PlanArgs) -> Result<plan::PlanOutcome> {
    let mut set = a.set.clone();
    if let Some(b) = a.budget {
        set.push(format!("plan.budget={b}"));
    }
    if let Some(t) = a.tolerance {
        set.push(format!("plan.mix_tolerance={t}"));
    }
    if let Some(e) = a.eval_every {
        set.push(format!("plan.eval_every={e}"));
    }
    let text = crate::userfile::read_to_string(&a.config, "config", crate::userfile::TEXT_MAX)?;
    let cfg = Config::parse(&text, &set).with_context(|| format!("in config {}", a.config.display()))?;
    let p = plan::pilot(&cfg)?;
    let report_dir = a.report_dir.clone().unwrap_or_else(|| cfg.out_dir().join("plan"));
    let mut runner = Runner::new(super::open_data(&cfg)?, report_dir.join("runs"));
    runner.cache = a.cache.clone();
    runner.fresh = a.fresh;
    runner.verbose = !a.quiet;
    if !a.quiet {
        println!(
            "plan {}: fixed {} blocks vs grown at step {} (end of warmup), {} steps each (schedule of {} steps, truncated), eval every {} steps, tolerance {:.2}%",
            cfg.run.name,
            cfg.target_depth(),
            p.tau0,
            p.budget,
            cfg.run.steps,
            p.eval_every,
            100.0 * p.tolerance
        );
    }
    let o = plan::run(&runner, &cfg)?;
    let md = plan::write_report(&o, &report_dir)?;
    if !a.quiet {
        println!("{md}report: {}", report_dir.display());
    }
    let Some(rec) = &o.recommendation else {
        bail!(
            "the runs did not mix within the budget of {} steps ({}); no τ recommended and no config written. Try a larger --budget (at most run.steps), a looser --tolerance, or a longer run",
            o.pilot.budget,
            o.mixing.describe()
        );
    };
    println!(
        "t_mix={} tau={} decay_start={} warmup_end={}{}",
        rec.t_mix,
        rec.tau,
        rec.decay_start,
        rec.warmup_end,
        if rec.clamped { " (clamped to the end of warmup)" } else { "" }
    );
    if let Some(out) = &a.out {
        let note = format!(
            "pilot of {} steps, t_mix = {} steps at tolerance {:.2}%, τ = {} − {} = {}{}",
            o.pilot.budget,
            rec.t_mix,
            100.0 * o.pilot.tolerance,
            rec.decay_start,
            rec.t_mix,
            rec.tau,
            if rec.clamped { " (clamped to the end of warmup)" } else { "" }
        );
        let new = plan::planned_config_text(&text, &cfg, &a.set, rec, &note)?;
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(out, new).with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
    }
    Ok(o)
}

/// Arguments of `taproot experiment`.
#[derive(Clone, Debug, Default)]
pub struct ExperimentArgs {
    pub name: String,
    pub quick: bool,
    pub config: Option<PathBuf>,
    pub set: Vec<String>,
    /// Output directory (default `runs/NAME`, `runs/quick/NAME` with `--quick`).
    pub out: Option<PathBuf>,
    pub fresh: bool,
    pub no_cache: bool,
}

/// Steps of a `--quick` run.
pub const QUICK_STEPS: u64 = 60;

/// `taproot experiment NAME` (or `all`: every experiment in order, then `suite.md`).
pub fn experiment_command(a: &ExperimentArgs) -> Result<Vec<suite::Outcome>> {
    let names: Vec<&str> = if a.name == "all" { suite::NAMES.to_vec() } else { vec![a.name.as_str()] };
    if let Some(bad) = names.iter().find(|n| !suite::NAMES.contains(n)) {
        bail!("unknown experiment {bad:?}: one of {}, or all", suite::NAMES.join(", "));
    }
    let root = a.out.clone().unwrap_or_else(|| if a.quick { PathBuf::from("runs/quick") } else { PathBuf::from("runs") });
    let t0 = Instant::now();
    let mut outcomes = Vec::new();
    for name in names {
        let path = a.config.clone().unwrap_or_else(|| PathBuf::from(suite::default_config(name)));
        let mut base = Config::load(&path, &a.set)?;
        if a.quick {
            base = super::checked(super::quick(&base, QUICK_STEPS))?;
        }
        let out = if a.name == "all" || a.out.is_none() { root.join(name) } else { root.clone() };
        let mut runner = Runner::new(super::open_data(&base)?, out.join("runs"));
        if !a.no_cache {
            runner.cache = Some(root.join("_cache"));
        }
        runner.fresh = a.fresh;
        outcomes.push(suite::run(name, &runner, &base, &out)?);
    }
    if a.name == "all" {
        write_suite_summary(&root, &outcomes, t0.elapsed().as_secs_f64(), a.quick)?;
    }
    Ok(outcomes)
}

fn write_suite_summary(root: &Path, outcomes: &[suite::Outcome], total: f64, quick: bool) -> Result<()> {
    let mut md = format!("# taproot experiment all{}\n\n| experiment | seconds |\n|---|---|\n", if quick { " --quick" } else { "" });
    for o in outcomes {
        md.push_str(&format!("| {} | {:.0} |\n", o.name, o.seconds));
    }
    md.push_str(&format!("| **total** | {total:.0} |\n\n"));
    for o in outcomes {
        md.push_str(&format!("## {}\n\n{}\n", o.name, o.markdown));
    }
    std::fs::write(root.join("suite.md"), md)?;
    println!("suite: {total:.0} s, summary in {}", root.join("suite.md").display());
    Ok(())
}
