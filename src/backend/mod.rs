//! The compute layer: one `Backend` trait, explicit forward and backward per op.
//!
//! A backend value is **a stream on a device**: every op enqueues on it, in order, and the host
//! only learns results at explicit read-back points ([`Backend::download`]). This is the shape of
//! an asynchronous GPU, and the CPU reference follows it so that code written against the trait
//! (model units, optimizers, the actor runtime) is already correct for a device. A pipeline stage
//! owns one backend value (its stream); [`Backend::fork`] makes another stream on the same device.
//!
//! Memory is addressed like device memory: a buffer handle (`Buf`, f32; `Ids`, u32 token ids) plus
//! an offset, packaged as a [`View`]. Ops take views by shared reference for inputs *and* outputs,
//! as a GPU kernel takes pointers: the stream, not Rust's borrow checker, orders the writes. The
//! contract every op keeps (and the CPU backend checks at run time): an output view never overlaps
//! any view of the same call, unless the op documents that it works in place.
//!
//! Why views into contiguous buffers instead of one buffer per tensor: a unit (embedding, block,
//! head) keeps all its parameters in ONE buffer and all its gradients in another with the same
//! layout, so that checkpoints, gradient norms, optimizer state and growth copy whole units at a
//! time, and inserting a layer is spawning its owner, never repacking a global buffer.
//!
//! Conventions (llm.c's): row-major; a linear layer's weight is (OC, C) and computes
//! `out = inp @ w^T + b`; parameter gradients ACCUMULATE (`+=`, so micro-batches sum before a
//! step and the caller zeroes them after it); activation gradients named `dinp` are OVERWRITTEN
//! unless an op says otherwise.
//!
//! **What a device error does.** Ops return nothing: a failure of the device itself (a CUDA
//! launch or copy error, an allocation that the device cannot satisfy, a buffer of another
//! device) panics with the op and the device in its message. Inside the actor runtime that panic
//! fails the actor that owns the stream; the supervisor (`runtime::supervisor`) receives
//! the failure and reports it as a named actor failure — `layer 3 (cuda:1) failed at step 120:
//! …` (`RunError::ActorFailed`) — then stops the run, or rebuilds the pipeline from the newest
//! checkpoint when `supervision.restart_on_failure` is set. Errors that a caller can act on
//! (opening a device that does not exist, a missing CUDA library) are returned as `Result`s from
//! [`Backend::open`] instead, before any actor starts.
//!
//! Dimension legend used in shape comments: B batch, T time, C channels, NH heads, hs = C/NH,
//! OC output channels, V vocabulary, Vp padded vocabulary, N = B*T rows.

pub mod cpu;
pub mod cuda;
pub mod mode;
pub mod pool;
pub mod precision;
pub mod view;

pub use mode::{Attention, StreamMode};
pub use precision::Precision;
pub use view::{DeviceView, MoeCombine, Segment, View};

/// Whether a matrix operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trans {
    N,
    T,
}

/// A stream on a device, with the ops a GPT-2 training step needs.
///
/// Every op is explicit and paired forward/backward (llm.c style) because a pipeline stage must
/// take an upstream gradient and return the downstream one. None of them allocates: the caller
/// owns every buffer, including scratch.
pub trait Backend: Send + Sized + 'static {
    /// f32 device memory.
    type Buf: Send + 'static;
    /// u32 device memory (token ids, targets).
    type Ids: Send + 'static;
    /// A point in a stream's work that another stream can wait on.
    type Event: Send + 'static;

    /// A new stream on the named device (`cpu:N`, `cuda:N`). An unknown or absent device is an
    /// error naming it, never a panic.
    fn open(device: &str) -> anyhow::Result<Self>;
    /// The device this stream runs on, e.g. `cpu:0`, `cuda:1`.
    fn device(&self) -> &str;
    /// A new stream on the same device (in fp32: set its precision again).
    fn fork(&self) -> anyhow::Result<Self>;
    /// The precision this stream's matrix products compute in ([`precision`]); a stream opens in
    /// fp32. Only the products change: storage, master weights and optimizer state stay fp32.
    fn set_precision(&self, p: Precision) -> anyhow::Result<()>;
    fn precision(&self) -> Precision;
    /// The attention algorithm of this stream ([`Attention`]); a stream opens materialized. An
    /// algorithm the device cannot run in the stream's precision is an error naming both.
    fn set_attention(&self, a: Attention) -> anyhow::Result<()>;
    fn attention(&self) -> Attention;
    /// Floats of the state [`Backend::attention_forward`] saves for the backward (`att`).
    fn attention_state_len(&self, b: usize, t: usize, nh: usize) -> usize {
        match self.attention() {
            Attention::Materialized => b * nh * t * t,
            Attention::Flash => b * nh * t,
        }
    }
    /// Floats of the backward's scratch (`datt`).
    fn attention_scratch_len(&self, b: usize, t: usize, nh: usize) -> usize {
        self.attention_state_len(b, t, nh)
    }

    // ----- memory -----
    /// A zero-filled buffer of `n` f32.
    fn alloc(&self, n: usize) -> Self::Buf;
    /// A buffer for activations or their gradients, stored in [`Backend::storage`]'s precision
    /// (`alloc` buffers are fp32 always: parameters, gradients, optimizer state, statistics).
    fn alloc_act(&self, n: usize) -> Self::Buf {
        self.alloc(n)
    }
    /// What the activations of later [`Backend::alloc_act`] buffers are stored in
    /// (`precision.storage`): fp32, or bf16 (each op's writes rounded to bf16 as it ends).
    fn set_storage(&self, p: Precision) -> anyhow::Result<()> {
        match p {
            Precision::Fp32 => Ok(()),
            _ => anyhow::bail!("{p} activation storage is not implemented on {} yet (fp32 only)", self.device()),
        }
    }
    fn storage(&self) -> Precision {
        Precision::Fp32
    }
    fn alloc_ids(&self, n: usize) -> Self::Ids;
    fn buf_len(buf: &Self::Buf) -> usize;
    fn ids_len(ids: &Self::Ids) -> usize;
    fn upload(&self, dst: View<Self::Buf>, src: &[f32]);
    fn upload_ids(&self, dst: &Self::Ids, src: &[u32]);
    /// Copy to the host; waits for the stream's pending work (a synchronisation point).
    fn download(&self, src: View<Self::Buf>, dst: &mut [f32]);
    /// `dst = src`, both on this stream's device.
    fn copy(&self, dst: View<Self::Buf>, src: View<Self::Buf>);
    /// Whether `buf` lives on this stream's device. Ops may only touch local buffers; one handed
    /// over from another device is brought in with [`Backend::copy_peer`] first.
    fn is_local(&self, buf: &Self::Buf) -> bool;
    /// `dst = src` where `dst` is on this stream's device and `src` may live on another device
    /// (a peer copy on GPUs: direct over NVLink/PCIe where peer access is enabled, staged by the
    /// driver otherwise). Ordered on this stream; the caller has made it wait for `src`'s writer.
    fn copy_peer(&self, dst: View<Self::Buf>, src: View<Self::Buf>);
    fn fill(&self, dst: View<Self::Buf>, value: f32);
    /// Zero parameter gradients after an update. They are next read long after, by the following
    /// step's backward, so a backend may write them past its caches; by default
    /// [`Backend::fill`] with 0.
    fn zero_grads(&self, dst: View<Self::Buf>) {
        self.fill(dst, 0.0)
    }
    /// Where `v` lives on a device, for collectives that run there (NCCL); None on the host.
    fn device_view(&self, _v: View<Self::Buf>) -> Option<DeviceView> {
        None
    }
    /// Mark the current end of this stream's work.
    fn record(&self) -> Self::Event;
    /// Make this stream's later work wait for `event` (no host synchronisation).
    fn wait(&self, event: &Self::Event);
    /// Block the host until the stream's work is done.
    fn synchronize(&self);
    /// Run `f`, a unit's run of ops, where this backend issues them most cheaply. The CPU backend
    /// runs it on a thread of its compute pool, so that each op's parallel loop forks there
    /// instead of being handed into the pool (and waking it) from outside, one op at a time.
    /// A GPU backend runs `f` in place: its ops only enqueue work.
    fn within<R>(&self, f: impl FnOnce() -> R) -> R {
        f()
    }

    /// A whole buffer as a view.
    fn whole(buf: &Self::Buf) -> View<'_, Self::Buf> {
        View::new(buf, 0, Self::buf_len(buf))
    }

    // ----- elementwise and reductions -----
    /// `dst = a + b` (residual forward).
    fn add(&self, dst: View<Self::Buf>, a: View<Self::Buf>, b: View<Self::Buf>);
    /// `dst += src` (residual backward into an accumulating gradient). Works in place on `dst`.
    fn add_assign(&self, dst: View<Self::Buf>, src: View<Self::Buf>);
    /// `dst = alpha * dst + beta * src`. Works in place on `dst`.
    fn axpby(&self, dst: View<Self::Buf>, alpha: f32, beta: f32, src: View<Self::Buf>);
    /// `dst[0] = sum(x^2)` accumulated in f64 — stays on the device (norms for the optimizers).
    fn sumsq(&self, dst: View<Self::Buf>, x: View<Self::Buf>);
    /// `x *= 1 / (sqrt(ss[0]) + eps)` — Frobenius normalisation by a device-side sum of squares.
    fn scale_by_rnorm(&self, x: View<Self::Buf>, ss: View<Self::Buf>, eps: f32);

    // ----- matrix products -----
    /// `c = alpha * op(a) @ op(b) + beta * c`, row-major, op(a) (m, k), op(b) (k, n), c (m, n).
    fn gemm(
        &self,
        c: View<Self::Buf>,
        a: View<Self::Buf>,
        ta: Trans,
        b: View<Self::Buf>,
        tb: Trans,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        beta: f32,
    );
    /// `out = inp @ w^T + b`: inp (N, C), w (OC, C), b (OC), out (N, OC).
    fn matmul_forward(
        &self,
        out: View<Self::Buf>,
        inp: View<Self::Buf>,
        w: View<Self::Buf>,
        b: Option<View<Self::Buf>>,
        n: usize,
        c: usize,
        oc: usize,
    );
    /// `pre = inp @ w^T + b` and `out = gelu(pre)` (the MLP's first product and its activation,
    /// both kept for the backward). A backend may fuse them; by default they run in turn.
    #[allow(clippy::too_many_arguments)]
    fn matmul_forward_gelu(
        &self,
        out: View<Self::Buf>,
        pre: View<Self::Buf>,
        inp: View<Self::Buf>,
        w: View<Self::Buf>,
        b: Option<View<Self::Buf>>,
        n: usize,
        c: usize,
        oc: usize,
    ) {
        self.matmul_forward(pre, inp, w, b, n, c, oc);
        self.gelu_forward(out, pre);
    }
    /// [`Backend::matmul_forward`] without bias of several independent row segments that share
    /// (C, OC), each with its own weight (a mixture's experts): out_i (N_i, OC) = inp_i (N_i, C)
    /// @ w_i^T. A backend may run them side by side; by default they run in turn.
    fn matmul_forward_segments(&self, segments: &[Segment<'_, Self::Buf>], c: usize, oc: usize) {
        for s in segments {
            self.matmul_forward(s.out, s.inp, s.w, None, s.rows, c, oc);
        }
    }
    /// [`Backend::gather_rows`] (xs (M, C) = x[rows]) then [`Backend::matmul_forward_segments`]
    /// of products whose `inp` views are their rows of `xs`, in order from row 0 (a mixture's
    /// first expert products). A backend may gather each segment's rows just before its product,
    /// while they are in cache; by default the two run in turn. Either way `xs` holds the
    /// gathered rows after it (the backward reads them).
    fn matmul_forward_segments_gathered(
        &self,
        segments: &[Segment<'_, Self::Buf>],
        xs: View<Self::Buf>,
        x: View<Self::Buf>,
        rows: &Self::Ids,
        c: usize,
        oc: usize,
    ) {
        self.gather_rows(xs, x, rows, segments.iter().map(|s| s.rows).sum(), c);
        self.matmul_forward_segments(segments, c, oc);
    }
    /// [`Backend::matmul_backward`] without bias of the segments of a
    /// [`Backend::matmul_forward_segments`]: per segment, dinp_i = dout_i @ w_i (overwritten)
    /// and dw_i += dout_i^T @ inp_i, with `out` holding dout_i and `dinp` the segments' dinp_i.
    fn matmul_backward_segments(
        &self,
        segments: &[Segment<'_, Self::Buf>],
        dinp: &[View<'_, Self::Buf>],
        dw: &[View<'_, Self::Buf>],
        c: usize,
        oc: usize,
    ) {
        for ((s, di), dw) in segments.iter().zip(dinp).zip(dw) {
            self.matmul_backward(Some(*di), *dw, None, s.out, s.inp, s.w, s.rows, c, oc);
        }
    }
    /// The backward of `act = gelu(pre)` then `out = act @ w^T + b` (the MLP's activation and
    /// second product): dpre (N, C) = gelu'(pre) ⊙ (dout @ w), overwritten; dw (OC, C) +=
    /// dout^T @ act; db (OC) += column sums of dout. `dact` (N, C) is scratch for dout @ w, which
    /// a backend that fuses the two need not use; by default they run in turn.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward_gelu(
        &self,
        dpre: View<Self::Buf>,
        dact: View<Self::Buf>,
        dw: View<Self::Buf>,
        db: Option<View<Self::Buf>>,
        dout: View<Self::Buf>,
        act: View<Self::Buf>,
        w: View<Self::Buf>,
        pre: View<Self::Buf>,
        n: usize,
        c: usize,
        oc: usize,
    ) {
        self.matmul_backward(Some(dact), dw, db, dout, act, w, n, c, oc);
        self.gelu_backward(dpre, pre, dact);
    }
    /// [`Backend::matmul_backward`] with its input gradient added to `dinp` (dinp += dout @ w):
    /// a branch's input gradient joining another's. The same bits as `matmul_backward` into
    /// `scratch` (N, C) then [`Backend::add_assign`], which is what it does by default; a backend
    /// may add in place and leave `scratch` unwritten.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward_add(
        &self,
        dinp: View<Self::Buf>,
        scratch: View<Self::Buf>,
        dw: View<Self::Buf>,
        db: Option<View<Self::Buf>>,
        dout: View<Self::Buf>,
        inp: View<Self::Buf>,
        w: View<Self::Buf>,
        n: usize,
        c: usize,
        oc: usize,
    ) {
        self.matmul_backward(Some(scratch), dw, db, dout, inp, w, n, c, oc);
        self.add_assign(dinp, scratch);
    }
    /// dinp (N, C) = dout @ w (overwritten, skipped if None); dw (OC, C) += dout^T @ inp;
    /// db (OC) += column sums of dout.
    fn matmul_backward(
        &self,
        dinp: Option<View<Self::Buf>>,
        dw: View<Self::Buf>,
        db: Option<View<Self::Buf>>,
        dout: View<Self::Buf>,
        inp: View<Self::Buf>,
        w: View<Self::Buf>,
        n: usize,
        c: usize,
        oc: usize,
    );

    // ----- transformer ops -----
    /// out (B, T, C) = wte[ids] + wpe[t]; wte (Vp, C), wpe (maxT, C) or none (rotary models),
    /// ids (B, T).
    fn encoder_forward(
        &self,
        out: View<Self::Buf>,
        ids: &Self::Ids,
        wte: View<Self::Buf>,
        wpe: Option<View<Self::Buf>>,
        b: usize,
        t: usize,
        c: usize,
    );
    /// dwte[ids] += dout; dwpe[t] += dout (when there is a wpe).
    fn encoder_backward(
        &self,
        dwte: View<Self::Buf>,
        dwpe: Option<View<Self::Buf>>,
        dout: View<Self::Buf>,
        ids: &Self::Ids,
        b: usize,
        t: usize,
        c: usize,
    );
    /// out (N, C) = (inp - mean) * rstd * w + b; saves mean (N), rstd (N) for backward.
    fn layernorm_forward(
        &self,
        out: View<Self::Buf>,
        mean: View<Self::Buf>,
        rstd: View<Self::Buf>,
        inp: View<Self::Buf>,
        w: View<Self::Buf>,
        b: View<Self::Buf>,
        n: usize,
        c: usize,
    );
    /// dinp += (ACCUMULATES: the residual stream's gradient); dw += ; db += .
    fn layernorm_backward(
        &self,
        dinp: View<Self::Buf>,
        dw: View<Self::Buf>,
        db: View<Self::Buf>,
        dout: View<Self::Buf>,
        inp: View<Self::Buf>,
        w: View<Self::Buf>,
        mean: View<Self::Buf>,
        rstd: View<Self::Buf>,
        n: usize,
        c: usize,
    );
    /// The residual add and the LayerNorm after it: res = x + α·y, then out = layernorm(res)
    /// (mean, rstd kept), as [`Backend::add`] (α = 1) or copy + [`Backend::axpby`] and
    /// [`Backend::layernorm_forward`] compute them. A backend may fuse them into one pass over
    /// the rows; by default they run in turn.
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_forward(
        &self,
        res: View<Self::Buf>,
        out: View<Self::Buf>,
        mean: View<Self::Buf>,
        rstd: View<Self::Buf>,
        x: View<Self::Buf>,
        y: View<Self::Buf>,
        alpha: f32,
        w: View<Self::Buf>,
        b: View<Self::Buf>,
        n: usize,
        c: usize,
    ) {
        self.residual_add(res, x, y, alpha);
        self.layernorm_forward(out, mean, rstd, res, w, b, n, c);
    }
    /// The residual add and the RMSNorm after it (as [`Backend::residual_layernorm_forward`]).
    #[allow(clippy::too_many_arguments)]
    fn residual_rmsnorm_forward(
        &self,
        res: View<Self::Buf>,
        out: View<Self::Buf>,
        rstd: View<Self::Buf>,
        x: View<Self::Buf>,
        y: View<Self::Buf>,
        alpha: f32,
        w: View<Self::Buf>,
        n: usize,
        c: usize,
        eps: f32,
    ) {
        self.residual_add(res, x, y, alpha);
        self.rmsnorm_forward(out, rstd, res, w, n, c, eps);
    }
    /// res = x + α·y: [`Backend::add`] when α = 1, else res = 1·x + α·y by copy and
    /// [`Backend::axpby`] (the residual branch multiplier, `Dims::residual`).
    fn residual_add(&self, res: View<Self::Buf>, x: View<Self::Buf>, y: View<Self::Buf>, alpha: f32) {
        if alpha == 1.0 {
            self.add(res, x, y);
        } else {
            self.copy(res, x);
            self.axpby(res, 1.0, alpha, y);
        }
    }
    /// Causal multi-head self-attention, scale 1/sqrt(hs).
    /// qkv (B, T, 3C) -> out (B, T, C); saves `att` ([`Backend::attention_state_len`] floats):
    /// the (B, NH, T, T) post-softmax probabilities, or with flash attention the (B, NH, T)
    /// logsumexp of each row's scores.
    fn attention_forward(&self, out: View<Self::Buf>, att: View<Self::Buf>, qkv: View<Self::Buf>, b: usize, t: usize, c: usize, nh: usize);
    /// dqkv (B, T, 3C) overwritten; datt ([`Backend::attention_scratch_len`]) is scratch;
    /// out (B, T, C) is the forward's output (flash attention's backward needs rowsum(dout·out)).
    fn attention_backward(
        &self,
        dqkv: View<Self::Buf>,
        datt: View<Self::Buf>,
        dout: View<Self::Buf>,
        qkv: View<Self::Buf>,
        out: View<Self::Buf>,
        att: View<Self::Buf>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    );
    /// RMSNorm over rows of C: out = x · rstd · w, rstd = 1 / sqrt(mean(x²) + eps), kept (N).
    fn rmsnorm_forward(
        &self,
        out: View<Self::Buf>,
        rstd: View<Self::Buf>,
        inp: View<Self::Buf>,
        w: View<Self::Buf>,
        n: usize,
        c: usize,
        eps: f32,
    );
    /// dinp += (ACCUMULATES, as LayerNorm's); dw += .
    fn rmsnorm_backward(
        &self,
        dinp: View<Self::Buf>,
        dw: View<Self::Buf>,
        dout: View<Self::Buf>,
        inp: View<Self::Buf>,
        w: View<Self::Buf>,
        rstd: View<Self::Buf>,
        n: usize,
        c: usize,
    );
    /// Per-head RMSNorm (qwen3's QK-norm): in each of `rows` rows of `stride` floats, the first
    /// `heads` vectors of `hd` floats become x · rstd · w, w (hd) shared by the heads; rstd
    /// (rows · heads) is kept. `out` has `inp`'s layout; only those vectors are written.
    fn head_rmsnorm_forward(
        &self,
        out: View<Self::Buf>,
        rstd: View<Self::Buf>,
        inp: View<Self::Buf>,
        w: View<Self::Buf>,
        rows: usize,
        stride: usize,
        heads: usize,
        hd: usize,
        eps: f32,
    );
    /// The backward of [`Backend::head_rmsnorm_forward`], IN PLACE: `d` holds the gradient of
    /// the output vectors on entry and that of the input vectors on return (the other floats of
    /// each row are left alone); dw += Σ over every vector of norm · dout.
    fn head_rmsnorm_backward(
        &self,
        d: View<Self::Buf>,
        dw: View<Self::Buf>,
        inp: View<Self::Buf>,
        w: View<Self::Buf>,
        rstd: View<Self::Buf>,
        rows: usize,
        stride: usize,
        heads: usize,
        hd: usize,
    );
    /// Mixture of experts: out (M, C)[i] = inp[rows[i]] — each expert's tokens gathered into
    /// contiguous rows (`model::moe::Plan`).
    fn gather_rows(&self, out: View<Self::Buf>, inp: View<Self::Buf>, rows: &Self::Ids, m: usize, c: usize);
    /// Mixture of experts: out (N, C)[t] = Σ_j w[t, j] · ys[slots[t, j]] over the k choices of
    /// each token, in choice order (overwritten; w = 1 when `weights` is None, which makes this
    /// the adjoint of [`Backend::gather_rows`]).
    fn moe_combine(
        &self,
        out: View<Self::Buf>,
        ys: View<Self::Buf>,
        slots: &Self::Ids,
        weights: Option<View<Self::Buf>>,
        n: usize,
        k: usize,
        c: usize,
    );
    /// The backward of [`Backend::moe_combine`] (both overwritten): dys[slots[t, j]] =
    /// w[t, j] · dout[t] and dweights[t, j] = dout[t] · ys[slots[t, j]].
    fn moe_combine_backward(
        &self,
        dys: View<Self::Buf>,
        dweights: View<Self::Buf>,
        dout: View<Self::Buf>,
        ys: View<Self::Buf>,
        slots: &Self::Ids,
        weights: View<Self::Buf>,
        n: usize,
        k: usize,
        c: usize,
    );
    /// [`Backend::moe_combine_backward`] (into `dys` (M, C) and `dweights`), then
    /// [`Backend::matmul_backward_segments`] of the experts' down products (F → C), whose `out`
    /// views are their rows of `dys`: the combine's backward makes the products' dout. A backend
    /// may make each expert's rows of dout just before its products, while they are in cache,
    /// and then need not write `dys`; by default the two run in turn. `dinp` and `dw` are as in
    /// `matmul_backward_segments`, `dweights` as in `moe_combine_backward`.
    #[allow(clippy::too_many_arguments)]
    fn moe_combine_backward_segments(
        &self,
        segments: &[Segment<'_, Self::Buf>],
        dinp: &[View<'_, Self::Buf>],
        dw: &[View<'_, Self::Buf>],
        combine: MoeCombine<'_, Self>,
        f: usize,
        c: usize,
    ) {
        let MoeCombine { dys, dweights, dout, ys, slots, weights, n, k } = combine;
        self.moe_combine_backward(dys, dweights, dout, ys, slots, weights, n, k, c);
        self.matmul_backward_segments(segments, dinp, dw, f, c);
    }
    /// Rotary positions in place on the first `heads` heads (size `hd`) of each of `rows` rows of
    /// `stride` floats (row r is position r mod t): pair (i, i + hd/2) rotated by
    /// pos · θ^(−2i/hd), the Hugging Face layout. `inverse` rotates back: the backward.
    fn rope(&self, x: View<Self::Buf>, rows: usize, t: usize, stride: usize, heads: usize, hd: usize, theta: f32, inverse: bool);
    /// Grouped-query attention's shared keys and values: out (N, 3·nh·hd) = [q | k | v] with
    /// query head h reading key/value head h / (nh / kv), from inp (N, (nh + 2·kv)·hd).
    fn gqa_expand(&self, out: View<Self::Buf>, inp: View<Self::Buf>, n: usize, nh: usize, kv: usize, hd: usize);
    /// The adjoint of `gqa_expand` (overwrites dinp): each key/value head's gradient is the sum
    /// over the query heads that read it.
    fn gqa_reduce(&self, dinp: View<Self::Buf>, dout: View<Self::Buf>, n: usize, nh: usize, kv: usize, hd: usize);
    /// out (N, F) = silu(gate) · up from inp (N, 2F) = [gate | up] per row.
    fn swiglu_forward(&self, out: View<Self::Buf>, inp: View<Self::Buf>, n: usize, f: usize);
    /// dinp (N, 2F) = [dgate | dup] (overwritten).
    fn swiglu_backward(&self, dinp: View<Self::Buf>, inp: View<Self::Buf>, dout: View<Self::Buf>, n: usize, f: usize);
    /// out = gelu(inp), tanh approximation.
    fn gelu_forward(&self, out: View<Self::Buf>, inp: View<Self::Buf>);
    /// dinp = gelu'(inp) * dout (overwritten).
    fn gelu_backward(&self, dinp: View<Self::Buf>, inp: View<Self::Buf>, dout: View<Self::Buf>);
    /// Fused softmax + cross-entropy over a padded vocabulary (llm.c's fused classifier).
    /// logits (N, Vp) is overwritten IN PLACE with dlogits = (softmax - onehot(target)) * dscale;
    /// columns V..Vp are masked: they take no probability and get zero gradient.
    /// losses (N) = -log softmax(logits)[target].
    fn crossentropy_forward_backward(
        &self,
        logits: View<Self::Buf>,
        losses: View<Self::Buf>,
        targets: &Self::Ids,
        dscale: f32,
        n: usize,
        v: usize,
        vp: usize,
    );

    // ----- optimizer kernels (one tensor at a time) -----
    /// AdamW with bias correction at this tensor's own step `t` (1-based) and decoupled decay:
    /// m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr (m̂ / (sqrt(v̂) + eps) + wd p).
    fn adamw_update(
        &self,
        p: View<Self::Buf>,
        g: View<Self::Buf>,
        m: View<Self::Buf>,
        v: View<Self::Buf>,
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        wd: f32,
        t: u64,
    );
    /// Momentum for Muon and NSGD: m = mu m + g; then u = g + mu m (Nesterov) or u = m.
    fn momentum_update(&self, u: View<Self::Buf>, m: View<Self::Buf>, g: View<Self::Buf>, mu: f32, nesterov: bool);
    /// p = p (1 - lr wd) - lr * scale * u (the final step of Muon and NSGD).
    fn apply_update(&self, p: View<Self::Buf>, u: View<Self::Buf>, lr: f32, scale: f32, wd: f32);
    /// p = p (1 - lr wd) - lr * u / (sqrt(ss[0]) + eps) — normalised SGD with a device-side norm.
    fn nsgd_apply(&self, p: View<Self::Buf>, u: View<Self::Buf>, ss: View<Self::Buf>, lr: f32, wd: f32, eps: f32);
}
