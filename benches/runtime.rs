//! Actor-runtime overhead against the sequential trainer on the demo config (byte vocabulary,
//! C=128, 4 heads, 6 blocks, B=16, T=128), as a ratio of wall times (goal ≤ 1.05), and the wall
//! time of a live growth 0 → 6 (drain at a step boundary, spawn, relink), and the cost of
//! placing the stages on three CPU "devices" (every hand-off across a device boundary is a copy
//! into the receiver's memory, as on GPUs) against one device.
//!
//! Run: `scripts/bench-cpu.sh` (or `cargo bench --bench runtime -- [--quick]`). Data: random
//! bytes (the cost of a step does not depend on the text). Runs alternate (sequential, runtime,
//! sequential, …) so that machine noise hits both; the median of each is reported.

use std::time::Instant;
use taproot::backend::cpu::CpuBackend;
use taproot::config::Config;
use taproot::data::Dataset;
use taproot::rng::Rng;
use taproot::runtime;
use taproot::train::{sequential::Sequential, RunOptions};

fn config(steps: u64, depth: usize, growth: &str, mbs: usize) -> Config {
    let text = format!(
        r#"
[run]
name = "bench-runtime"
steps = {steps}
log_every = 0
out_dir = "{out}"
[data]
dir = "unused"
tokenizer = "bytes"
batch_size = {b}
seq_len = 128
micro_batches = {mbs}
[model]
channels = 128
heads = 4
depth = {depth}
target_depth = 6
[optim]
kind = "adamw"
[eval]
every = 100000
batches = 1
{growth}
"#,
        out = std::env::temp_dir().join("taproot-bench-runtime").display(),
        b = 16 / mbs,
    );
    Config::parse(&text, &[]).unwrap()
}

fn dataset() -> Dataset {
    let mut rng = Rng::new(3);
    let gen = |n: usize, rng: &mut Rng| (0..n).map(|_| rng.below(256) as u16).collect::<Vec<u16>>();
    Dataset::in_memory(gen(1 << 20, &mut rng), gen(1 << 16, &mut rng), 256)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Median wall seconds of `a` and of `b` over `reps` runs each, alternating (a, b, a, b, …) so
/// that machine noise hits both.
fn alternating(reps: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (f64, f64) {
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t0 = Instant::now();
        a();
        ta.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        b();
        tb.push(t0.elapsed().as_secs_f64());
    }
    (median(ta), median(tb))
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (steps, reps) = if quick { (12, 3) } else { (30, 5) };
    let data = dataset();
    let q = RunOptions { quiet: true, ..Default::default() };
    println!("taproot runtime benchmark: demo config (6 blocks, C=128, B=16, T=128), {steps} steps, {reps} alternating runs each");
    let growth_only = std::env::args().any(|a| a == "--growth-only");
    for mbs in [1usize, 2].into_iter().filter(|_| !growth_only) {
        let cfg = config(steps, 6, "", mbs);
        let (s, r) = alternating(
            reps,
            || {
                let mut s = Sequential::new(CpuBackend::default(), &cfg, &data).unwrap();
                s.run(&RunOptions { quiet: true, ..Default::default() }).unwrap();
            },
            || {
                runtime::train::<CpuBackend>(&cfg, data.clone(), q.clone(), false).unwrap();
            },
        );
        println!(
            "  micro_batches={mbs}: sequential {:7.1} ms/step   actor runtime {:7.1} ms/step   overhead ratio {:.3} (goal <= 1.05)",
            s * 1e3 / steps as f64,
            r * 1e3 / steps as f64,
            r / s
        );
    }
    // Three devices: the same run with the ring crossing device boundaries three times per
    // direction per micro-batch (each crossing copies a (B, T, C) buffer).
    if !growth_only {
        let one = config(steps, 6, "", 2);
        let three = config(steps, 6, "[placement]\ndevices = [\"cpu:0\", \"cpu:1\", \"cpu:2\"]\n", 2);
        let run = |cfg: &Config| {
            runtime::train::<CpuBackend>(cfg, data.clone(), q.clone(), false).unwrap();
        };
        let (o, t) = alternating(reps, || run(&one), || run(&three));
        println!(
            "  micro_batches=2: one device {:7.1} ms/step   three devices (hand-offs copied) {:7.1} ms/step   ratio {:.3}",
            o * 1e3 / steps as f64,
            t * 1e3 / steps as f64,
            t / o
        );
    }
    // Growth: 0 -> 6 at step 5 of 10, random init; the wall time of the growth event itself.
    let cfg = config(10, 0, "[[growth]]\nat_step = 5\nto_depth = 6\n", 1);
    let mut g = Vec::new();
    for _ in 0..reps {
        let rep = runtime::train::<CpuBackend>(&cfg, data.clone(), q.clone(), false).unwrap();
        g.push(rep.growth_wall_s[0]);
        let mut s = Sequential::new(CpuBackend::default(), &cfg, &data).unwrap();
        let srep = s.run(&RunOptions { quiet: true, ..Default::default() }).unwrap();
        g.push(-srep.growth_wall_s[0]); // negative marks the sequential figure
    }
    let rt: Vec<f64> = g.iter().filter(|x| **x > 0.0).cloned().collect();
    let growth_124m = {
        // GPT-2 124M width (C=768, 12 heads, GPT-2 vocabulary): 0 -> 12 at step 1 of 2, with
        // tiny steps (B=1, T=16), so the figure is the growth itself: 85M parameters
        // initialised by the 12 newborn layer actors, which run their inits concurrently.
        let text = format!(
            "[run]\nname = \"bench-grow-124m\"\nsteps = 2\nlog_every = 0\nout_dir = \"{}\"\n[data]\ndir = \"unused\"\ntokenizer = \"gpt2\"\nbatch_size = 1\nseq_len = 16\n[model]\nchannels = 768\nheads = 12\ndepth = 0\ntarget_depth = 12\n[optim]\nkind = \"adamw\"\n[eval]\nevery = 100000\nbatches = 1\n[[growth]]\nat_step = 1\nto_depth = 12\n",
            std::env::temp_dir().join("taproot-bench-runtime").display()
        );
        let cfg = Config::parse(&text, &[]).unwrap();
        let mut rng = Rng::new(4);
        let gen = |n: usize, rng: &mut Rng| (0..n).map(|_| rng.below(50257) as u16).collect::<Vec<u16>>();
        let big = Dataset::in_memory(gen(1 << 16, &mut rng), gen(1 << 12, &mut rng), 50257);
        let runs: Vec<f64> =
            (0..reps.min(3)).map(|_| runtime::train::<CpuBackend>(&cfg, big.clone(), q.clone(), false).unwrap().growth_wall_s[0]).collect();
        median(runs)
    };
    let sq: Vec<f64> = g.iter().filter(|x| **x < 0.0).map(|x| -x).collect();
    println!(
        "  growth 0 -> 6 (spawn 6 layer actors, init, relink): {:.1} ms in the actor runtime, {:.1} ms for the same growth in the sequential trainer",
        median(rt) * 1e3,
        median(sq) * 1e3
    );
    println!("  growth 0 -> 12 at GPT-2 124M width (85M parameters initialised): {:.0} ms in the actor runtime", growth_124m * 1e3);
}
