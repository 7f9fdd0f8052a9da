//! `[parallel]`: the processes of one run, how they sum their gradients and which devices each
//! uses.

use serde::{Deserialize, Serialize};

/// Processes of one run (`crate::dist`): `data` data-parallel replicas, each training its share
/// of every step's micro-batches; `data × pipeline` processes in all.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// Data-parallel replicas D (`data.micro_batches` must be a multiple of it).
    pub data: usize,
    /// Pipeline stages across processes P (stage 0 runs the scheduler; each stage has the
    /// devices of `[placement]`).
    pub pipeline: usize,
    /// Hosts for `taproot launch` (empty: this machine), and processes per host.
    pub hosts: Vec<String>,
    pub processes_per_host: Option<usize>,
    /// ZeRO stage: 0 (every replica keeps the whole optimizer state) or 1 (each keeps and
    /// updates its share of every unit's tensors; the weights are the same bitwise).
    pub zero: u8,
    /// Seconds a rank waits in a collective for the other replicas before it stops the run,
    /// naming the ranks that did not join (a stopped, stuck or vanished process). Rank 0's
    /// checkpoints and evaluations keep the others waiting, so it is generous. 0: forever.
    pub timeout_s: u64,
    /// Where the replicas sum their gradients (see [`Collectives`]).
    pub collectives: Collectives,
    /// Which devices each process uses (see [`DeviceMap`]).
    pub devices: DeviceMap,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            data: 1,
            pipeline: 1,
            hosts: Vec::new(),
            processes_per_host: None,
            zero: 0,
            timeout_s: 600,
            collectives: Collectives::Host,
            devices: DeviceMap::LocalRank,
        }
    }
}

/// Where data-parallel replicas sum each unit's gradients (`parallel.collectives`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Collectives {
    /// Downloaded, summed over MPI in host memory, uploaded: every backend.
    #[default]
    Host,
    /// Summed on the device over NCCL, on each unit's own stream (`crate::dist::nccl`): CUDA
    /// runs with one device per process, in a build with the `nccl` feature. A run of one replica
    /// sums over a communicator of one (a check of the setup before a multi-GPU run).
    Nccl,
}

/// Which devices each process of a run uses (`parallel.devices`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeviceMap {
    /// `cuda:N` in `[placement]` is `cuda:(N + local rank × devices listed)`: the processes on
    /// one host take consecutive, disjoint groups of its GPUs.
    #[default]
    LocalRank,
    /// `[placement]` as written in every process: for a launcher that gives each process its own
    /// GPUs (`CUDA_VISIBLE_DEVICES` per process, each seeing its own from `cuda:0`), or processes
    /// that share a GPU over `collectives = "host"` (NCCL refuses two ranks on one GPU).
    AsListed,
}

impl ParallelConfig {
    pub fn is_default(&self) -> bool {
        *self == ParallelConfig::default()
    }
}
