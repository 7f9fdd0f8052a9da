//! The block kinds, one folder each, and the registry that maps `model.arch` to them.
//!
//! A kind's folder holds its tensor table (typed handles), its forward and backward
//! ([`spec::BlockBody`]), its facts for generic code and its host decoder ([`spec::KindSpec`]),
//! and its Hugging Face mapping (`hf.rs`, registered in [`hf`]). Nothing outside the folders
//! and the registries branches on the kind; docs/ARCHITECTURE.md says how to add one.
//!
//! | `model.arch` | folder | positions | norm | MLP | LM head |
//! |---|---|---|---|---|---|
//! | `gpt2` | [`gpt2`] | learned `wpe` | LayerNorm | GELU, 4C, biases | tied to `wte` |
//! | `llama` | [`llama`] | rotary | RMSNorm | SwiGLU (or MoE) | untied by default |
//! | `qwen3` | [`llama`] | rotary | RMSNorm, and QK-norm | SwiGLU (or MoE) | untied by default |

pub mod gpt2;
pub mod hf;
pub mod llama;
pub mod spec;

use crate::backend::Backend;
use crate::model::dims::{Arch, Dims};
use crate::model::moe::Mlp;
use spec::{BlockBody, KindSpec};

/// The kind of `arch`.
pub fn spec(arch: Arch) -> &'static dyn KindSpec {
    match arch {
        Arch::Gpt2 => &gpt2::Gpt2,
        Arch::Llama => &llama::LLAMA,
        Arch::Qwen3 => &llama::QWEN3,
    }
}

/// The forward and backward of a block of `d` whose MLP is `mlp`, on backend `B`.
pub fn body<B: Backend>(d: &Dims, mlp: Mlp) -> Box<dyn BlockBody<B>> {
    match d.arch {
        Arch::Gpt2 => Box::new(gpt2::body::Gpt2Body::<B>::new(gpt2::Gpt2Tensors::new(d).1)),
        Arch::Llama | Arch::Qwen3 => Box::new(llama::body::LlamaBody::<B>::new(llama::LlamaTensors::new(d, d.arch == Arch::Qwen3, mlp).1)),
    }
}
