//! The growth operator (docs/METHOD.md, "Expansion"): grow a model from L_s to L_t blocks at step τ.
//!
//! - **Where**: new blocks go to the `bottom` (default: between the embedding and the existing
//!   blocks) or, for ablation, the `top`.
//! - **Init** of new blocks:
//!   - `random`: the target-depth init of [`init`](super::init) (the only choice from 0 layers);
//!   - `copying`: every new block a copy of a trained block, in the order `stack` =
//!     [w1..wk, w1..wk, …] (default), `inter` = [w1, w1, …, w2, w2, …] or `last` = copies of the
//!     last block, where w1 is the bottom-most existing block;
//!   - `zero`: all block matrices and biases 0, norm gains 1 (a dead block, for ablation);
//!   - `copying_zero`: copy, then zero the attention-out and MLP-out projections (and their
//!     biases, for GPT-2) — an identity block, so the grown model computes the same function.
//!
//!   The tensors each kind zeroes or sets to 1 are [`residual_outputs`] and
//!   [`block::gains`](super::block::gains); every other tensor is copied or drawn alike for
//!   every kind.
//! - **Optimizer state**: `inherit` (default: old tensors keep theirs, new blocks start from zero
//!   state at step 0), `copy` (a copied block also copies its source's state; new blocks without
//!   a source start from zero), `reset` (every unit's state zeroed, old ones too).
//! - New blocks get fresh stable ids in birth order (`Model::next_id`), bottom-most first.
//!
//! One [`Plan`] says who is born where, from which source, with which init and MLP kind, and in
//! which order growth happens; the sequential trainer ([`grow`]) and the actor runtime
//! (`runtime::scheduler::growth`, where each newborn's actor calls [`Plan::make`] on its own
//! thread) both carry it out. Its pieces stay public: [`plan_sources`] says which source each new
//! block copies, [`make_block`] builds one block from a source snapshot (what a layer actor's
//! `GetState` returns).

use super::init::InitConfig;
use super::moe::Mlp;
use super::{Block, Dims, Model};
use crate::backend::Backend;
use crate::params::UnitState;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    #[default]
    Bottom,
    Top,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GrowInit {
    #[default]
    Random,
    Copying,
    Zero,
    CopyingZero,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CopyOrder {
    #[default]
    Stack,
    Inter,
    Last,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptStatePolicy {
    #[default]
    Inherit,
    Copy,
    Reset,
}

/// One entry of a growth plan as the config writes it (`[[growth]]`): when (`at`, a fraction
/// of `run.steps`, or `at_step`), to what depth, and how. [`GrowthSpec::resolve`] turns it into
/// the [`Expansion`] the operator applies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrowthSpec {
    #[serde(default)]
    pub at: Option<f64>,
    #[serde(default)]
    pub at_step: Option<u64>,
    pub to_depth: usize,
    #[serde(default)]
    pub position: Position,
    #[serde(default)]
    pub init: GrowInit,
    #[serde(default)]
    pub order: CopyOrder,
    #[serde(default)]
    pub opt_state: OptStatePolicy,
    /// Multiplies the init standard deviation of the new blocks (`random` init only; 1 = the
    /// model's own init, `model::init`).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub init_scale: f64,
}

fn one() -> f64 {
    1.0
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}

impl GrowthSpec {
    /// The expansion at its step τ in a run of `total_steps` (`at` rounds `at · T`).
    pub fn resolve(&self, total_steps: u64) -> Expansion {
        Expansion {
            at_step: self.at_step.unwrap_or_else(|| (self.at.unwrap_or(0.0) * total_steps as f64).round() as u64),
            to_depth: self.to_depth,
            position: self.position,
            init: self.init,
            order: self.order,
            opt_state: self.opt_state,
            init_scale: self.init_scale,
        }
    }
}

/// One expansion of a growth plan, at its step: what the operator ([`grow`], and the runtime's
/// growth in `runtime::scheduler::growth`) applies. A multi-stage plan is a list of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expansion {
    /// τ: the expansion happens before the update of this step.
    pub at_step: u64,
    /// L_t: the depth after this expansion.
    pub to_depth: usize,
    #[serde(default)]
    pub position: Position,
    #[serde(default)]
    pub init: GrowInit,
    #[serde(default)]
    pub order: CopyOrder,
    #[serde(default)]
    pub opt_state: OptStatePolicy,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub init_scale: f64,
}

/// For each of the `k` new blocks (bottom-most first), the index of the existing block it copies
/// (0 = bottom-most existing), or None when the init does not copy.
pub fn plan_sources(init: GrowInit, order: CopyOrder, ls: usize, k: usize) -> anyhow::Result<Vec<Option<usize>>> {
    match init {
        GrowInit::Random | GrowInit::Zero => Ok(vec![None; k]),
        GrowInit::Copying | GrowInit::CopyingZero => {
            anyhow::ensure!(ls >= 1, "init `{init:?}` copies trained blocks, but the model has 0 blocks: from 0 layers use `random`");
            Ok((0..k)
                .map(|j| {
                    Some(match order {
                        CopyOrder::Stack => j % ls,
                        // even spread in consecutive runs: block i of ls gets the new blocks j
                        // with floor(j*ls/k) = i, i.e. j in [ceil(i*k/ls), ceil((i+1)*k/ls))
                        CopyOrder::Inter => j * ls / k,
                        CopyOrder::Last => ls - 1,
                    })
                })
                .collect())
        }
    }
}

/// The tensors `copying_zero` zeroes, per block kind: the residual output projections (and
/// their biases, where the kind has them).
pub use super::block::residual_outputs;

pub use super::block::mlp_at_birth;

/// Build one new block with layer id `id` whose MLP is `mlp`.
///
/// `source`: the snapshot of the block it copies (`copying`, `copying_zero`); its optimizer state
/// is taken along only under the `copy` policy. A copy is of its source's kind, dense or MoE
/// (`mlp` then does not apply): experts, router and balancing bias are copied as they are.
pub fn make_block<B: Backend>(
    be: &B,
    dims: &Dims,
    id: u64,
    init: GrowInit,
    source: Option<&UnitState>,
    policy: OptStatePolicy,
    init_cfg: &InitConfig,
    mlp: Mlp,
) -> anyhow::Result<Block<B>> {
    let blk = match init {
        GrowInit::Random => Block::new_init_mlp(be, dims, id, init_cfg, mlp),
        GrowInit::Zero => {
            let blk = Block::new_empty_mlp(be, dims, id, mlp);
            let mut host = vec![0.0; blk.w.layout.total];
            let gains = super::kinds::spec(dims.arch).gains();
            for s in blk.w.layout.specs.iter().filter(|s| gains.contains(&s.name.as_str())) {
                host[s.offset..s.offset + s.numel()].fill(1.0);
            }
            blk.w.params_from_host(be, &host);
            blk
        }
        GrowInit::Copying | GrowInit::CopyingZero => {
            let src = source.ok_or_else(|| anyhow::anyhow!("init `{init:?}` needs a source block"))?;
            let kind = Block::<B>::mlp_of_len(dims, src.params.len())
                .ok_or_else(|| anyhow::anyhow!("the source block holds {} values, which no block of this model has", src.params.len()))?;
            let mut blk = Block::new_empty_mlp(be, dims, id, kind);
            let mut host = src.params.clone();
            if init == GrowInit::CopyingZero {
                let kind = super::kinds::spec(dims.arch);
                for s in blk.w.layout.specs.iter().filter(|s| kind.is_residual_output(&s.name)) {
                    host[s.offset..s.offset + s.numel()].fill(0.0);
                }
            }
            if policy == OptStatePolicy::Copy {
                blk.w.restore(be, &UnitState { params: host, ..src.clone() })?;
            } else {
                blk.w.params_from_host(be, &host);
            }
            blk
        }
    };
    blk.w.zero_grad(be);
    Ok(blk)
}

/// What an expansion did: the one record of growth, kept in the run's report, its checkpoints
/// and its events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrowthRecord {
    /// The expansion happened before the update of this step.
    pub at_step: u64,
    pub from_depth: usize,
    pub to_depth: usize,
    /// Layer ids of the new blocks, bottom-most first.
    pub new_ids: Vec<u64>,
    /// Layer ids of the whole stack after growth, bottom to top.
    pub stack: Vec<u64>,
}

/// One newborn of a [`Plan`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Birth {
    /// Its layer id (birth order).
    pub id: u64,
    /// Its position in the stack after growth (0 = the bottom).
    pub position: usize,
    /// The position, in the stack before growth, of the block it copies (`copying` inits).
    pub source: Option<usize>,
    /// Dense or mixture of experts ([`mlp_at_birth`]; a copy takes its source's kind).
    pub mlp: Mlp,
}

/// One expansion planned against a stack: who is born where, from which source, with which
/// init and MLP kind. Both drivers — the sequential trainer ([`grow`]) and the actor runtime
/// (`runtime::scheduler::growth`) — make their plan here and carry it out in this one order:
///
/// 1. read the trained state of every source ([`Plan::sources`]);
/// 2. make each newborn ([`Plan::make`]): fresh optimizer state at step 0, or under `copy` its
///    source's;
/// 3. under `reset` ([`Plan::resets_state`]), zero the optimizer state of every unit that was
///    there before (the newborns' is zero already);
/// 4. splice the newborns into the stack ([`Plan::splice`]) and record it ([`Plan::record`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub at_step: u64,
    pub from_depth: usize,
    pub to_depth: usize,
    pub position: Position,
    pub init: GrowInit,
    pub opt_state: OptStatePolicy,
    /// The newborns' init (the run's, scaled by `init_scale`).
    pub init_cfg: InitConfig,
    /// Bottom-most first.
    pub births: Vec<Birth>,
}

impl Plan {
    /// Plan `exp` against a stack of `from_depth` blocks whose next layer id is `next_id`.
    pub fn new(exp: &Expansion, from_depth: usize, next_id: u64, dims: &Dims, init_cfg: &InitConfig) -> anyhow::Result<Plan> {
        let ls = from_depth;
        anyhow::ensure!(
            exp.to_depth > ls,
            "expansion at step {} grows to depth {} but the model already has {ls} blocks",
            exp.at_step,
            exp.to_depth
        );
        let k = exp.to_depth - ls;
        let top = exp.position == Position::Top;
        let births = plan_sources(exp.init, exp.order, ls, k)?
            .into_iter()
            .enumerate()
            .map(|(j, source)| {
                let position = if top { ls + j } else { j };
                let mlp = mlp_at_birth(dims, position, exp.to_depth, init_cfg.target_depth, top);
                Birth { id: next_id + j as u64, position, source, mlp }
            })
            .collect();
        Ok(Plan {
            at_step: exp.at_step,
            from_depth: ls,
            to_depth: exp.to_depth,
            position: exp.position,
            init: exp.init,
            opt_state: exp.opt_state,
            init_cfg: init_cfg.scaled(exp.init_scale),
            births,
        })
    }

    /// The distinct source positions (in the stack before growth), in order of first use.
    pub fn sources(&self) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        for s in self.births.iter().filter_map(|b| b.source) {
            if !out.contains(&s) {
                out.push(s);
            }
        }
        out
    }

    /// The next layer id after the newborns.
    pub fn next_id(&self) -> u64 {
        self.births.last().map_or(0, |b| b.id + 1)
    }

    /// Newborn `j`, from the snapshot of its source (when it copies one).
    pub fn make<B: Backend>(&self, be: &B, dims: &Dims, j: usize, source: Option<&UnitState>) -> anyhow::Result<Block<B>> {
        let b = &self.births[j];
        make_block(be, dims, b.id, self.init, source, self.opt_state, &self.init_cfg, b.mlp)
    }

    /// Whether the units that were there before lose their optimizer state (`reset`).
    pub fn resets_state(&self) -> bool {
        self.opt_state == OptStatePolicy::Reset
    }

    /// Put `newborn` (bottom-most first) into `stack`.
    pub fn splice<T>(&self, stack: &mut Vec<T>, mut newborn: Vec<T>) {
        match self.position {
            Position::Bottom => {
                newborn.append(stack);
                *stack = newborn;
            }
            Position::Top => stack.append(&mut newborn),
        }
    }

    /// The record of this expansion, given the stack's layer ids after it.
    pub fn record(&self, stack: Vec<u64>) -> GrowthRecord {
        GrowthRecord {
            at_step: self.at_step,
            from_depth: self.from_depth,
            to_depth: self.to_depth,
            new_ids: self.births.iter().map(|b| b.id).collect(),
            stack,
        }
    }
}

/// Apply one expansion to a sequential model, in the order [`Plan`] documents.
pub fn grow<B: Backend>(be: &B, model: &mut Model<B>, exp: &Expansion, init_cfg: &InitConfig) -> anyhow::Result<GrowthRecord> {
    let plan = Plan::new(exp, model.depth(), model.next_id, &model.dims, init_cfg)?;
    // 1. the sources' trained state
    let snaps: Vec<UnitState> = model.blocks.iter().map(|b| b.w.snapshot(be)).collect();
    // 2. the newborns
    let newborn = (0..plan.births.len())
        .map(|j| plan.make(be, &model.dims, j, plan.births[j].source.map(|i| &snaps[i])))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // 3. `reset`: the units that were there before
    if plan.resets_state() {
        model.embed.w.state.reset(be);
        model.head.w.state.reset(be);
        for b in model.blocks.iter_mut() {
            b.w.state.reset(be);
        }
    }
    // 4. the splice and the record
    plan.splice(&mut model.blocks, newborn);
    model.next_id = plan.next_id();
    Ok(plan.record(model.blocks.iter().map(|b| b.id).collect()))
}
