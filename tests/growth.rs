//! Growth-operator checks against docs/METHOD.md ("Expansion"): where new blocks go, every init
//! (`random`, `copying` in each order, `zero`, `copying_zero`), every optimizer-state policy
//! (`inherit`, `copy`, `reset`) including per-block AdamW bias correction, multi-stage plans and
//! the error cases.
//!
//! Every test first trains the model a few steps with `Optimizer::step`, so blocks, embedding and
//! optimizer state are non-trivial before the expansion.
//!
//! Tolerances: an identity block (`copying_zero`, `zero`) adds exact zeros to the residual
//! stream, so logits before and after growth agree to f32 rounding at most (on the CPU backend
//! they are bit-identical); we assert 1e-6 max abs. Copies are compared bit for bit. Init statistics: per-tensor empirical std within 5% of
//! the target (the smallest sample, a (64, 64) matrix, has a standard error of about 1.1%).

use taproot::backend::cpu::CpuBackend;
use taproot::model::growth::{self, CopyOrder, Expansion, GrowInit, OptStatePolicy, Position};
use taproot::model::init::{InitConfig, InitScheme, Parameterization};
use taproot::model::{Batch, Block, Dims, Model};
use taproot::optim::adamw::adamw_reference;
use taproot::optim::{OptimConfig, Optimizer, OptimizerKind, Scratch};
use taproot::params::UnitState;
use taproot::rng::Rng;

type B = CpuBackend;

const BATCH: usize = 2;
const SEQ: usize = 5;
const LOGIT_TOL: f32 = 1e-6;

const MATRICES: [&str; 4] = ["qkvw", "attprojw", "fcw", "fcprojw"];
const ALL: [&str; 12] = ["ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb"];

fn dims() -> Dims {
    Dims::new(67, 8, 16, 2)
}

fn init_cfg(target_depth: usize) -> InitConfig {
    InitConfig::new(InitScheme::Gpt2, target_depth, 1234)
}

fn adamw() -> Optimizer {
    Optimizer::new(OptimConfig { kind: OptimizerKind::Adamw, ..Default::default() })
}

fn batch(be: &B, vocab: usize, seed: u64) -> Batch<B> {
    let mut rng = Rng::new(seed);
    let w: Vec<u32> = (0..BATCH * (SEQ + 1)).map(|_| rng.below(vocab as u64) as u32).collect();
    Batch::from_windows(be, &w, BATCH, SEQ)
}

fn exp(to_depth: usize, init: GrowInit, order: CopyOrder, position: Position, opt_state: OptStatePolicy) -> Expansion {
    Expansion { at_step: 0, to_depth, position, init, order, opt_state, init_scale: 1.0 }
}

/// One optimizer step over one micro-batch; returns the training loss.
fn train_step(be: &B, m: &mut Model<B>, opt: &Optimizer, sc: &mut Scratch<B>, batch: &Batch<B>, lr: f32) -> f32 {
    let loss = m.forward_backward(be, batch, 1.0 / (batch.b * batch.t) as f32);
    m.finish_grads(be);
    opt.step(be, &mut m.embed.w, sc, lr);
    for blk in m.blocks.iter_mut() {
        opt.step(be, &mut blk.w, sc, lr);
    }
    opt.step(be, &mut m.head.w, sc, lr);
    m.zero_grad(be);
    loss
}

/// A model of `depth` blocks trained `steps` AdamW steps on a few fixed batches.
fn trained(be: &B, d: Dims, depth: usize, target: usize, steps: usize) -> Model<B> {
    let mut m = Model::new(be, d.clone(), depth, &init_cfg(target));
    let opt = adamw();
    let mut sc = Scratch::default();
    let batches: Vec<Batch<B>> = (0..3).map(|s| batch(be, d.vocab, 100 + s)).collect();
    for s in 0..steps {
        let l = train_step(be, &mut m, &opt, &mut sc, &batches[s % 3], 1e-2);
        assert!(l.is_finite());
    }
    m
}

fn ids(m: &Model<B>) -> Vec<u64> {
    m.blocks.iter().map(|b| b.id).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn tensor<'a>(blk: &Block<B>, host: &'a [f32], name: &str) -> &'a [f32] {
    let s = blk.w.layout.get(name);
    &host[s.offset..s.offset + s.numel()]
}

fn assert_zero_state(what: &str, s: &UnitState) {
    assert!(s.m.iter().all(|&x| x == 0.0), "{what}: m is not zero");
    if let Some(v) = &s.v {
        assert!(v.iter().all(|&x| x == 0.0), "{what}: v is not zero");
    }
    assert!(s.steps.iter().all(|&t| t == 0), "{what}: step counters {:?} are not 0", s.steps);
}

// ---------------------------------------------------------------------------------------------
// 1. copying_zero preserves the function
// ---------------------------------------------------------------------------------------------

#[test]
fn copying_zero_preserves_the_function() {
    let be = B::default();
    let d = dims();
    for (ls, lt) in [(1, 3), (2, 4)] {
        for position in [Position::Bottom, Position::Top] {
            for order in [CopyOrder::Stack, CopyOrder::Inter, CopyOrder::Last] {
                let mut m = trained(&be, d.clone(), ls, lt, 4);
                let bt = batch(&be, d.vocab, 7);
                let before = m.logits(&be, &bt);
                let loss_before = m.eval_loss(&be, &bt);
                let old: Vec<Vec<f32>> = m.blocks.iter().map(|b| b.w.params_to_host(&be)).collect();
                let rep =
                    growth::grow(&be, &mut m, &exp(lt, GrowInit::CopyingZero, order, position, OptStatePolicy::Inherit), &init_cfg(lt))
                        .unwrap();
                assert_eq!(m.depth(), lt);
                assert_eq!(rep.stack, ids(&m));
                let after = m.logits(&be, &bt);
                let loss_after = m.eval_loss(&be, &bt);
                let what = format!("{ls}->{lt} {position:?} {order:?}");
                // The trained model is far from uniform, so equal logits are not a triviality.
                assert!(before.iter().any(|&x| x.abs() > 1e-3), "{what}: logits are all ~0");
                let diff = max_abs_diff(&before, &after);
                assert!(diff <= LOGIT_TOL, "{what}: logits changed by {diff:e}");
                assert!((loss_before - loss_after).abs() <= 1e-6, "{what}: eval loss {loss_before} -> {loss_after}");
                // The new blocks are copies with the residual outputs zeroed, nothing else.
                let sources = growth::plan_sources(GrowInit::CopyingZero, order, ls, lt - ls).unwrap();
                let new_pos: Vec<usize> = match position {
                    Position::Bottom => (0..lt - ls).collect(),
                    Position::Top => (ls..lt).collect(),
                };
                for (j, &p) in new_pos.iter().enumerate() {
                    let blk = &m.blocks[p];
                    let h = blk.w.params_to_host(&be);
                    let src = &old[sources[j].unwrap()];
                    for name in ALL {
                        let got = tensor(blk, &h, name);
                        if growth::residual_outputs(taproot::model::Arch::Gpt2).contains(&name) {
                            assert!(got.iter().all(|&x| x == 0.0), "{what}: new block {p} {name} is not zero");
                        } else {
                            assert_eq!(got, tensor(blk, src, name), "{what}: new block {p} {name} is not its source's");
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. copying: sources in the stated order, placement, ids
// ---------------------------------------------------------------------------------------------

/// Grow a trained `ls`-block model to `lt` by `copying` and check the new blocks against the
/// expected sources (indices into the pre-growth stack, 0 = bottom-most).
fn check_copying(ls: usize, lt: usize, order: CopyOrder, position: Position, want_sources: &[usize]) {
    let be = B::default();
    let d = dims();
    let mut m = trained(&be, d.clone(), ls, lt, 3);
    let old: Vec<Vec<f32>> = m.blocks.iter().map(|b| b.w.params_to_host(&be)).collect();
    // Trained blocks differ from each other, so "equal to source i" identifies i.
    for i in 0..ls {
        for j in 0..i {
            assert_ne!(old[i], old[j], "blocks {i} and {j} are equal before growth");
        }
    }
    let old_ids = ids(&m);
    assert_eq!(old_ids, (0..ls as u64).collect::<Vec<_>>());
    let what = format!("{ls}->{lt} {order:?} {position:?}");
    let k = lt - ls;
    assert_eq!(
        growth::plan_sources(GrowInit::Copying, order, ls, k).unwrap(),
        want_sources.iter().map(|&s| Some(s)).collect::<Vec<_>>(),
        "{what}: plan_sources"
    );
    let rep = growth::grow(&be, &mut m, &exp(lt, GrowInit::Copying, order, position, OptStatePolicy::Inherit), &init_cfg(lt)).unwrap();
    let new_ids: Vec<u64> = (ls as u64..lt as u64).collect();
    assert_eq!(rep.from_depth, ls);
    assert_eq!(rep.to_depth, lt);
    assert_eq!(rep.new_ids, new_ids, "{what}: new ids are fresh, in birth order");
    assert_eq!(m.next_id, lt as u64);
    assert_eq!(rep.stack, ids(&m), "{what}: report stack vs model");
    let (new_at, old_at) = match position {
        Position::Bottom => (0, k),
        Position::Top => (ls, 0),
    };
    let want_stack: Vec<u64> = match position {
        Position::Bottom => new_ids.iter().chain(&old_ids).copied().collect(),
        Position::Top => old_ids.iter().chain(&new_ids).copied().collect(),
    };
    assert_eq!(rep.stack, want_stack, "{what}: stack order");
    for (i, old_i) in old.iter().enumerate().take(ls) {
        assert_eq!(m.blocks[old_at + i].w.params_to_host(&be), *old_i, "{what}: old block {i} moved or changed");
    }
    for (j, &s) in want_sources.iter().enumerate() {
        let blk = &m.blocks[new_at + j];
        assert_eq!(blk.id, new_ids[j]);
        assert_eq!(blk.w.params_to_host(&be), old[s], "{what}: new block {j} is not a copy of block {s}");
    }
}

#[test]
fn copying_stack_order() {
    check_copying(2, 6, CopyOrder::Stack, Position::Bottom, &[0, 1, 0, 1]);
    check_copying(2, 5, CopyOrder::Stack, Position::Bottom, &[0, 1, 0]);
    check_copying(3, 5, CopyOrder::Stack, Position::Bottom, &[0, 1]);
}

#[test]
fn copying_inter_order() {
    check_copying(2, 6, CopyOrder::Inter, Position::Bottom, &[0, 0, 1, 1]);
    // Uneven: consecutive runs per source, bottom-most sources first; source i gets the new
    // blocks j with floor(j * ls / k) = i.
    check_copying(3, 5, CopyOrder::Inter, Position::Bottom, &[0, 1]);
    check_copying(3, 7, CopyOrder::Inter, Position::Bottom, &[0, 0, 1, 2]);
    check_copying(3, 8, CopyOrder::Inter, Position::Bottom, &[0, 0, 1, 1, 2]);
    check_copying(1, 4, CopyOrder::Inter, Position::Bottom, &[0, 0, 0]);
}

#[test]
fn copying_last_order() {
    check_copying(2, 6, CopyOrder::Last, Position::Bottom, &[1, 1, 1, 1]);
    check_copying(3, 5, CopyOrder::Last, Position::Bottom, &[2, 2]);
}

#[test]
fn copying_at_the_top_keeps_old_blocks_at_the_bottom() {
    check_copying(2, 6, CopyOrder::Stack, Position::Top, &[0, 1, 0, 1]);
    check_copying(2, 5, CopyOrder::Inter, Position::Top, &[0, 0, 1]);
}

// ---------------------------------------------------------------------------------------------
// 3. zero: identity blocks, which of their gradients are zero
// ---------------------------------------------------------------------------------------------

#[test]
fn zero_blocks_are_identities_and_their_matrices_get_zero_gradient() {
    let be = B::default();
    let d = dims();
    for position in [Position::Bottom, Position::Top] {
        let mut m = trained(&be, d.clone(), 1, 3, 4);
        let bt = batch(&be, d.vocab, 9);
        let before = m.logits(&be, &bt);
        let loss_before = m.eval_loss(&be, &bt);
        let rep =
            growth::grow(&be, &mut m, &exp(3, GrowInit::Zero, CopyOrder::Stack, position, OptStatePolicy::Inherit), &init_cfg(3)).unwrap();
        assert_eq!(rep.new_ids, vec![1, 2]);
        let new_at: Vec<usize> = if position == Position::Bottom { vec![0, 1] } else { vec![1, 2] };
        // The definition: block matrices and biases 0, LayerNorm gains 1, fresh optimizer state.
        for &p in &new_at {
            let blk = &m.blocks[p];
            let h = blk.w.params_to_host(&be);
            for name in ALL {
                let want = if name == "ln1w" || name == "ln2w" { 1.0 } else { 0.0 };
                assert!(tensor(blk, &h, name).iter().all(|&x| x == want), "{position:?}: zero block {p} {name} != {want}");
            }
            assert_zero_state("zero block", &blk.w.snapshot(&be));
        }
        let after = m.logits(&be, &bt);
        let diff = max_abs_diff(&before, &after);
        assert!(diff <= LOGIT_TOL, "{position:?}: a zero block changed the logits by {diff:e}");
        assert!((loss_before - m.eval_loss(&be, &bt)).abs() <= 1e-6);

        // Gradients. With every matrix and bias 0: qkv = 0 so V = 0 and atty = att·V = 0, hence
        // d attprojw = attyᵀ·dres2 = 0; fch = 0, gelu(0) = 0, hence d fcprojw = gelu(fch)ᵀ·dy = 0;
        // the gradients flowing into the branches pass through attprojw = 0 and fcprojw = 0, so
        // dqkv = 0 and dfch = 0, hence qkvw, qkvb, fcw, fcb and both LayerNorms get 0 too.
        // Only the residual-output biases see the upstream gradient: d attprojb = d fcprojb =
        // the column sums of dy (dres2 = dy exactly, since the MLP branch adds 0 back).
        m.forward_backward(&be, &bt, 1.0 / (BATCH * SEQ) as f32);
        let mut bias_grads = Vec::new();
        for &p in &new_at {
            let blk = &m.blocks[p];
            let g = blk.w.grads_to_host(&be);
            for name in ALL {
                let gt = tensor(blk, &g, name);
                if name == "attprojb" || name == "fcprojb" {
                    assert!(gt.iter().any(|&x| x.abs() > 1e-6), "{position:?}: zero block {p} {name} gradient is 0");
                } else {
                    assert!(gt.iter().all(|&x| x == 0.0), "{position:?}: zero block {p} {name} gradient is not exactly 0: {gt:?}");
                }
            }
            let (ga, gf) = (tensor(blk, &g, "attprojb").to_vec(), tensor(blk, &g, "fcprojb").to_vec());
            assert!(max_abs_diff(&ga, &gf) <= 1e-7, "{position:?}: d attprojb != d fcprojb");
            bias_grads.push(ga);
        }
        // Stacked identity blocks pass dx = dy through unchanged: both see the same gradient.
        assert!(max_abs_diff(&bias_grads[0], &bias_grads[1]) <= 1e-7);
        // The old block still learns.
        let old_p = if position == Position::Bottom { 2 } else { 0 };
        let g_old = m.blocks[old_p].w.grads_to_host(&be);
        for name in MATRICES {
            assert!(tensor(&m.blocks[old_p], &g_old, name).iter().any(|&x| x != 0.0), "old block {name} gradient is 0");
        }
        m.zero_grad(&be);

        // Consequence: the matrices of a zero block never move (AdamW with zero gradient and
        // zero weights updates by exactly 0), only its two residual-output biases train.
        let opt = adamw();
        let mut sc = Scratch::default();
        for _ in 0..3 {
            assert!(train_step(&be, &mut m, &opt, &mut sc, &bt, 1e-2).is_finite());
        }
        for &p in &new_at {
            let blk = &m.blocks[p];
            let h = blk.w.params_to_host(&be);
            for name in ["qkvw", "qkvb", "attprojw", "fcw", "fcb", "fcprojw", "ln1b", "ln2b"] {
                assert!(tensor(blk, &h, name).iter().all(|&x| x == 0.0), "{position:?}: zero block {p} {name} moved");
            }
            for name in ["attprojb", "fcprojb"] {
                assert!(tensor(blk, &h, name).iter().any(|&x| x != 0.0), "{position:?}: zero block {p} {name} did not train");
            }
        }
    }
}

#[test]
fn zero_blocks_stay_finite_under_the_default_optimizer() {
    // Muon orthogonalises a zero momentum: the normalisation must not divide 0 by 0.
    let be = B::default();
    let d = dims();
    let mut m = trained(&be, d.clone(), 1, 3, 2);
    growth::grow(&be, &mut m, &exp(3, GrowInit::Zero, CopyOrder::Stack, Position::Bottom, OptStatePolicy::Inherit), &init_cfg(3)).unwrap();
    let opt = Optimizer::new(OptimConfig::default());
    let mut sc = Scratch::default();
    let bt = batch(&be, d.vocab, 3);
    for _ in 0..3 {
        assert!(train_step(&be, &mut m, &opt, &mut sc, &bt, 1e-2).is_finite());
    }
    for p in 0..2 {
        let blk = &m.blocks[p];
        let h = blk.w.params_to_host(&be);
        assert!(h.iter().all(|x| x.is_finite()), "zero block {p} has non-finite parameters");
        for name in MATRICES {
            assert!(tensor(blk, &h, name).iter().all(|&x| x == 0.0), "zero block {p} {name} moved under Muon");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. random: target-depth init
// ---------------------------------------------------------------------------------------------

fn mean_std(x: &[f32]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[test]
fn random_uses_target_depth_init() {
    let be = B::default();
    let d = Dims::new(67, 8, 64, 4);
    let target = 8;
    let cfg = init_cfg(target);
    let mut m = Model::new(&be, d.clone(), 0, &cfg);
    // Train the 0-layer model a little: growth must not depend on the trained state.
    let opt = adamw();
    let mut sc = Scratch::default();
    let bt = batch(&be, d.vocab, 5);
    for _ in 0..2 {
        assert!(train_step(&be, &mut m, &opt, &mut sc, &bt, 1e-2).is_finite());
    }
    let rep = growth::grow(&be, &mut m, &exp(target, GrowInit::Random, CopyOrder::Stack, Position::Bottom, OptStatePolicy::Inherit), &cfg)
        .unwrap();
    assert_eq!(rep.new_ids, (0..8).collect::<Vec<u64>>());
    assert_eq!(rep.stack, ids(&m));
    let residual_std = 0.02 / (2.0 * target as f64).sqrt(); // 0.005
    let fixed = Model::new(&be, d.clone(), target, &cfg);
    for (p, blk) in m.blocks.iter().enumerate() {
        let h = blk.w.params_to_host(&be);
        for name in ALL {
            let t = tensor(blk, &h, name);
            match name {
                "ln1w" | "ln2w" => assert!(t.iter().all(|&x| x == 1.0), "block {p} {name}: gains must be 1"),
                "ln1b" | "ln2b" | "qkvb" | "attprojb" | "fcb" | "fcprojb" => {
                    assert!(t.iter().all(|&x| x == 0.0), "block {p} {name}: biases must be 0")
                }
                _ => {
                    let want = if name == "attprojw" || name == "fcprojw" { residual_std } else { 0.02 };
                    let (mean, std) = mean_std(t);
                    assert!((std / want - 1.0).abs() <= 0.05, "block {p} {name}: std {std:.5} vs {want:.5}");
                    assert!(mean.abs() <= 0.1 * want, "block {p} {name}: mean {mean:e}");
                }
            }
        }
        // Deterministic per id: the same as a fresh block of that id, and as block `id` of a
        // fixed-depth model built with the same init (a grown block starts as a fixed one does).
        assert_eq!(h, Block::new_init(&be, &d, blk.id, &cfg).w.params_to_host(&be), "block {p}: not new_init of its id");
        assert_eq!(h, fixed.blocks[p].w.params_to_host(&be), "block {p}: differs from the fixed-depth model");
        assert_zero_state("random block", &blk.w.snapshot(&be));
    }
    // Different ids draw different weights.
    assert_ne!(m.blocks[0].w.params_to_host(&be), m.blocks[1].w.params_to_host(&be));
}

/// The std of every block matrix of `blk` against `want(name)`, within 5%.
fn assert_matrix_stds(what: &str, be: &B, blk: &Block<B>, want: impl Fn(&str) -> f64) {
    let h = blk.w.params_to_host(be);
    for name in ["qkvw", "attprojw", "fcw", "fcprojw"] {
        let (_, std) = mean_std(tensor(blk, &h, name));
        let w = want(name);
        assert!((std / w - 1.0).abs() <= 0.05, "{what} {name}: std {std:.5} vs {w:.5}");
    }
}

#[test]
fn depth_mup_init_and_the_init_scale_of_new_blocks() {
    let be = B::default();
    let d = Dims::new(67, 8, 64, 4);
    let target = 8;
    // Standard: the residual projections are shrunk by 1/sqrt(2L); depth-µP: they are not (the
    // branch multiplier does the depth scaling).
    let std_cfg = init_cfg(target);
    let mup_cfg = init_cfg(target).with_parameterization(Parameterization::DepthMup);
    let shrunk = 0.02 / (2.0 * target as f64).sqrt();
    let m = Model::new(&be, d.clone(), 1, &std_cfg);
    assert_matrix_stds("standard", &be, &m.blocks[0], |n| if n.ends_with("projw") { shrunk } else { 0.02 });
    let m = Model::new(&be, d.clone(), 1, &mup_cfg);
    assert_matrix_stds("depth_mup", &be, &m.blocks[0], |_| 0.02);
    // `init_scale` widens or narrows the blocks an expansion creates, and only those.
    for (cfg, proj) in [(&std_cfg, shrunk), (&mup_cfg, 0.02)] {
        let mut m = Model::new(&be, d.clone(), 1, cfg);
        let old = m.blocks[0].w.params_to_host(&be);
        let mut e = exp(3, GrowInit::Random, CopyOrder::Stack, Position::Bottom, OptStatePolicy::Inherit);
        e.init_scale = 0.5;
        growth::grow(&be, &mut m, &e, cfg).unwrap();
        for p in 0..2 {
            assert_matrix_stds("init_scale 0.5", &be, &m.blocks[p], |n| 0.5 * if n.ends_with("projw") { proj } else { 0.02 });
        }
        assert_eq!(m.blocks[2].w.params_to_host(&be), old, "the old block changed");
    }
}

#[test]
fn a_residual_multiplier_is_the_standard_block_with_scaled_projections() {
    // The definition of depth-µP's branch multiplier α: x + α·(h W + b) for each branch, which is
    // the standard block with W and b of both residual projections multiplied by α.
    let be = B::default();
    let alpha = 1.0 / 3f32.sqrt();
    let mut scaled = trained(&be, dims(), 3, 3, 4);
    scaled.dims = scaled.dims.clone().with_residual(alpha);
    for blk in scaled.blocks.iter_mut() {
        blk.dims = blk.dims.clone().with_residual(alpha);
    }
    let mut folded = trained(&be, dims(), 3, 3, 4);
    for blk in &folded.blocks {
        let mut h = blk.w.params_to_host(&be);
        for name in growth::residual_outputs(taproot::model::Arch::Gpt2) {
            let s = blk.w.layout.get(name);
            h[s.offset..s.offset + s.numel()].iter_mut().for_each(|x| *x *= alpha);
        }
        blk.w.params_from_host(&be, &h);
    }
    let bt = batch(&be, dims().vocab, 9);
    let (a, b) = (scaled.logits(&be, &bt), folded.logits(&be, &bt));
    let plain = trained(&be, dims(), 3, 3, 4).logits(&be, &bt);
    assert!(max_abs_diff(&a, &plain) > 1e-2, "α changed nothing: the multiplier is not applied");
    let diff = max_abs_diff(&a, &b);
    assert!(diff <= 1e-5, "α·branch and the folded block differ by {diff:e}");
}

// ---------------------------------------------------------------------------------------------
// 5. optimizer-state policies and per-block bias correction
// ---------------------------------------------------------------------------------------------

const TAU: usize = 3;
const LR: f32 = 1e-2;

struct Before {
    embed: UnitState,
    head: UnitState,
    block: UnitState,
}

/// A 1-block model after TAU AdamW steps, with snapshots of every unit.
fn policy_setup(be: &B) -> (Model<B>, Before) {
    let m = trained(be, dims(), 1, 3, TAU);
    let before = Before { embed: m.embed.w.snapshot(be), head: m.head.w.snapshot(be), block: m.blocks[0].w.snapshot(be) };
    // The state is non-trivial: moments non-zero, every counter at TAU.
    for s in [&before.embed, &before.head, &before.block] {
        assert!(s.m.iter().any(|&x| x != 0.0));
        assert!(s.v.as_ref().expect("AdamW allocates v").iter().any(|&x| x != 0.0));
        assert!(s.steps.iter().all(|&t| t == TAU as u64));
    }
    (m, before)
}

fn grow_policy(be: &B, m: &mut Model<B>, policy: OptStatePolicy) {
    let rep = growth::grow(be, m, &exp(3, GrowInit::Copying, CopyOrder::Stack, Position::Bottom, policy), &init_cfg(3)).unwrap();
    assert_eq!(rep.stack, vec![1, 2, 0]);
}

#[test]
fn inherit_keeps_old_state_and_starts_new_blocks_from_zero() {
    let be = B::default();
    let (mut m, before) = policy_setup(&be);
    grow_policy(&be, &mut m, OptStatePolicy::Inherit);
    assert_eq!(m.embed.w.snapshot(&be), before.embed, "embed state changed");
    assert_eq!(m.head.w.snapshot(&be), before.head, "head state changed");
    assert_eq!(m.blocks[2].w.snapshot(&be), before.block, "old block state changed");
    for p in 0..2 {
        let s = m.blocks[p].w.snapshot(&be);
        assert_eq!(s.params, before.block.params, "new block {p} is a copy");
        assert_zero_state("inherit: new block", &s);
    }
}

#[test]
fn copy_policy_copies_the_source_state() {
    let be = B::default();
    let (mut m, before) = policy_setup(&be);
    grow_policy(&be, &mut m, OptStatePolicy::Copy);
    assert_eq!(m.embed.w.snapshot(&be), before.embed);
    assert_eq!(m.head.w.snapshot(&be), before.head);
    assert_eq!(m.blocks[2].w.snapshot(&be), before.block);
    for p in 0..2 {
        assert_eq!(m.blocks[p].w.snapshot(&be), before.block, "new block {p}: params, m, v and steps must equal its source's");
    }
    // The copied counters continue: after one more step every tensor is at TAU + 1.
    let opt = adamw();
    let mut sc = Scratch::default();
    train_step(&be, &mut m, &opt, &mut sc, &batch(&be, 67, 11), LR);
    for blk in &m.blocks {
        assert!(blk.w.state.steps.iter().all(|&t| t == TAU as u64 + 1));
    }
}

#[test]
fn copy_policy_without_a_source_starts_from_zero() {
    let be = B::default();
    let (mut m, before) = policy_setup(&be);
    growth::grow(&be, &mut m, &exp(3, GrowInit::Random, CopyOrder::Stack, Position::Bottom, OptStatePolicy::Copy), &init_cfg(3)).unwrap();
    assert_eq!(m.blocks[2].w.snapshot(&be), before.block);
    for p in 0..2 {
        assert_zero_state("copy policy, random block", &m.blocks[p].w.snapshot(&be));
    }
}

#[test]
fn reset_zeroes_every_state_and_keeps_parameters() {
    let be = B::default();
    let (mut m, before) = policy_setup(&be);
    grow_policy(&be, &mut m, OptStatePolicy::Reset);
    let units = [
        ("embed", m.embed.w.snapshot(&be), &before.embed),
        ("head", m.head.w.snapshot(&be), &before.head),
        ("old block", m.blocks[2].w.snapshot(&be), &before.block),
    ];
    for (what, s, b) in &units {
        assert_zero_state(&format!("reset: {what}"), s);
        assert_eq!(&s.params, &b.params, "reset: {what} parameters changed");
    }
    for p in 0..2 {
        assert_zero_state("reset: new block", &m.blocks[p].w.snapshot(&be));
    }
    // Everything restarts its bias correction: after one step every counter is 1.
    let opt = adamw();
    let mut sc = Scratch::default();
    train_step(&be, &mut m, &opt, &mut sc, &batch(&be, 67, 11), LR);
    for s in [&m.embed.w.state.steps, &m.head.w.state.steps] {
        assert!(s.iter().all(|&t| t == 1));
    }
    for blk in &m.blocks {
        assert!(blk.w.state.steps.iter().all(|&t| t == 1));
    }
}

/// A block born at step τ does its first AdamW update with bias correction at its own step 1
/// (m̂ = g, v̂ = g², so |Δp| = lr·|g|/(|g| + ε) ≈ lr plus decay), while the old block's update is
/// bias-corrected at τ + 1 with its inherited moments.
#[test]
fn newborn_blocks_start_their_own_bias_correction() {
    let be = B::default();
    let (mut m, _) = policy_setup(&be);
    grow_policy(&be, &mut m, OptStatePolicy::Inherit);
    let opt = adamw();
    let c = opt.cfg.clone();
    let wd = c.weight_decay();
    let bt = batch(&be, 67, 11);
    m.forward_backward(&be, &bt, 1.0 / (BATCH * SEQ) as f32);
    m.finish_grads(&be);
    let pre: Vec<(UnitState, Vec<f32>)> = m.blocks.iter().map(|b| (b.w.snapshot(&be), b.w.grads_to_host(&be))).collect();
    let mut sc = Scratch::default();
    opt.step(&be, &mut m.embed.w, &mut sc, LR);
    for blk in m.blocks.iter_mut() {
        opt.step(&be, &mut blk.w, &mut sc, LR);
    }
    opt.step(&be, &mut m.head.w, &mut sc, LR);

    // Counters: newborns at 1, everything older at τ + 1.
    for p in 0..2 {
        assert_eq!(m.blocks[p].w.state.steps, vec![1; ALL.len()], "new block {p} counters");
    }
    assert_eq!(m.blocks[2].w.state.steps, vec![TAU as u64 + 1; ALL.len()], "old block counters");
    assert!(m.embed.w.state.steps.iter().chain(&m.head.w.state.steps).all(|&t| t == TAU as u64 + 1));

    for (p, blk) in m.blocks.iter().enumerate() {
        let (s, g) = &pre[p];
        let t = if p < 2 { 1 } else { TAU as u64 + 1 };
        let after = blk.w.snapshot(&be);
        let mut checked = 0;
        for spec in &blk.w.layout.specs {
            let wdt = if spec.is_matrix() { wd } else { 0.0 };
            let r = spec.offset..spec.offset + spec.numel();
            // Reference: one AdamW step at this tensor's own counter, from the pre-step state.
            let f = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
            let (mut pr, gr, mut mr, mut vr) = (
                f(&s.params[r.clone()]),
                f(&g[r.clone()]),
                f(&s.m[r.clone()]),
                f(&s.v.clone().unwrap_or(vec![0.0; s.params.len()])[r.clone()]),
            );
            adamw_reference(&mut pr, &gr, &mut mr, &mut vr, LR as f64, c.beta1 as f64, c.beta2 as f64, c.eps as f64, wdt as f64, t);
            for (i, k) in r.clone().enumerate() {
                let got = after.params[k] as f64;
                assert!((got - pr[i]).abs() <= 1e-6, "block {p} {}[{i}]: {got} vs reference at step {t} {}", spec.name, pr[i]);
            }
            if p < 2 {
                // By hand: a newborn's first update is lr·sign(g) (for |g| ≫ ε) plus decay.
                for k in r {
                    let (p0, gk) = (s.params[k] as f64, g[k] as f64);
                    if gk.abs() < 1e-4 {
                        continue;
                    }
                    let step = p0 - after.params[k] as f64 - LR as f64 * wdt as f64 * p0;
                    assert!(
                        (step - LR as f64 * gk.signum()).abs() <= 2e-3 * LR as f64,
                        "block {p} {}: first update {step:e}, want lr·sign(g) = {:e}",
                        spec.name,
                        LR as f64 * gk.signum()
                    );
                    checked += 1;
                }
            }
        }
        if p < 2 {
            assert!(checked > 1000, "block {p}: only {checked} elements with |g| >= 1e-4");
        }
    }
    // Contrast: the old block's update is NOT of magnitude lr everywhere (its moments carry
    // history and its correction is at τ + 1), so the check above really sees the counter.
    let (s, g) = &pre[2];
    let after = m.blocks[2].w.params_to_host(&be);
    let off_lr = (0..after.len()).filter(|&k| g[k].abs() >= 1e-4 && ((s.params[k] - after[k]).abs() / LR - 1.0).abs() > 0.05).count();
    assert!(off_lr > 100, "old block: updates look like a first step ({off_lr} elements differ from lr)");
}

// ---------------------------------------------------------------------------------------------
// 6. multi-stage plans
// ---------------------------------------------------------------------------------------------

#[test]
fn multi_stage_plan_zero_to_two_to_four() {
    let be = B::default();
    let d = dims();
    let cfg = init_cfg(4);
    let plan = [
        Expansion {
            at_step: 2,
            to_depth: 2,
            position: Position::Bottom,
            init: GrowInit::Random,
            order: CopyOrder::Stack,
            opt_state: OptStatePolicy::Inherit,
            init_scale: 1.0,
        },
        Expansion {
            at_step: 4,
            to_depth: 4,
            position: Position::Bottom,
            init: GrowInit::Copying,
            order: CopyOrder::Stack,
            opt_state: OptStatePolicy::Inherit,
            init_scale: 1.0,
        },
    ];
    let mut m = Model::new(&be, d.clone(), 0, &cfg);
    let opt = adamw();
    let mut sc = Scratch::default();
    let batches: Vec<Batch<B>> = (0..3).map(|s| batch(&be, d.vocab, 40 + s)).collect();
    let val = batch(&be, d.vocab, 99);
    let mut reports = Vec::new();
    let mut losses = Vec::new();
    for step in 0..7u64 {
        for e in plan.iter().filter(|e| e.at_step == step) {
            let before = m.logits(&be, &val);
            let r = growth::grow(&be, &mut m, e, &cfg).unwrap();
            assert!(before.iter().all(|x| x.is_finite()));
            reports.push(r);
        }
        let depth = m.depth();
        let want = match step {
            0 | 1 => 0,
            2 | 3 => 2,
            _ => 4,
        };
        assert_eq!(depth, want, "depth at step {step}");
        let l = train_step(&be, &mut m, &opt, &mut sc, &batches[step as usize % 3], 1e-2);
        assert!(l.is_finite(), "loss {l} at step {step}");
        losses.push(l);
    }
    assert_eq!(reports.len(), 2);
    assert_eq!((reports[0].from_depth, reports[0].to_depth), (0, 2));
    assert_eq!(reports[0].new_ids, vec![0, 1]);
    assert_eq!(reports[0].stack, vec![0, 1]);
    assert_eq!((reports[1].from_depth, reports[1].to_depth), (2, 4));
    assert_eq!(reports[1].new_ids, vec![2, 3]);
    assert_eq!(reports[1].stack, vec![2, 3, 0, 1]);
    assert_eq!(ids(&m), vec![2, 3, 0, 1]);
    assert_eq!(m.next_id, 4);
    // Counters: the stage-1 blocks were born before step 2 and took 5 steps, the stage-2 ones 3,
    // the embedding all 7.
    assert!(m.embed.w.state.steps.iter().all(|&t| t == 7));
    assert!(m.blocks[0].w.state.steps.iter().chain(&m.blocks[1].w.state.steps).all(|&t| t == 3));
    assert!(m.blocks[2].w.state.steps.iter().chain(&m.blocks[3].w.state.steps).all(|&t| t == 5));
    let ev = m.eval_loss(&be, &val);
    assert!(ev.is_finite());
    // Training continues: the loss on the training batches has gone down from the start.
    assert!(losses[6] < losses[0], "losses {losses:?}");
}

// ---------------------------------------------------------------------------------------------
// 7. errors
// ---------------------------------------------------------------------------------------------

#[test]
fn copying_from_zero_blocks_is_an_error() {
    let be = B::default();
    let d = dims();
    for init in [GrowInit::Copying, GrowInit::CopyingZero] {
        let mut m = Model::new(&be, d.clone(), 0, &init_cfg(2));
        let err = growth::grow(&be, &mut m, &exp(2, init, CopyOrder::Stack, Position::Bottom, OptStatePolicy::Inherit), &init_cfg(2))
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("random"), "{init:?} from 0 blocks: message {msg:?} does not point at `random`");
        assert_eq!(m.depth(), 0, "a failed expansion must leave the model alone");
        assert_eq!(m.next_id, 0);
        assert!(growth::plan_sources(init, CopyOrder::Last, 0, 2).is_err());
    }
    // `random` and `zero` are fine from 0 layers.
    for init in [GrowInit::Random, GrowInit::Zero] {
        let mut m = Model::new(&be, d.clone(), 0, &init_cfg(2));
        growth::grow(&be, &mut m, &exp(2, init, CopyOrder::Stack, Position::Bottom, OptStatePolicy::Inherit), &init_cfg(2)).unwrap();
        assert_eq!(m.depth(), 2);
    }
}

#[test]
fn growing_to_a_depth_not_above_the_current_is_an_error() {
    let be = B::default();
    let d = dims();
    let mut m = trained(&be, d, 2, 2, 1);
    let snap: Vec<Vec<f32>> = m.blocks.iter().map(|b| b.w.params_to_host(&be)).collect();
    for to in [0, 1, 2] {
        for init in [GrowInit::Random, GrowInit::Copying] {
            let r = growth::grow(&be, &mut m, &exp(to, init, CopyOrder::Stack, Position::Bottom, OptStatePolicy::Inherit), &init_cfg(4));
            assert!(r.is_err(), "growing 2 -> {to} must fail");
        }
    }
    assert_eq!(m.depth(), 2);
    assert_eq!(ids(&m), vec![0, 1]);
    assert_eq!(m.next_id, 2);
    assert_eq!(m.blocks.iter().map(|b| b.w.params_to_host(&be)).collect::<Vec<_>>(), snap);
}
