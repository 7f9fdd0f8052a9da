//! The block kinds (`model.arch` = `gpt2`, `llama`, `qwen3`) through everything else: every
//! growth operator against its definition for each kind (by the kind's own tensor names), the
//! actor pipeline against the sequential trainer bitwise through growth, and the config's errors.
//! The ops and blocks themselves are checked by finite differences in `tests/gradients.rs`.

mod common;

use common::{synthetic_dataset, TestConfig};
use taproot::backend::cpu::CpuBackend;
use taproot::data::Dataset;
use taproot::model::block::{gains, is_residual_output};
use taproot::model::growth::{self, CopyOrder, Expansion, GrowInit, OptStatePolicy, Position};
use taproot::model::init::{block_tensor_std, InitConfig, InitScheme};
use taproot::model::moe::{Mlp, Moe, Routing};
use taproot::model::{Arch, Batch, Block, Dims, Model};
use taproot::optim::{OptimConfig, Optimizer, OptimizerKind, Scratch};
use taproot::rng::Rng;
use taproot::runtime;
use taproot::train::{sequential::Sequential, RunOptions};

type B = CpuBackend;

/// Every kind at a tiny size; the LLaMA kinds with grouped-query attention (4 heads, 2 kv); the
/// last two with a mixture of experts in every block (4 experts of 24, 2 per token; one shared).
fn kinds() -> Vec<Dims> {
    vec![
        Dims::new(67, 8, 16, 4),
        Dims::llama(67, 8, 16, 4, 2, 24),
        Dims::llama(67, 8, 16, 4, 2, 24).with_arch(Arch::Qwen3).with_tied(true),
        Dims::llama(67, 8, 16, 4, 2, 24).with_moe(moe(Routing::Softmax, 1)),
        Dims::llama(67, 8, 16, 4, 2, 24).with_arch(Arch::Qwen3).with_moe(moe(Routing::Sigmoid, 0)),
    ]
}

fn moe(routing: Routing, shared: usize) -> Moe {
    Moe { experts: 4, top_k: 2, shared, hidden: 24, routing, bias_rate: 0.01, first_dense: 0, aux: 0.0 }
}

fn kind_name(d: &Dims) -> String {
    format!("{}{}", d.arch.name(), if d.moe.is_some() { " moe" } else { "" })
}

fn batch(be: &B, vocab: usize, seed: u64) -> Batch<B> {
    let mut rng = Rng::new(seed);
    let w: Vec<u32> = (0..2 * 6).map(|_| rng.below(vocab as u64) as u32).collect();
    Batch::from_windows(be, &w, 2, 5)
}

fn exp(to_depth: usize, init: GrowInit, opt_state: OptStatePolicy) -> Expansion {
    Expansion { at_step: 0, to_depth, position: Position::Bottom, init, order: CopyOrder::Stack, opt_state, init_scale: 1.0 }
}

/// A model of `depth` blocks trained a few AdamW steps, so weights and state are not the init's.
fn trained(be: &B, d: &Dims, depth: usize) -> Model<B> {
    let mut m = Model::new(be, d.clone(), depth, &InitConfig::new(InitScheme::Gpt2, 4, 9));
    let opt = Optimizer::new(OptimConfig { kind: OptimizerKind::Adamw, ..Default::default() });
    let mut sc = Scratch::default();
    for s in 0..4 {
        let bt = batch(be, d.vocab, 100 + s);
        let l = m.forward_backward(be, &bt, 0.1);
        assert!(l.is_finite());
        m.finish_grads(be);
        opt.step(be, &mut m.embed.w, &mut sc, 1e-2);
        for blk in m.blocks.iter_mut() {
            opt.step(be, &mut blk.w, &mut sc, 1e-2);
        }
        opt.step(be, &mut m.head.w, &mut sc, 1e-2);
        m.zero_grad(be);
    }
    m
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn every_kind_has_its_own_tensors() {
    let names = |d: &Dims| Block::<B>::layout(d).specs.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    let [g, l, q, ..] = <[Dims; 5]>::try_from(kinds()).unwrap();
    assert_eq!(names(&g), ["ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb"]);
    assert_eq!(names(&l), ["attn_norm", "qkvw", "ow", "mlp_norm", "gate_upw", "downw"]);
    assert_eq!(names(&q), ["attn_norm", "qkvw", "q_norm", "k_norm", "ow", "mlp_norm", "gate_upw", "downw"]);
    // GQA: q (4 heads of 4) + k, v (2 heads each) rows; SwiGLU's gate and up stacked.
    let ll = Block::<B>::layout(&l);
    assert_eq!(ll.get("qkvw").shape, vec![(4 + 2 * 2) * 4, 16]);
    assert_eq!(ll.get("gate_upw").shape, vec![48, 16]);
    assert_eq!(ll.get("downw").shape, vec![16, 24]);
    // Rotary models have no position table; an untied head owns lm_head.
    let be = B::default();
    let m = Model::new(&be, l.clone(), 0, &InitConfig::new(InitScheme::Gpt2, 2, 1));
    assert_eq!(m.embed.w.layout.specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["wte"]);
    assert_eq!(m.head.w.layout.specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["normw", "lm_head"]);
    let m = Model::new(&be, q, 0, &InitConfig::new(InitScheme::Gpt2, 2, 1));
    assert_eq!(m.head.w.layout.specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["normw"]);
    // The untied lm_head starts like wte (its own stream), padding rows zero.
    let m = Model::new(&be, l.clone(), 0, &InitConfig::new(InitScheme::Gpt2, 2, 1));
    let h = m.head.w.params_to_host(&be);
    let lm = m.head.w.layout.slice(&h, "lm_head");
    assert!(lm[l.vocab * 16..].iter().all(|&x| x == 0.0));
    let std = (lm[..l.vocab * 16].iter().map(|x| (x * x) as f64).sum::<f64>() / (l.vocab * 16) as f64).sqrt();
    assert!((std / 0.02 - 1.0).abs() < 0.1, "lm_head std {std}");
    assert_ne!(lm, &m.embed.w.params_to_host(&be)[..lm.len()]);
}

#[test]
fn parameter_counts_match_the_layouts_of_every_kind() {
    use taproot::model::{Embed, Head};
    for d in kinds().into_iter().chain([Dims::llama(300, 8, 16, 4, 1, 24)]) {
        let be = B::default();
        let moe = taproot::flops::moe_block_params(&d);
        let stored = moe.map_or(taproot::flops::block_params(&d), |p| p.0);
        assert_eq!(stored, Block::<B>::layout_of(&d, if moe.is_some() { Mlp::Moe } else { Mlp::Dense }).total as u64, "{}", kind_name(&d));
        if let (Some((all, active)), Some(m)) = (moe, &d.moe) {
            // A token uses k of the E experts' 3·F·C weights each.
            assert_eq!(all - active, ((m.experts - m.top_k) * 3 * m.hidden * d.channels) as u64);
        }
        let m = Model::new(&be, d.clone(), 3, &InitConfig::new(InitScheme::Gpt2, 3, 1));
        let (total, _, _) = m.param_counts();
        assert_eq!(taproot::flops::total_params(&d, 3), total as u64, "{}", kind_name(&d));
        let head_norm = Head::<B>::layout(&d).specs.iter().filter(|s| s.name != "lm_head").map(|s| s.numel()).sum::<usize>();
        let ne = m.blocks.iter().map(|b| b.w.layout.total).sum::<usize>() + head_norm;
        assert_eq!(taproot::flops::non_embedding_params(&d, 3), ne as u64, "{}", kind_name(&d));
        assert_eq!(taproot::flops::embedding_params(&d) as usize + head_norm, Embed::<B>::layout(&d).total + Head::<B>::layout(&d).total);
    }
}

/// `random`: gains 1, biases 0, matrices at the kind's target-depth std (residual outputs
/// scaled by 1/sqrt(2L)); the same weights as block `id` of a fixed-depth model.
#[test]
fn random_growth_draws_each_kind_at_its_init() {
    let be = B::default();
    for d in kinds() {
        let d = Dims {
            channels: 64,
            heads: 4,
            kv_heads: if d.arch == taproot::model::Arch::Gpt2 { 4 } else { 2 },
            ffn_hidden: if d.arch == taproot::model::Arch::Gpt2 { 256 } else { 176 },
            ..d
        };
        let cfg = InitConfig::new(InitScheme::Gpt2, 8, 5);
        let mut m = Model::new(&be, d.clone(), 0, &cfg);
        growth::grow(&be, &mut m, &exp(8, GrowInit::Random, OptStatePolicy::Inherit), &cfg).unwrap();
        let fixed = Model::new(&be, d.clone(), 8, &cfg);
        for (p, blk) in m.blocks.iter().enumerate() {
            let h = blk.w.params_to_host(&be);
            for s in &blk.w.layout.specs {
                let t = &h[s.offset..s.offset + s.numel()];
                let what = format!("{} block {p} {}", kind_name(&d), s.name);
                if gains(d.arch).contains(&s.name.as_str()) {
                    assert!(t.iter().all(|&x| x == 1.0), "{what}: a gain starts at 1");
                } else if !s.is_matrix() {
                    assert!(t.iter().all(|&x| x == 0.0), "{what}: a bias starts at 0");
                } else {
                    let want = if is_residual_output(d.arch, &s.name) { 0.02 / 4.0 } else { 0.02 };
                    assert_eq!(block_tensor_std(&cfg, taproot::model::kinds::spec(d.arch), &s.name, &s.shape), want, "{what}");
                    let std = (t.iter().map(|x| (x * x) as f64).sum::<f64>() / t.len() as f64).sqrt();
                    assert!((std / want - 1.0).abs() < 0.06, "{what}: std {std} against {want}");
                }
            }
            assert_eq!(h, fixed.blocks[p].w.params_to_host(&be), "{}: a grown block starts as a fixed one", kind_name(&d));
        }
    }
}

/// `copying` (stack order) copies every tensor bit for bit, and under `copy` the optimizer state
/// too; `copying_zero` zeroes exactly the kind's residual outputs and keeps the function; `zero`
/// blocks are identities too (gains 1, everything else 0); `reset` zeroes every state.
#[test]
fn copying_zero_and_state_policies_follow_their_definitions_for_every_kind() {
    let be = B::default();
    for d in kinds() {
        let kind = kind_name(&d);
        let bt = batch(&be, d.vocab, 7);
        let cfg = InitConfig::new(InitScheme::Gpt2, 4, 9);
        // copying, copy policy: 2 -> 4 blocks; new block j copies old block j % 2.
        let mut m = trained(&be, &d, 2);
        let src: Vec<_> = m.blocks.iter().map(|b| b.w.snapshot(&be)).collect();
        growth::grow(&be, &mut m, &exp(4, GrowInit::Copying, OptStatePolicy::Copy), &cfg).unwrap();
        for j in 0..2 {
            let got = m.blocks[j].w.snapshot(&be);
            assert_eq!(got.params, src[j % 2].params, "{kind}: copying copies every tensor");
            assert_eq!(
                (got.m, got.v, got.steps),
                (src[j % 2].m.clone(), src[j % 2].v.clone(), src[j % 2].steps.clone()),
                "{kind}: copy policy"
            );
        }
        // copying_zero: the function is kept, and only the residual outputs are zero.
        let mut m = trained(&be, &d, 2);
        let before = m.logits(&be, &bt);
        let src: Vec<_> = m.blocks.iter().map(|b| b.w.params_to_host(&be)).collect();
        growth::grow(&be, &mut m, &exp(4, GrowInit::CopyingZero, OptStatePolicy::Inherit), &cfg).unwrap();
        assert!(max_abs_diff(&before, &m.logits(&be, &bt)) <= 1e-6, "{kind}: copying_zero changes the function");
        let blk = &m.blocks[0];
        let h = blk.w.params_to_host(&be);
        for s in &blk.w.layout.specs {
            let (t, o) = (&h[s.offset..s.offset + s.numel()], &src[0][s.offset..s.offset + s.numel()]);
            if is_residual_output(d.arch, &s.name) {
                assert!(t.iter().all(|&x| x == 0.0), "{kind} {}: zeroed", s.name);
            } else {
                assert_eq!(t, o, "{kind} {}: copied", s.name);
            }
        }
        // zero: identity blocks; reset: every unit's state zero, parameters kept.
        let mut m = trained(&be, &d, 1);
        let before = m.logits(&be, &bt);
        let params: Vec<_> =
            std::iter::once(m.embed.w.params_to_host(&be)).chain(m.blocks.iter().map(|b| b.w.params_to_host(&be))).collect();
        growth::grow(&be, &mut m, &exp(3, GrowInit::Zero, OptStatePolicy::Reset), &cfg).unwrap();
        assert!(max_abs_diff(&before, &m.logits(&be, &bt)) <= 1e-6, "{kind}: zero blocks are not identities");
        for s in &m.blocks[0].w.layout.specs {
            let t = m.blocks[0].w.layout.slice(&m.blocks[0].w.params_to_host(&be), &s.name).to_vec();
            let want = if gains(d.arch).contains(&s.name.as_str()) { 1.0 } else { 0.0 };
            assert!(t.iter().all(|&x| x == want), "{kind} zero block {}", s.name);
        }
        assert_eq!(m.embed.w.params_to_host(&be), params[0]);
        assert_eq!(m.blocks[2].w.params_to_host(&be), params[1], "{kind}: the old block moves up unchanged");
        for u in [&m.embed.w, &m.head.w, &m.blocks[2].w] {
            let s = u.snapshot(&be);
            assert!(s.m.iter().all(|&x| x == 0.0) && s.steps.iter().all(|&x| x == 0), "{kind}: reset");
        }
    }
}

fn quiet() -> RunOptions {
    RunOptions { quiet: true, ..Default::default() }
}

/// The actor runtime against the sequential trainer, bitwise, through a growth.
fn compare(tag: &str, config: impl FnOnce(TestConfig) -> TestConfig) {
    let dir = synthetic_dataset(tag);
    let cfg = config(TestConfig::new(&dir).name(tag).steps(30).micro_batches(2).lr(0.02)).build();
    let data = Dataset::open(&dir, 256).unwrap();
    let want = Sequential::new(CpuBackend::default(), &cfg, &data).unwrap().run(&quiet()).unwrap();
    let got = runtime::train::<CpuBackend>(&cfg, data, quiet(), false).unwrap();
    assert_eq!(got.steps.len(), 30);
    assert!(got.growth.len() == 1 && got.steps.last().unwrap().depth == 4);
    common::assert_same_run(&want, &got);
    let (first, last) = (got.steps[0].train_loss, got.steps.last().unwrap().train_loss);
    assert!(last < first, "{tag}: the loss did not fall: {first} -> {last}");
}

#[test]
fn llama_pipeline_equals_sequential_through_growth_from_0_layers() {
    compare("arch-llama", |c| {
        c.set("model.arch", "\"llama\"").set("model.kv_heads", 1).grow_at_step(12, 4).devices(&["cpu:0", "cpu:1", "cpu:2"])
    });
}

#[test]
fn qwen3_pipeline_equals_sequential_through_copying_growth_tied() {
    compare("arch-qwen3", |c| {
        c.set("model.arch", "\"qwen3\"")
            .set("model.tie_embeddings", true)
            .set("model.ffn_hidden", 40)
            .micro_batches(4)
            .depth(1)
            .grow_at_step(15, 4)
            .growth_init("copying")
            .devices(&["cpu:0", "cpu:1", "cpu:2"])
            .set("placement.policy", "\"fill\"")
    });
}

#[test]
fn config_errors_name_the_block_kind_keys() {
    let dir = synthetic_dataset("arch-cfg");
    let err = |c: TestConfig| format!("{:#}", c.build_result().unwrap_err());
    let base = || TestConfig::new(&dir).name("arch-cfg").steps(10);
    let e = err(base().set("model.kv_heads", 1));
    assert!(e.contains("`model.kv_heads`") && e.contains("gpt2"), "{e}");
    let e = err(base().set("model.arch", "\"llama\"").set("model.kv_heads", 3));
    assert!(e.contains("`model.kv_heads` (3)") && e.contains("divide"), "{e}");
    let e = err(base().set("model.arch", "\"mamba\""));
    assert!(e.contains("arch") && e.contains("llama"), "{e}");
    let e = err(base().set("model.arch", "\"llama\"").set("model.rope_theta", 0.5));
    assert!(e.contains("`model.rope_theta`"), "{e}");
}

/// A mixture-of-experts model through the actor runtime: bitwise the sequential trainer through
/// a growth 1 → 4, with `first_dense_layers = 1` making the bottom block of the final model
/// dense (the initial block ends on top, MoE); the sigmoid router's bias moves as the loads say,
/// and the auxiliary balancing loss adds its gradient.
#[test]
fn moe_pipeline_equals_sequential_through_growth_with_a_dense_first_layer() {
    let moe = |c: TestConfig| {
        c.set("model.arch", "\"llama\"")
            .set("model.kv_heads", 1)
            .extra("[model.moe]\nexperts = 4\ntop_k = 2\nshared_experts = 1\nexpert_hidden = 16\nrouting = \"sigmoid\"\nbias_update_rate = 0.01\nfirst_dense_layers = 1\naux_loss = 0.01\n")
            .depth(1)
            .grow_at_step(12, 4)
            .devices(&["cpu:0", "cpu:1", "cpu:2"])
    };
    compare("arch-moe", moe);
    // The sequential trainer's model after the same run: the kinds and the bias.
    let dir = synthetic_dataset("arch-moe");
    let cfg = moe(TestConfig::new(&dir).name("arch-moe-seq").steps(30).micro_batches(2).lr(0.02)).build();
    let data = Dataset::open(&dir, 256).unwrap();
    let mut seq = Sequential::new(CpuBackend::default(), &cfg, &data).unwrap();
    seq.run(&quiet()).unwrap();
    let kinds: Vec<Mlp> = seq.model.blocks.iter().map(|b| b.mlp()).collect();
    let ids: Vec<u64> = seq.model.blocks.iter().map(|b| b.id).collect();
    assert_eq!(kinds, [Mlp::Dense, Mlp::Moe, Mlp::Moe, Mlp::Moe], "bottom block dense, the rest MoE (stack {ids:?})");
    // The initial block (id 0, now on top) has balanced for 30 steps: its bias moved both ways,
    // by at most γ a step.
    let top = seq.model.blocks.last().unwrap();
    assert_eq!(top.id, 0);
    let h = top.w.params_to_host(&seq.be);
    let bias = top.w.layout.slice(&h, "router_bias");
    assert!(bias.iter().any(|&b| b > 0.0) && bias.iter().any(|&b| b < 0.0), "bias {bias:?}");
    assert!(bias.iter().all(|b| b.abs() <= 0.01 * 30.0 + 1e-6), "bias {bias:?}");
}

/// The routing's definitions, on hand-made logits.
#[test]
fn routing_follows_its_definition() {
    use taproot::model::moe::{route, route_backward, update_bias, Plan};
    // softmax, top 2 of 4: the weights are the softmax of the two largest logits.
    let l = [1.0f32, 3.0, 2.0, 3.0];
    let r = route(&l, None, 1, 4, 2, Routing::Softmax);
    assert_eq!(r.experts, [1, 3], "descending, ties to the lower index");
    assert!((r.weights[0] - 0.5).abs() < 1e-6 && (r.weights[1] - 0.5).abs() < 1e-6);
    let r = route(&[0.0, 1.0, 2.0, -1.0], None, 1, 4, 2, Routing::Softmax);
    let z = 1.0f32.exp() + 2.0f32.exp();
    assert_eq!(r.experts, [2, 1]);
    assert!((r.weights[0] - 2.0f32.exp() / z).abs() < 1e-6);
    // sigmoid: the bias steers the choice, the weights are the sigmoids renormalised.
    let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
    let r = route(&[0.0, 1.0, 2.0, -1.0], Some(&[0.0, 0.0, 0.0, 5.0]), 1, 4, 2, Routing::Sigmoid);
    assert_eq!(r.experts, [3, 2], "expert 3's bias wins it the first place");
    assert!((r.weights[0] - sig(-1.0) / (sig(-1.0) + sig(2.0))).abs() < 1e-6);
    // The gradient lands on the selected logits only.
    let dl = route_backward(&r, &[1.0, -1.0], 1, 4, 2, Routing::Sigmoid);
    assert!(dl[0] == 0.0 && dl[1] == 0.0 && dl[2] != 0.0 && dl[3] != 0.0);
    // The plan: each expert's slots contiguous, in token order.
    let p = Plan::new(&[2, 0, 0, 2, 1, 2], 3, 4, 2);
    assert_eq!(p.offsets, [0, 2, 3, 6, 6]);
    assert_eq!(p.rows, [0, 1, 2, 0, 1, 2]);
    assert_eq!(p.slots, [3, 0, 1, 4, 2, 5]);
    // Refilled with another routing (as every step does, in the same memory): the plan of it.
    let mut q = p.clone();
    q.refill(&[1, 3, 3, 0, 1, 0, 2, 3], 4, 4, 2);
    assert_eq!(q, Plan::new(&[1, 3, 3, 0, 1, 0, 2, 3], 4, 4, 2));
    assert_eq!(q.offsets, [0, 2, 4, 5, 8]);
    assert_eq!(q.rows, [1, 2, 0, 2, 3, 0, 1, 3]);
    // The bias update: underloaded experts up, overloaded down, balanced unchanged.
    let mut b = [0.0f32; 4];
    update_bias(&mut b, &[1, 3, 2, 2], 0.5);
    assert_eq!(b, [0.5, -0.5, 0.0, 0.0]);
}

/// Routing many tokens at once (side by side on the pool, in tasks of tokens) gives each token
/// exactly its own one-token routing, ties included, on 1 thread and on 3 alike.
#[test]
fn routing_a_batch_equals_routing_each_token_alone() {
    use taproot::model::moe::route;
    let (n, e, k) = (301, 8, 3);
    let mut r = Rng::new(5);
    // Logits on a coarse grid, so that many tokens have tied logits.
    let logits: Vec<f32> = (0..n * e).map(|_| (r.below(7) as f32 - 3.0) * 0.5).collect();
    let bias: Vec<f32> = (0..e).map(|i| if i % 3 == 0 { 0.25 } else { 0.0 }).collect();
    for (routing, bias) in [(Routing::Softmax, None), (Routing::Sigmoid, Some(&bias[..]))] {
        let pool = |threads: usize| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let batch = pool(3).install(|| route(&logits, bias, n, e, k, routing));
        assert_eq!(batch, pool(1).install(|| route(&logits, bias, n, e, k, routing)), "{routing:?}: 1 thread against 3");
        for t in 0..n {
            let one = route(&logits[t * e..(t + 1) * e], bias, 1, e, k, routing);
            assert_eq!(one.experts[..], batch.experts[t * k..(t + 1) * k], "{routing:?} token {t}");
            assert_eq!(one.weights[..], batch.weights[t * k..(t + 1) * k], "{routing:?} token {t}");
            assert_eq!(one.scores[..], batch.scores[t * e..(t + 1) * e], "{routing:?} token {t}");
            // Best first, ties to the lower index: by key, then index.
            let key = |i: u32| one.scores[i as usize] + bias.map_or(0.0, |b| b[i as usize]);
            for w in one.experts.windows(2) {
                assert!(key(w[0]) > key(w[1]) || (key(w[0]) == key(w[1]) && w[0] < w[1]), "{routing:?} token {t}: {:?}", one.experts);
            }
            let rest = (0..e as u32).filter(|i| !one.experts.contains(i));
            let last = *one.experts.last().unwrap();
            for i in rest {
                assert!(key(i) < key(last) || (key(i) == key(last) && i > last), "{routing:?} token {t}: {i} beats {last}");
            }
        }
    }
}

/// The combine's backward writes each slot's row from its own task: slots that are not a
/// permutation (two choices in one row) are refused before anything is written.
#[test]
#[should_panic(expected = "repeated")]
fn moe_combine_backward_refuses_repeated_slots() {
    use taproot::backend::Backend;
    type B = CpuBackend;
    let be = B::default();
    let (n, k, c) = (2, 2, 4);
    let slots = be.alloc_ids(n * k);
    be.upload_ids(&slots, &[0, 1, 1, 3]);
    let (dys, dw, dout, ys, w) = (be.alloc(n * k * c), be.alloc(n * k), be.alloc(n * c), be.alloc(n * k * c), be.alloc(n * k));
    be.moe_combine_backward(B::whole(&dys), B::whole(&dw), B::whole(&dout), B::whole(&ys), &slots, B::whole(&w), n, k, c);
}

#[test]
fn moe_config_errors_are_named() {
    let dir = synthetic_dataset("arch-moe-cfg");
    let base = || TestConfig::new(&dir).name("arch-moe-cfg").steps(10);
    let err = |c: TestConfig| format!("{:#}", c.build_result().unwrap_err());
    let e = err(base().extra("[model.moe]\nexperts = 4\ntop_k = 2\n"));
    assert!(e.contains("[model.moe]") && e.contains("llama"), "{e}");
    let e = err(base().set("model.arch", "\"llama\"").extra("[model.moe]\nexperts = 4\ntop_k = 5\n"));
    assert!(e.contains("`model.moe.top_k` (5)"), "{e}");
    let e = err(base()
        .set("model.arch", "\"llama\"")
        .extra("[model.moe]\nexperts = 4\ntop_k = 2\nrouting = \"sigmoid\"\n")
        .set("parallel.data", 2)
        .micro_batches(2));
    assert!(e.contains("sigmoid") && e.contains("parallel.data"), "{e}");
    let e = err(base().set("model.arch", "\"llama\"").extra("[model.moe]\nexperts = 4\ntop_k = 2\naux_loss = -1.0\n"));
    assert!(e.contains("`model.moe.aux_loss`"), "{e}");
    let e = err(base().set("model.arch", "\"llama\"").extra("[model.moe]\nexperts = 4\ntop_k = 2\nrouting = \"hash\"\n"));
    assert!(e.contains("routing") || e.contains("hash"), "{e}");
}

/// The expert load reaches the observer (and so the metrics) after every step, for every MoE
/// layer: k assignments per trained token, however the experts share them.
#[test]
fn the_expert_load_of_every_moe_layer_is_reported_each_step() {
    use std::sync::{Arc, Mutex};
    use taproot::runtime::events::Event;
    let dir = synthetic_dataset("arch-moe-load");
    let cfg = TestConfig::new(&dir)
        .name("arch-moe-load")
        .steps(6)
        .micro_batches(2)
        .set("model.arch", "\"llama\"")
        .extra("[model.moe]\nexperts = 4\ntop_k = 2\nexpert_hidden = 16\n")
        .depth(2)
        .build();
    let data = Dataset::open(&dir, 256).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let observer: taproot::runtime::events::Observer = Arc::new(move |e: &Event| {
        if let Event::ExpertLoad { layer, step, load } = e {
            s.lock().unwrap().push((*layer, *step, load.clone()));
        }
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async { runtime::start::<CpuBackend>(&cfg, data, quiet(), observer).await.unwrap().wait().await.unwrap() });
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2 * 6, "two MoE layers, six steps: {seen:?}");
    let tokens = (cfg.data.batch_size * cfg.data.seq_len * cfg.data.micro_batches) as u64;
    for (layer, step, load) in seen.iter() {
        assert_eq!(load.len(), 4);
        assert_eq!(load.iter().sum::<u64>(), 2 * tokens, "layer {layer} step {step}: {load:?}");
    }
}
