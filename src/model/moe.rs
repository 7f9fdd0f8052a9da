//! The mixture-of-experts MLP (`[model.moe]`): routing, the dispatch plan, and the aux-loss-free
//! balancing bias. The block's forward and backward that use them are in the LLaMA kind's
//! folder ([`kinds::llama::moe`](super::kinds::llama::moe)).
//!
//! ```text
//! rms2 ─► logits = rms2 @ Wr^T (N, E) ─► route: top-k experts and their weights per token
//!      ─► gather each expert's tokens ─► SwiGLU expert e on its rows ─► Σ_k weight · output
//!      (+ the shared experts: one SwiGLU of S·F units on every token)
//! ```
//!
//! **Routing** (`routing`):
//! - `softmax` (Mixtral, Qwen-MoE): p = softmax(logits); the k largest p; weights p / Σ_top-k p
//!   (renormalised), which is the softmax of the selected logits.
//! - `sigmoid` (DeepSeek-V3): s = sigmoid(logits); the k largest s + b, where b is a per-expert
//!   bias that only steers the selection; weights s / Σ_top-k s. After every optimizer step each
//!   expert's bias moves by `bias_update_rate` towards balance: b_e += γ · sign(mean load − load_e),
//!   load_e = the tokens routed to e during the step (the auxiliary-loss-free balancing). The
//!   bias is a tensor of the unit (`router_bias`: checkpointed, copied by growth) that the
//!   optimizer never updates.
//!
//! Ties in the top-k go to the lower expert index. Dropless: every token goes to its k experts,
//! however many tokens an expert gets. The selection is piecewise constant in the logits, so
//! gradients flow through the weights only, as in every top-k router.
//!
//! Routing runs on the host, from the logits read back (N·E floats per block and micro-batch),
//! on every backend alike; the experts' products run on the device, each expert on the
//! contiguous rows of its tokens.

use serde::{Deserialize, Serialize};

/// How tokens choose their experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    #[default]
    Softmax,
    Sigmoid,
}

/// The resolved shape of a mixture-of-experts MLP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Moe {
    /// Routed experts E.
    pub experts: usize,
    /// Experts per token k.
    pub top_k: usize,
    /// Shared experts S (every token goes through them; 0: none).
    pub shared: usize,
    /// SwiGLU hidden units F of each expert (routed and shared).
    pub hidden: usize,
    pub routing: Routing,
    /// γ of the auxiliary-loss-free bias update (`sigmoid` routing).
    pub bias_rate: f32,
    /// Blocks that stay dense: those whose position in the final model is below this.
    pub first_dense: usize,
    /// The auxiliary balancing loss's weight per micro-batch: `aux_loss` / the step's
    /// micro-batches, so that a step minimises the mean over its micro-batches of the LM loss
    /// plus `aux_loss` times the balancing loss (0: none).
    #[serde(default)]
    pub aux: f32,
}

/// Whether a block's MLP is dense or a mixture of experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum Mlp {
    #[default]
    Dense,
    Moe,
}

/// One micro-batch's routing: per token its k experts (best first) and their weights, and the
/// scores (softmax probabilities or sigmoids, (N, E)) the backward needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Route {
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
    pub scores: Vec<f32>,
}

/// Route `n` tokens from their logits (N, E); `bias` (E) steers the `sigmoid` selection.
pub fn route(logits: &[f32], bias: Option<&[f32]>, n: usize, e: usize, k: usize, routing: Routing) -> Route {
    let mut r = Route::default();
    route_into(&mut r, logits, bias, n, e, k, routing);
    r
}

/// Tokens per task of [`route_into`].
const ROUTE_TOKENS: usize = 64;

/// [`route`] into `r`, reusing its vectors (the block routes every micro-batch). Tokens are
/// routed independently, side by side on the pool: the result does not depend on the number
/// of threads.
pub fn route_into(r: &mut Route, logits: &[f32], bias: Option<&[f32]>, n: usize, e: usize, k: usize, routing: Routing) {
    use rayon::prelude::*;
    assert!(logits.len() == n * e && k >= 1 && k <= e, "route: {n} tokens of {e} logits, top {k}");
    r.experts.resize(n * k, 0);
    r.weights.resize(n * k, 0.0);
    r.scores.resize(n * e, 0.0);
    let tasks = logits.par_chunks(ROUTE_TOKENS * e).zip(r.scores.par_chunks_mut(ROUTE_TOKENS * e));
    tasks.zip(r.experts.par_chunks_mut(ROUTE_TOKENS * k).zip(r.weights.par_chunks_mut(ROUTE_TOKENS * k))).for_each(|((l, s), (x, w))| {
        ROUTE_SCRATCH.with_borrow_mut(|(exps, keys)| {
            exps.resize(e, 0.0);
            keys.resize(e, 0);
            for (((l, s), x), w) in l.chunks_exact(e).zip(s.chunks_exact_mut(e)).zip(x.chunks_exact_mut(k)).zip(w.chunks_exact_mut(k)) {
                route_token(l, bias, s, x, w, routing, (&mut exps[..], &mut keys[..]));
            }
        });
    });
}

thread_local! {
    /// A pool thread's routing scratch: a token's exponentials and its selection keys (grown to
    /// E once, then reused: routing allocates nothing per step).
    static ROUTE_SCRATCH: std::cell::RefCell<(Vec<f64>, Vec<i64>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// One token: its scores `s` (E) from its logits `l`, then its k experts `x` (best first) and
/// their weights `w`. `scratch` holds E exponentials and E selection keys.
fn route_token(
    l: &[f32],
    bias: Option<&[f32]>,
    s: &mut [f32],
    x: &mut [u32],
    w: &mut [f32],
    routing: Routing,
    scratch: (&mut [f64], &mut [i64]),
) {
    let (exps, keys) = scratch;
    match routing {
        Routing::Softmax => {
            // The largest logit (NaNs skipped, as `f32::max` skips them), one compare each.
            let m = l.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
            exps.iter_mut().zip(l).for_each(|(v, &x)| *v = ((x - m) as f64).exp());
            let z: f64 = exps.iter().sum();
            s.iter_mut().zip(exps.iter()).for_each(|(s, &v)| *s = (v / z) as f32);
        }
        Routing::Sigmoid => s.iter_mut().zip(l).for_each(|(s, &x)| *s = (1.0 / (1.0 + (-(x as f64)).exp())) as f32),
    }
    // The k largest keys, best first, ties to the lower index: the first k of a stable sort by
    // descending key, by selection. Keys are ordered as `f32::total_cmp` orders them, as
    // integers; a chosen expert's key drops below every other.
    for (i, key) in keys.iter_mut().enumerate() {
        let v = s[i] + bias.map_or(0.0, |b| b[i]);
        *key = total_order_key(v);
    }
    for xj in x.iter_mut() {
        let mut best = 0;
        for i in 1..keys.len() {
            if keys[i] > keys[best] {
                best = i;
            }
        }
        keys[best] = i64::MIN;
        *xj = best as u32;
    }
    let sum: f32 = x.iter().map(|&i| s[i as usize]).sum();
    for (w, &i) in w.iter_mut().zip(x.iter()) {
        *w = s[i as usize] / sum;
    }
}

/// An integer ordered as [`f32::total_cmp`] orders the floats.
fn total_order_key(v: f32) -> i64 {
    let b = v.to_bits() as i32;
    (b ^ (((b >> 31) as u32) >> 1) as i32) as i64
}

/// dlogits (N, E) from the weights' gradient dweights (N, k): the selected logits only.
/// `softmax`: the weights are the softmax of the selected logits, dl_j = w_j (dw_j − Σ w·dw).
/// `sigmoid`: w_j = s_j / S, so ds_j = (dw_j − Σ w·dw) / S and dl_j = ds_j · s_j (1 − s_j).
pub fn route_backward(r: &Route, dweights: &[f32], n: usize, e: usize, k: usize, routing: Routing) -> Vec<f32> {
    let mut dl = Vec::new();
    route_backward_into(&mut dl, r, dweights, n, e, k, routing);
    dl
}

/// [`route_backward`] into `dl` (resized to N·E), reusing its memory.
pub fn route_backward_into(dl: &mut Vec<f32>, r: &Route, dweights: &[f32], n: usize, e: usize, k: usize, routing: Routing) {
    dl.clear();
    dl.resize(n * e, 0.0);
    for t in 0..n {
        let (sel, w, dw) = (&r.experts[t * k..(t + 1) * k], &r.weights[t * k..(t + 1) * k], &dweights[t * k..(t + 1) * k]);
        let dot: f32 = w.iter().zip(dw).map(|(a, b)| a * b).sum();
        let s = &r.scores[t * e..(t + 1) * e];
        let total: f32 = sel.iter().map(|&i| s[i as usize]).sum();
        for j in 0..k {
            let i = sel[j] as usize;
            dl[t * e + i] = match routing {
                Routing::Softmax => w[j] * (dw[j] - dot),
                Routing::Sigmoid => (dw[j] - dot) / total * s[i] * (1.0 - s[i]),
            };
        }
    }
}

/// The auxiliary balancing loss of one micro-batch and its gradient with respect to the logits
/// (N, E), times `weight`: L = E · Σ_e f_e · P_e, where f_e is the fraction of the N·k choices
/// that went to e (a constant) and P_e the mean over tokens of q_e, the softmax probability
/// (`softmax` routing) or the sigmoid score normalised over the experts (`sigmoid`: DeepSeek's
/// sequence-wise balance loss). dL/dq_te = E · f_e / N; through the softmax
/// dl_t = q_t ⊙ (g − q_t·g); through the normalised sigmoids ds = (g − q·g) / Σs and
/// dl = ds · s (1 − s).
pub fn aux_loss(r: &Route, n: usize, e: usize, k: usize, routing: Routing, weight: f32) -> (f32, Vec<f32>) {
    let mut f = vec![0.0f64; e];
    for &x in &r.experts {
        f[x as usize] += 1.0 / (n * k) as f64;
    }
    let g: Vec<f64> = f.iter().map(|fe| e as f64 * fe / n as f64).collect();
    let (mut loss, mut dl) = (0.0f64, vec![0.0f32; n * e]);
    for t in 0..n {
        let s = &r.scores[t * e..(t + 1) * e];
        let total: f64 = match routing {
            Routing::Softmax => 1.0,
            Routing::Sigmoid => s.iter().map(|&x| x as f64).sum(),
        };
        let q: Vec<f64> = s.iter().map(|&x| x as f64 / total).collect();
        let qg: f64 = q.iter().zip(&g).map(|(a, b)| a * b).sum();
        loss += qg; // Σ_e g_e q_te = E/N · Σ_e f_e q_te
        for i in 0..e {
            let d = match routing {
                Routing::Softmax => q[i] * (g[i] - qg),
                Routing::Sigmoid => (g[i] - qg) / total * s[i] as f64 * (1.0 - s[i] as f64),
            };
            dl[t * e + i] = (weight as f64 * d) as f32;
        }
    }
    ((weight as f64 * loss) as f32, dl)
}

/// Where each (token, choice) goes: the slots sorted by expert (then token, then choice), so
/// that each expert's tokens are contiguous rows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Slot → the token whose row it holds (M = N·k).
    pub rows: Vec<u32>,
    /// (token, choice) → its slot (N·k).
    pub slots: Vec<u32>,
    /// Expert e's slots are offsets[e]..offsets[e + 1].
    pub offsets: Vec<usize>,
}

impl Plan {
    pub fn new(experts: &[u32], n: usize, e: usize, k: usize) -> Plan {
        let mut p = Plan::default();
        p.refill(experts, n, e, k);
        p
    }

    /// The plan of another routing, in this plan's memory.
    pub fn refill(&mut self, experts: &[u32], n: usize, e: usize, k: usize) {
        let offsets = &mut self.offsets;
        offsets.clear();
        offsets.resize(e + 1, 0);
        for &x in experts {
            offsets[x as usize + 1] += 1;
        }
        for i in 0..e {
            offsets[i + 1] += offsets[i];
        }
        self.rows.resize(n * k, 0);
        self.slots.resize(n * k, 0);
        // Each expert's offset serves as its cursor (no allocation per step): after the pass it
        // has moved to the next expert's offset, so the offsets then shift back by one.
        for (tj, &x) in experts.iter().enumerate() {
            let slot = self.offsets[x as usize];
            self.offsets[x as usize] += 1;
            self.rows[slot] = (tj / k) as u32;
            self.slots[tj] = slot as u32;
        }
        self.offsets.copy_within(0..e, 1);
        self.offsets[0] = 0;
    }

    /// Tokens routed to expert `e`.
    pub fn count(&self, e: usize) -> usize {
        self.offsets[e + 1] - self.offsets[e]
    }
}

/// The auxiliary-loss-free update: b_e += γ · sign(mean − load_e).
pub fn update_bias(bias: &mut [f32], load: &[u64], rate: f32) {
    let mean = load.iter().sum::<u64>() as f64 / load.len().max(1) as f64;
    for (b, &l) in bias.iter_mut().zip(load) {
        let d = mean - l as f64;
        *b += rate
            * if d > 0.0 {
                1.0
            } else if d < 0.0 {
                -1.0
            } else {
                0.0
            };
    }
}
