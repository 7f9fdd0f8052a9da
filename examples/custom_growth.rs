//! Write a growth plan in code, and run it with the sequential trainer.
//!
//! The config is parsed from a small TOML string with no `[[growth]]` section; the plan is then
//! pushed into `cfg.growth` as [`GrowthSpec`]s: a two-stage expansion 1 -> 2 -> 6 blocks (the
//! first at an absolute step, the second at a fraction of the run), each new block a copy of a
//! trained one (`copying`) in `inter` order (each existing block copied into a consecutive run:
//! 2 -> 6 adds copies of [w1, w1, w2, w2] below the old two) that also copies its source's
//! optimizer state (`copy`). `cfg.validate()` checks the plan; the example prints the resolved
//! expansions (`cfg.expansions()`) and which existing block each new block copies, trains with
//! [`Sequential`], and prints every `GrowthRecord` of the report with the loss around it.
//!
//! ```sh
//! cargo run --release --example custom_growth                # tiny model, synthetic data (a few seconds)
//! cargo run --release --example custom_growth -- CONFIG [KEY=VALUE ...]   # your config (its plan is replaced)
//! ```
//!
//! With a config starting at L >= 1 blocks, its growth plan is replaced by L -> 2L at 0.3 T and
//! 2L -> 6L at 0.6 T, and `model.target_depth` by 6L. The tiny run writes its corpus and outputs to
//! a fresh temporary directory, removed at the end.

mod common;

use anyhow::{bail, Context, Result};
use common::{scratch_dir, synthetic_corpus, toml_path};
use std::path::Path;
use taproot::backend::cpu::CpuBackend;
use taproot::config::{Config, GrowthSpec};
use taproot::data::{Dataset, Tokenizer};
use taproot::model::growth::{plan_sources, CopyOrder, GrowInit, OptStatePolicy, Position};
use taproot::train::sequential::Sequential;
use taproot::train::RunOptions;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut cfg, scratch) = match args.split_first() {
        Some((path, sets)) => (Config::load(Path::new(path), sets)?, None),
        None => {
            let dir = scratch_dir("custom_growth")?;
            let data = synthetic_corpus(&dir)?;
            (Config::parse(&tiny_config(&dir, &data), &[])?, Some(dir))
        }
    };

    // The plan, from code: L -> 2L at step 0.3 T (as an absolute step), 2L -> 6L at 0.6 T (as a
    // fraction of run.steps).
    let l = cfg.model.depth;
    if l == 0 {
        bail!("this example copies trained blocks, so the model must start with at least 1 block (`model.depth`)");
    }
    let stage = |at: Option<f64>, at_step: Option<u64>, to_depth: usize| GrowthSpec {
        at,
        at_step,
        to_depth,
        position: Position::Bottom,
        init: GrowInit::Copying,
        order: CopyOrder::Inter,
        opt_state: OptStatePolicy::Copy,
        init_scale: 1.0,
    };
    cfg.growth = vec![stage(None, Some((cfg.run.steps as f64 * 0.3).round() as u64), 2 * l), stage(Some(0.6), None, 6 * l)];
    cfg.model.target_depth = None; // the plan's last depth: the residual-projection init scale follows it
    cfg.validate().context("the custom growth plan")?;

    println!("run {:?}: {} steps, {} -> {} blocks (target depth {})", cfg.run.name, cfg.run.steps, l, 6 * l, cfg.target_depth());
    println!("resolved expansions (cfg.expansions()):");
    let mut depth = l;
    for (i, e) in cfg.expansions().iter().enumerate() {
        println!(
            "  [{i}] before step {}: {} -> {} blocks, position {:?}, init {:?}, order {:?}, opt_state {:?}",
            e.at_step, depth, e.to_depth, e.position, e.init, e.order, e.opt_state
        );
        let sources = plan_sources(e.init, e.order, depth, e.to_depth - depth)?;
        let sources: Vec<String> = sources.iter().map(|s| s.map_or("new".into(), |i| format!("w{}", i + 1))).collect();
        println!("      new blocks (bottom-most first) copy [{}] of the {depth} existing", sources.join(", "));
        depth = e.to_depth;
    }

    let tok = Tokenizer::from_name(&cfg.data.tokenizer)?;
    let data = Dataset::open(&cfg.data.dir, tok.vocab_size()).with_context(|| format!("loading {}", cfg.data.dir.display()))?;
    let mut trainer = Sequential::new(CpuBackend::default(), &cfg, &data)?;
    let report = trainer.run(&RunOptions { quiet: true, ..Default::default() })?;

    println!("\ngrowth records of the report:");
    let loss_at = |step: u64| report.steps.iter().find(|s| s.step == step).map(|s| s.train_loss);
    for ((g, wall), e) in report.growth.iter().zip(&report.growth_wall_s).zip(cfg.expansions()) {
        println!("  {g:?}");
        // Which block each newborn copies, by layer id: the old stack is the new one minus them.
        let old: Vec<u64> = g.stack.iter().copied().filter(|id| !g.new_ids.contains(id)).collect();
        let sources = plan_sources(e.init, e.order, g.from_depth, g.new_ids.len())?;
        let copies: Vec<String> = g
            .new_ids
            .iter()
            .zip(&sources)
            .map(|(id, s)| s.map_or(format!("id {id} new"), |i| format!("id {id} <- id {}", old[i])))
            .collect();
        println!("    {}", copies.join(", "));
        // The record's step is the update the new blocks first take part in (1-based: step + 1).
        let (before, after) = (loss_at(g.at_step), loss_at(g.at_step + 1));
        println!(
            "    {:.2} ms; train loss {} before it, {} at its first update",
            wall * 1e3,
            before.map_or("-".into(), |v| format!("{v:.4}")),
            after.map_or("-".into(), |v| format!("{v:.4}"))
        );
    }
    println!("\nevaluations:");
    for e in &report.evals {
        println!("  step {:3} depth {} val_loss {:.4}", e.step, e.depth, e.val_loss);
    }
    let last = report.steps.last().context("the run made no step")?;
    println!("final: step {} depth {} train_loss {:.4}, wall {:.2} s", last.step, last.depth, last.train_loss, report.wall_s);
    if let Some(dir) = scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

/// A tiny 1-block run with no growth plan (the example adds it).
fn tiny_config(dir: &Path, data: &Path) -> String {
    format!(
        r#"
[run]
name = "custom-growth"
steps = 40
log_every = 0
out_dir = {out}
[data]
dir = {data}
tokenizer = "bytes"
batch_size = 4
seq_len = 16
micro_batches = 2
[model]
channels = 32
heads = 2
depth = 1
[schedule]
lr = 0.01
[eval]
every = 10
batches = 2
"#,
        out = toml_path(&dir.join("run")),
        data = toml_path(data),
    )
}
