//! Frames: what crosses between the processes of one pipeline (`[parallel] pipeline = P`).
//!
//! A frame is `b"TPF1"`, the header's length (u32, little-endian), the header (bincode 2,
//! standard config with fixed-width integers), then the payload: an activation's raw f32 bytes
//! (little-endian), or a bincode-encoded [`Request`] or [`Reply`]. The header names what the
//! frame is ([`Kind`]: an activation going up, a gradient going down, a control request, its
//! answer), the run, the step, the unit it is for, the payload's dtype, shape and length, and an
//! FNV-1a checksum of the payload, so a frame from another run, a truncated frame or flipped
//! bits are errors that say so instead of wrong numbers.
//!
//! Everything that crosses processes other than activations is a [`Request`] from stage 0
//! (which runs the scheduler) to the stage that hosts a layer, answered by one [`Reply`]: spawn
//! a layer (fresh at growth, or restored from a checkpoint or a move, its `UnitState` inside),
//! link it to its neighbours, take its optimizer step, read or write its state, stop it.

use crate::checkpoint::checksum::{hash_bytes, hash_f32};
use crate::params::UnitState;
use crate::runtime::layer::LayerInit;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 4] = b"TPF1";

/// A unit of the model a frame can be addressed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Unit {
    /// The embed-head actor (on stage 0).
    Ends,
    Layer(u64),
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unit::Ends => write!(f, "the embedding and head"),
            Unit::Layer(id) => write!(f, "layer {id}"),
        }
    }
}

/// A unit on a stage of this replica's pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Addr {
    pub stage: usize,
    pub unit: Unit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// An activation from below for micro-batch `mb`.
    Forward {
        mb: u64,
        eval: bool,
    },
    /// The gradient of the receiver's output for micro-batch `mb`.
    Backward {
        mb: u64,
    },
    /// A control request; the answer carries the same id.
    Request {
        id: u64,
    },
    Reply {
        id: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dtype {
    F32,
    /// A bincode-encoded [`Request`] or [`Reply`].
    Bincode,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub kind: Kind,
    pub run: String,
    pub step: u64,
    pub to: Unit,
    pub dtype: Dtype,
    /// (B, T, C) for activations; (bytes) for bincode payloads.
    pub shape: Vec<u64>,
    /// Payload bytes.
    pub len: u64,
    pub checksum: u64,
}

/// A control request (stage 0 → the stage that hosts the unit, except `StopRun`).
#[derive(Serialize, Deserialize)]
pub enum Request {
    /// Start layer `id` on the hosting stage's device number `device_index` of `[placement]`.
    Spawn {
        id: u64,
        device_index: usize,
        init: LayerInit,
        panic_at_step: Option<u64>,
        micro_batches: usize,
    },
    /// The layer's neighbours.
    Link {
        id: u64,
        prev: Addr,
        next: Addr,
    },
    Step {
        id: u64,
        lr: f32,
        step: u64,
    },
    GetState {
        id: u64,
    },
    SetState {
        id: u64,
        state: UnitState,
    },
    ResetOptState {
        id: u64,
    },
    InFlight {
        id: u64,
    },
    /// Stop the layer (a move to another stage, or the end of the pipeline).
    Stop {
        id: u64,
    },
    /// To stage 0: a stop signal reached a hosting stage (`force`: the second one).
    StopRun {
        force: bool,
    },
    /// The run is over: stop every layer and end the process.
    Shutdown,
}

impl Request {
    /// What it asks, for error messages.
    pub fn what(&self) -> String {
        match self {
            Request::Spawn { id, .. } => format!("spawning layer {id}"),
            Request::Link { id, .. } => format!("linking layer {id}"),
            Request::Step { id, step, .. } => format!("the optimizer step {step} of layer {id}"),
            Request::GetState { id } => format!("reading the state of layer {id}"),
            Request::SetState { id, .. } => format!("writing the state of layer {id}"),
            Request::ResetOptState { id } => format!("resetting the optimizer state of layer {id}"),
            Request::InFlight { id } => format!("the micro-batches in flight at layer {id}"),
            Request::Stop { id } => format!("stopping layer {id}"),
            Request::StopRun { .. } => "a stop request".into(),
            Request::Shutdown => "the shutdown".into(),
        }
    }
}

#[derive(Serialize, Deserialize)]
pub enum Reply {
    Done,
    Failed(String),
    SumSq(f64),
    State(UnitState),
    Count(usize),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_fixed_int_encoding().with_little_endian()
}

/// Serialise `x` (a request or a reply).
pub fn to_bincode<T: Serialize>(x: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(x, config()).expect("frames serialise")
}

/// Deserialise a request or a reply.
pub fn from_bincode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let (x, n) = bincode::serde::decode_from_slice(bytes, config()).context("decoding a frame's payload")?;
    ensure!(n == bytes.len(), "a frame's payload has {} bytes after its end", bytes.len() - n);
    Ok(x)
}

/// The bytes before the payload: magic, header length, header; room reserved for `extra`
/// more (the payload).
fn prefix(h: &Header, extra: usize) -> Vec<u8> {
    let hb = bincode::serde::encode_to_vec(h, config()).expect("headers serialise");
    let mut out = Vec::with_capacity(8 + hb.len() + extra);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(hb.len() as u32).to_le_bytes());
    out.extend_from_slice(&hb);
    out
}

/// A whole frame: magic, header length, header, `payload`.
pub fn encode(kind: Kind, run: &str, step: u64, to: Unit, dtype: Dtype, shape: Vec<u64>, payload: &[u8]) -> Vec<u8> {
    let h = Header { kind, run: run.to_string(), step, to, dtype, shape, len: payload.len() as u64, checksum: hash_bytes(payload) };
    let mut out = prefix(&h, payload.len());
    out.extend_from_slice(payload);
    out
}

/// An activation as a frame (`x` is (b, t, c)), written once into the frame's one buffer (the
/// checksum of the values equals that of their little-endian bytes).
pub fn encode_f32(kind: Kind, run: &str, step: u64, to: Unit, b: usize, t: usize, x: &[f32]) -> Vec<u8> {
    let c = x.len() / (b * t).max(1);
    let shape = vec![b as u64, t as u64, c as u64];
    let len = 4 * x.len();
    let h = Header { kind, run: run.to_string(), step, to, dtype: Dtype::F32, shape, len: len as u64, checksum: hash_f32(x) };
    let mut out = prefix(&h, len);
    for v in x {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// The header and payload of `bytes`, checked: magic, lengths, checksum, and (for f32
/// payloads) that the shape covers the payload exactly.
pub fn decode(bytes: &[u8]) -> Result<(Header, &[u8])> {
    ensure!(bytes.len() >= 8 && &bytes[..4] == MAGIC, "not a taproot frame ({} bytes, no TPF1 magic)", bytes.len());
    let hl = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize;
    ensure!(8 + hl <= bytes.len(), "a frame of {} bytes announces a header of {hl}", bytes.len());
    let (h, n): (Header, usize) = bincode::serde::decode_from_slice(&bytes[8..8 + hl], config()).context("decoding a frame header")?;
    ensure!(n == hl, "a frame header of {hl} bytes decodes from {n}");
    let payload = &bytes[8 + hl..];
    if payload.len() as u64 != h.len {
        bail!("a frame for {} carries {} payload bytes; its header says {}", h.to, payload.len(), h.len);
    }
    let sum = hash_bytes(payload);
    ensure!(sum == h.checksum, "a frame for {} fails its checksum ({sum:#x}, header {:#x})", h.to, h.checksum);
    if h.dtype == Dtype::F32 {
        let elems: u64 = h.shape.iter().product();
        ensure!(h.shape.len() == 3 && elems * 4 == h.len, "an activation frame of shape {:?} carries {} bytes", h.shape, h.len);
    }
    Ok((h, payload))
}

/// The f32 values of an activation payload, into `out`.
pub fn f32s(payload: &[u8], out: &mut Vec<f32>) {
    out.clear();
    out.extend(payload.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_activation_round_trips_bit_exactly() {
        let x: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37).sin() / 3.0).collect();
        let f = encode_f32(Kind::Forward { mb: 7, eval: true }, "run", 3, Unit::Layer(2), 2, 3, &x);
        let (h, p) = decode(&f).unwrap();
        assert_eq!(h.kind, Kind::Forward { mb: 7, eval: true });
        assert_eq!((h.run.as_str(), h.step, h.to, h.shape.clone()), ("run", 3, Unit::Layer(2), vec![2, 3, 4]));
        let mut y = Vec::new();
        f32s(p, &mut y);
        assert_eq!(x.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), y.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }

    #[test]
    fn a_request_with_a_unit_state_round_trips() {
        let st = UnitState { params: vec![1.0, -2.5], m: vec![0.5, 0.25], v: Some(vec![3.0, 4.0]), steps: vec![9] };
        let f = encode(
            Kind::Request { id: 4 },
            "r",
            0,
            Unit::Layer(1),
            Dtype::Bincode,
            vec![],
            &to_bincode(&Request::SetState { id: 1, state: st.clone() }),
        );
        let (h, p) = decode(&f).unwrap();
        assert_eq!(h.kind, Kind::Request { id: 4 });
        match from_bincode::<Request>(p).unwrap() {
            Request::SetState { id, state } => assert_eq!((id, state), (1, st)),
            _ => panic!("another request came back"),
        }
    }

    #[test]
    fn damaged_frames_are_errors_that_say_what() {
        let f = encode_f32(Kind::Backward { mb: 1 }, "run", 0, Unit::Ends, 1, 1, &[1.0, 2.0]);
        let mut flipped = f.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(format!("{:#}", decode(&flipped).unwrap_err()).contains("checksum"));
        let short = &f[..f.len() - 4];
        assert!(format!("{:#}", decode(short).unwrap_err()).contains("payload bytes"));
        assert!(format!("{:#}", decode(b"junk").unwrap_err()).contains("not a taproot frame"));
        let mut bad_len = f.clone();
        bad_len[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(format!("{:#}", decode(&bad_len).unwrap_err()).contains("announces a header"));
    }
}
