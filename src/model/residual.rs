//! The residual-branch multiplier α (`Dims::residual`) as every block kind applies it: 1 under
//! the standard parameterisation, where each step is a plain add (GPT-2's path exactly), and
//! 1/sqrt(L) under `depth_mup`.

use crate::backend::{Backend, View};

/// y = res + α·y, in place on y.
pub fn add_onto_branch<B: Backend>(be: &B, y: View<B::Buf>, res: View<B::Buf>, alpha: f32) {
    if alpha == 1.0 {
        be.add_assign(y, res);
    } else {
        be.axpby(y, alpha, 1.0, res);
    }
}

/// The gradient of a branch's output from the block output's `dy`: dy itself when α = 1, else
/// α·dy written into `scaled` (the block's scratch, allocated only when α ≠ 1).
pub fn branch_grad<'a, B: Backend>(be: &B, scaled: Option<&'a B::Buf>, dy: View<'a, B::Buf>, alpha: f32) -> View<'a, B::Buf> {
    match scaled {
        None => dy,
        Some(g) => {
            be.copy(B::whole(g), dy);
            be.axpby(B::whole(g), alpha, 0.0, dy);
            B::whole(g)
        }
    }
}
