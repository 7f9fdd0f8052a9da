//! Learning-rate schedules at their corners (docs/METHOD.md, "Schedules"; the step convention is the
//! module doc of `optim::schedule`): 0-based steps, warmup lr·(s+1)/W for s < W, and every decay
//! reaches `min_lr` exactly at the last step T−1, its first step being progress 1/D.
//!
//! Values are computed in f64 and returned as f32: compared with |got − want| ≤ 1e-6·want + 1e-9.

use taproot::optim::schedule::{DecayShape, Schedule, ScheduleKind};

const LR: f32 = 0.02;

fn sched(kind: ScheduleKind, shape: DecayShape, t: u64) -> Schedule {
    Schedule { kind, decay_shape: shape, total_steps: t, ..Schedule::default() }
}

fn wsd(shape: DecayShape, t: u64) -> Schedule {
    sched(ScheduleKind::Wsd, shape, t)
}

#[track_caller]
fn close(got: f32, want: f64) {
    let err = (got as f64 - want).abs();
    assert!(err <= 1e-6 * want.abs() + 1e-9, "got {got}, want {want} (err {err:.3e})");
}

#[test]
fn defaults_are_methods() {
    let s = Schedule::default();
    assert_eq!(s.kind, ScheduleKind::Wsd);
    assert_eq!(s.decay_shape, DecayShape::Linear);
    assert_eq!((s.lr, s.min_lr, s.warmup, s.decay), (0.02, 0.0, 0.02, 0.1));
}

#[test]
fn decay_shape_names_parse() {
    for (name, shape) in [("linear", DecayShape::Linear), ("cosine", DecayShape::Cosine), ("1-sqrt", DecayShape::OneMinusSqrt)] {
        let s: Schedule = serde_json::from_str(&format!(r#"{{"kind": "wsd", "decay_shape": "{name}"}}"#)).unwrap();
        assert_eq!(s.decay_shape, shape);
    }
    let s: Schedule = serde_json::from_str(r#"{"kind": "cosine", "min_lr": 0.001}"#).unwrap();
    assert_eq!((s.kind, s.min_lr), (ScheduleKind::Cosine, 0.001));
    assert!(serde_json::from_str::<Schedule>(r#"{"decay_shape": "sqrt"}"#).is_err());
}

#[test]
fn phase_boundaries_t1000_and_t37() {
    // T = 1000: W = round(0.02·1000) = 20, D = round(0.1·1000) = 100, decay starts at 900.
    let s = wsd(DecayShape::Linear, 1000);
    assert_eq!((s.warmup_steps(), s.decay_start()), (20, 900));
    // T = 37: W = round(0.74) = 1, D = round(3.7) = 4, decay starts at 33.
    let s = wsd(DecayShape::Linear, 37);
    assert_eq!((s.warmup_steps(), s.decay_start()), (1, 33));
    // Rounding is half away from zero: T = 25 gives W = round(0.5) = 1, D = round(2.5) = 3.
    let s = wsd(DecayShape::Linear, 25);
    assert_eq!((s.warmup_steps(), s.decay_start()), (1, 22));
    // Cosine decays right after warmup; constant never does (decay_start = T).
    assert_eq!(sched(ScheduleKind::Cosine, DecayShape::Linear, 1000).decay_start(), 20);
    assert_eq!(sched(ScheduleKind::Cosine, DecayShape::Linear, 37).decay_start(), 1);
    assert_eq!(sched(ScheduleKind::Constant, DecayShape::Linear, 1000).decay_start(), 1000);
    assert_eq!(sched(ScheduleKind::Constant, DecayShape::Linear, 37).decay_start(), 37);
}

#[test]
fn wsd_corners_t1000_every_shape() {
    // Shared by every shape: warmup and stable phase.
    for shape in [DecayShape::Linear, DecayShape::Cosine, DecayShape::OneMinusSqrt] {
        let s = wsd(shape, 1000);
        close(s.lr_at(0), 0.001); // step 0: lr·1/20, never exactly 0
        close(s.lr_at(9), 0.01); // lr·10/20
        close(s.lr_at(19), 0.02); // last warmup step reaches the peak
        close(s.lr_at(20), 0.02); // first stable step
        close(s.lr_at(899), 0.02); // the step before decay starts
        assert_eq!(s.lr_at(999), 0.0, "{shape:?}: the last step is exactly min_lr");
    }
    // Decay start s = 900 is progress p = 1/100; the midpoint s = 949 is p = 1/2; s = 998 is
    // p = 99/100.
    let s = wsd(DecayShape::Linear, 1000); // lr·(1 − p)
    close(s.lr_at(900), 0.0198);
    close(s.lr_at(949), 0.01);
    close(s.lr_at(998), 0.0002);
    let s = wsd(DecayShape::Cosine, 1000); // lr·(1 + cos πp)/2
    close(s.lr_at(900), 0.0199950656);
    close(s.lr_at(949), 0.01);
    close(s.lr_at(998), 4.934396343e-6);
    let s = wsd(DecayShape::OneMinusSqrt, 1000); // lr·(1 − √p)
    close(s.lr_at(900), 0.018);
    close(s.lr_at(949), 0.005857864376);
    close(s.lr_at(998), 1.002512579e-4);
}

#[test]
fn wsd_corners_t37_every_shape() {
    // W = 1: step 0 is the (only) warmup step and already at the peak; decay is steps 33..36.
    let want = [
        (DecayShape::Linear, [0.015, 0.01, 0.005]),
        (DecayShape::Cosine, [0.01707106781, 0.01, 0.002928932188]),
        (DecayShape::OneMinusSqrt, [0.01, 0.005857864376, 0.002679491924]),
    ];
    for (shape, d) in want {
        let s = wsd(shape, 37);
        close(s.lr_at(0), 0.02);
        close(s.lr_at(1), 0.02);
        close(s.lr_at(32), 0.02);
        close(s.lr_at(33), d[0]);
        close(s.lr_at(34), d[1]); // midpoint, p = 2/4
        close(s.lr_at(35), d[2]);
        assert_eq!(s.lr_at(36), 0.0, "{shape:?}");
    }
}

#[test]
fn warmup_and_decay_are_monotone() {
    for shape in [DecayShape::Linear, DecayShape::Cosine, DecayShape::OneMinusSqrt] {
        for t in [37u64, 1000] {
            let s = wsd(shape, t);
            let w = s.warmup_steps();
            let d0 = s.decay_start();
            for i in 1..w {
                assert!(s.lr_at(i) > s.lr_at(i - 1), "{shape:?} T={t}: warmup not increasing at {i}");
            }
            for i in w..d0 {
                assert_eq!(s.lr_at(i), LR, "{shape:?} T={t}: stable phase at {i}");
            }
            for i in d0..t {
                assert!(s.lr_at(i) < s.lr_at(i - 1), "{shape:?} T={t}: decay not decreasing at {i}");
                assert!(s.lr_at(i) >= 0.0);
            }
        }
    }
    let c = Schedule { min_lr: 0.002, ..sched(ScheduleKind::Cosine, DecayShape::Linear, 1000) };
    for i in 1..1000 {
        let (a, b) = (c.lr_at(i - 1), c.lr_at(i));
        assert!(if i < 20 { b > a } else { b < a }, "cosine at {i}: {a} -> {b}");
    }
}

#[test]
fn zero_warmup_starts_at_peak() {
    for kind in [ScheduleKind::Wsd, ScheduleKind::Cosine, ScheduleKind::Constant] {
        let s = Schedule { warmup: 0.0, ..sched(kind, DecayShape::Linear, 100) };
        assert_eq!(s.warmup_steps(), 0);
        assert!(s.lr_at(0) > 0.0199, "{kind:?}: step 0 without warmup starts at (about) the peak");
    }
    assert_eq!(Schedule { warmup: 0.0, ..wsd(DecayShape::Linear, 100) }.lr_at(0), LR);
    let s = Schedule { warmup: 0.0, ..wsd(DecayShape::Linear, 100) };
    assert_eq!(s.decay_start(), 90);
    close(s.lr_at(89), 0.02);
    close(s.lr_at(90), 0.018);
    assert_eq!(s.lr_at(99), 0.0);
    // Cosine without warmup: step 0 is progress 1/100 of the cosine already.
    let c = Schedule { warmup: 0.0, ..sched(ScheduleKind::Cosine, DecayShape::Linear, 100) };
    assert_eq!(c.decay_start(), 0);
    close(c.lr_at(0), 0.02 * 0.5 * (1.0 + (std::f64::consts::PI / 100.0).cos()));
    close(c.lr_at(49), 0.01);
    assert_eq!(c.lr_at(99), 0.0);
    // Constant without warmup is flat.
    let k = Schedule { warmup: 0.0, ..sched(ScheduleKind::Constant, DecayShape::Linear, 100) };
    assert!((0..100).all(|i| k.lr_at(i) == LR));
}

#[test]
fn cosine_with_min_lr() {
    // T = 1000, W = 20, cosine over steps 20..999 (980 steps) from 0.02 down to 0.002.
    let s = Schedule { min_lr: 0.002, ..sched(ScheduleKind::Cosine, DecayShape::Linear, 1000) };
    close(s.lr_at(0), 0.001); // warmup from 0 toward lr, not toward min_lr
    close(s.lr_at(19), 0.02);
    close(s.lr_at(20), 0.01999995376); // first step after warmup: p = 1/980
    close(s.lr_at(21), 0.01999981502);
    close(s.lr_at(509), 0.011); // midpoint p = 490/980: (lr + min_lr)/2
    close(s.lr_at(998), 0.002000046244);
    assert_eq!(s.lr_at(999), 0.002, "the last step is exactly min_lr");
    // T = 37: W = 1, cosine over steps 1..36 (36 steps), midpoint at s = 18.
    let s = Schedule { min_lr: 0.002, ..sched(ScheduleKind::Cosine, DecayShape::Linear, 37) };
    close(s.lr_at(0), 0.02);
    close(s.lr_at(1), 0.01996575228);
    close(s.lr_at(18), 0.011);
    assert_eq!(s.lr_at(36), 0.002);
    // The decay shape is a `wsd` setting: it does not change `cosine`.
    let lin = Schedule { min_lr: 0.002, ..sched(ScheduleKind::Cosine, DecayShape::Linear, 1000) };
    let sq = Schedule { min_lr: 0.002, ..sched(ScheduleKind::Cosine, DecayShape::OneMinusSqrt, 1000) };
    assert!((0..1000).all(|i| lin.lr_at(i) == sq.lr_at(i)));
}

#[test]
fn wsd_with_min_lr_ends_at_min_lr() {
    let s = Schedule { min_lr: 0.002, ..wsd(DecayShape::Linear, 1000) };
    close(s.lr_at(900), 0.002 + 0.018 * 0.99);
    close(s.lr_at(949), 0.011);
    assert_eq!(s.lr_at(999), 0.002);
    let s = Schedule { min_lr: 0.002, ..wsd(DecayShape::OneMinusSqrt, 1000) };
    close(s.lr_at(949), 0.002 + 0.018 * (1.0 - 0.5f64.sqrt()));
    assert_eq!(s.lr_at(999), 0.002);
}

#[test]
fn constant_corners() {
    let s = sched(ScheduleKind::Constant, DecayShape::Linear, 1000);
    close(s.lr_at(0), 0.001);
    close(s.lr_at(19), 0.02);
    for i in [20, 899, 900, 949, 999] {
        assert_eq!(s.lr_at(i), LR);
    }
    let s = sched(ScheduleKind::Constant, DecayShape::Linear, 37);
    assert_eq!(s.lr_at(0), LR);
    assert_eq!(s.lr_at(36), LR);
}

#[test]
fn overlapping_warmup_and_decay_decay_after_warmup() {
    // T = 10, warmup 0.5 (W = 5), decay 0.6 (would start at 4): the decay waits for warmup to
    // end and spreads over steps 5..9.
    let s = Schedule { warmup: 0.5, decay: 0.6, ..wsd(DecayShape::Linear, 10) };
    let want = [0.004, 0.008, 0.012, 0.016, 0.02, 0.016, 0.012, 0.008, 0.004, 0.0];
    for (i, &w) in want.iter().enumerate() {
        close(s.lr_at(i as u64), w);
    }
}
