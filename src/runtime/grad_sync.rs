//! Data parallelism inside a stage: the all-reduce of a unit's gradients, started as soon as
//! the unit's last backward of the step is done and awaited at the optimizer step
//! (`crate::dist`). Every stage (layer actor, embed-head actor) holds one.
//!
//! A stage knows its last backward by counting: each step it runs exactly `micro_batches`
//! backwards (its replica's share of the step), and growth, restarts and resumes all happen at
//! step boundaries, where the count is 0.

//!
//! With `parallel.collectives = "nccl"` the sum runs on the device instead, in place in the
//! unit's gradient buffer and on its stream ([`crate::dist::all_reduce_in_place`]): the
//! optimizer step, later on the same stream, is ordered after it, so there is nothing to wait
//! for at [`GradSync::finish`]. It runs with one replica too, over a communicator of one.
//!
//! With `parallel.zero = 1` (ZeRO-1) each replica keeps the optimizer state of its share of
//! every unit's tensors only ([`crate::params::Shard`]) and updates only those; after the
//! update the owners' new values are summed into every replica (the others contribute -0.0,
//! which leaves every value exact), so the weights are those of the unsharded run bitwise, and a
//! snapshot gathers the whole state the same way.

use crate::backend::Backend;
use crate::dist;
use crate::params::{ParamSet, Shard, UnitState};

pub struct GradSync {
    /// Backwards per step on this replica.
    micro_batches: usize,
    done: usize,
    pending: Vec<dist::Pending>,
    /// Host buffers of the last step's sums, in start order, reused for the next downloads
    /// (each unit's buffer comes back to it, so a steady run allocates nothing).
    spare: std::collections::VecDeque<Vec<f32>>,
    /// ZeRO-1 (`parallel.zero = 1` with several replicas).
    sharded: bool,
    /// This process's place in the run.
    topo: dist::Topology,
    /// Sum on the device (`parallel.collectives = "nccl"`).
    on_device: bool,
}

impl GradSync {
    pub fn new(micro_batches: usize, zero: bool, topo: dist::Topology) -> Self {
        let sharded = zero && topo.replicas > 1;
        let on_device = dist::on_device();
        GradSync { micro_batches: micro_batches.max(1), done: 0, pending: Vec::new(), spare: Default::default(), sharded, topo, on_device }
    }

    /// ZeRO-1: keep only this replica's share of `set`'s optimizer state (`salt` spreads the
    /// units' shares over the replicas). Nothing to do otherwise.
    pub fn shard<B: Backend>(&self, be: &B, set: &mut ParamSet<B>, salt: u64) {
        if self.sharded {
            let shard = Shard::new(&set.layout, self.topo.replica, self.topo.replicas, salt);
            set.shard_state(be, shard);
        }
    }

    /// ZeRO-1, after the optimizer step: every tensor's new values from its owner, in every
    /// replica. Every replica must call this for the same units in the same order.
    pub fn gather_params<B: Backend>(&mut self, be: &B, sets: &[&ParamSet<B>]) {
        if !self.sharded {
            return;
        }
        for set in sets {
            let mut host = self.spare.pop_front().unwrap_or_default();
            host.resize(set.layout.total, 0.0);
            be.download(B::whole(&set.params), &mut host);
            for (i, spec) in set.layout.specs.iter().enumerate() {
                if set.state.offset(i, spec).is_none() {
                    host[spec.offset..spec.offset + spec.numel()].fill(-0.0);
                }
            }
            let sum = dist::all_reduce_start(host).wait();
            set.params_from_host(be, &sum);
            self.spare.push_back(sum);
        }
    }

    /// A whole snapshot of `set`: sharded, the optimizer state is gathered from every replica
    /// (every replica must call this for the same units in the same order).
    pub fn snapshot<B: Backend>(&self, be: &B, set: &ParamSet<B>) -> UnitState {
        let mut st = set.snapshot(be);
        if !self.sharded {
            return st;
        }
        st.m = dist::all_reduce_start(std::mem::take(&mut st.m)).wait();
        // A second moment exists if any replica has one (AdamW state of a tensor it owns).
        let mut any_v = [if st.v.is_some() { 1.0 } else { 0.0 }];
        dist::all_reduce_sum_f64(&mut any_v);
        if any_v[0] > 0.0 {
            // None here is a second moment of zeros (as allocated) for the tensors this
            // replica owns, and -0.0 for the others, as every snapshot has them.
            let v = st.v.take().unwrap_or_else(|| {
                let mut v = vec![-0.0; set.layout.total];
                for (i, spec) in set.layout.specs.iter().enumerate() {
                    if set.state.offset(i, spec).is_some() {
                        v[spec.offset..spec.offset + spec.numel()].fill(0.0);
                    }
                }
                v
            });
            st.v = Some(dist::all_reduce_start(v).wait());
        }
        st
    }

    /// Count one backward; true when it was the step's last and the run has several replicas
    /// or sums on the device (then the caller starts its reductions, before handing anything on).
    pub fn backward_done(&mut self) -> bool {
        if self.topo.replicas == 1 && !self.on_device {
            return false;
        }
        self.done += 1;
        if self.done == self.micro_batches {
            self.done = 0;
            return true;
        }
        false
    }

    /// Start summing `set`'s gradients over the replicas.
    pub fn start<B: Backend>(&mut self, be: &B, set: &ParamSet<B>) {
        if self.on_device {
            let Some(v) = be.device_view(B::whole(&set.grads)) else {
                panic!("`parallel.collectives` = \"nccl\" on a backend without device memory (validation admits CUDA runs only)");
            };
            if let Err(e) = dist::all_reduce_in_place(v) {
                panic!("summing gradients over NCCL: {e:#}");
            }
            return;
        }
        let mut host = self.spare.pop_front().unwrap_or_default();
        host.resize(set.layout.total, 0.0);
        be.download(B::whole(&set.grads), &mut host);
        self.pending.push(dist::all_reduce_start(host));
    }

    /// Wait for the sums started, in order, and write them into `sets` (the same sets, in the
    /// same order, as the starts). Nothing to do in a one-process run.
    pub fn finish<B: Backend>(&mut self, be: &B, sets: &[&ParamSet<B>]) {
        if self.pending.is_empty() {
            return;
        }
        assert_eq!(self.pending.len(), sets.len(), "all-reduces started for {} units, finished for {}", self.pending.len(), sets.len());
        for (p, set) in self.pending.drain(..).zip(sets) {
            let sum = p.wait();
            set.grads_from_host(be, &sum);
            self.spare.push_back(sum);
        }
    }
}

impl<B: Backend> crate::optim::StepSync<B> for GradSync {
    fn finish(&mut self, be: &B, sets: &[&ParamSet<B>]) {
        GradSync::finish(self, be, sets)
    }
    fn gather(&mut self, be: &B, sets: &[&ParamSet<B>]) {
        self.gather_params(be, sets)
    }
}
