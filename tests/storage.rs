//! bf16 activation storage on the CPU (`precision.storage = "bf16"`, `backend/cpu/storage.rs`):
//! what an op writes into an activation buffer is rounded to bf16 as the op ends, as a GPU's
//! bf16 buffers would hold it, while parameters, gradients, optimizer state and statistics stay
//! fp32. CI proves here what bf16 storage does to training, for every block kind, without a GPU.
//!
//! - op by op: activation outputs are the fp32 results rounded to bf16, bit for bit; fp32
//!   buffers (weight gradients, LayerNorm statistics, losses) are the fp32 results, bit for bit;
//!   an fp32-storage stream rounds nothing;
//! - every block kind (gpt2, with either attention, llama, qwen3, MoE) trains through a growth in
//!   bf16 storage near its
//!   fp32 run (and not equal to it: the rounding is in use), and the actor pipeline equals the
//!   sequential trainer bit for bit in it;
//! - bf16 storage with bf16 products (a GPU run's whole scheme) follows fp32: final validation
//!   loss within 1%;
//! - checkpoints hold fp32 master weights and resume in either storage;
//! - config: storage is fp32 or bf16, and bf16 storage on CUDA is refused naming the key.

mod common;

use common::{not_bf16, synthetic_dataset, TestConfig};
use taproot::backend::cpu::CpuBackend;
use taproot::backend::precision::{bf16_to_f32, f32_to_bf16};
use taproot::backend::{Backend, Precision, View};
use taproot::data::Dataset;
use taproot::rng::Rng;
use taproot::train::sequential::Sequential;
use taproot::train::{RunOptions, TrainReport};

fn round(x: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(x))
}

fn randn(r: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.normal() as f32).collect()
}

/// One op on two streams: fp32 storage (`f`) and bf16 storage (`h`), from the same inputs
/// (activations bf16-representable, as a bf16 buffer would hold them).
struct Pair {
    f: CpuBackend,
    h: CpuBackend,
}

impl Pair {
    fn new() -> Pair {
        let h = CpuBackend::default();
        h.set_storage(Precision::Bf16).unwrap();
        Pair { f: CpuBackend::default(), h }
    }
    fn act(be: &CpuBackend, x: &[f32]) -> <CpuBackend as Backend>::Buf {
        let b = be.alloc_act(x.len());
        be.upload(CpuBackend::whole(&b), x);
        b
    }
    fn fp32(be: &CpuBackend, x: &[f32]) -> <CpuBackend as Backend>::Buf {
        let b = be.alloc(x.len());
        be.upload(CpuBackend::whole(&b), x);
        b
    }
    fn get(be: &CpuBackend, b: &<CpuBackend as Backend>::Buf) -> Vec<f32> {
        let mut h = vec![0.0; CpuBackend::buf_len(b)];
        be.download(CpuBackend::whole(b), &mut h);
        h
    }
}

fn w(b: &<CpuBackend as Backend>::Buf) -> View<'_, <CpuBackend as Backend>::Buf> {
    CpuBackend::whole(b)
}

#[test]
fn bf16_storage_rounds_what_ops_write_into_activation_buffers_only() {
    let mut r = Rng::new(5);
    let (n, c, oc) = (24, 16, 40);
    let x: Vec<f32> = randn(&mut r, n * c).into_iter().map(round).collect();
    let wt = randn(&mut r, oc * c);
    let dout: Vec<f32> = randn(&mut r, n * oc).into_iter().map(round).collect();
    let p = Pair::new();
    assert_eq!((p.f.storage(), p.h.storage()), (Precision::Fp32, Precision::Bf16));

    // An upload into a bf16 buffer stores bf16; into an fp32 buffer, the values.
    let raw = randn(&mut r, 100);
    assert_eq!(Pair::get(&p.h, &Pair::act(&p.h, &raw)), raw.iter().map(|&v| round(v)).collect::<Vec<_>>());
    assert_eq!(Pair::get(&p.h, &Pair::fp32(&p.h, &raw)), raw);
    assert_eq!(Pair::get(&p.f, &Pair::act(&p.f, &raw)), raw, "fp32 storage rounded an activation");

    // The linear layer: out is an activation; forward and backward.
    let run = |be: &CpuBackend| {
        let (xb, wb) = (Pair::act(be, &x), Pair::fp32(be, &wt));
        let out = be.alloc_act(n * oc);
        be.matmul_forward(w(&out), w(&xb), w(&wb), None, n, c, oc);
        let (db, dinp, dw) = (Pair::act(be, &dout), be.alloc_act(n * c), be.alloc(oc * c));
        be.matmul_backward(Some(w(&dinp)), w(&dw), None, w(&db), w(&xb), w(&wb), n, c, oc);
        (Pair::get(be, &out), Pair::get(be, &dinp), Pair::get(be, &dw))
    };
    let (out32, dinp32, dw32) = run(&p.f);
    let (out16, dinp16, dw16) = run(&p.h);
    assert!(not_bf16(&out32) > out32.len() / 2 && not_bf16(&dinp32) > dinp32.len() / 2, "the fp32 results are bf16 already");
    assert_eq!(out16, out32.iter().map(|&v| round(v)).collect::<Vec<_>>(), "forward output: the fp32 result rounded");
    assert_eq!(dinp16, dinp32.iter().map(|&v| round(v)).collect::<Vec<_>>(), "input gradient: the fp32 result rounded");
    assert_eq!(dw16, dw32, "the weight gradient (fp32) was touched");

    // LayerNorm: out rounded; the mean and 1/σ it keeps (fp32 buffers) exact.
    let (g, bias) = (randn(&mut r, c), randn(&mut r, c));
    let ln = |be: &CpuBackend| {
        let (xb, gb, bb) = (Pair::act(be, &x), Pair::fp32(be, &g), Pair::fp32(be, &bias));
        let (out, mean, rstd) = (be.alloc_act(n * c), be.alloc(n), be.alloc(n));
        be.layernorm_forward(w(&out), w(&mean), w(&rstd), w(&xb), w(&gb), w(&bb), n, c);
        (Pair::get(be, &out), Pair::get(be, &mean), Pair::get(be, &rstd))
    };
    let (o32, m32, s32) = ln(&p.f);
    let (o16, m16, s16) = ln(&p.h);
    assert_eq!(o16, o32.iter().map(|&v| round(v)).collect::<Vec<_>>());
    assert_eq!((m16, s16), (m32.clone(), s32.clone()), "LayerNorm's statistics were rounded");
    assert!(not_bf16(&s32) > 0);

    // The classifier: the logits' gradient (written over the logits) is rounded, the losses not.
    let (v, vp) = (30, 32);
    let logits: Vec<f32> = randn(&mut r, n * vp).into_iter().map(round).collect();
    let targets: Vec<u32> = (0..n).map(|i| (i * 7 % v) as u32).collect();
    let ce = |be: &CpuBackend| {
        let (lb, losses) = (Pair::act(be, &logits), be.alloc(n));
        let t = be.alloc_ids(n);
        be.upload_ids(&t, &targets);
        be.crossentropy_forward_backward(w(&lb), w(&losses), &t, 1.0 / n as f32, n, v, vp);
        (Pair::get(be, &lb), Pair::get(be, &losses))
    };
    let (d32, l32) = ce(&p.f);
    let (d16, l16) = ce(&p.h);
    assert_eq!(d16, d32.iter().map(|&v| round(v)).collect::<Vec<_>>());
    assert_eq!(l16, l32);
    assert!(not_bf16(&l32) > 0);
}

fn quiet() -> RunOptions {
    RunOptions { quiet: true, ..Default::default() }
}

/// 40 steps of the kind `kind` sets up, growing to 3 blocks at step 20.
fn kind_cfg(dir: &std::path::Path, name: &str, kind: &str) -> TestConfig {
    let c = TestConfig::new(dir).name(name).steps(40).micro_batches(2).lr(0.01).depth(1).target_depth(3).grow_at_step(20, 3);
    match kind {
        "gpt2" => c,
        "gpt2-flash" => c.set("kernels.attention", "\"flash\""),
        "llama" => c.set("model.arch", "\"llama\"").set("model.kv_heads", 1),
        "qwen3" => c.set("model.arch", "\"qwen3\"").set("model.tie_embeddings", true).set("model.ffn_hidden", 40).growth_init("copying"),
        "moe" => c
            .set("model.arch", "\"llama\"")
            .set("model.kv_heads", 1)
            .extra("[model.moe]\nexperts = 4\ntop_k = 2\nshared_experts = 1\nexpert_hidden = 16\nrouting = \"softmax\"\naux_loss = 0.01\n"),
        _ => unreachable!(),
    }
}

fn mean_loss(r: &TrainReport, from: u64, to: u64) -> f32 {
    let v: Vec<f32> = r.steps.iter().filter(|s| s.step > from && s.step <= to).map(|s| s.train_loss).collect();
    v.iter().sum::<f32>() / v.len() as f32
}

#[test]
fn every_block_kind_trains_with_growth_in_bf16_storage_near_fp32() {
    for kind in ["gpt2", "gpt2-flash", "llama", "qwen3", "moe"] {
        let tag = format!("storage-{kind}");
        let dir = synthetic_dataset(&tag);
        let data = Dataset::open(&dir, 256).unwrap();
        let f = kind_cfg(&dir, &tag, kind).build();
        let h = kind_cfg(&dir, &tag, kind).set("precision.storage", "bf16").build();
        assert_eq!(h.precision.storage, Precision::Bf16);
        let fp32 = Sequential::new(CpuBackend::default(), &f, &data).unwrap().run(&quiet()).unwrap();
        let bf16 = Sequential::new(CpuBackend::default(), &h, &data).unwrap().run(&quiet()).unwrap();
        assert_eq!(bf16.growth.len(), 1, "{kind}: the bf16-storage run grew");
        assert!(
            fp32.steps.iter().zip(&bf16.steps).any(|(a, b)| a.train_loss != b.train_loss),
            "{kind}: bf16 storage equals fp32: not in use"
        );
        // Step by step before the growth, by means of 10 steps after it.
        let mut worst = 0f32;
        for (a, b) in fp32.steps.iter().zip(&bf16.steps).filter(|(a, _)| a.step <= 20) {
            let rel = ((a.train_loss - b.train_loss) / a.train_loss).abs();
            worst = worst.max(rel);
            assert!(rel < 3e-3, "{kind} step {}: bf16 storage {} against fp32 {} ({rel:.1e})", a.step, b.train_loss, a.train_loss);
        }
        println!("{kind}: worst step before the growth {worst:.1e}");
        for from in [20, 30] {
            let (a, b) = (mean_loss(&fp32, from, from + 10), mean_loss(&bf16, from, from + 10));
            let rel = ((a - b) / a).abs();
            println!("{kind}: steps {}..={}: fp32 {a:.5} bf16 storage {b:.5} ({rel:.1e})", from + 1, from + 10);
            assert!(rel < 3e-3, "{kind} steps {}..={}: bf16 storage {b} against fp32 {a}", from + 1, from + 10);
        }
        // The actor pipeline over three CPU devices equals the sequential trainer bit for bit.
        let hp = kind_cfg(&dir, &format!("{tag}-rt"), kind).set("precision.storage", "bf16").devices(&["cpu:0", "cpu:1", "cpu:2"]).build();
        let rt = taproot::runtime::train::<CpuBackend>(
            &hp,
            data.clone(),
            taproot::runtime::RunOptions { quiet: true, ..Default::default() },
            false,
        )
        .unwrap();
        common::assert_same_run(&bf16, &rt);
    }
}

/// 300 steps of C = 64 growing 1 -> 3 at step 150: bf16 storage and bf16 products together, the
/// whole of a GPU run's bf16 scheme, against fp32.
#[test]
fn bf16_storage_and_products_together_follow_fp32() {
    let dir = synthetic_dataset("storage-all");
    let data = Dataset::open(&dir, 256).unwrap();
    let cfg = |name: &str| common::growth_cfg(&dir, name, 300);
    let fp32 = Sequential::new(CpuBackend::default(), &cfg("fp32").build(), &data).unwrap().run(&quiet()).unwrap();
    let all = cfg("bf16").set("precision.compute", "bf16").set("precision.storage", "bf16").build();
    let bf16 = Sequential::new(CpuBackend::default(), &all, &data).unwrap().run(&quiet()).unwrap();
    let (v32, v16) = (fp32.final_val_loss().unwrap(), bf16.final_val_loss().unwrap());
    let rel = ((v16 - v32) / v32).abs();
    println!("final validation loss: fp32 {v32:.5}, bf16 products and storage {v16:.5} ({rel:.2e})");
    assert!(rel < 1e-2, "bf16 products and storage end at {v16}, fp32 at {v32} (target: within 1%)");
    // The storage is in use on top of the products.
    let products = cfg("bf16-products").set("precision.compute", "bf16").build();
    let only = Sequential::new(CpuBackend::default(), &products, &data).unwrap().run(&quiet()).unwrap();
    assert_ne!(only.final_val_loss(), bf16.final_val_loss(), "bf16 storage changed nothing over bf16 products");
}

#[test]
fn a_bf16_storage_checkpoint_holds_fp32_weights_and_resumes_in_either_storage() {
    let dir = synthetic_dataset("storage-resume");
    let base = |name: &str| kind_cfg(&dir, name, "gpt2").checkpoint_every(10).checkpoint_keep(10);
    let q = || taproot::runtime::RunOptions { quiet: true, ..Default::default() };
    let data = || Dataset::open(&dir, 256).unwrap();
    let whole_cfg = base("whole").set("precision.storage", "bf16").build();
    let whole = taproot::runtime::train::<CpuBackend>(&whole_cfg, data(), q(), false).unwrap();
    let (ck, _, _) = taproot::checkpoint::load_newest_valid(&whole_cfg.checkpoint_dir()).unwrap().expect("a checkpoint");
    let (mut total, mut fp32_only) = (0, 0);
    for (_, u) in &ck.units {
        total += u.params.len() + u.m.len();
        fp32_only += not_bf16(&u.params) + not_bf16(&u.m);
    }
    assert!(
        fp32_only as f64 > 0.9 * total as f64,
        "a bf16-storage run checkpointed bf16-rounded weights ({fp32_only} of {total} fp32-only)"
    );
    let after = |r: &TrainReport| r.steps.iter().filter(|s| s.step > 20).map(|s| s.train_loss).collect::<Vec<f32>>();

    // Stopped at step 20 and resumed in bf16 storage: exactly the uninterrupted run.
    let split = base("split").set("precision.storage", "bf16").build();
    taproot::runtime::train::<CpuBackend>(&split, data(), taproot::runtime::RunOptions { stop_after: Some(20), ..q() }, false).unwrap();
    let resumed =
        taproot::runtime::train::<CpuBackend>(&split, data(), taproot::runtime::RunOptions { resume: true, ..q() }, false).unwrap();
    assert_eq!(after(&resumed), after(&whole), "resumed in bf16 storage, the run left its trajectory");

    // The same checkpoint resumed in fp32 storage (no flag needed): the same model continues.
    let other = base("other").set("precision.storage", "bf16").build();
    taproot::runtime::train::<CpuBackend>(&other, data(), taproot::runtime::RunOptions { stop_after: Some(20), ..q() }, false).unwrap();
    let cont =
        taproot::runtime::train::<CpuBackend>(&base("other").build(), data(), taproot::runtime::RunOptions { resume: true, ..q() }, false)
            .unwrap();
    let (a, b) = (after(&cont), after(&whole));
    assert_eq!(a.len(), b.len());
    assert_ne!(a, b, "the fp32-storage continuation equals the bf16 one bit for bit");
    for (x, y) in a.iter().zip(&b) {
        assert!(((x - y) / y).abs() < 2e-2, "fp32-storage continuation {x} against bf16 storage {y}");
    }
}

#[test]
fn storage_config_is_checked() {
    let dir = synthetic_dataset("storage-config");
    let base = || TestConfig::new(&dir).name("s").steps(10);
    assert_eq!(base().build().precision.storage, Precision::Fp32);
    let e = format!("{:#}", base().set("precision.storage", "tf32").build_result().unwrap_err());
    assert!(e.contains("`precision.storage`") && e.contains("tf32"), "{e}");
    let e = format!("{:#}", base().set("precision.storage", "bf16").devices(&["cuda:0"]).build_result().unwrap_err());
    assert!(e.contains("`precision.storage` = \"bf16\"") && e.contains("CPU backend only"), "{e}");
    let e = format!("{:#}", base().set("precision.storage", "fp8").build_result().unwrap_err());
    assert!(e.contains("storage") && e.contains("fp8"), "{e}");
    // A stream refuses tf32 storage itself, too.
    assert!(CpuBackend::default().set_storage(Precision::Tf32).is_err());
}
