//! taproot — a training runtime for deep progressive training.
//!
//! Train a zero- or one-layer GPT-2 cheaply, grow it to full depth mid-run by inserting new
//! blocks at the bottom of the stack, and finish at the loss of a model trained at full depth.
//!
//! Layout (a newcomer's map):
//! - [`backend`]: the `Backend` trait (device buffers, streams, explicit forward/backward per op)
//!   and its CPU reference implementation.
//! - [`model`]: the units a pipeline stage owns (`Embed`, `Block`, `Head`), initialisation and
//!   the growth operator (`model::growth`).
//! - [`optim`]: Muon-NSGD, AdamW, Muon-AdamW and the learning-rate schedules (`optim::schedule`,
//!   where the warmup-stable-decay schedule lives).
//! - [`data`]: tokenizers, llm.c-format token shards and the deterministic batch loader.
//! - [`config`]: the TOML run configuration.
//! - [`train`]: the sequential trainer (the test oracle for the actor runtime).
//! - [`runtime`]: the actor pipeline — one actor per layer (`runtime::layer`), the scheduler
//!   (`runtime::scheduler`: WSD timing, growth at τ), the supervising trainer.
//! - [`checkpoint`]: atomic, checksummed safetensors checkpoints keyed by layer id.
//! - [`experiment`]: the paper's experiments at our scale (`taproot experiment`) and the τ pilot
//!   (`taproot plan`): mixing time, speed-up at matched loss, CSV tables and PNG plots.
//! - [`flops`]: FLOP accounting; [`cli`]: the `taproot` command line.
//! - [`daemon`]: `taproot daemon`, a run as a service: Prometheus `/metrics` (from the metrics
//!   actor, `runtime::metrics`), `/status`, token-protected control endpoints.

pub mod backend;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod data;
pub mod experiment;
pub mod flops;
pub mod model;
pub mod optim;
pub mod params;
pub mod rng;
pub mod runtime;
pub mod train;
