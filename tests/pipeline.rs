//! The actor runtime against the sequential trainer (the oracle): same config and seed, the same
//! per-step training losses — bitwise on CPU — over 50 steps that include a growth event, with
//! 2 and 4 micro-batches and 3 "devices". Also: growth reports and depth, copying_zero preserving
//! the function through a live growth, and placement moves.

mod common;

use common::{synthetic_dataset, tiny_config};
use taproot::backend::cpu::CpuBackend;
use taproot::data::Dataset;
use taproot::runtime::{self, SchedOptions};
use taproot::train::sequential::{RunOptions, Sequential};

fn quiet() -> SchedOptions {
    SchedOptions { quiet: true, ..Default::default() }
}

fn compare(extra: &str, tag: &str) {
    let dir = synthetic_dataset(tag);
    let cfg = tiny_config(&dir, tag, 50, extra);
    let data = Dataset::open(&dir, 256).unwrap();
    let mut seq = Sequential::new(CpuBackend::default(), &cfg, &data).unwrap();
    let want = seq.run(&RunOptions { quiet: true, ..Default::default() }).unwrap();
    let got = runtime::train::<CpuBackend>(&cfg, data, quiet(), false).unwrap();
    assert_eq!(got.steps.len(), 50);
    for (a, b) in want.steps.iter().zip(&got.steps) {
        assert_eq!((a.step, a.depth), (b.step, b.depth));
        assert_eq!(a.train_loss.to_bits(), b.train_loss.to_bits(), "step {}: sequential {} vs pipeline {}", a.step, a.train_loss, b.train_loss);
        assert_eq!(a.lr, b.lr);
    }
    let (ev_a, ev_b): (Vec<_>, Vec<_>) = (want.evals.iter().map(|e| (e.step, e.val_loss.to_bits())).collect(), got.evals.iter().map(|e| (e.step, e.val_loss.to_bits())).collect());
    assert_eq!(ev_a, ev_b, "validation losses differ");
    assert_eq!(want.growth, got.growth);
}

const THREE_DEVICES: &str = "[placement]\ndevices = [\"cpu:0\", \"cpu:1\", \"cpu:2\"]\n";

#[test]
fn pipeline_equals_sequential_2_micro_batches_3_devices_with_growth() {
    compare(&format!("[[growth]]\nat_step = 20\nto_depth = 4\n{THREE_DEVICES}"), "p2");
}

#[test]
fn pipeline_equals_sequential_4_micro_batches_copying_growth_from_1_layer() {
    let extra = format!("[[growth]]\nat_step = 25\nto_depth = 4\ninit = \"copying\"\n[placement]\ndevices = [\"cpu:0\", \"cpu:1\", \"cpu:2\"]\npolicy = \"fill\"\n[pipeline]\nmax_in_flight = 2\n");
    compare(&extra, "p4");
}

#[test]
fn growth_reports_depth_and_new_ids_at_the_bottom() {
    let dir = synthetic_dataset("grow-rt");
    let cfg = tiny_config(&dir, "grow-rt", 30, "[[growth]]\nat_step = 10\nto_depth = 4\n");
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
    let grown = tiny_config(&dir, "cz-grown", 20, "[[growth]]\nat_step = 10\nto_depth = 3\ninit = \"copying_zero\"\n");
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
    let cfg = tiny_config(&dir, "nodev", 5, "[placement]\ndevices = [\"cuda:7\"]\n");
    let data = Dataset::open(&dir, 256).unwrap();
    // No driver here (CI), or no 8th GPU on a GPU machine: either way a clear error, no panic.
    let err = runtime::train::<taproot::backend::cuda::CudaBackend>(&cfg, data, quiet(), false).unwrap_err().to_string();
    println!("{err}");
    assert!(err.contains("placement.devices") && err.contains("cuda:7"), "{err}");
}
