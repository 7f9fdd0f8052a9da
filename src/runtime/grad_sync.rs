//! Data parallelism inside a stage: the all-reduce of a unit's gradients, started as soon as
//! the unit's last backward of the step is done and awaited at the optimizer step
//! (`crate::dist`). Every stage (layer actor, embed-head actor) holds one.
//!
//! A stage knows its last backward by counting: each step it runs exactly `micro_batches`
//! backwards (its replica's share of the step), and growth, restarts and resumes all happen at
//! step boundaries, where the count is 0.

use crate::backend::Backend;
use crate::dist;
use crate::params::ParamSet;

pub struct GradSync {
    /// Backwards per step on this replica.
    micro_batches: usize,
    done: usize,
    pending: Vec<dist::Pending>,
    /// Host buffers of the last step's sums, in start order, reused for the next downloads
    /// (each unit's buffer comes back to it, so a steady run allocates nothing).
    spare: std::collections::VecDeque<Vec<f32>>,
}

impl GradSync {
    pub fn new(micro_batches: usize) -> Self {
        GradSync { micro_batches: micro_batches.max(1), done: 0, pending: Vec::new(), spare: Default::default() }
    }

    /// Count one backward; true when it was the step's last and the run has several replicas
    /// (then the caller starts its reductions, before handing anything on).
    pub fn backward_done(&mut self) -> bool {
        if dist::replicas() == 1 {
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
