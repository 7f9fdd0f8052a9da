//! taproot — a training runtime for deep progressive training.
//!
//! Train a zero- or one-layer transformer (GPT-2, LLaMA, Qwen3 or mixture-of-experts blocks)
//! cheaply, grow it to full depth mid-run by inserting new blocks at the bottom of the stack, and
//! finish near the loss of a model trained at full depth. `docs/ARCHITECTURE.md` is the map.
//! Every method choice, with its config key and default, is written in `docs/METHOD.md`.
//!
//! Words, used in one sense each: a **block** is one transformer layer's computation and
//! parameters (`model::Block`); a **layer** is a block in the stack, owned by one layer actor
//! and named by its stable id (birth order); a **unit** is anything that owns one `ParamSet`
//! (the embedding, a block, the head); a **kind** is a block kind (`model.arch`, one folder
//! under `model::kinds`); a **stage** is a process of a pipeline split over processes
//! (`dist::stage()`), never an actor: the pipeline's actors are the layer actors and the
//! embed-head actor; a **replica** is one data-parallel copy of the pipeline; the **schedule** is the learning rate over steps
//! (`optim::schedule`), the **scheduler** the actor that runs the step clock; the **sequential
//! trainer** is the plain loop (`train::sequential`), the **supervisor** the actor that owns a
//! runtime run's failures.
//!
//! Layout (a newcomer's map):
//! - [`backend`]: the `Backend` trait (device buffers, streams, explicit forward/backward per op),
//!   the CPU reference implementation (`backend::cpu`), the CUDA implementation (`backend::cuda`:
//!   cuBLAS and NVRTC kernels, one stream per stage actor), and the per-device pools of
//!   activation buffers (`backend::pool`).
//! - [`params`]: a unit's tensors as model and optimizer both see them (`Layout`, `ParamSet`,
//!   `OptState`, `UnitState`); it depends on the backend only.
//! - [`model`]: the units (`Embed`, `Block`, `Head`), initialisation, the growth operator and its
//!   `Plan` (`model::growth`), and the block kinds, one folder each, behind `KindSpec` and
//!   `BlockBody` with their registry (`model::kinds`).
//! - [`optim`]: Muon-NSGD, AdamW, Muon-AdamW, the one optimizer step of every owner
//!   (`optim::step_units`) and the learning-rate schedules (`optim::schedule`, where the
//!   warmup-stable-decay schedule lives).
//! - [`data`]: documents in (text, JSONL, Parquet), tokenizers (built in and Hugging Face's),
//!   llm.c-format token shards (mapped, u16 or u32), mixtures and the deterministic batch loader.
//! - [`eval`]: `taproot eval`, a model's loss on given tokens or text.
//! - [`config`]: the TOML run configuration.
//! - [`train`]: the sequential trainer (the test oracle for the actor runtime), the run options
//!   and report every loop shares, and `train::log::RunLog`, the step bookkeeping of every loop.
//! - [`runtime`]: the actor pipeline — one actor per layer (`runtime::layer`), the embedding and
//!   head (`runtime::embed_head`), the scheduler (`runtime::scheduler`: WSD timing, its state in
//!   parts, the replicas' agreement at each step; `runtime::scheduler::growth`: growth at τ), the
//!   supervisor (`runtime::supervisor`), the gradient all-reduce (`runtime::grad_sync`), the
//!   metrics actor (`runtime::metrics`), and a pipeline split over processes: frames
//!   (`runtime::frame`), stand-ins of remote layers (`runtime::remote`), a hosting stage
//!   (`runtime::host`).
//! - [`checkpoint`]: atomic, checksummed safetensors checkpoints keyed by layer id.
//! - [`experiment`]: the paper's experiments at our scale (`taproot experiment`) and the τ pilot
//!   (`taproot plan`): mixing time, speed-up at matched loss, CSV tables and PNG plots.
//! - [`flops`]: FLOP accounting; [`rng`]: the seeded random streams (keyed by layer id);
//!   [`cli`]: the `taproot` command line.
//! - [`daemon`]: `taproot daemon`, a run as a service: Prometheus `/metrics` (from the metrics
//!   actor, `runtime::metrics`), `/status`, token-protected control endpoints.
//!   Every listener of a run goes through one HTTP front (`daemon::guard`, `daemon::http`).
//! - [`dist`]: the processes of a run (MPI): rank, communicators, collectives with a timeout,
//!   the agreement of every rank before step 1 (`dist::agree`), stage 0's watchdog of the
//!   pipeline stages (`dist::watchdog`), `taproot launch`.
//! - [`export`]: Hugging Face folders out and in; [`sample`]: drawing text with a KV cache;
//!   [`run_folder`]: one process per run folder, never a fresh run over another.
//! - [`userfile`]: the one bounded reader of every file a user names; [`signals`]: stop signals
//!   that arrive while a process is still starting.

pub mod backend;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod data;
pub mod dist;
pub mod eval;
pub mod experiment;
pub mod export;
pub mod flops;
pub mod model;
pub mod optim;
pub mod params;
pub mod rng;
pub mod run_folder;
pub mod runtime;
pub mod sample;
pub mod signals;
pub mod train;
pub mod userfile;
