//! Grow a model live on the actor runtime, and watch the messages go by.
//!
//! A 0-block GPT-2 trains on a synthetic byte corpus; at step 10 the scheduler actor grows it to
//! 3 blocks, spawning three new layer actors at the bottom of the running pipeline. An
//! [`Observer`] installed with [`taproot::runtime::start`] prints every [`Event`] the runtime
//! reports, one line each, as it happens: steps, evaluations, the growth (new layer ids and the
//! stack after it), each layer's forward and backward compute time per micro-batch
//! (`LayerTime`), the micro-batches in flight, the buffers of each device. At the end it prints
//! the run's report: steps, final losses, growth records, and how many events of each kind came.
//!
//! ```sh
//! cargo run --release --example grow_live                    # tiny model, synthetic data (a few seconds)
//! cargo run --release --example grow_live -- CONFIG [KEY=VALUE ...]   # your config, `--set`-style overrides
//! ```
//!
//! The tiny run writes its corpus and run outputs to a fresh temporary directory, removed at the
//! end. With a config, the data and outputs are the config's (`data.dir`, `run.out_dir`).

mod common;

use anyhow::{Context, Result};
use common::{scratch_dir, synthetic_corpus, toml_path};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use taproot::backend::cpu::CpuBackend;
use taproot::config::Config;
use taproot::data::{Dataset, Tokenizer};
use taproot::runtime::events::{Event, Observer};
use taproot::runtime::RunOptions;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cfg, scratch) = match args.split_first() {
        Some((path, sets)) => (Config::load(Path::new(path), sets)?, None),
        None => {
            let dir = scratch_dir("grow_live")?;
            let data = synthetic_corpus(&dir)?;
            (Config::parse(&tiny_config(&dir, &data), &[])?, Some(dir))
        }
    };
    let tok = Tokenizer::from_name(&cfg.data.tokenizer)?;
    let data = Dataset::open(&cfg.data.dir, tok.vocab_size()).with_context(|| format!("loading {}", cfg.data.dir.display()))?;
    println!(
        "run {:?}: {} steps, depth {} -> {}, C={} heads={} B={} T={} micro-batches={}, plan {:?}",
        cfg.run.name,
        cfg.run.steps,
        cfg.model.depth,
        cfg.target_depth(),
        cfg.model.channels,
        cfg.model.heads,
        cfg.data.batch_size,
        cfg.data.seq_len,
        cfg.data.micro_batches,
        cfg.expansions().iter().map(|e| (e.at_step, e.to_depth)).collect::<Vec<_>>()
    );

    // The observer: called from the actors' handlers, so it only formats a line and counts.
    let t0 = Instant::now();
    let counts: Arc<Mutex<BTreeMap<&'static str, usize>>> = Arc::default();
    let observer: Observer = {
        let counts = counts.clone();
        Arc::new(move |e: &Event| {
            let (kind, line) = describe(e);
            *counts.lock().expect("counts lock").entry(kind).or_default() += 1;
            println!("{:9.2} ms  {line}", t0.elapsed().as_secs_f64() * 1e3);
        })
    };

    // The actor runtime lives in a multi-thread tokio runtime (the layer handlers compute inside
    // `block_in_place`, which the current-thread flavour does not allow).
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let opts = RunOptions { quiet: true, ..Default::default() };
    let report = rt.block_on(async {
        let run = taproot::runtime::start::<CpuBackend>(&cfg, data, opts, observer).await?;
        run.wait().await
    })?;
    rt.shutdown_timeout(std::time::Duration::from_secs(2));

    println!("\n== report");
    let last = report.steps.last().context("the run made no step")?;
    println!("steps: {} (depth {} at the end), last train loss {:.4}, wall {:.2} s", last.step, last.depth, last.train_loss, report.wall_s);
    if let (Some(first), Some(v)) = (report.evals.first(), report.final_val_loss()) {
        println!("val loss: {:.4} at step {} -> {v:.4} at step {}", first.val_loss, first.step, report.evals.last().map_or(0, |e| e.step));
    }
    for (g, wall) in report.growth.iter().zip(report.growth_wall_s.iter()) {
        println!(
            "growth before step {}: {} -> {} blocks, new ids {:?}, stack {:?} ({:.1} ms)",
            g.at_step,
            g.from_depth,
            g.to_depth,
            g.new_ids,
            g.stack,
            wall * 1e3
        );
    }
    let counts = counts.lock().expect("counts lock");
    println!("events: {}", counts.iter().map(|(k, n)| format!("{k}={n}")).collect::<Vec<_>>().join(" "));
    if let Some(dir) = scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

/// One line for an event, and its kind (for the tally).
fn describe(e: &Event) -> (&'static str, String) {
    match e {
        Event::Step { step, total_steps, depth, lr, train_loss, seconds, grad_norm, params, .. } => (
            "step",
            format!(
                "step {step}/{total_steps} depth={depth} train_loss={train_loss:.4} lr={lr:.4} grad_norm={grad_norm:.3} params={} wall={:.2}ms",
                params.0,
                seconds * 1e3
            ),
        ),
        Event::Eval { step, depth, val_loss } => ("eval", format!("eval at step {step} depth={depth} val_loss={val_loss:.4}")),
        Event::Growth { record: g, seconds } => (
            "growth",
            format!(
                "GROWTH before step {}: {} -> {} blocks, new layer ids {:?}, stack (bottom to top) {:?}, {:.2}ms",
                g.at_step,
                g.from_depth,
                g.to_depth,
                g.new_ids,
                g.stack,
                seconds * 1e3
            ),
        ),
        Event::LayerTime { layer, device, backward, seconds } => {
            let pass = if *backward { "backward" } else { "forward " };
            ("layer_time", format!("  layer {layer} ({device}) {pass} {:.3}ms", seconds * 1e3))
        }
        Event::InFlight(n) => ("in_flight", format!("  in flight: {n}")),
        Event::Buffers { device, allocated, peer_bytes_in } => {
            ("buffers", format!("  buffers of {device}: {allocated} allocated, {peer_bytes_in} bytes copied in"))
        }
        Event::Checkpoint { step, path, bytes, .. } => ("checkpoint", format!("checkpoint at step {step}: {path} ({bytes} bytes)")),
        other => ("other", format!("{other:?}")),
    }
}

/// A tiny progressive run: 0 blocks, grown to 3 at step 10 of 24.
fn tiny_config(dir: &Path, data: &Path) -> String {
    format!(
        r#"
[run]
name = "grow-live"
steps = 24
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
depth = 0
target_depth = 3
[schedule]
lr = 0.01
[eval]
every = 8
batches = 2
[[growth]]
at_step = 10
to_depth = 3
"#,
        out = toml_path(&dir.join("run")),
        data = toml_path(data),
    )
}
