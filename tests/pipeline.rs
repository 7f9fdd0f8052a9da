//! The actor runtime against the sequential trainer (the oracle): same config and seed, the same
//! per-step training losses — bitwise on CPU — over 50 steps that include a growth event, with
//! 2 and 4 micro-batches and 3 "devices". Also: growth reports and depth, copying_zero preserving
//! the function through a live growth, and placement moves.

mod common;

use common::{synthetic_dataset, TestConfig};
use std::path::Path;
use taproot::backend::cpu::CpuBackend;
use taproot::data::Dataset;
use taproot::runtime;
use taproot::train::{sequential::Sequential, RunOptions};

fn quiet() -> RunOptions {
    RunOptions { quiet: true, ..Default::default() }
}

/// The tiny model (0 -> 4 blocks) on 2 micro-batches of B = 4, run `name` writing under `dir`.
fn tiny(dir: &Path, name: &str, steps: u64) -> TestConfig {
    TestConfig::new(dir).name(name).steps(steps).micro_batches(2).lr(0.02)
}

fn compare(tag: &str, config: impl FnOnce(TestConfig) -> TestConfig) {
    let dir = synthetic_dataset(tag);
    let cfg = config(tiny(&dir, tag, 50)).build();
    let data = Dataset::open(&dir, 256).unwrap();
    let mut seq = Sequential::new(CpuBackend::default(), &cfg, &data).unwrap();
    let want = seq.run(&RunOptions { quiet: true, ..Default::default() }).unwrap();
    let got = runtime::train::<CpuBackend>(&cfg, data, quiet(), false).unwrap();
    assert_eq!(got.steps.len(), 50);
    common::assert_same_run(&want, &got);
}

const THREE_DEVICES: [&str; 3] = ["cpu:0", "cpu:1", "cpu:2"];

/// A learning-rate re-warmup after growth: the same in both loops, and ramped as stated.
#[test]
fn pipeline_equals_sequential_with_a_rewarmup_after_growth() {
    compare("rewarm", |c| c.grow_at_step(20, 4).set("schedule.rewarmup", 5));
    let dir = synthetic_dataset("rewarm-lr");
    let cfg = tiny(&dir, "rewarm-lr", 50).grow_at_step(20, 4).set("schedule.rewarmup", 5).build();
    let plain = tiny(&dir, "plain-lr", 50).grow_at_step(20, 4).build();
    let data = Dataset::open(&dir, 256).unwrap();
    let rep = runtime::train::<CpuBackend>(&cfg, data.clone(), quiet(), false).unwrap();
    let base = runtime::train::<CpuBackend>(&plain, data, quiet(), false).unwrap();
    // records are 1-based: record 21 is the update of step 20, the first of the grown model
    for (i, k) in (20..25).zip(1..=5) {
        let want = base.steps[i].lr * (k as f32 / 5.0);
        assert_eq!(rep.steps[i].lr, want, "update {i}: lr {} vs {want}", rep.steps[i].lr);
    }
    assert_eq!(rep.steps[25].lr, base.steps[25].lr);
    assert_eq!(rep.steps[19].lr, base.steps[19].lr);
}

#[test]
fn pipeline_equals_sequential_2_micro_batches_3_devices_with_growth() {
    compare("p2", |c| c.grow_at_step(20, 4).devices(&THREE_DEVICES));
}

#[test]
fn pipeline_equals_sequential_4_micro_batches_copying_growth_from_1_layer() {
    compare("p4", |c| {
        c.micro_batches(4)
            .depth(1)
            .grow_at_step(25, 4)
            .growth_init("copying")
            .devices(&THREE_DEVICES)
            .set("placement.policy", "\"fill\"")
            .set("pipeline.max_in_flight", 2)
    });
}

#[test]
fn growth_reports_depth_and_new_ids_at_the_bottom() {
    let dir = synthetic_dataset("grow-rt");
    let cfg = tiny(&dir, "grow-rt", 30).grow_at_step(10, 4).build();
    let data = Dataset::open(&dir, 256).unwrap();
    let rep = runtime::train::<CpuBackend>(&cfg, data, quiet(), false).unwrap();
    assert!(rep.steps.iter().filter(|s| s.step <= 10).all(|s| s.depth == 0));
    assert!(rep.steps.iter().filter(|s| s.step > 10).all(|s| s.depth == 4));
    assert_eq!(rep.growth.len(), 1);
    assert_eq!(rep.growth[0].new_ids, vec![0, 1, 2, 3]);
    let last = rep.steps.last().unwrap().train_loss;
    let at = rep.steps[10].train_loss;
    assert!(last.is_finite() && last < at + 0.5, "loss did not continue: {at} -> {last}");
}

/// With copying_zero the grown model computes the same function: the first training loss after
/// growth equals the loss the un-grown model would have had at that step.
#[test]
fn copying_zero_growth_preserves_the_loss_in_a_live_pipeline() {
    let dir = synthetic_dataset("cz");
    let grown = tiny(&dir, "cz-grown", 20).depth(1).target_depth(3).grow_at_step(10, 3).growth_init("copying_zero").build();
    assert_eq!(grown.model.depth, 1);
    let mut flat = grown.clone();
    flat.growth.clear();
    flat.run.name = "cz-flat".into();
    flat.run.out_dir = Some(dir.join("cz-flat"));
    let data = Dataset::open(&dir, 256).unwrap();
    let g = runtime::train::<CpuBackend>(&grown, data.clone(), quiet(), false).unwrap();
    let f = runtime::train::<CpuBackend>(&flat, data, quiet(), false).unwrap();
    // step 11 is the first update at depth 3; its loss was computed on the grown model
    assert_eq!(g.steps[10].depth, 3);
    assert_eq!(f.steps[10].depth, 1);
    let (a, b) = (g.steps[10].train_loss, f.steps[10].train_loss);
    assert!((a - b).abs() <= 1e-6 * b.abs(), "function not preserved: {a} vs {b}");
    // before growth the two runs are the same run
    for i in 0..10 {
        assert_eq!(g.steps[i].train_loss.to_bits(), f.steps[i].train_loss.to_bits());
    }
}

#[test]
fn a_device_that_does_not_exist_is_an_error_naming_the_key() {
    let dir = synthetic_dataset("nodev");
    let cfg = tiny(&dir, "nodev", 5).devices(&["cuda:7"]).build();
    let data = Dataset::open(&dir, 256).unwrap();
    // No driver here (CI), or no 8th GPU on a GPU machine: either way a clear error, no panic.
    let err = runtime::train::<taproot::backend::cuda::CudaBackend>(&cfg, data, quiet(), false).unwrap_err().to_string();
    println!("{err}");
    assert!(err.contains("placement.devices") && err.contains("cuda:7"), "{err}");
}

#[test]
fn a_topology_other_than_this_process_is_refused() {
    // The runtime takes the process's place in the run as a value (`RunOptions::topology`, what
    // `dist::init` returns); a value that is not this process's would train without the
    // all-reduces (or with them, alone), so it is refused before any actor starts.
    let dir = synthetic_dataset("topo");
    let cfg = tiny(&dir, "topo", 5).build();
    let data = Dataset::open(&dir, 256).unwrap();
    let two = taproot::dist::Topology { replica: 1, replicas: 2, stage: 0, stages: 1 };
    let err = runtime::train::<CpuBackend>(&cfg, data, RunOptions { topology: two, ..quiet() }, false).unwrap_err().to_string();
    assert!(err.contains("RunOptions::topology") && err.contains("replicas: 2"), "{err}");
}

/// What a run's events say about its buffers: (step, device, buffers allocated so far, bytes
/// copied in so far) after each step, and the device of every layer (from its timings).
struct BufferTrace {
    steps: Vec<(u64, String, usize, u64)>,
    layers: std::collections::BTreeMap<u64, String>,
}

fn buffer_trace(cfg: &taproot::config::Config, dir: &std::path::Path) -> BufferTrace {
    use std::sync::{Arc, Mutex};
    use taproot::runtime::events::Event;
    let data = Dataset::open(dir, 256).unwrap();
    let trace = Arc::new(Mutex::new(BufferTrace { steps: Vec::new(), layers: Default::default() }));
    let step = Arc::new(Mutex::new(0u64));
    let (t, s) = (trace.clone(), step.clone());
    let observer: taproot::runtime::events::Observer = Arc::new(move |e: &Event| match e {
        Event::Step { step, .. } => *s.lock().unwrap() = *step,
        Event::Buffers { device, allocated, peer_bytes_in } => {
            t.lock().unwrap().steps.push((*s.lock().unwrap(), device.clone(), *allocated, *peer_bytes_in))
        }
        Event::LayerTime { layer, device, .. } => {
            t.lock().unwrap().layers.insert(*layer, device.clone());
        }
        _ => {}
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async { runtime::start::<CpuBackend>(cfg, data, quiet(), observer).await.unwrap().wait().await.unwrap() });
    let mut guard = trace.lock().unwrap();
    BufferTrace { steps: std::mem::take(&mut guard.steps), layers: std::mem::take(&mut guard.layers) }
}

/// Across devices a stage never computes on another device's memory (the CPU backend fails any
/// op that mixes devices): it copies the buffer in and sends the original home. Every device's
/// pool stays within what its stages can hold at once — M micro-batches in flight, each with at
/// most one input stashed per layer on the device plus two moving buffers — over 60 steps with
/// six evaluations, whose micro-batches cross devices forward only (a pool that lost a buffer
/// per evaluation micro-batch would pass the bound by step 60). Bytes move between devices in
/// whole (B, T, C) buffers, the same amount every training step. On one device nothing moves.
#[test]
fn cross_device_hand_offs_copy_and_keep_every_pool_bounded() {
    let dir = synthetic_dataset("xdev");
    let cfg = tiny(&dir, "xdev", 60).grow_at_step(10, 4).devices(&THREE_DEVICES).build();
    let trace = buffer_trace(&cfg, &dir);
    if std::env::var("TRACE").is_ok() {
        for e in &trace.steps {
            println!("{e:?}");
        }
    }
    let at = |step: u64, dev: &str| {
        trace
            .steps
            .iter()
            .find(|(s, d, _, _)| *s == step && d == dev)
            .map(|(_, _, a, p)| (*a, *p))
            .unwrap_or_else(|| panic!("no Buffers event for {dev} at step {step}"))
    };
    assert_eq!(trace.layers.len(), 4, "layers seen: {:?}", trace.layers);
    let in_flight = 3; // max(micro_batches = 2, eval.batches = 3): the scheduler never has more
    let one_buffer = 4 * 16 * 32 * 4; // (B, T, C) f32
    for dev in ["cpu:0", "cpu:1", "cpu:2"] {
        let layers_here = trace.layers.values().filter(|d| *d == dev).count();
        let bound = in_flight * (layers_here + 2);
        let most = trace.steps.iter().filter(|e| e.1 == dev).map(|e| e.2).max().unwrap();
        assert!(most <= bound, "{dev}: {most} buffers allocated, more than {bound} ({layers_here} layers here): a leak");
        let (p25, p60) = (at(25, dev).1, at(60, dev).1);
        assert!(p60 > p25 && p25 > 0, "{dev}: no bytes copied in ({p25} at step 25, {p60} at step 60)");
        // Steps 32..=39 see no evaluation (the one at step 30 lands in step 31): the same traffic.
        let per_step: Vec<u64> = (32..=39).map(|s| at(s, dev).1 - at(s - 1, dev).1).collect();
        assert!(per_step.windows(2).all(|w| w[0] == w[1]), "{dev}: uneven traffic {per_step:?}");
        assert!(
            per_step[0] > 0 && per_step[0].is_multiple_of(one_buffer),
            "{dev}: {} bytes per step is not whole buffers of {one_buffer}",
            per_step[0]
        );
        println!("{dev}: {layers_here} layers, {most} buffers (bound {bound}), {} bytes copied in per step, {p60} in all", per_step[0]);
    }

    let dir1 = synthetic_dataset("xdev1");
    let cfg1 = tiny(&dir1, "xdev1", 60).grow_at_step(10, 4).build();
    let trace1 = buffer_trace(&cfg1, &dir1);
    assert!(trace1.steps.iter().all(|(_, d, _, p)| d == "cpu:0" && *p == 0), "one device copies nothing");
    let most = trace1.steps.iter().map(|e| e.2).max().unwrap();
    assert!(most <= in_flight * (4 + 2), "one device: {most} buffers allocated");
}
