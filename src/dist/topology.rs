//! Where a process sits in a run: its data-parallel replica and its pipeline stage. Made once by
//! `dist::init` and passed to whatever needs it (the runtime's scheduler, supervisor, layers and
//! hosting stages; the command line; the daemon), rather than read from process globals.

use serde::{Deserialize, Serialize};

/// A process's place in a run of `replicas` × `stages` processes. Its MPI rank is
/// replica × stages + stage: the stages of one replica are consecutive ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// This process's data-parallel replica (`[parallel] data` of them).
    pub replica: usize,
    pub replicas: usize,
    /// This process's pipeline stage (`[parallel] pipeline` of them; 0: the scheduler, the
    /// embedding and the head).
    pub stage: usize,
    pub stages: usize,
}

impl Topology {
    /// A one-process run.
    pub const ALONE: Topology = Topology { replica: 0, replicas: 1, stage: 0, stages: 1 };

    /// The topology of rank `rank` among `replicas` × `stages` processes.
    pub fn of_rank(rank: usize, replicas: usize, stages: usize) -> Topology {
        Topology { replica: rank / stages, replicas, stage: rank % stages, stages }
    }

    /// This process's MPI rank.
    pub fn rank(&self) -> usize {
        self.rank_of(self.stage)
    }

    /// The rank of stage `stage` of this process's replica.
    pub fn rank_of(&self, stage: usize) -> usize {
        self.replica * self.stages + stage
    }

    /// The run's number of processes.
    pub fn size(&self) -> usize {
        self.replicas * self.stages
    }

    /// Rank 0: the process that logs, checkpoints and takes control requests.
    pub fn is_lead(&self) -> bool {
        self.rank() == 0
    }
}

impl Default for Topology {
    fn default() -> Self {
        Topology::ALONE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_and_places_agree() {
        for rank in 0..12 {
            let t = Topology::of_rank(rank, 3, 4);
            assert_eq!((t.rank(), t.size()), (rank, 12));
            assert!(t.replica < 3 && t.stage < 4);
        }
        assert_eq!(Topology::of_rank(6, 2, 4).rank_of(1), 5);
        assert!(Topology::ALONE.is_lead() && Topology::ALONE.size() == 1);
    }
}
