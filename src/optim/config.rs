//! The optimizer's configuration (`[optim]`) and which update rule each tensor gets.

use crate::params::ParamSpec;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    #[default]
    MuonNsgd,
    Adamw,
    MuonAdamw,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EmbeddingOptimizer {
    #[default]
    Muon,
    Nsgd,
}

/// Every optimizer hyperparameter; defaults are docs/METHOD.md's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub kind: OptimizerKind,
    /// Muon/NSGD momentum.
    pub momentum: f32,
    pub nesterov: bool,
    pub ns_steps: usize,
    pub ns_coeffs: [f32; 3],
    /// Decoupled weight decay; `None` means the kind's default (0.01 Muon-NSGD; 0.1 AdamW and Muon-AdamW, its Muon matrices included).
    pub weight_decay: Option<f32>,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub embedding_optimizer: EmbeddingOptimizer,
    /// `muon_adamw` only: the AdamW tensors use lr × this.
    pub adam_lr_scale: f32,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            kind: OptimizerKind::MuonNsgd,
            momentum: 0.95,
            nesterov: true,
            ns_steps: 5,
            ns_coeffs: [3.4445, -4.7750, 2.0315],
            weight_decay: None,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            embedding_optimizer: EmbeddingOptimizer::Muon,
            adam_lr_scale: 1.0,
        }
    }
}

impl OptimConfig {
    pub fn weight_decay(&self) -> f32 {
        self.weight_decay.unwrap_or(match self.kind {
            OptimizerKind::MuonNsgd => 0.01,
            OptimizerKind::Adamw | OptimizerKind::MuonAdamw => 0.1,
        })
    }

    /// The update rule of one tensor.
    pub fn rule(&self, spec: &ParamSpec) -> Rule {
        if spec.name == "router_bias" {
            // The balancing bias of `sigmoid` routing moves by its own rule (`model::moe`).
            return Rule::Fixed;
        }
        let embedding = spec.is_embedding;
        match self.kind {
            OptimizerKind::Adamw => Rule::AdamW,
            OptimizerKind::MuonAdamw => {
                if spec.is_matrix() && !embedding {
                    Rule::Muon
                } else {
                    Rule::AdamW
                }
            }
            OptimizerKind::MuonNsgd => {
                if embedding && self.embedding_optimizer == EmbeddingOptimizer::Nsgd {
                    Rule::Nsgd
                } else if spec.is_matrix() {
                    Rule::Muon
                } else {
                    Rule::Nsgd
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    Muon,
    Nsgd,
    AdamW,
    /// Not updated by the optimizer.
    Fixed,
}
