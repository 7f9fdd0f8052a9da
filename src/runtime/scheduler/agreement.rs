//! The scheduler's decisions that every data-parallel replica must take at the same step
//! boundary — stop, grow now, gather a checkpoint — and the one exchange that makes them
//! agree: at each step's barrier every replica `Say`s its loss and its wishes, one all-reduce
//! sums them, and each replica hears the same `Heard` and folds it into its `Agreement`.

use crate::dist;

/// What this replica wants and what all replicas agreed.
#[derive(Default)]
pub(crate) struct Agreement {
    /// A stop asked of this replica, not yet agreed by all.
    pub stop_wanted: bool,
    /// Agreed: every replica stops after this step.
    pub stop_requested: bool,
    /// A second stop signal: stop without finishing the step.
    pub force_stop: bool,
    /// A `GrowNow` asked of this replica (only rank 0 takes control requests), not yet agreed.
    pub grow_wanted: bool,
    /// Agreed: every replica grows at the next step boundary.
    pub grow_agreed: bool,
    /// Sharded optimizer state: a `CheckpointNow` agreed by all replicas (they all gather).
    pub checkpoint_agreed: bool,
}

/// What one replica says at a step's barrier.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Say {
    /// The sum of its micro-batches' losses.
    pub loss_sum: f64,
    pub stop: bool,
    pub grow: bool,
    pub checkpoint: bool,
}

/// What every replica hears back: the sum of the losses, and whether any replica said each wish.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Heard {
    pub loss_sum: f64,
    pub stop: bool,
    pub grow: bool,
    pub checkpoint: bool,
}

impl Say {
    /// The exchange, as one all-reduce of four numbers (a flag as 0 or 1; any replica's 1 makes
    /// the sum positive). Alone, what was said is heard.
    pub fn exchange(self) -> Heard {
        let mut wire = self.wire();
        dist::all_reduce_sum_f64(&mut wire);
        Heard::from_wire(wire)
    }

    fn wire(self) -> [f64; 4] {
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        [self.loss_sum, flag(self.stop), flag(self.grow), flag(self.checkpoint)]
    }
}

impl Heard {
    fn from_wire(w: [f64; 4]) -> Heard {
        Heard { loss_sum: w[0], stop: w[1] > 0.0, grow: w[2] > 0.0, checkpoint: w[3] > 0.0 }
    }
}

impl Agreement {
    /// This replica's wishes, with its loss, for the barrier.
    pub fn say(&self, loss_sum: f64, checkpoint: bool) -> Say {
        Say { loss_sum, stop: self.stop_wanted, grow: self.grow_wanted, checkpoint }
    }

    /// Take what every replica heard: the decisions are now the same everywhere.
    pub fn hear(&mut self, h: &Heard) {
        if h.checkpoint {
            self.checkpoint_agreed = true;
        }
        if h.stop {
            self.stop_requested = true;
        }
        if h.grow {
            self.grow_wanted = false;
            self.grow_agreed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_of_what_replicas_say_are_heard_as_any() {
        // Two replicas' words summed on the wire: a flag said by one is heard by both.
        let a = Say { loss_sum: 1.5, stop: true, grow: false, checkpoint: false }.wire();
        let b = Say { loss_sum: 2.0, stop: false, grow: false, checkpoint: true }.wire();
        let sum: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        let h = Heard::from_wire([sum[0], sum[1], sum[2], sum[3]]);
        assert_eq!(h, Heard { loss_sum: 3.5, stop: true, grow: false, checkpoint: true });
        let mut ag = Agreement { grow_wanted: true, ..Default::default() };
        ag.hear(&h);
        assert!(ag.stop_requested && ag.checkpoint_agreed && !ag.grow_agreed && ag.grow_wanted);
        ag.hear(&Heard { grow: true, ..h });
        assert!(ag.grow_agreed && !ag.grow_wanted);
    }
}
