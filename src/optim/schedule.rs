//! Learning-rate schedules (docs/METHOD.md, "Schedules"): pure functions of the step.
//!
//! - `wsd` (default): linear warmup over `warmup` (fraction of T, default 2%), constant, then decay
//!   to `min_lr` (default 0) over the last `decay` (default 10%) with shape `linear`, `cosine` or
//!   `1-sqrt`. Growth belongs in the stable phase: the scheduler asks [`Schedule::decay_start`].
//! - `cosine`: the same warmup, then a cosine from `lr` to `min_lr` over the rest.
//! - `constant`: the same warmup, then `lr` (set `warmup = 0` for a truly flat schedule).
//!
//! Step convention: steps are 0-based, `lr_at(s)` is the rate used by the update of step s.
//! Warmup is `lr·(s+1)/W` for s < W — it starts from 0 but never spends a step at exactly 0 —
//! and every decay reaches `min_lr` exactly at the last step, T−1.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    #[default]
    Wsd,
    Cosine,
    Constant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum DecayShape {
    #[default]
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "cosine")]
    Cosine,
    #[serde(rename = "1-sqrt")]
    OneMinusSqrt,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Schedule {
    pub kind: ScheduleKind,
    /// Peak learning rate.
    pub lr: f32,
    pub min_lr: f32,
    /// Warmup length as a fraction of the total steps.
    pub warmup: f64,
    /// `wsd` only: decay length as a fraction of the total steps.
    pub decay: f64,
    pub decay_shape: DecayShape,
    /// Steps of a linear learning-rate re-warmup after each growth (0: none): the update of
    /// step τ + i runs at `(i + 1) / rewarmup` of the schedule's rate, for i < `rewarmup`.
    pub rewarmup: u64,
    /// Total steps T (filled from the run's `steps`).
    #[serde(skip)]
    pub total_steps: u64,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            kind: ScheduleKind::Wsd,
            lr: 0.02,
            min_lr: 0.0,
            warmup: 0.02,
            decay: 0.1,
            decay_shape: DecayShape::Linear,
            rewarmup: 0,
            total_steps: 0,
        }
    }
}

impl Schedule {
    pub fn warmup_steps(&self) -> u64 {
        (self.warmup * self.total_steps as f64).round() as u64
    }

    /// First step of the decay phase (T for schedules without one; after warmup for cosine).
    pub fn decay_start(&self) -> u64 {
        match self.kind {
            ScheduleKind::Wsd => self.total_steps - (self.decay * self.total_steps as f64).round() as u64,
            ScheduleKind::Cosine => self.warmup_steps(),
            ScheduleKind::Constant => self.total_steps,
        }
    }

    /// The learning rate of step `s` when the model last grew before the update of step
    /// `grown_at` (None: it never grew): [`Schedule::lr_at`], ramped up again over `rewarmup`
    /// steps after the growth.
    ///
    /// ```
    /// use taproot::optim::schedule::Schedule;
    ///
    /// let s = Schedule { lr: 1.0, warmup: 0.0, rewarmup: 4, total_steps: 100, ..Default::default() };
    /// assert_eq!(s.lr_after_growth(50, None), 1.0);
    /// assert_eq!(s.lr_after_growth(50, Some(50)), 0.25); // the first update of the grown model
    /// assert_eq!(s.lr_after_growth(52, Some(50)), 0.75);
    /// assert_eq!(s.lr_after_growth(53, Some(50)), 1.0);
    /// ```
    pub fn lr_after_growth(&self, s: u64, grown_at: Option<u64>) -> f32 {
        let lr = self.lr_at(s);
        match grown_at {
            Some(tau) if self.rewarmup > 0 && s >= tau && s - tau < self.rewarmup => lr * ((s - tau + 1) as f32 / self.rewarmup as f32),
            _ => lr,
        }
    }

    /// The learning rate of step `s` (0-based).
    ///
    /// WSD over T = 100 steps: warmup over the first 10% (from lr/10 at step 0 to lr at step 9),
    /// constant, then a linear decay over the last 20% that reaches `min_lr` at step 99.
    ///
    /// ```
    /// use taproot::optim::schedule::Schedule;
    ///
    /// let s = Schedule { lr: 1.0, warmup: 0.1, decay: 0.2, total_steps: 100, ..Default::default() };
    /// assert_eq!((s.warmup_steps(), s.decay_start()), (10, 80));
    /// assert_eq!(s.lr_at(0), 0.1);
    /// assert_eq!(s.lr_at(4), 0.5);
    /// assert_eq!(s.lr_at(9), 1.0);
    /// assert_eq!(s.lr_at(50), 1.0);
    /// assert_eq!(s.lr_at(79), 1.0);
    /// assert_eq!(s.lr_at(84), 0.75); // 5 of the 20 decay steps done
    /// assert_eq!(s.lr_at(89), 0.5);
    /// assert_eq!(s.lr_at(99), 0.0);
    /// ```
    pub fn lr_at(&self, s: u64) -> f32 {
        let w = self.warmup_steps();
        if s < w {
            return self.lr * (s + 1) as f32 / w as f32;
        }
        let t = self.total_steps;
        let d0 = self.decay_start().max(w);
        if self.kind == ScheduleKind::Constant || s < d0 || t <= d0 {
            return self.lr;
        }
        // progress through the decay, in (0, 1]: 1 exactly at the last step T-1
        let p = ((s + 1 - d0) as f64 / (t - d0) as f64).min(1.0);
        let f = match (self.kind, self.decay_shape) {
            (ScheduleKind::Cosine, _) | (ScheduleKind::Wsd, DecayShape::Cosine) => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
            (ScheduleKind::Wsd, DecayShape::Linear) => 1.0 - p,
            (ScheduleKind::Wsd, DecayShape::OneMinusSqrt) => 1.0 - p.sqrt(),
            (ScheduleKind::Constant, _) => 1.0,
        };
        (self.min_lr as f64 + (self.lr - self.min_lr) as f64 * f) as f32
    }
}
