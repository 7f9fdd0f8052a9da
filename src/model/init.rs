//! Parameter initialisation (docs/METHOD.md, "Initialisation").
//!
//! - `gpt2` (default): every matrix N(0, 0.02); the two residual output projections (attention
//!   out, MLP out) N(0, 0.02/sqrt(2·L)) with **L = the target depth**, so that a block born at τ
//!   and a block of the fixed-depth model start alike; biases 0; LayerNorm gains 1, biases 0.
//! - `spectral`: block matrices N(0, σ) with σ = (1/sqrt(fan_in))·min(1, sqrt(fan_out/fan_in))
//!   (the spectral condition for feature learning). Decision: the embeddings keep N(0, 0.02) under
//!   `spectral` too — their "fan_in" is a one-hot vector, and the tied head would otherwise start
//!   with huge logits.
//!
//! Parameterisation (`model.parameterization`):
//! - `standard` (default): each residual branch adds its output to the stream as it is; depth
//!   enters only through the residual-projection init scale above.
//! - `depth_mup`: each residual branch is multiplied by 1/sqrt(L) (L = the target depth) before it
//!   is added (depth-µP's branch multiplier), and the residual projections start at the same
//!   scale as every other matrix (no 1/sqrt(2·L): the multiplier does the depth scaling). L is
//!   the *target* depth, so a 0- or 1-block model and the model it grows into share one
//!   multiplier and one learning rate, and growth changes no existing block's function.
//!
//! `scale` multiplies every block matrix's standard deviation (growth's `init_scale`, the init
//! scale of blocks born at an expansion; 1 for the blocks of step 0).
//!
//! Rows of `wte` beyond the real vocabulary (padding up to Vp) are zero and stay zero: their
//! logits are masked, so they never receive a gradient.
//!
//! Every unit draws from its own random stream (`Rng::stream(seed, id)`), so a block's initial
//! weights depend only on the seed and its layer id, never on the order units are created in.

use super::dims::Dims;
use super::kinds::spec::KindSpec;
use crate::params::{Layout, Tensor};
use crate::rng::Rng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InitScheme {
    #[default]
    Gpt2,
    Spectral,
}

/// How depth enters the model (`model.parameterization`; module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Parameterization {
    #[default]
    Standard,
    DepthMup,
}

impl Parameterization {
    /// The multiplier of each residual branch in a model whose target depth is `target_depth`.
    pub fn residual_multiplier(self, target_depth: usize) -> f32 {
        match self {
            Parameterization::Standard => 1.0,
            Parameterization::DepthMup => (1.0 / (target_depth.max(1) as f64).sqrt()) as f32,
        }
    }

    pub fn is_standard(&self) -> bool {
        *self == Parameterization::Standard
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InitConfig {
    pub scheme: InitScheme,
    pub parameterization: Parameterization,
    /// Multiplies every block matrix's standard deviation (growth's `init_scale`).
    pub scale: f64,
    /// L in the residual-projection scale: the depth the model will finally have.
    pub target_depth: usize,
    pub seed: u64,
    /// The base standard deviation of `gpt2` init.
    pub std: f64,
}

impl InitConfig {
    pub fn new(scheme: InitScheme, target_depth: usize, seed: u64) -> Self {
        InitConfig { scheme, parameterization: Parameterization::Standard, target_depth, seed, std: 0.02, scale: 1.0 }
    }

    pub fn with_parameterization(mut self, p: Parameterization) -> Self {
        self.parameterization = p;
        self
    }

    /// The same config with block matrices drawn `scale` times wider.
    pub fn scaled(&self, scale: f64) -> Self {
        InitConfig { scale: self.scale * scale, ..self.clone() }
    }
}

/// Random-stream ids: 0 for the embedding, `BLOCK_STREAM + id` for block `id`.
pub const BLOCK_STREAM: u64 = 1 << 20;

/// The standard deviation of a block tensor of `kind` under `cfg`.
pub fn block_tensor_std(cfg: &InitConfig, kind: &dyn KindSpec, name: &str, shape: &[usize]) -> f64 {
    let residual_out = kind.is_residual_output(name);
    let std = match cfg.scheme {
        InitScheme::Gpt2 => {
            if residual_out && cfg.parameterization.is_standard() {
                cfg.std / (2.0 * cfg.target_depth.max(1) as f64).sqrt()
            } else {
                cfg.std
            }
        }
        InitScheme::Spectral => {
            let (fan_out, fan_in) = (shape[0] as f64, shape[1] as f64);
            (1.0 / fan_in.sqrt()) * (fan_out / fan_in).sqrt().min(1.0)
        }
    };
    std * cfg.scale
}

/// Host values of a freshly initialised block of `kind` with layer id `id`.
pub fn block_init(layout: &Layout, kind: &dyn KindSpec, cfg: &InitConfig, id: u64) -> Vec<f32> {
    let mut rng = Rng::stream(cfg.seed, BLOCK_STREAM + id);
    let mut host = vec![0.0f32; layout.total];
    for s in &layout.specs {
        let dst = &mut host[s.offset..s.offset + s.numel()];
        if s.is_matrix() {
            rng.fill_normal(dst, block_tensor_std(cfg, kind, &s.name, &s.shape));
        } else if kind.gains().contains(&s.name.as_str()) {
            dst.fill(1.0); // the norms' gains
        } // biases stay 0
    }
    host
}

/// Host values of a fresh embedding unit (wte, then wpe for `gpt2`).
pub fn embed_init(total: usize, wte: Tensor, wpe: Option<Tensor>, dims: &Dims, cfg: &InitConfig) -> Vec<f32> {
    let mut rng = Rng::stream(cfg.seed, 0);
    let mut host = vec![0.0f32; total];
    // Only the real vocabulary rows are random; padded rows stay 0.
    rng.fill_normal(&mut wte.of_mut(&mut host)[..dims.vocab * dims.channels], cfg.std);
    if let Some(wpe) = wpe {
        rng.fill_normal(wpe.of_mut(&mut host), cfg.std);
    }
    host
}

/// The random stream of the head (an untied `lm_head`).
pub const HEAD_STREAM: u64 = 1;

/// Host values of a fresh head unit: the final norm's gain 1 (bias 0), and an untied `lm_head`
/// drawn like `wte` (N(0, std) on the real vocabulary rows, the padding rows 0).
pub fn head_init(total: usize, norm_w: Tensor, lm_head: Option<Tensor>, dims: &Dims, cfg: &InitConfig) -> Vec<f32> {
    let mut host = vec![0.0f32; total];
    norm_w.of_mut(&mut host).fill(1.0);
    if let Some(h) = lm_head {
        let mut rng = Rng::stream(cfg.seed, HEAD_STREAM);
        rng.fill_normal(&mut h.of_mut(&mut host)[..dims.vocab * dims.channels], cfg.std);
    }
    host
}
