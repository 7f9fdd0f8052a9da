//! Which devices each process of a run uses (`parallel.devices`): by default the processes on
//! one host take consecutive, disjoint groups of its GPUs by their local rank; `"as_listed"`
//! keeps `[placement]` as written in every process, for a launcher that gives each process its
//! own GPUs (`CUDA_VISIBLE_DEVICES` per process: each sees its own as `cuda:0`), or for
//! processes sharing one GPU over the host path.

use crate::config::{Config, DeviceMap};

/// Map `[placement]` to this process's devices (see [`replica_devices`]); a no-op alone or with
/// `parallel.devices = "as_listed"`.
pub fn map_devices(cfg: &mut Config) {
    if super::size() > 1 && cfg.parallel.devices == DeviceMap::LocalRank {
        let local = super::local_rank();
        let k = cfg.placement.devices.len();
        cfg.placement.ends = cfg.placement.ends.as_ref().map(|e| replica_device(e, local, k));
        cfg.placement.devices = replica_devices(&cfg.placement.devices, local);
    }
}

/// The devices of this process's replica: `cuda:N` in `[placement]` becomes
/// `cuda:(N + local_rank × k)`, k the number of devices listed, so that the replicas on one host
/// take consecutive, disjoint groups of its GPUs (a one-GPU config runs on `cuda:LOCAL_RANK`).
/// CPU devices are logical and stay as they are.
pub fn replica_devices(devices: &[String], local_rank: usize) -> Vec<String> {
    devices.iter().map(|d| replica_device(d, local_rank, devices.len())).collect()
}

/// One device of [`replica_devices`], for a replica of `k` devices.
pub fn replica_device(device: &str, local_rank: usize, k: usize) -> String {
    match device.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
        Some(n) => format!("cuda:{}", n + local_rank * k),
        None => device.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_on_one_host_take_disjoint_gpu_groups() {
        let two = ["cuda:0".to_string(), "cuda:1".to_string()];
        assert_eq!(replica_devices(&two, 0), two);
        assert_eq!(replica_devices(&two, 1), ["cuda:2", "cuda:3"]);
        assert_eq!(replica_devices(&["cuda:0".to_string()], 3), ["cuda:3"]);
        assert_eq!(replica_device("cuda:1", 1, 2), "cuda:3");
        assert_eq!(replica_devices(&["cpu:0".to_string(), "cpu:1".to_string()], 1), ["cpu:0", "cpu:1"]);
    }
}
