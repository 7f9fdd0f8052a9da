//! `crate::dist` without the `mpi` feature: one process only; starting several is an error that
//! says how to build with MPI.

use anyhow::{bail, Result};

pub fn init() -> Result<()> {
    bail!("this run asks for several processes (`parallel.data` or `parallel.pipeline` > 1, or an MPI launcher started it), but taproot was built without MPI: rebuild with `cargo build --release --features mpi`")
}
pub struct Comms;
pub struct SendRequest;
impl SendRequest {
    pub fn done(&mut self) -> bool {
        true
    }
}
impl Comms {
    pub fn new(_: usize, _: usize) -> Result<Self> {
        bail!("built without MPI")
    }
    pub fn all_reduce_f32(&self, _: &[f32], _: &mut [f32]) {}
    pub fn all_reduce_f64(&self, _: &[f64], _: &mut [f64]) {}
    pub fn all_max_u64(&self, _: &[u64], _: &mut [u64]) {}
    pub fn send(&self, _: usize, _: Vec<u8>) -> SendRequest {
        SendRequest
    }
    pub fn receive(&self) -> Option<(usize, Vec<u8>)> {
        None
    }
    pub fn finish_beats(&self) {}
}
pub fn exchange_facts(_: &super::Facts) -> Option<String> {
    None
}
pub fn finalize() {}
pub fn abort(_: i32) {}
