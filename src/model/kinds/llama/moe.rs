//! The mixture-of-experts MLP's forward and backward on a backend (the routing and the plan are
//! host code in [`model::moe`](crate::model::moe)). Used by the LLaMA-family block in place of
//! its SwiGLU MLP.
//!
//! Shapes: N = B·T tokens, k choices each, M = N·k slots (every token in k experts: dropless),
//! E experts of F hidden units, S shared experts (one SwiGLU of S·F units).

use super::{Expert, MoeTensors};
use crate::backend::{Backend, MoeCombine, Segment, View};
use crate::model::dims::Dims;
use crate::model::moe::{self, Moe, Plan, Route, Routing};
use crate::params::{ParamSet, Tensor};

fn w<B: Backend>(buf: &B::Buf) -> View<'_, B::Buf> {
    B::whole(buf)
}

/// What one micro-batch's MoE forward leaves for its backward.
pub struct MoeActs<B: Backend> {
    route: Route,
    plan: Plan,
    rows: B::Ids,                     // (M) slot → token
    slots: B::Ids,                    // (N·k) (token, choice) → slot
    weights: B::Buf,                  // (N·k)
    logits: B::Buf,                   // (N, E)
    xs: B::Buf,                       // (M, C) each expert's tokens, contiguous
    gu: B::Buf,                       // (M, 2F)
    h: B::Buf,                        // (M, F)
    ys: B::Buf,                       // (M, C)
    shared: Option<(B::Buf, B::Buf)>, // (N, 2SF), (N, SF)
    /// The weighted auxiliary balancing loss of this micro-batch (0 without one), and its
    /// gradient with respect to the logits (N, E; empty without one), made once in the forward.
    pub aux: f32,
    aux_grad: Vec<f32>,
    host_logits: Vec<f32>, // (N, E) the logits read back
    host_bias: Vec<f32>,   // (E) the balancing bias read back (`sigmoid`)
}

impl<B: Backend> MoeActs<B> {
    pub fn new(be: &B, d: &Dims, m: &Moe, n: usize) -> Self {
        let (c, f, k) = (d.channels, m.hidden, m.top_k);
        let slots = n * k;
        MoeActs {
            route: Route::default(),
            plan: Plan::default(),
            rows: be.alloc_ids(slots),
            slots: be.alloc_ids(slots),
            weights: be.alloc(slots),
            logits: be.alloc(n * m.experts),
            xs: be.alloc_act(slots * c),
            gu: be.alloc_act(slots * 2 * f),
            h: be.alloc_act(slots * f),
            ys: be.alloc_act(slots * c),
            shared: (m.shared > 0).then(|| (be.alloc_act(n * 2 * m.shared * f), be.alloc_act(n * m.shared * f))),
            aux: 0.0,
            aux_grad: Vec::new(),
            host_logits: vec![0.0; n * m.experts],
            host_bias: vec![0.0; m.experts],
        }
    }

    /// The experts each token went to (N·k), for the load count.
    pub fn experts(&self) -> &[u32] {
        &self.route.experts
    }
}

/// The MoE backward's working buffers (one set per block).
pub struct MoeScratch<B: Backend> {
    dys: B::Buf,                      // (M, C)
    dh: B::Buf,                       // (M, F)
    dgu: B::Buf,                      // (M, 2F)
    dxs: B::Buf,                      // (M, C)
    dweights: B::Buf,                 // (N·k)
    dlogits: B::Buf,                  // (N, E)
    dc2: B::Buf,                      // (N, C)
    shared: Option<(B::Buf, B::Buf)>, // dh (N, SF), dgu (N, 2SF)
    host_dw: Vec<f32>,
    host_dl: Vec<f32>,
}

impl<B: Backend> MoeScratch<B> {
    pub fn new(be: &B, d: &Dims, m: &Moe, n: usize) -> Self {
        let (c, f, slots) = (d.channels, m.hidden, n * m.top_k);
        MoeScratch {
            dys: be.alloc_act(slots * c),
            dh: be.alloc_act(slots * f),
            dgu: be.alloc_act(slots * 2 * f),
            dxs: be.alloc_act(slots * c),
            dweights: be.alloc(slots),
            dlogits: be.alloc(n * m.experts),
            dc2: be.alloc_act(n * c),
            shared: (m.shared > 0).then(|| (be.alloc_act(n * m.shared * f), be.alloc_act(n * 2 * m.shared * f))),
            host_dw: vec![0.0; slots],
            host_dl: Vec::with_capacity(n * m.experts),
        }
    }
}

/// Each expert with rows, as a segment of a grouped product: its rows of `out` (row width
/// `out.1`) and `inp` (row width `inp.1`) and its `weight`.
fn segments<'a, B: Backend>(
    p: &'a ParamSet<B>,
    mt: &MoeTensors,
    plan: &Plan,
    out: (&'a B::Buf, usize),
    inp: (&'a B::Buf, usize),
    weight: fn(&Expert) -> Tensor,
) -> Vec<Segment<'a, B::Buf>> {
    (0..mt.experts.len())
        .filter(|&ex| plan.count(ex) > 0)
        .map(|ex| {
            let (o, r) = (plan.offsets[ex], plan.count(ex));
            let (out, inp) = (w::<B>(out.0).sub(o * out.1, r * out.1), w::<B>(inp.0).sub(o * inp.1, r * inp.1));
            Segment { out, inp, w: p.p(weight(&mt.experts[ex])), rows: r }
        })
        .collect()
}

/// For the experts with rows: their rows of the input gradient `dinp` (row width `dinp.1`) and
/// the gradient of their `weight`.
type Grads<'a, B> = (Vec<View<'a, <B as Backend>::Buf>>, Vec<View<'a, <B as Backend>::Buf>>);
fn expert_grads<'a, B: Backend>(
    p: &'a ParamSet<B>,
    mt: &MoeTensors,
    plan: &Plan,
    dinp: (&'a B::Buf, usize),
    weight: fn(&Expert) -> Tensor,
) -> Grads<'a, B> {
    (0..mt.experts.len())
        .filter(|&ex| plan.count(ex) > 0)
        .map(|ex| {
            let (o, r) = (plan.offsets[ex], plan.count(ex));
            (w::<B>(dinp.0).sub(o * dinp.1, r * dinp.1), p.g(weight(&mt.experts[ex])))
        })
        .unzip()
}

/// y (N, C) = the MoE MLP of x (N, C) (overwritten); `tmp` (N, C) is scratch.
pub fn forward<B: Backend>(
    be: &B,
    p: &ParamSet<B>,
    mt: &MoeTensors,
    d: &Dims,
    m: &Moe,
    a: &mut MoeActs<B>,
    x: &B::Buf,
    y: &B::Buf,
    tmp: &B::Buf,
    n: usize,
) {
    let (c, e, k, f) = (d.channels, m.experts, m.top_k, m.hidden);
    // Route on the host from the logits (and the balancing bias).
    be.matmul_forward(w::<B>(&a.logits), w::<B>(x), p.p(mt.routerw), None, n, c, e);
    be.download(w::<B>(&a.logits), &mut a.host_logits);
    let sigmoid = m.routing == Routing::Sigmoid;
    if sigmoid {
        be.download(p.p(mt.router_bias.expect("sigmoid routing has a balancing bias")), &mut a.host_bias);
    }
    moe::route_into(&mut a.route, &a.host_logits, sigmoid.then_some(&a.host_bias[..]), n, e, k, m.routing);
    a.plan.refill(&a.route.experts, n, e, k);
    (a.aux, a.aux_grad) = if m.aux > 0.0 { moe::aux_loss(&a.route, n, e, k, m.routing, m.aux) } else { (0.0, Vec::new()) };
    be.upload_ids(&a.rows, &a.plan.rows);
    be.upload_ids(&a.slots, &a.plan.slots);
    be.upload(w::<B>(&a.weights), &a.route.weights);
    // Each expert on its own contiguous rows (gathered), its products as one grouped call per
    // product (a backend may run the experts side by side, and gather each expert's rows in its
    // own task).
    let gate_up = segments::<B>(p, mt, &a.plan, (&a.gu, 2 * f), (&a.xs, c), |x| x.gate_upw);
    be.matmul_forward_segments_gathered(&gate_up, w::<B>(&a.xs), w::<B>(x), &a.rows, c, 2 * f);
    be.swiglu_forward(w::<B>(&a.h), w::<B>(&a.gu), n * k, f);
    be.matmul_forward_segments(&segments::<B>(p, mt, &a.plan, (&a.ys, c), (&a.h, f), |x| x.downw), f, c);
    be.moe_combine(w::<B>(y), w::<B>(&a.ys), &a.slots, Some(w::<B>(&a.weights)), n, k, c);
    if let (Some((gu, h)), Some((shared_gate_upw, shared_downw))) = (&a.shared, mt.shared) {
        let sf = m.shared * f;
        be.matmul_forward(w::<B>(gu), w::<B>(x), p.p(shared_gate_upw), None, n, c, 2 * sf);
        be.swiglu_forward(w::<B>(h), w::<B>(gu), n, sf);
        be.matmul_forward(w::<B>(tmp), w::<B>(h), p.p(shared_downw), None, n, sf, c);
        be.add_assign(w::<B>(y), w::<B>(tmp));
    }
}

/// dx (N, C) of the MoE MLP (overwritten) from its output's gradient `dy`; parameter gradients
/// accumulate.
pub fn backward<B: Backend>(
    be: &B,
    p: &ParamSet<B>,
    mt: &MoeTensors,
    d: &Dims,
    m: &Moe,
    a: &MoeActs<B>,
    s: &mut MoeScratch<B>,
    x: &B::Buf,
    dy: View<B::Buf>,
    dx: &B::Buf,
    n: usize,
) {
    let (c, e, k, f) = (d.channels, m.experts, m.top_k, m.hidden);
    // Shared experts: a dense SwiGLU; its input gradient starts dx.
    let shared = match (&a.shared, &s.shared, mt.shared) {
        (Some((gu, h)), Some((dh, dgu)), Some((shared_gate_upw, shared_downw))) => {
            let sf = m.shared * f;
            be.matmul_backward(Some(w::<B>(dh)), p.g(shared_downw), None, dy, w::<B>(h), p.p(shared_downw), n, sf, c);
            be.swiglu_backward(w::<B>(dgu), w::<B>(gu), w::<B>(dh), n, sf);
            be.matmul_backward(Some(w::<B>(dx)), p.g(shared_gate_upw), None, w::<B>(dgu), w::<B>(x), p.p(shared_gate_upw), n, c, 2 * sf);
            true
        }
        _ => false,
    };
    // Routed experts: the combine, each expert's SwiGLU, the gather's adjoint. The combine's
    // backward makes the down projections' dout; then dh and their gradients, all experts in one
    // grouped call.
    let down = segments::<B>(p, mt, &a.plan, (&s.dys, c), (&a.h, f), |x| x.downw);
    let (dh, dwd) = expert_grads::<B>(p, mt, &a.plan, (&s.dh, f), |x| x.downw);
    let (dys, dweights, ys, weights) = (w::<B>(&s.dys), w::<B>(&s.dweights), w::<B>(&a.ys), w::<B>(&a.weights));
    be.moe_combine_backward_segments(&down, &dh, &dwd, MoeCombine { dys, dweights, dout: dy, ys, slots: &a.slots, weights, n, k }, f, c);
    be.swiglu_backward(w::<B>(&s.dgu), w::<B>(&a.gu), w::<B>(&s.dh), n * k, f);
    let gate_up = segments::<B>(p, mt, &a.plan, (&s.dgu, 2 * f), (&a.xs, c), |x| x.gate_upw);
    let (dxs, dwg) = expert_grads::<B>(p, mt, &a.plan, (&s.dxs, c), |x| x.gate_upw);
    be.matmul_backward_segments(&gate_up, &dxs, &dwg, c, 2 * f);
    // The gather's adjoint: dx itself without shared experts, or added to theirs.
    if shared {
        be.moe_combine(w::<B>(&s.dc2), w::<B>(&s.dxs), &a.slots, None, n, k, c);
        be.add_assign(w::<B>(dx), w::<B>(&s.dc2));
    } else {
        be.moe_combine(w::<B>(dx), w::<B>(&s.dxs), &a.slots, None, n, k, c);
    }
    // The router, through the weights (the selection itself has no gradient).
    be.download(w::<B>(&s.dweights), &mut s.host_dw);
    moe::route_backward_into(&mut s.host_dl, &a.route, &s.host_dw, n, e, k, m.routing);
    // The balancing loss's own gradient (made in the forward), added to the logits'.
    s.host_dl.iter_mut().zip(&a.aux_grad).for_each(|(d, g)| *d += g);
    be.upload(w::<B>(&s.dlogits), &s.host_dl);
    be.matmul_backward_add(w::<B>(dx), w::<B>(&s.dc2), p.g(mt.routerw), None, w::<B>(&s.dlogits), w::<B>(x), p.p(mt.routerw), n, c, e);
}
