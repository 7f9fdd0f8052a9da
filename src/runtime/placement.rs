//! Placement: which device each layer actor runs on (`[placement]` in the config).
//!
//! Pipeline order follows device order: the bottom of the stack goes on the first device. The
//! policy also decides where layers born at τ go:
//! - `balanced`: the whole stack is re-split into contiguous ranges of near-equal length, one per
//!   device (the first `L mod D` devices get one layer more). After a growth at the bottom this
//!   moves old layers up the device list; the scheduler moves their state with them.
//! - `fill`: a layer, once placed, never moves; each new layer goes to the first device (in
//!   order) holding fewer than ceil(target_depth / D) layers, or the least loaded one.
//!
//! Several named CPU devices (`cpu:0`, `cpu:1`, …) stand in for GPUs in tests: each owns its
//! buffers, an op that mixes two devices' buffers fails, and hand-offs across devices are copies,
//! so the policy, the moves and the hand-off protocol are the same code a multi-GPU run uses.

//!
//! A pipeline split over P processes (`[parallel] pipeline = P`) places layers on P × k
//! *slots* ([`pipeline_slots`]): stage 0's devices as they are, then each device of stage q
//! as `DEVICE@q`. The policies run over the slots unchanged, so `balanced` splits the stack
//! over the processes and moves layers across them at growth.

use crate::config::PlacementPolicy;

/// The slots of a pipeline over `stages` processes, each with the devices `devices`, in
/// pipeline order: `devices` (stage 0), then `d@1` for each device d, …, then `d@(P-1)`.
pub fn pipeline_slots(devices: &[String], stages: usize) -> Vec<String> {
    let mut out = devices.to_vec();
    for q in 1..stages {
        out.extend(devices.iter().map(|d| format!("{d}@{q}")));
    }
    out
}

/// The stage of a slot and the index of its device in `devices` (stage 0's device list, which
/// has the length of every stage's).
pub fn slot_of(slot: &str, devices: &[String]) -> (usize, usize) {
    let (dev, stage) = match slot.rsplit_once('@').and_then(|(d, q)| Some((d, q.parse::<usize>().ok()?))) {
        Some((d, q)) => (d, q),
        None => (slot, 0),
    };
    (stage, devices.iter().position(|d| d == dev).unwrap_or(0))
}

/// Devices for a stack of `depth` layers under `balanced`: contiguous, near-equal ranges.
pub fn balanced(devices: &[String], depth: usize) -> Vec<String> {
    let d = devices.len();
    let (base, extra) = (depth / d, depth % d);
    let mut out = Vec::with_capacity(depth);
    for (i, dev) in devices.iter().enumerate() {
        let n = base + usize::from(i < extra);
        out.extend(std::iter::repeat_n(dev.clone(), n));
    }
    out
}

/// Devices for the new stack after growth. `old` holds the devices of the existing layers in
/// stack order; `new_positions` the stack positions (after growth) of the new layers.
pub fn after_growth(
    policy: PlacementPolicy,
    devices: &[String],
    old: &[String],
    new_positions: &[usize],
    target_depth: usize,
) -> Vec<String> {
    let depth = old.len() + new_positions.len();
    match policy {
        PlacementPolicy::Balanced => balanced(devices, depth),
        PlacementPolicy::Fill => {
            let cap = target_depth.div_ceil(devices.len()).max(1);
            let mut load: Vec<usize> = devices.iter().map(|d| old.iter().filter(|o| *o == d).count()).collect();
            let mut out: Vec<Option<String>> = vec![None; depth];
            let mut old_it = old.iter();
            for (pos, slot) in out.iter_mut().enumerate() {
                if !new_positions.contains(&pos) {
                    *slot = old_it.next().cloned();
                }
            }
            for &pos in new_positions {
                let i = (0..devices.len())
                    .find(|&i| load[i] < cap)
                    .unwrap_or_else(|| (0..devices.len()).min_by_key(|&i| load[i]).expect("at least one device"));
                load[i] += 1;
                out[pos] = Some(devices[i].clone());
            }
            out.into_iter().map(|d| d.expect("every position placed")).collect()
        }
    }
}

/// Devices for a fresh (or resumed) stack of `depth` layers.
pub fn initial(policy: PlacementPolicy, devices: &[String], depth: usize, target_depth: usize) -> Vec<String> {
    after_growth(policy, devices, &[], &(0..depth).collect::<Vec<_>>(), target_depth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_name_the_stage_and_the_device() {
        let devs = vec!["cpu:0".to_string(), "cpu:1".to_string()];
        let slots = pipeline_slots(&devs, 3);
        assert_eq!(slots, ["cpu:0", "cpu:1", "cpu:0@1", "cpu:1@1", "cpu:0@2", "cpu:1@2"]);
        assert_eq!(slot_of("cpu:1", &devs), (0, 1));
        assert_eq!(slot_of("cpu:0@2", &devs), (2, 0));
        assert_eq!(slot_of("cpu:1@1", &devs), (1, 1));
        // Balanced over two single-device stages: the bottom half on stage 0.
        let two = pipeline_slots(&devs[..1], 2);
        assert_eq!(balanced(&two, 3), ["cpu:0", "cpu:0", "cpu:0@1"]);
    }
}
