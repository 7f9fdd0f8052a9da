//! A unit's tensors, as both the model and the optimizer see them (the role candle's
//! `Var`/`VarMap` play): a [`Layout`] of named tensors ([`ParamSpec`]), one contiguous buffer of
//! parameters and one of gradients in that layout ([`ParamSet`]), the optimizer state in the same
//! layout ([`OptState`]), and the host snapshot of all of it ([`UnitState`]) that growth,
//! checkpoints and layer moves pass around.
//!
//! This module depends on the backend only: `model` (which builds units) and `optim` (which
//! updates them) both use it, and neither imports the other.

use crate::backend::{Backend, View};

/// One tensor of a unit: its name, shape and offset in the unit's buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    /// An embedding table (`wte`, `wpe`): Muon or NSGD per `embedding_optimizer`, AdamW under
    /// `muon_adamw`.
    pub is_embedding: bool,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// A 2-D tensor (Muon's domain; AdamW's weight-decay domain).
    pub fn is_matrix(&self) -> bool {
        self.shape.len() == 2
    }
    pub fn rows(&self) -> usize {
        self.shape[0]
    }
    pub fn cols(&self) -> usize {
        self.shape[1..].iter().product()
    }
}

/// A typed handle to one tensor of a unit: where it sits in the unit's one buffer (parameters,
/// gradients and, unsharded, optimizer state alike). A unit's handles are made once, with its
/// layout, by a [`LayoutBuilder`]; the forward and backward read tensors through them, never by
/// name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tensor {
    pub offset: usize,
    pub len: usize,
}

impl Tensor {
    /// This tensor's values in a host copy of the unit's buffer.
    pub fn of(self, host: &[f32]) -> &[f32] {
        &host[self.offset..self.offset + self.len]
    }
    /// This tensor's values in a host copy of the unit's buffer, to write.
    pub fn of_mut(self, host: &mut [f32]) -> &mut [f32] {
        &mut host[self.offset..self.offset + self.len]
    }
    /// This tensor in a device buffer of the unit's layout.
    pub fn view<Buf>(self, buf: &Buf) -> View<'_, Buf> {
        View::new(buf, self.offset, self.len)
    }
}

/// Builds a [`Layout`] one tensor at a time, handing back each tensor's [`Tensor`] handle: a
/// unit's table of tensors is written once, as the fields of its handle struct, in buffer order.
#[derive(Default)]
pub struct LayoutBuilder {
    specs: Vec<ParamSpec>,
    total: usize,
}

impl LayoutBuilder {
    /// Append tensor `name` of `shape`. The embedding tables are the ones named `wte`, `wpe`
    /// and an untied `lm_head` (the vocabulary-sized matrix the optimizer treats like `wte`).
    pub fn add(&mut self, name: impl Into<String>, shape: &[usize]) -> Tensor {
        let name = name.into();
        let is_embedding = matches!(name.as_str(), "wte" | "wpe" | "lm_head");
        let spec = ParamSpec { name, shape: shape.to_vec(), offset: self.total, is_embedding };
        let t = Tensor { offset: self.total, len: spec.numel() };
        self.total += t.len;
        self.specs.push(spec);
        t
    }
    pub fn finish(self) -> Layout {
        Layout { specs: self.specs, total: self.total }
    }
}

/// The tensors of a unit, in buffer order.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub specs: Vec<ParamSpec>,
    pub total: usize,
}

impl Layout {
    /// Build from (name, shape) in order (see [`LayoutBuilder::add`] for the embedding tables).
    pub fn new(tensors: &[(&str, Vec<usize>)]) -> Self {
        let mut b = LayoutBuilder::default();
        for (name, shape) in tensors {
            b.add(*name, shape);
        }
        b.finish()
    }
    /// The named tensor's values in a unit's flat parameter vector of this layout.
    pub fn slice<'a>(&self, params: &'a [f32], name: &str) -> &'a [f32] {
        let s = self.get(name);
        &params[s.offset..s.offset + s.numel()]
    }
    pub fn get(&self, name: &str) -> &ParamSpec {
        self.specs.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no tensor named {name} in layout"))
    }
    /// The named tensor, if the layout has it.
    pub fn find(&self, name: &str) -> Option<&ParamSpec> {
        self.specs.iter().find(|s| s.name == name)
    }
    pub fn index(&self, name: &str) -> usize {
        self.specs.iter().position(|s| s.name == name).unwrap_or_else(|| panic!("no tensor named {name} in layout"))
    }
}

/// A unit's parameters, gradients and optimizer state, all in the same layout.
pub struct ParamSet<B: Backend> {
    pub layout: Layout,
    pub params: B::Buf,
    pub grads: B::Buf,
    pub state: OptState<B>,
}

impl<B: Backend> ParamSet<B> {
    pub fn new(be: &B, layout: Layout) -> Self {
        let params = be.alloc(layout.total);
        let grads = be.alloc(layout.total);
        let state = OptState::new(be, &layout);
        ParamSet { layout, params, grads, state }
    }
    /// View of one parameter tensor.
    pub fn p(&self, t: Tensor) -> View<'_, B::Buf> {
        t.view(&self.params)
    }
    /// View of one gradient tensor.
    pub fn g(&self, t: Tensor) -> View<'_, B::Buf> {
        t.view(&self.grads)
    }
    pub fn zero_grad(&self, be: &B) {
        be.zero_grads(B::whole(&self.grads));
    }
    pub fn numel(&self) -> usize {
        self.layout.total
    }
    /// Host copy of all parameters (checkpoints, tests).
    pub fn params_to_host(&self, be: &B) -> Vec<f32> {
        let mut v = vec![0.0; self.layout.total];
        be.download(B::whole(&self.params), &mut v);
        v
    }
    pub fn grads_to_host(&self, be: &B) -> Vec<f32> {
        let mut v = vec![0.0; self.layout.total];
        be.download(B::whole(&self.grads), &mut v);
        v
    }
    pub fn params_from_host(&self, be: &B, host: &[f32]) {
        be.upload(B::whole(&self.params), host);
    }
    pub fn grads_from_host(&self, be: &B, host: &[f32]) {
        be.upload(B::whole(&self.grads), host);
    }
}

/// ZeRO-1: the tensors of a unit whose optimizer state this data-parallel replica keeps (and
/// updates), and where each sits in its compact state buffers. Every tensor has exactly one
/// owner among the replicas.
#[derive(Clone, Debug, PartialEq)]
pub struct Shard {
    /// Per tensor of the layout: its offset in the compact state, if this replica owns it.
    offsets: Vec<Option<usize>>,
    /// Values of the compact state.
    pub total: usize,
}

impl Shard {
    /// Replica `replica`'s share of `layout` among `replicas`: tensors are dealt largest first
    /// to the least-loaded replica (ties to the lowest index after rotating by `salt`, so that
    /// the units of a stack do not all load the same replica). The same on every replica.
    pub fn new(layout: &Layout, replica: usize, replicas: usize, salt: u64) -> Self {
        let mut order: Vec<usize> = (0..layout.specs.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(layout.specs[i].numel()), i));
        let mut load = vec![0usize; replicas.max(1)];
        let mut owner = vec![0usize; layout.specs.len()];
        let rot = (salt % replicas.max(1) as u64) as usize;
        for i in order {
            let r = (0..load.len()).map(|k| (k + rot) % load.len()).min_by_key(|&r| load[r]).expect("one replica at least");
            load[r] += layout.specs[i].numel();
            owner[i] = r;
        }
        let mut total = 0;
        let offsets = layout
            .specs
            .iter()
            .zip(&owner)
            .map(|(spec, &o)| {
                (o == replica).then(|| {
                    total += spec.numel();
                    total - spec.numel()
                })
            })
            .collect();
        Shard { offsets, total }
    }

    pub fn owns(&self, i: usize) -> bool {
        self.offsets[i].is_some()
    }
}

/// A unit's optimizer state, in the unit's layout (or, sharded, in the compact layout of the
/// tensors this replica owns).
pub struct OptState<B: Backend> {
    /// First moment / momentum, same layout as the parameters.
    pub m: B::Buf,
    /// Second moment (AdamW only), allocated on first use.
    pub v: Option<B::Buf>,
    /// Steps taken by each tensor (index = the tensor's index in the layout). Counted for every
    /// tensor on every replica, sharded or not.
    pub steps: Vec<u64>,
    /// ZeRO-1: only the owned tensors' state is here.
    pub shard: Option<Shard>,
}

impl<B: Backend> OptState<B> {
    pub fn new(be: &B, layout: &Layout) -> Self {
        OptState { m: be.alloc(layout.total), v: None, steps: vec![0; layout.specs.len()], shard: None }
    }

    /// Values in each state buffer (the layout's total, or the shard's).
    pub fn len(&self) -> usize {
        B::buf_len(&self.m)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where tensor `i` (of `spec`) keeps its state here: None if another replica owns it.
    pub fn offset(&self, i: usize, spec: &ParamSpec) -> Option<usize> {
        match &self.shard {
            None => Some(spec.offset),
            Some(s) => s.offsets[i],
        }
    }

    /// Zero every moment and step counter (the `reset` policy).
    pub fn reset(&mut self, be: &B) {
        be.fill(B::whole(&self.m), 0.0);
        if let Some(v) = &self.v {
            be.fill(B::whole(v), 0.0);
        }
        self.steps.iter_mut().for_each(|s| *s = 0);
    }

    /// Copy all state from `src` (same layout, same sharding), e.g. a copied block inheriting its
    /// source's.
    pub fn copy_from(&mut self, be: &B, src: &OptState<B>) {
        assert_eq!(self.shard, src.shard, "optimizer state copied between different shardings");
        be.copy(B::whole(&self.m), B::whole(&src.m));
        match (&src.v, &self.v) {
            (Some(sv), Some(dv)) => be.copy(B::whole(dv), B::whole(sv)),
            (Some(sv), None) => {
                let dv = be.alloc(B::buf_len(sv));
                be.copy(B::whole(&dv), B::whole(sv));
                self.v = Some(dv);
            }
            (None, Some(dv)) => be.fill(B::whole(dv), 0.0),
            (None, None) => {}
        }
        self.steps.clone_from(&src.steps);
    }
}

/// A host snapshot of a unit: parameters and optimizer state. Used by growth (`copying` reads
/// its sources this way, as a layer actor answers `GetState`) and by checkpoints.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UnitState {
    pub params: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Option<Vec<f32>>,
    pub steps: Vec<u64>,
}

impl<B: Backend> ParamSet<B> {
    /// Parameters and optimizer state on the host. Sharded (ZeRO-1), the state of tensors other
    /// replicas own is -0.0: summing the snapshots of all replicas gives the whole state
    /// exactly (x + (-0.0) = x for every x, signed zeros included).
    pub fn snapshot(&self, be: &B) -> UnitState {
        let n = self.layout.total;
        let full = |buf: &B::Buf| -> Vec<f32> {
            let mut h = vec![0.0; n];
            match &self.state.shard {
                None => be.download(B::whole(buf), &mut h),
                Some(_) => {
                    h.fill(-0.0);
                    for (i, spec) in self.layout.specs.iter().enumerate() {
                        if let Some(o) = self.state.offset(i, spec) {
                            let k = spec.numel();
                            be.download(View::new(buf, o, k), &mut h[spec.offset..spec.offset + k]);
                        }
                    }
                }
            }
            h
        };
        let m = full(&self.state.m);
        let v = self.state.v.as_ref().map(full);
        UnitState { params: self.params_to_host(be), m, v, steps: self.state.steps.clone() }
    }

    /// Load parameters and optimizer state from a snapshot of the same layout (sharded: the
    /// owned tensors' state only).
    pub fn restore(&mut self, be: &B, s: &UnitState) -> anyhow::Result<()> {
        let n = self.layout.total;
        anyhow::ensure!(
            s.params.len() == n && s.m.len() == n && s.steps.len() == self.layout.specs.len(),
            "unit state does not match the layout: {} params for {n}, {} step counters for {} tensors",
            s.params.len(),
            s.steps.len(),
            self.layout.specs.len()
        );
        if let Some(v) = &s.v {
            anyhow::ensure!(v.len() == n, "second-moment state of {} values for {n} parameters", v.len());
        }
        self.params_from_host(be, &s.params);
        let len = self.state.len();
        let put = |dst: &B::Buf, src: &[f32]| match &self.state.shard {
            None => be.upload(B::whole(dst), src),
            Some(_) => {
                for (i, spec) in self.layout.specs.iter().enumerate() {
                    if let Some(o) = self.state.offset(i, spec) {
                        be.upload(View::new(dst, o, spec.numel()), &src[spec.offset..spec.offset + spec.numel()]);
                    }
                }
            }
        };
        put(&self.state.m, &s.m);
        let v = s.v.as_ref().map(|v| {
            let dst = be.alloc(len);
            put(&dst, v);
            dst
        });
        self.state.v = v;
        self.state.steps.clone_from(&s.steps);
        Ok(())
    }

    /// ZeRO-1: keep only the optimizer state of the tensors `shard` gives this replica (moved
    /// into compact buffers); the rest is dropped.
    pub fn shard_state(&mut self, be: &B, shard: Shard) {
        let st = self.snapshot(be);
        self.state.m = be.alloc(shard.total);
        self.state.v = None;
        self.state.shard = Some(shard);
        self.restore(be, &st).expect("the state of this very unit");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    fn layout() -> Layout {
        Layout::new(&[("a", vec![4, 8]), ("b", vec![8]), ("c", vec![8, 8]), ("d", vec![2]), ("e", vec![4, 4])])
    }

    #[test]
    fn every_tensor_has_one_owner_and_the_shares_are_balanced() {
        let l = layout();
        for replicas in 1..=4 {
            let shards: Vec<Shard> = (0..replicas).map(|r| Shard::new(&l, r, replicas, 7)).collect();
            for i in 0..l.specs.len() {
                assert_eq!(shards.iter().filter(|s| s.owns(i)).count(), 1, "tensor {i} with {replicas} replicas");
            }
            assert_eq!(shards.iter().map(|s| s.total).sum::<usize>(), l.total);
            // Largest-first to the least loaded: no share above the mean plus the largest tensor.
            let max = shards.iter().map(|s| s.total).max().unwrap();
            assert!(max <= l.total / replicas + 64, "{replicas}: {:?}", shards.iter().map(|s| s.total).collect::<Vec<_>>());
        }
    }

    #[test]
    fn sharded_snapshots_sum_to_the_whole_state_exactly() {
        let be = CpuBackend::default();
        let l = layout();
        let n = l.total;
        let st = UnitState {
            params: (0..n).map(|i| i as f32 * 0.5).collect(),
            m: (0..n).map(|i| if i % 7 == 0 { -0.0 } else { (i as f32).sin() }).collect(),
            v: Some((0..n).map(|i| (i as f32).cos().abs()).collect()),
            steps: vec![3, 1, 4, 1, 5],
        };
        let mut sum_m = vec![-0.0f32; n];
        let mut sum_v = vec![-0.0f32; n];
        let mut held = 0;
        for r in 0..3 {
            let mut set = ParamSet::new(&be, l.clone());
            set.restore(&be, &st).unwrap();
            set.shard_state(&be, Shard::new(&l, r, 3, 0));
            held += set.state.len();
            let snap = set.snapshot(&be);
            assert_eq!((&snap.params, &snap.steps), (&st.params, &st.steps));
            for i in 0..n {
                sum_m[i] += snap.m[i];
                sum_v[i] += snap.v.as_ref().unwrap()[i];
            }
        }
        assert_eq!(held, n, "each value of the state is held once");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&sum_m), bits(&st.m));
        assert_eq!(bits(&sum_v), bits(st.v.as_ref().unwrap()));
    }
}
