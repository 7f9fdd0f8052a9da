//! The registry of the kinds' Hugging Face mappings (each in its kind's `hf.rs`). Kept apart
//! from the kind registry ([`kinds`](super)) because the mappings read checkpoints and write
//! folders, which the model itself never does.

use super::{gpt2, llama};
use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::data::LoaderState;
use crate::export::folder::{Exported, HfConfig};
use crate::model::dims::Arch;
use anyhow::Result;
use std::path::Path;

/// Write `ck` as a Hugging Face folder of its kind's class in `out`.
pub fn export(arch: Arch, ck: &Checkpoint, out: &Path) -> Result<Exported> {
    match arch {
        Arch::Gpt2 => gpt2::hf::export(ck, out),
        Arch::Llama | Arch::Qwen3 => llama::hf::export(ck, out),
    }
}

/// The `model_type` a folder for the run `cfg` must have.
pub fn model_type(cfg: &Config) -> &'static str {
    match cfg.model.arch {
        Arch::Gpt2 => "gpt2",
        Arch::Llama | Arch::Qwen3 => llama::hf::model_type(cfg),
    }
}

/// A folder of the class of `cfg`'s kind as the step-0 checkpoint of the run `cfg` describes.
pub fn import(folder: &Path, cfg: &Config, loader: LoaderState, hf: &HfConfig) -> Result<Checkpoint> {
    match cfg.model.arch {
        Arch::Gpt2 => gpt2::hf::import(folder, cfg, loader, hf),
        Arch::Llama | Arch::Qwen3 => llama::hf::import(folder, cfg, loader, hf),
    }
}
