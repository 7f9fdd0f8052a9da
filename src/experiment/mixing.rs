//! Mixing time (docs/METHOD.md, "Expansion timing and mixing time").
//!
//! t_mix is the number of steps after an expansion until the progressive run's evaluation loss is
//! within `tol` (relative) of the fixed-size run's loss *at the same step* and stays within it for
//! the rest of the comparison window.
//!
//! Decisions taken here:
//! - "Within" is one-sided: the progressive loss may be below the fixed one by any amount;
//!   it is within when `(prog − fixed) / fixed <= tol`.
//! - Only steps at which both runs were evaluated count, and only those after the expansion
//!   (an evaluation at step s is taken after s updates; an expansion at step τ happens before the
//!   update of step τ, so the evaluation at τ is still the small model's).
//! - The resolution is the evaluation interval: t_mix is the first evaluated step from which the
//!   runs agree, minus τ — an upper bound on the true crossing, by at most one interval.
//! - Three outcomes besides "mixed": never within the tolerance, within it at some step but not
//!   at the end of the window (mixes, then diverges), and no evaluation to judge on.

use serde::{Deserialize, Serialize};

/// Default tolerance: 0.5% relative.
pub const DEFAULT_TOLERANCE: f64 = 0.005;

/// Relative gap of the progressive loss over the fixed-size one: `(prog − fixed) / fixed`.
pub fn relative_gap(prog: f64, fixed: f64) -> f64 {
    (prog - fixed) / fixed
}

/// What the comparison of two loss curves after an expansion found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Mixing {
    /// Within the tolerance from `at_step` to the end of the window; `t_mix = at_step − τ`.
    Mixed { at_step: u64, t_mix: u64 },
    /// Never within the tolerance after the expansion. `best_gap` is the smallest relative gap
    /// seen, at `best_step`; `final_gap` the gap at the end of the window.
    Never { best_gap: f64, best_step: u64, final_gap: f64 },
    /// Within the tolerance first at `first_within`, but no longer at the end of the window.
    Diverged { first_within: u64, final_gap: f64 },
    /// No step after the expansion at which both runs were evaluated.
    NoData,
}

impl Mixing {
    pub fn t_mix(&self) -> Option<u64> {
        match self {
            Mixing::Mixed { t_mix, .. } => Some(*t_mix),
            _ => None,
        }
    }

    /// One line for logs and tables.
    pub fn describe(&self) -> String {
        match self {
            Mixing::Mixed { at_step, t_mix } => format!("mixed: t_mix = {t_mix} steps (within tolerance from step {at_step} on)"),
            Mixing::Never { best_gap, best_step, final_gap } => format!(
                "did not mix: never within tolerance (closest {:+.2}% at step {best_step}, {:+.2}% at the end)",
                100.0 * best_gap,
                100.0 * final_gap
            ),
            Mixing::Diverged { first_within, final_gap } => {
                format!("did not stay mixed: within tolerance at step {first_within}, {:+.2}% at the end of the window", 100.0 * final_gap)
            }
            Mixing::NoData => "no evaluation after the expansion in both runs".to_string(),
        }
    }
}

/// The relative gaps `(step, (prog − fixed) / fixed)` at the steps after `tau` that both curves
/// (`(step, loss)`, any order) evaluated, in step order.
pub fn gaps(fixed: &[(u64, f64)], prog: &[(u64, f64)], tau: u64) -> Vec<(u64, f64)> {
    let mut out: Vec<(u64, f64)> = prog
        .iter()
        .filter(|(s, _)| *s > tau)
        .filter_map(|&(s, p)| fixed.iter().find(|(fs, _)| *fs == s).map(|&(_, f)| (s, relative_gap(p, f))))
        .collect();
    out.sort_by_key(|&(s, _)| s);
    out.dedup_by_key(|&mut (s, _)| s);
    out
}

/// Measure t_mix of `prog` against `fixed` for an expansion at step `tau`, with relative
/// tolerance `tol`, over the window both curves cover.
pub fn mixing_time(fixed: &[(u64, f64)], prog: &[(u64, f64)], tau: u64, tol: f64) -> Mixing {
    let g = gaps(fixed, prog, tau);
    let Some(&(_, final_gap)) = g.last() else {
        return Mixing::NoData;
    };
    let within = |gap: f64| gap <= tol;
    if within(final_gap) {
        // Walk back from the end while the runs agree: the start of the final agreeing stretch.
        let mut i = g.len() - 1;
        while i > 0 && within(g[i - 1].1) {
            i -= 1;
        }
        let at_step = g[i].0;
        return Mixing::Mixed { at_step, t_mix: at_step - tau };
    }
    if let Some(&(first_within, _)) = g.iter().find(|(_, gap)| within(*gap)) {
        return Mixing::Diverged { first_within, final_gap };
    }
    let (best_step, best_gap) = g.iter().copied().fold((0, f64::INFINITY), |b, x| if x.1 < b.1 { x } else { b });
    Mixing::Never { best_gap, best_step, final_gap }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(points: &[(u64, f64)]) -> Vec<(u64, f64)> {
        points.to_vec()
    }

    #[test]
    fn mixes_at_the_start_of_the_final_agreeing_stretch() {
        let fixed = curve(&[(10, 3.0), (20, 2.0), (30, 1.8), (40, 1.7), (50, 1.6)]);
        // grown at 10: 5% off, then 1% off, then within 0.5%, and stays.
        let prog = curve(&[(10, 4.0), (20, 2.1), (30, 1.818), (40, 1.705), (50, 1.601)]);
        assert_eq!(mixing_time(&fixed, &prog, 10, 0.005), Mixing::Mixed { at_step: 40, t_mix: 30 });
        // a looser tolerance mixes earlier
        assert_eq!(mixing_time(&fixed, &prog, 10, 0.02), Mixing::Mixed { at_step: 30, t_mix: 20 });
    }

    #[test]
    fn evaluation_at_tau_is_the_small_model_and_does_not_count() {
        let fixed = curve(&[(10, 2.0), (20, 1.9)]);
        let prog = curve(&[(10, 2.0), (20, 1.9)]);
        assert_eq!(mixing_time(&fixed, &prog, 10, 0.005), Mixing::Mixed { at_step: 20, t_mix: 10 });
        assert_eq!(mixing_time(&fixed, &prog, 20, 0.005), Mixing::NoData);
    }

    #[test]
    fn below_the_fixed_run_counts_as_within() {
        let fixed = curve(&[(10, 2.0), (20, 1.9)]);
        let prog = curve(&[(10, 1.5), (20, 1.5)]);
        assert_eq!(mixing_time(&fixed, &prog, 5, 0.005).t_mix(), Some(5));
    }

    #[test]
    fn never_mixes() {
        let fixed = curve(&[(10, 2.0), (20, 1.9), (30, 1.8)]);
        let prog = curve(&[(10, 2.5), (20, 2.0), (30, 1.9)]);
        match mixing_time(&fixed, &prog, 5, 0.005) {
            Mixing::Never { best_step, best_gap, final_gap } => {
                assert_eq!(best_step, 20);
                assert!((best_gap - 0.1 / 1.9).abs() < 1e-12);
                assert!((final_gap - 0.1 / 1.8).abs() < 1e-12);
            }
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn mixes_then_diverges() {
        let fixed = curve(&[(10, 2.0), (20, 1.9), (30, 1.8)]);
        let prog = curve(&[(10, 2.0), (20, 1.9), (30, 1.9)]);
        match mixing_time(&fixed, &prog, 5, 0.005) {
            Mixing::Diverged { first_within, .. } => assert_eq!(first_within, 10),
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn only_common_steps_count() {
        let fixed = curve(&[(10, 2.0), (30, 1.8)]);
        let prog = curve(&[(10, 2.5), (20, 9.0), (30, 1.8)]);
        assert_eq!(gaps(&fixed, &prog, 0).len(), 2);
        assert_eq!(mixing_time(&fixed, &prog, 0, 0.005), Mixing::Mixed { at_step: 30, t_mix: 30 });
    }
}
