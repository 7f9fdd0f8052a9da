//! The experiment tooling: t_mix on synthetic loss curves, FLOPs accounting against hand-computed
//! values, the files a `--quick` experiment writes, and `taproot plan` (a τ when the pilot mixes,
//! none — and no config written — when it does not). Tiny configs on the synthetic corpus.

mod common;

use common::{synthetic_dataset, TestConfig};
use std::path::{Path, PathBuf};
use taproot::config::Config;
use taproot::data::Dataset;
use taproot::experiment::commands::{experiment_command, plan_command, ExperimentArgs, PlanArgs};
use taproot::experiment::mixing::{mixing_time, Mixing};
use taproot::experiment::report::{matched_speedup, Axis};
use taproot::experiment::{self, plan, suite, Runner};
use taproot::flops;
use taproot::model::Dims;

/// The tiny model (0 → 4 blocks) over the synthetic corpus in `dir`, run `name` of `steps`.
fn tiny(dir: &Path, name: &str, steps: u64) -> TestConfig {
    TestConfig::new(dir).name(name).steps(steps)
}

// ---- t_mix on synthetic curves ----

/// A loss curve `floor + a·exp(−s/k)` evaluated every 10 steps up to `end`.
fn decay_curve(floor: f64, a: f64, k: f64, end: u64, bump: impl Fn(u64) -> f64) -> Vec<(u64, f64)> {
    (0..=end / 10).map(|i| i * 10).map(|s| (s, floor + a * (-(s as f64) / k).exp() + bump(s))).collect()
}

#[test]
fn t_mix_when_the_grown_run_catches_up() {
    let fixed = decay_curve(1.5, 2.0, 100.0, 1000, |_| 0.0);
    // grown at 200: 30% worse right after, the excess decaying with a time constant of 50 steps
    let prog = decay_curve(1.5, 2.0, 100.0, 1000, |s| if s <= 200 { 1.0 } else { 0.3 * fixed_at(s) * (-((s - 200) as f64) / 50.0).exp() });
    fn fixed_at(s: u64) -> f64 {
        1.5 + 2.0 * (-(s as f64) / 100.0).exp()
    }
    // gap(s) = 0.3·exp(−(s−200)/50) <= 0.005  ⇔  s − 200 >= 50·ln(60) = 204.7  → first eval 410
    assert_eq!(mixing_time(&fixed, &prog, 200, 0.005), Mixing::Mixed { at_step: 410, t_mix: 210 });
}

#[test]
fn t_mix_never_when_the_gap_stays() {
    let fixed = decay_curve(1.5, 2.0, 100.0, 1000, |_| 0.0);
    let prog = decay_curve(1.5, 2.0, 100.0, 1000, |s| if s > 300 { 0.02 } else { 0.5 });
    match mixing_time(&fixed, &prog, 300, 0.005) {
        Mixing::Never { final_gap, .. } => assert!((final_gap - 0.02 / (1.5 + 2.0 * (-10.0f64).exp())).abs() < 1e-9),
        m => panic!("expected no mixing, got {m:?}"),
    }
    assert_eq!(plan::recommend(&tiny_cfg(), &Mixing::Never { best_gap: 0.01, best_step: 310, final_gap: 0.02 }), None);
}

#[test]
fn t_mix_mixes_then_diverges() {
    let fixed = decay_curve(1.5, 2.0, 100.0, 1000, |_| 0.0);
    // catches up by 500, then falls behind again from 800 (e.g. a late instability)
    let prog = decay_curve(1.5, 2.0, 100.0, 1000, |s| match s {
        0..=499 => 0.2,
        500..=799 => 0.0,
        _ => 0.05,
    });
    match mixing_time(&fixed, &prog, 100, 0.005) {
        Mixing::Diverged { first_within, .. } => assert_eq!(first_within, 500),
        m => panic!("expected mixing then divergence, got {m:?}"),
    }
    assert_eq!(plan::recommend(&tiny_cfg(), &Mixing::Diverged { first_within: 500, final_gap: 0.03 }), None);
}

/// 1000 steps (0 → 2 blocks at τ = 0.5) of a model that never trains here: only its schedule
/// and growth plan are read.
fn tiny_cfg() -> Config {
    TestConfig::new(Path::new("none"))
        .name("t")
        .steps(1000)
        .batch_size(1)
        .seq_len(8)
        .channels(8)
        .heads(1)
        .target_depth(2)
        .grow_at(0.5, 2)
        .unset("run.log_every")
        .unset("run.out_dir")
        .unset("eval")
        .build()
}

#[test]
fn recommended_tau_is_decay_start_minus_t_mix_never_before_warmup() {
    let cfg = tiny_cfg(); // 1000 steps: warmup 20, decay from 900
    let r = plan::recommend(&cfg, &Mixing::Mixed { at_step: 170, t_mix: 150 }).unwrap();
    assert_eq!((r.tau, r.decay_start, r.warmup_end, r.clamped), (750, 900, 20, false));
    let r = plan::recommend(&cfg, &Mixing::Mixed { at_step: 900, t_mix: 890 }).unwrap();
    assert_eq!((r.tau, r.clamped), (20, true));
}

#[test]
fn the_plan_says_whether_the_budget_is_in_the_mixing_regime_and_what_saving_tau_supports() {
    let cfg = tiny_cfg(); // 1000 steps: warmup 20, decay from 900; 0 -> 2 blocks
                          // Mixing in 150 of the 880 stable steps: τ = 750, the last 250 steps at depth 2.
    let r = plan::recommend(&cfg, &Mixing::Mixed { at_step: 170, t_mix: 150 }).unwrap();
    assert!(r.in_mixing_regime(), "{r:?}");
    assert!((r.mix_fraction - 150.0 / 880.0).abs() < 1e-12);
    assert!((r.saving_ne - 1000.0 / 250.0).abs() < 1e-12, "{}", r.saving_ne);
    assert!(r.regime(1000).starts_with("In the mixing regime"), "{}", r.regime(1000));
    // Mixing in 750 steps: τ = 150 (15% of T), a saving of 1000/850 only — and the plan says so.
    let r = plan::recommend(&cfg, &Mixing::Mixed { at_step: 770, t_mix: 750 }).unwrap();
    assert_eq!(r.tau, 150);
    assert!(!r.in_mixing_regime());
    let text = r.regime(1000);
    assert!(text.starts_with("Not in the mixing regime") && text.contains("15% of T") && text.contains("1.18×"), "{text}");
}

// ---- FLOPs ----

#[test]
fn flops_per_token_match_hand_computed_values() {
    // C = 32, vocabulary 256 (already a multiple of 128), position table 16 rows.
    let d = Dims::new(256, 16, 32, 2);
    assert_eq!(flops::block_params(&d), 12 * 32 * 32 + 13 * 32); // 12704
    assert_eq!(flops::total_params(&d, 0), (256 + 16) * 32 + 2 * 32); // 8768
    assert_eq!(flops::total_params(&d, 4), 8768 + 4 * 12704); // 59584
    assert_eq!(flops::flops_per_token_llmc(&d, 4, 16), 6.0 * 59584.0 + 6.0 * 4.0 * 16.0 * 32.0); // 369792
    assert_eq!(flops::flops_per_token_llmc(&d, 0, 16), 52608.0);
    assert_eq!(flops::flops_per_token_non_embedding(&d, 4), 6.0 * (4.0 * 12704.0 + 64.0)); // 305280
    assert_eq!(flops::flops_per_token_non_embedding(&d, 0), 384.0);
}

#[test]
fn progressive_run_cost_is_the_sum_over_steps_of_the_model_as_it_was() {
    let dir = synthetic_dataset("exp-flops");
    let cfg = tiny(&dir, "flops", 60).grow_at(0.5, 4).build();
    let runner = Runner { verbose: false, ..Runner::new(Dataset::open(&dir, 256).unwrap(), dir.join("logs")) };
    let prog = runner.run("prog", &cfg, None).unwrap();
    let fixed = runner.run("fixed", &experiment::fixed(&cfg), None).unwrap();
    // 64 tokens a step; 30 steps at depth 0, then 30 at depth 4
    assert_eq!(prog.growth, vec![(30, 0, 4)]);
    assert_eq!(prog.flops_llmc, 64.0 * (30.0 * 52608.0 + 30.0 * 369792.0));
    assert_eq!(prog.flops_ne, 64.0 * (30.0 * 384.0 + 30.0 * 305280.0));
    assert_eq!(fixed.flops_llmc, 64.0 * 60.0 * 369792.0);
    assert_eq!(fixed.flops_ne, 64.0 * 60.0 * 305280.0);
    // the same-steps ratio of the speed-up is the ratio of these totals
    let s = matched_speedup(&fixed, &prog, Axis::FlopsNe).unwrap();
    assert!((s.same_steps_ratio - 60.0 * 305280.0 / (30.0 * 384.0 + 30.0 * 305280.0)).abs() < 1e-9);
    // cost at each evaluation is cumulative up to it: evaluation at step 30 still at depth 0
    let e30 = prog.evals.iter().find(|e| e.step == 30).unwrap();
    assert_eq!((e30.depth, e30.flops_llmc), (0, 64.0 * 30.0 * 52608.0));
    assert!(prog.train_s > 0.0 && prog.train_s <= prog.wall_s);
}

// ---- files of an experiment ----

fn csv_rows(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).lines().map(String::from).collect()
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", path.display());
    assert!(bytes.len() > 5_000 && bytes.len() < 200_000, "{}: {} bytes", path.display(), bytes.len());
}

#[test]
fn every_quick_experiment_writes_csv_plots_and_a_table() {
    let dir = synthetic_dataset("exp-suite");
    let config = tiny(&dir, "suite", 200).grow_at(0.5, 4).write();
    let out = dir.join("out");
    let args = ExperimentArgs { name: "all".into(), quick: true, config: Some(config), out: Some(out.clone()), ..Default::default() };
    let outcomes = experiment_command(&args).unwrap();
    assert_eq!(outcomes.len(), suite::NAMES.len());
    let runs_of = |name: &str| -> usize {
        match name {
            "progressive-vs-fixed" => 5,
            "tau-sweep" => 12,
            "init-ablation" => 8,
            "stages" => 3,
            "optimizer-state" => 4,
            // fixed, then 0→4, 1→4 and 2→4 at three τ each (the frontier's two shorter runs apart)
            "pareto" => 10,
            // fixed, five arms on today's recipe, and a fixed/grown pair for each of two recipes
            "recipe" => 10,
            _ => unreachable!(),
        }
    };
    for name in suite::NAMES {
        let d = out.join(name);
        let evals = csv_rows(&d.join("evals.csv"));
        assert_eq!(evals[0], "run,step,depth,val_loss,flops_llmc,flops_ne,train_s");
        // --quick: 60 steps evaluated every 5 (and at step 0) = 13 evaluations per run; the
        // frontier's fixed runs of 15 and 30 steps are evaluated every 1 and 2 steps (16 each)
        let frontier = if name == "progressive-vs-fixed" || name == "pareto" { 2 * 16 } else { 0 };
        assert_eq!(evals.len() - 1, 13 * runs_of(name) + frontier, "{name}: rows of evals.csv");
        let table = std::fs::read_to_string(d.join("table.md")).unwrap();
        assert!(table.contains("| run | τ (step) | final val loss |"), "{name}: {table}");
        for png in
            std::fs::read_dir(&d).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "png"))
        {
            assert_png(&png);
        }
    }
    let summary = csv_rows(&out.join("progressive-vs-fixed/summary.csv"));
    assert_eq!(summary.len(), 6, "header, fixed, 0→L and 1→L at the config's τ and at 0.8 T");
    assert!(summary[2].starts_with("0→4 random τ=30,30,"), "{}", summary[2]);
    assert!(summary[4].starts_with("0→4 random τ=48,48,"), "{}", summary[4]);
    let frontier = csv_rows(&out.join("progressive-vs-fixed/frontier.csv"));
    assert_eq!(frontier.len(), 4, "header and fixed runs of 15, 30 and 60 steps: {frontier:?}");
    assert!(frontier[1].starts_with("fixed 4 T=15,") && frontier[3].starts_with("fixed 4,"), "{frontier:?}");
    let header = &csv_rows(&out.join("progressive-vs-fixed/summary.csv"))[0];
    assert!(header.contains("saving vs frontier non-emb") && header.contains("matched-loss speed-up non-emb"), "{header}");
    for f in
        ["loss_vs_step", "loss_vs_step_late", "loss_vs_flops_llmc", "loss_vs_flops_ne", "loss_vs_wall", "pareto_flops_ne", "pareto_wall"]
    {
        assert_png(&out.join(format!("progressive-vs-fixed/{f}.png")));
    }
    assert_png(&out.join("tau-sweep/final_loss_vs_tau.png"));
    assert_eq!(csv_rows(&out.join("tau-sweep/summary_wsd.csv")).len(), 7);
    assert_eq!(csv_rows(&out.join("tau-sweep/summary_cosine.csv")).len(), 7);
    let pareto = csv_rows(&out.join("pareto/summary.csv"));
    assert_eq!(pareto.len(), 11, "header, fixed and 3 sources × 3 τ: {pareto:?}");
    assert!(pareto[2].starts_with("0→4 random τ=0.5T,30,") && pareto[10].starts_with("2→4 copying τ=0.8T,48,"), "{pareto:?}");
    for f in ["pareto_flops_ne", "pareto_flops_llmc", "pareto_wall"] {
        assert_png(&out.join(format!("pareto/{f}.png")));
    }
    let recipe = csv_rows(&out.join("recipe/summary.csv"));
    assert_eq!(recipe.len(), 7, "{recipe:?}");
    assert!(recipe[3].starts_with("0→4 re-warmup 1 steps,48,"), "{recipe:?}");
    for (file, name) in [("summary_nsgd.csv", "NSGD embedding/head"), ("summary_depth_mup.csv", "depth-µP")] {
        let rows = csv_rows(&out.join("recipe").join(file));
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert!(rows[1].starts_with(&format!("fixed 4 {name},")) && rows[2].starts_with(&format!("0→4 {name},48,")), "{rows:?}");
    }
    // depth-µP changes the model: its fixed run differs from today's
    assert_ne!(recipe[1].split(',').nth(2), csv_rows(&out.join("recipe/summary_depth_mup.csv"))[1].split(',').nth(2));
    assert!(std::fs::read_to_string(out.join("suite.md")).unwrap().contains("| **total** |"));
    // the fixed WSD baseline is shared through the cache: one cache entry per distinct run
    let cached = std::fs::read_dir(out.join("_cache")).unwrap().count();
    assert!(cached < 56, "{cached} cache entries for 56 runs");
}

/// `progressive-vs-fixed` for the LLaMA kinds: the same runs and files, and every run is of
/// the config's kind (its FLOPs are the kind's: 6 · the LLaMA model's non-embedding parameters
/// per token at each depth).
#[test]
fn progressive_vs_fixed_runs_for_each_block_kind() {
    for kind in ["llama", "qwen3"] {
        let dir = synthetic_dataset(&format!("exp-{kind}"));
        let t = tiny(&dir, kind, 200).grow_at(0.5, 4).set("model.arch", format!("\"{kind}\"")).heads(4).set("model.kv_heads", 2);
        let cfg = t.build();
        let out = dir.join("out");
        let args = ExperimentArgs {
            name: "progressive-vs-fixed".into(),
            quick: true,
            config: Some(t.write()),
            out: Some(out.clone()),
            ..Default::default()
        };
        experiment_command(&args).unwrap();
        let d = out; // one experiment writes into --out itself
        assert_eq!(csv_rows(&d.join("summary.csv")).len(), 6, "{kind}");
        let evals = csv_rows(&d.join("evals.csv"));
        let fixed_last = evals.iter().rfind(|r| r.starts_with("fixed 4,")).unwrap().clone();
        let cols: Vec<&str> = fixed_last.split(',').collect();
        let (step, flops_ne): (f64, f64) = (cols[1].parse().unwrap(), cols[5].parse().unwrap());
        let dims = taproot::train::dims_of(&cfg, 256);
        let tokens = (cfg.data.batch_size * cfg.data.seq_len * cfg.data.micro_batches) as f64;
        let want = flops::flops_per_token_non_embedding(&dims, 4) * tokens * step;
        assert!((flops_ne / want - 1.0).abs() < 1e-6, "{kind}: fixed run's FLOPs {flops_ne} against the kind's {want}");
        assert_ne!(flops::block_params(&dims), flops::block_params(&Dims::new(256, dims.max_seq, dims.channels, 4)));
        assert!(std::fs::read_to_string(d.join("table.md")).unwrap().contains("| run | τ (step) | final val loss |"));
    }
}

#[test]
fn unknown_experiment_is_an_error_naming_the_choices() {
    let e = experiment_command(&ExperimentArgs { name: "nope".into(), ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("progressive-vs-fixed"), "{e}");
}

// ---- taproot plan ----

fn plan_args(config: PathBuf, dir: &Path, tag: &str) -> PlanArgs {
    PlanArgs {
        config,
        out: Some(dir.join(format!("{tag}-planned.toml"))),
        report_dir: Some(dir.join(format!("{tag}-report"))),
        quiet: true,
        fresh: true,
        ..Default::default()
    }
}

#[test]
fn plan_writes_the_config_grown_at_decay_start_minus_t_mix() {
    let dir = synthetic_dataset("exp-plan");
    // 200 steps: warmup 4, decay from 180; a loose tolerance so that the pilot mixes
    let config = tiny(&dir, "plan", 200).grow_at(0.5, 4).extra("[plan]\nmix_tolerance = 0.3\neval_every = 4\nbudget = 80\n").write();
    let args = plan_args(config, &dir, "mix");
    let o = plan_command(&args).unwrap();
    assert_eq!((o.pilot.tau0, o.pilot.budget, o.pilot.eval_every), (4, 80, 4));
    let t_mix = o.mixing.t_mix().expect("the pilot mixes at 30%");
    let rec = o.recommendation.unwrap();
    assert_eq!(rec.tau, (180 - t_mix).max(4));
    let planned = Config::load(args.out.as_ref().unwrap(), &[]).unwrap();
    assert_eq!(planned.expansions()[0].at_step, rec.tau);
    assert_eq!(planned.run.steps, 200);
    assert_eq!(planned.target_depth(), 4);
    let text = std::fs::read_to_string(args.out.as_ref().unwrap()).unwrap();
    assert!(text.starts_with("# τ set by `taproot plan`"), "{text}");
    assert!(args.report_dir.as_ref().unwrap().join("plan.png").exists());
    assert_eq!(csv_rows(&args.report_dir.as_ref().unwrap().join("curves.csv"))[0], "run,step,depth,val_loss,flops_llmc,flops_ne,train_s");
}

#[test]
fn plan_refuses_to_invent_a_tau_when_the_runs_do_not_mix() {
    let dir = synthetic_dataset("exp-plan-never");
    // Zero-initialised blocks receive no gradient in their matrices: the grown model stays a
    // 0-layer model (plus biases) and cannot reach the 4-block model's loss.
    let config = tiny(&dir, "never", 200).grow_at(0.5, 4).growth_init("zero").extra("[plan]\neval_every = 5\nbudget = 100\n").write();
    let args = plan_args(config, &dir, "never");
    let e = plan_command(&args).unwrap_err().to_string();
    assert!(e.contains("did not mix within the budget of 100 steps"), "{e}");
    assert!(e.contains("no τ recommended and no config written"), "{e}");
    assert!(!args.out.as_ref().unwrap().exists(), "a config was written");
    // the pilot's curves are still there to look at
    assert!(args.report_dir.as_ref().unwrap().join("plan.md").exists());
}

#[test]
fn plan_needs_a_single_stage_config() {
    let dir = synthetic_dataset("exp-plan-stages");
    let args = plan_args(tiny(&dir, "two", 100).grow_at(0.3, 2).grow_at(0.6, 4).write(), &dir, "two");
    let e = plan_command(&args).unwrap_err().to_string();
    assert!(e.contains("exactly one [[growth]] entry"), "{e}");
}
