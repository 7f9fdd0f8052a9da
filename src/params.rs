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
    pub name: &'static str,
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

/// The tensors of a unit, in buffer order.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub specs: Vec<ParamSpec>,
    pub total: usize,
}

impl Layout {
    /// Build from (name, shape) in order; the embedding tables are the ones named `wte`, `wpe`.
    pub fn new(tensors: &[(&'static str, Vec<usize>)]) -> Self {
        let mut specs = Vec::with_capacity(tensors.len());
        let mut off = 0;
        for (name, shape) in tensors {
            let spec = ParamSpec { name, shape: shape.clone(), offset: off, is_embedding: matches!(*name, "wte" | "wpe") };
            off += spec.numel();
            specs.push(spec);
        }
        Layout { specs, total: off }
    }
    /// The named tensor's values in a unit's flat parameter vector of this layout.
    pub fn slice<'a>(&self, params: &'a [f32], name: &str) -> &'a [f32] {
        let s = self.get(name);
        &params[s.offset..s.offset + s.numel()]
    }
    pub fn get(&self, name: &str) -> &ParamSpec {
        self.specs.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no tensor named {name} in layout"))
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
    pub fn p(&self, name: &str) -> View<'_, B::Buf> {
        let s = self.layout.get(name);
        View::new(&self.params, s.offset, s.numel())
    }
    /// View of one gradient tensor.
    pub fn g(&self, name: &str) -> View<'_, B::Buf> {
        let s = self.layout.get(name);
        View::new(&self.grads, s.offset, s.numel())
    }
    pub fn zero_grad(&self, be: &B) {
        be.fill(B::whole(&self.grads), 0.0);
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

/// A unit's optimizer state, in the unit's layout.
pub struct OptState<B: Backend> {
    /// First moment / momentum, same layout as the parameters.
    pub m: B::Buf,
    /// Second moment (AdamW only), allocated on first use.
    pub v: Option<B::Buf>,
    /// Steps taken by each tensor (index = the tensor's index in the layout).
    pub steps: Vec<u64>,
}

impl<B: Backend> OptState<B> {
    pub fn new(be: &B, layout: &Layout) -> Self {
        OptState { m: be.alloc(layout.total), v: None, steps: vec![0; layout.specs.len()] }
    }

    /// Zero every moment and step counter (the `reset` policy).
    pub fn reset(&mut self, be: &B) {
        be.fill(B::whole(&self.m), 0.0);
        if let Some(v) = &self.v {
            be.fill(B::whole(v), 0.0);
        }
        self.steps.iter_mut().for_each(|s| *s = 0);
    }

    /// Copy all state from `src` (same layout), e.g. a copied block inheriting its source's.
    pub fn copy_from(&mut self, be: &B, src: &OptState<B>) {
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
    pub fn snapshot(&self, be: &B) -> UnitState {
        let mut m = vec![0.0; self.layout.total];
        be.download(B::whole(&self.state.m), &mut m);
        let v = self.state.v.as_ref().map(|v| {
            let mut h = vec![0.0; self.layout.total];
            be.download(B::whole(v), &mut h);
            h
        });
        UnitState { params: self.params_to_host(be), m, v, steps: self.state.steps.clone() }
    }

    /// Load parameters and optimizer state from a snapshot of the same layout.
    pub fn restore(&mut self, be: &B, s: &UnitState) -> anyhow::Result<()> {
        let n = self.layout.total;
        anyhow::ensure!(
            s.params.len() == n && s.m.len() == n && s.steps.len() == self.layout.specs.len(),
            "unit state does not match the layout: {} params for {n}, {} step counters for {} tensors",
            s.params.len(),
            s.steps.len(),
            self.layout.specs.len()
        );
        self.params_from_host(be, &s.params);
        be.upload(B::whole(&self.state.m), &s.m);
        match &s.v {
            Some(v) => {
                anyhow::ensure!(v.len() == n, "second-moment state of {} values for {n} parameters", v.len());
                let dst = be.alloc(n);
                be.upload(B::whole(&dst), v);
                self.state.v = Some(dst);
            }
            None => self.state.v = None,
        }
        self.state.steps.clone_from(&s.steps);
        Ok(())
    }
}
