//! Run-config checks: the shipped configs load, every malformed config is rejected with an error
//! that names the offending key (and never panics), and `--set key=value` overrides behave.
//!
//! Each malformed case starts from `config/demo.toml` and changes one thing. Error messages are
//! printed (`cargo test --test config -- --nocapture`) so their clarity can be judged by eye.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use taproot::config::Config;
use taproot::model::growth::{CopyOrder, GrowInit, OptStatePolicy, Position};
use taproot::optim::schedule::{DecayShape, ScheduleKind};
use taproot::optim::OptimizerKind;

const DEMO: &str = include_str!("../config/demo.toml");
const DEMO_FIXED: &str = include_str!("../config/demo-fixed.toml");

fn shipped(name: &str) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config").join(name);
    Config::load(&path, &[]).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

/// `DEMO` with the single occurrence of `from` replaced by `to`.
fn demo_with(from: &str, to: &str) -> String {
    assert_eq!(DEMO.matches(from).count(), 1, "{from:?} must occur exactly once in demo.toml");
    DEMO.replacen(from, to, 1)
}

/// Parse without letting a panic escape: `Ok(result)` or `Err(panic message)`.
fn parse_caught(text: &str, overrides: &[String]) -> Result<anyhow::Result<Config>, String> {
    catch_unwind(AssertUnwindSafe(|| Config::parse(text, overrides))).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "<non-string panic>".into())
    })
}

/// The error `Config::parse` returns (with its whole context chain); fails on panic or `Ok`.
#[track_caller]
fn parse_err(case: &str, text: &str, overrides: &[String]) -> String {
    match parse_caught(text, overrides) {
        Err(panic) => panic!("{case}: Config::parse panicked: {panic}"),
        Ok(Ok(cfg)) => panic!("{case}: accepted, expected an error; parsed {cfg:#?}"),
        Ok(Err(e)) => format!("{e:#}"),
    }
}

fn sets(overrides: &[&str]) -> Vec<String> {
    overrides.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Shipped configs

#[test]
fn shipped_demo_loads_and_expands_once_at_0_8_t() {
    let cfg = shipped("demo.toml");
    assert_eq!(cfg.run.name, "demo");
    assert_eq!(cfg.run.steps, 3000);
    assert_eq!(cfg.schedule.total_steps, 3000, "schedule.total_steps is filled from run.steps");
    assert_eq!(cfg.model.depth, 0);
    assert_eq!(cfg.target_depth(), 6);
    assert_eq!(cfg.max_seq(), cfg.data.seq_len);
    assert_eq!(cfg.optim.kind, OptimizerKind::MuonNsgd);
    assert_eq!(cfg.schedule.kind, ScheduleKind::Wsd);
    let ex = cfg.expansions();
    assert_eq!(ex.len(), 1, "{ex:?}");
    assert_eq!(ex[0].at_step, 2400, "0.8 × 3000");
    assert_eq!(ex[0].to_depth, 6);
    // docs/METHOD.md defaults for everything the config does not spell out.
    assert_eq!(ex[0].init, GrowInit::Random);
    assert_eq!(ex[0].position, Position::Bottom);
    assert_eq!(ex[0].order, CopyOrder::Stack);
    assert_eq!(ex[0].opt_state, OptStatePolicy::Inherit);
    cfg.validate().unwrap();
}

#[test]
fn shipped_demo_fixed_loads_without_growth() {
    let cfg = shipped("demo-fixed.toml");
    assert_eq!(cfg.run.name, "demo-fixed");
    assert_eq!(cfg.model.depth, 6);
    assert_eq!(cfg.model.target_depth, None);
    assert_eq!(cfg.target_depth(), 6);
    assert!(cfg.growth.is_empty() && cfg.expansions().is_empty());
    cfg.validate().unwrap();
}

#[test]
fn shipped_configs_differ_only_in_growth_plan() {
    let (p, f) = (shipped("demo.toml"), shipped("demo-fixed.toml"));
    assert_eq!((&p.data, &p.optim, &p.schedule, &p.eval), (&f.data, &f.optim, &f.schedule, &f.eval));
    assert_eq!((p.run.seed, p.run.steps, p.run.log_every), (f.run.seed, f.run.steps, f.run.log_every));
    assert_eq!((p.model.channels, p.model.heads), (f.model.channels, f.model.heads));
    assert_eq!(p.target_depth(), f.model.depth);
}

#[test]
fn shipped_daemon_demo_is_the_demo_with_checkpoints_and_a_loopback_endpoint() {
    let (d, p) = (shipped("daemon-demo.toml"), shipped("demo.toml"));
    assert_eq!(
        (&d.data, &d.model, &d.optim, &d.schedule, &d.eval, &d.growth),
        (&p.data, &p.model, &p.optim, &p.schedule, &p.eval, &p.growth)
    );
    assert_eq!(d.run.steps, p.run.steps);
    assert!(d.checkpoint.every > 0, "a daemon run must checkpoint to resume");
    assert_eq!(d.daemon.listen, "127.0.0.1:9464");
    // Defaults: loopback, no token file, MFU unknown, a minute of linger.
    assert_eq!(p.daemon, taproot::config::DaemonConfig::default());
    assert!(
        p.daemon.listen.starts_with("127.0.0.1:") && p.daemon.token_file.is_none() && p.daemon.peak_flops == 0.0 && p.daemon.linger_s == 60
    );
    let over =
        Config::parse(DEMO, &sets(&["daemon.listen=\"127.0.0.1:0\"", "daemon.token_file=/etc/taproot/token", "daemon.peak_flops=1e12"]))
            .unwrap();
    assert_eq!(over.daemon.listen, "127.0.0.1:0");
    assert_eq!(over.daemon.token_file.as_deref(), Some(Path::new("/etc/taproot/token")));
    assert_eq!(over.daemon.peak_flops, 1e12);
}

#[test]
fn parse_matches_load_and_is_stable() {
    assert_eq!(Config::parse(DEMO, &[]).unwrap(), shipped("demo.toml"));
    assert_eq!(Config::parse(DEMO_FIXED, &[]).unwrap(), shipped("demo-fixed.toml"));
}

#[test]
fn load_of_missing_file_names_the_path() {
    let e = format!("{:#}", Config::load(Path::new("config/no-such-config.toml"), &[]).unwrap_err());
    println!("{e}");
    assert!(e.contains("no-such-config.toml"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// 2. Malformed configs

/// (what is wrong, config text, text the error must contain).
fn malformed() -> Vec<(&'static str, String, &'static str)> {
    let two_growths =
        |a: &str, b: &str| demo_with("[[growth]]\nat = 0.8\nto_depth = 6\n", &format!("[[growth]]\n{a}\n\n[[growth]]\n{b}\n"));
    vec![
        // Unknown keys, at the top level and in every section.
        ("unknown top-level key", format!("colour = \"blue\"\n{DEMO}"), "colour"),
        ("unknown top-level section", format!("{DEMO}\n[logging]\nlevel = 1\n"), "logging"),
        ("unknown key in [run]", demo_with("steps = 3000\n", "steps = 3000\nepochs = 3\n"), "run.epochs"),
        ("unknown key in [data]", demo_with("seq_len = 128\n", "seq_len = 128\nshuffle = true\n"), "data.shuffle"),
        ("unknown key in [model]", demo_with("heads = 4\n", "heads = 4\ndropout = 0.1\n"), "model.dropout"),
        ("unknown key in [optim]", demo_with("kind = \"muon_nsgd\"\n", "kind = \"muon_nsgd\"\nnestrov = true\n"), "optim.nestrov"),
        ("unknown key in [schedule]", demo_with("lr = 0.02\n", "lr = 0.02\nwarmup_steps = 100\n"), "schedule.warmup_steps"),
        ("unknown key in [eval]", demo_with("batches = 16\n", "batches = 16\ninterval = 10\n"), "eval.interval"),
        ("unknown key in [[growth]]", demo_with("to_depth = 6\n", "to_depth = 6\ndepth = 6\n"), "growth[0].depth"),
        (
            "unknown key in the second [[growth]]",
            two_growths("at = 0.5\nto_depth = 3", "at = 0.8\nto_depth = 6\nnew_blocks = 3"),
            "growth[1].new_blocks",
        ),
        // Wrong types.
        ("string for an integer", demo_with("steps = 3000", "steps = \"3000\""), "run.steps"),
        ("negative for a usize", demo_with("batch_size = 16", "batch_size = -16"), "data.batch_size"),
        ("float for an integer", demo_with("heads = 4", "heads = 4.5"), "model.heads"),
        ("integer for a string", demo_with("tokenizer = \"bytes\"", "tokenizer = 2"), "data.tokenizer"),
        ("string for a float", demo_with("lr = 0.02", "lr = \"fast\""), "schedule.lr"),
        ("negative for a u64", demo_with("every = 250", "every = -1"), "eval.every"),
        ("wrong array length", demo_with("kind = \"muon_nsgd\"\n", "kind = \"muon_nsgd\"\nns_coeffs = [1.0, 2.0]\n"), "optim.ns_coeffs"),
        ("string for a growth integer", two_growths("at = 0.5\nto_depth = 3", "at = 0.8\nto_depth = \"six\""), "growth[1].to_depth"),
        (
            "a section that is not a table",
            demo_with("[eval]\nevery = 250\nbatches = 16\n", "").replacen("[run]", "eval = 5\n\n[run]", 1),
            "eval",
        ),
        ("growth as a table, not an array", demo_with("[[growth]]", "[growth]"), "growth"),
        (
            "growth entry not a table",
            format!("growth = [5]\n{}", demo_with("[[growth]]\nat = 0.8\nto_depth = 6\ninit = \"random\"\n", "")),
            "growth[0]",
        ),
        // Missing required keys.
        ("missing run.steps", demo_with("steps = 3000\n", ""), "run.steps"),
        ("missing data.dir", demo_with("dir = \"data/shakespeare-bytes\"\n", ""), "data.dir"),
        ("missing model.channels", demo_with("channels = 128\n", ""), "model.channels"),
        ("missing growth[0].to_depth", demo_with("to_depth = 6\n", ""), "growth[0].to_depth"),
        ("missing [model] section", demo_with("[model]\nchannels = 128\nheads = 4\ndepth = 0\ntarget_depth = 6\n", ""), "model"),
        // Values the types allow but the run cannot use.
        ("steps = 0", demo_with("steps = 3000", "steps = 0"), "run.steps"),
        ("heads not dividing channels", demo_with("heads = 4", "heads = 3"), "model.heads"),
        ("heads = 0", demo_with("heads = 4", "heads = 0"), "model.heads"),
        ("max_seq < seq_len", demo_with("heads = 4\n", "heads = 4\nmax_seq = 64\n"), "model.max_seq"),
        (
            "target_depth below depth",
            demo_with("depth = 0\n", "depth = 2\n").replacen("target_depth = 6", "target_depth = 1", 1),
            "model.target_depth",
        ),
        ("batch_size = 0", demo_with("batch_size = 16", "batch_size = 0"), "data.batch_size"),
        ("micro_batches = 0", demo_with("seq_len = 128\n", "seq_len = 128\nmicro_batches = 0\n"), "data.micro_batches"),
        ("unknown tokenizer", demo_with("tokenizer = \"bytes\"", "tokenizer = \"bpe\""), "data.tokenizer"),
        ("bpe vocabulary not above the bytes", demo_with("tokenizer = \"bytes\"", "tokenizer = \"bpe:200\""), "data.tokenizer"),
        ("bpe vocabulary not a number", demo_with("tokenizer = \"bytes\"", "tokenizer = \"bpe:big\""), "data.tokenizer"),
        ("run.name with a slash", demo_with("name = \"demo\"", "name = \"runs/demo\""), "run.name"),
        ("empty run.name", demo_with("name = \"demo\"", "name = \"\""), "run.name"),
        ("run.name = ..", demo_with("name = \"demo\"", "name = \"..\""), "run.name"),
        ("run.name = .", demo_with("name = \"demo\"", "name = \".\""), "run.name"),
        ("run.name with a NUL", demo_with("name = \"demo\"", "name = \"de\\u0000mo\""), "run.name"),
        ("run.name with a backslash", demo_with("name = \"demo\"", "name = \"..\\\\demo\""), "run.name"),
        ("lr = 0", demo_with("lr = 0.02", "lr = 0.0"), "schedule.lr"),
        ("lr < 0", demo_with("lr = 0.02", "lr = -0.02"), "schedule.lr"),
        ("lr = nan", demo_with("lr = 0.02", "lr = nan"), "schedule.lr"),
        ("warmup = 1", demo_with("lr = 0.02\n", "lr = 0.02\nwarmup = 1.0\n"), "schedule.warmup"),
        ("warmup + decay > 1", demo_with("lr = 0.02\n", "lr = 0.02\nwarmup = 0.5\ndecay = 0.6\n"), "schedule.decay"),
        ("min_lr > lr", demo_with("lr = 0.02\n", "lr = 0.02\nmin_lr = 0.1\n"), "schedule.min_lr"),
        ("rewarmup as long as the run", demo_with("lr = 0.02\n", "lr = 0.02\nrewarmup = 3000\n"), "schedule.rewarmup"),
        ("momentum = 1", demo_with("kind = \"muon_nsgd\"\n", "kind = \"muon_nsgd\"\nmomentum = 1.0\n"), "optim.momentum"),
        ("beta2 = 1", demo_with("kind = \"muon_nsgd\"\n", "kind = \"muon_nsgd\"\nbeta2 = 1.0\n"), "optim.beta2"),
        ("negative weight_decay", demo_with("kind = \"muon_nsgd\"\n", "kind = \"muon_nsgd\"\nweight_decay = -0.1\n"), "optim.weight_decay"),
        ("eval.batches = 0", demo_with("batches = 16", "batches = 0"), "eval.batches"),
        ("infinite weight_decay", demo_with("kind = \"muon_nsgd\"\n", "kind = \"muon_nsgd\"\nweight_decay = inf\n"), "optim.weight_decay"),
        ("eps = 0", demo_with("kind = \"muon_nsgd\"\n", "kind = \"muon_nsgd\"\neps = 0.0\n"), "optim.eps"),
        ("ns_steps = 0", demo_with("kind = \"muon_nsgd\"\n", "kind = \"muon_nsgd\"\nns_steps = 0\n"), "optim.ns_steps"),
        ("ns_steps = 10^9", demo_with("kind = \"muon_nsgd\"\n", "kind = \"muon_nsgd\"\nns_steps = 1000000000\n"), "optim.ns_steps"),
        (
            "ns_coeffs with nan",
            demo_with("kind = \"muon_nsgd\"\n", "kind = \"muon_nsgd\"\nns_coeffs = [3.4, nan, 2.0]\n"),
            "optim.ns_coeffs",
        ),
        ("adam_lr_scale = 0", demo_with("kind = \"muon_nsgd\"\n", "kind = \"muon_nsgd\"\nadam_lr_scale = 0.0\n"), "optim.adam_lr_scale"),
        ("run.stop_grace_s beyond a day", demo_with("log_every = 100\n", "log_every = 100\nstop_grace_s = 100000\n"), "run.stop_grace_s"),
        ("daemon.linger_s beyond a day", format!("{DEMO}\n[daemon]\nlinger_s = 100000\n"), "daemon.linger_s"),
        ("supervision.max_restarts too many", format!("{DEMO}\n[supervision]\nmax_restarts = 5000\n"), "supervision.max_restarts"),
        // Unknown enum values.
        ("optim.kind = sgd", demo_with("kind = \"muon_nsgd\"", "kind = \"sgd\""), "optim.kind"),
        ("unknown schedule.kind", demo_with("kind = \"wsd\"", "kind = \"step\""), "schedule.kind"),
        ("unknown decay_shape", demo_with("lr = 0.02\n", "lr = 0.02\ndecay_shape = \"exp\"\n"), "schedule.decay_shape"),
        (
            "unknown embedding_optimizer",
            demo_with("kind = \"muon_nsgd\"\n", "kind = \"muon_nsgd\"\nembedding_optimizer = \"adam\"\n"),
            "optim.embedding_optimizer",
        ),
        ("unknown model.init", demo_with("heads = 4\n", "heads = 4\ninit = \"xavier\"\n"), "model.init"),
        ("unknown growth init", demo_with("init = \"random\"", "init = \"xavier\""), "growth[0].init"),
        ("unknown growth position", demo_with("init = \"random\"\n", "init = \"random\"\nposition = \"middle\"\n"), "growth[0].position"),
        ("unknown growth order", demo_with("init = \"random\"\n", "init = \"random\"\norder = \"shuffled\"\n"), "growth[0].order"),
        ("unknown growth opt_state", demo_with("init = \"random\"\n", "init = \"random\"\nopt_state = \"keep\"\n"), "growth[0].opt_state"),
        // The growth plan.
        ("τ after T (at_step = steps)", demo_with("at = 0.8", "at_step = 3000"), "growth[0].at_step"),
        ("τ after T (at_step > steps)", demo_with("at = 0.8", "at_step = 5000"), "growth[0].at_step"),
        ("at_step = 0", demo_with("at = 0.8", "at_step = 0"), "growth[0].at_step"),
        ("at = 1", demo_with("at = 0.8", "at = 1.0"), "growth[0].at"),
        ("at > 1", demo_with("at = 0.8", "at = 1.5"), "growth[0].at"),
        ("at = 0", demo_with("at = 0.8", "at = 0.0"), "growth[0].at"),
        ("at < 0", demo_with("at = 0.8", "at = -0.2"), "growth[0].at"),
        ("both at and at_step", demo_with("at = 0.8", "at = 0.8\nat_step = 2400"), "growth[0]"),
        ("neither at nor at_step", demo_with("at = 0.8\n", ""), "growth[0]"),
        ("expansions out of order", two_growths("at = 0.8\nto_depth = 3", "at = 0.5\nto_depth = 6"), "growth[1]"),
        ("two expansions at the same step", two_growths("at = 0.5\nto_depth = 3", "at_step = 1500\nto_depth = 6"), "growth[1]"),
        ("to_depth not above the starting depth", demo_with("to_depth = 6", "to_depth = 0"), "growth[0].to_depth"),
        (
            "to_depth not above the previous expansion",
            two_growths("at = 0.5\nto_depth = 3", "at = 0.8\nto_depth = 3"),
            "growth[1].to_depth",
        ),
        ("to_depth above target_depth", demo_with("to_depth = 6", "to_depth = 8"), "growth[0].to_depth"),
        (
            "target_depth with no growth plan",
            demo_with("[[growth]]\nat = 0.8\nto_depth = 6\ninit = \"random\"\n", ""),
            "model.target_depth` (6) is not reached: there is no growth plan",
        ),
        ("target_depth beyond the last expansion", demo_with("to_depth = 6", "to_depth = 4"), "model.target_depth` (6) is not reached"),
        ("copying from 0 blocks", demo_with("init = \"random\"", "init = \"copying\""), "growth[0].init` = \"copying\""),
        ("copying_zero from 0 blocks", demo_with("init = \"random\"", "init = \"copying_zero\""), "growth[0].init` = \"copying_zero\""),
        ("at rounding to step 0", demo_with("at = 0.8", "at = 0.0001"), "growth[0].at"),
        // Sizes: refused at load time with the estimate, before anything is allocated.
        ("channels = 2^40", demo_with("channels = 128", "channels = 1099511627776"), "the run needs about"),
        (
            "max_seq = 2^40",
            demo_with("heads = 4\n", "heads = 4\nmax_seq = 1099511627776\n"),
            "`model.max_seq` (1099511627776) must be at most",
        ),
        (
            "depth = 100000",
            demo_with("depth = 0\n", "depth = 100000\n").replacen("target_depth = 6", "target_depth = 100000", 1).replacen(
                "[[growth]]\nat = 0.8\nto_depth = 6\ninit = \"random\"\n",
                "",
                1,
            ),
            "the run needs about",
        ),
        (
            "a growth to 100,000 blocks",
            demo_with("to_depth = 6", "to_depth = 100000").replacen("target_depth = 6", "target_depth = 100000", 1),
            "more than",
        ),
        ("micro_batches = 2^40", demo_with("seq_len = 128\n", "seq_len = 128\nmicro_batches = 1099511627776\n"), "the run needs about"),
        ("batch_size = 2^40", demo_with("batch_size = 16", "batch_size = 1099511627776"), "the run needs about"),
        ("eval.batches = 2^40", demo_with("batches = 16", "batches = 1099511627776"), "the run needs about"),
        (
            "run.max_memory below the estimate",
            demo_with("log_every = 100\n", "log_every = 100\nmax_memory = \"1MiB\"\n"),
            "of `run.max_memory`",
        ),
        ("run.max_memory not a size", demo_with("log_every = 100\n", "log_every = 100\nmax_memory = \"lots\"\n"), "run.max_memory"),
        // The [daemon] section.
        ("unknown key in [daemon]", format!("{DEMO}\n[daemon]\nport = 9464\n"), "daemon.port"),
        ("daemon.listen without a port", format!("{DEMO}\n[daemon]\nlisten = \"127.0.0.1\"\n"), "daemon.listen"),
        ("daemon.listen not an address", format!("{DEMO}\n[daemon]\nlisten = \"localhost:http\"\n"), "daemon.listen"),
        ("negative daemon.peak_flops", format!("{DEMO}\n[daemon]\npeak_flops = -1.0\n"), "daemon.peak_flops"),
        ("empty daemon.token_file", format!("{DEMO}\n[daemon]\ntoken_file = \"\"\n"), "daemon.token_file"),
        ("negative daemon.linger_s", format!("{DEMO}\n[daemon]\nlinger_s = -5\n"), "daemon.linger_s"),
        ("daemon.max_connections = 0", format!("{DEMO}\n[daemon]\nmax_connections = 0\n"), "daemon.max_connections"),
        ("daemon.max_connections too large", format!("{DEMO}\n[daemon]\nmax_connections = 100000\n"), "daemon.max_connections"),
        ("daemon.header_timeout_s = 0", format!("{DEMO}\n[daemon]\nheader_timeout_s = 0\n"), "daemon.header_timeout_s"),
        ("daemon.idle_timeout_s = 0", format!("{DEMO}\n[daemon]\nidle_timeout_s = 0\n"), "daemon.idle_timeout_s"),
        ("negative daemon.rate_limit", format!("{DEMO}\n[daemon]\nrate_limit = -1.0\n"), "daemon.rate_limit"),
        ("daemon.rate_limit = nan", format!("{DEMO}\n[daemon]\nrate_limit = nan\n"), "daemon.rate_limit"),
        ("daemon.allowed_hosts not a list", format!("{DEMO}\n[daemon]\nallowed_hosts = \"localhost\"\n"), "daemon.allowed_hosts"),
        ("negative run.stop_grace_s", demo_with("log_every = 100\n", "log_every = 100\nstop_grace_s = -1\n"), "run.stop_grace_s"),
        // TOML syntax: the message names the line.
        ("missing value", demo_with("steps = 3000", "steps = "), "line 6"),
        ("unterminated string", demo_with("dir = \"data/shakespeare-bytes\"", "dir = \"data/shakespeare-bytes"), "line 10"),
        ("duplicate key", demo_with("seed = 1337\n", "seed = 1337\nseed = 7\n"), "seed"),
        ("unclosed table header", demo_with("[model]", "[model"), "line 15"),
    ]
}

#[test]
fn malformed_configs_are_rejected_naming_the_key() {
    let cases = malformed();
    assert!(cases.len() >= 24);
    let mut failures = Vec::new();
    for (i, (case, text, key)) in cases.iter().enumerate() {
        let msg = parse_err(case, text, &[]);
        println!("--- [{i:2}] {case} (must name {key:?})\n{msg}\n");
        if !msg.contains(key) {
            failures.push(format!("{case}: {key:?} not in {msg:?}"));
        }
    }
    println!("{} malformed configs rejected", cases.len());
    assert!(failures.is_empty(), "errors that do not name their key:\n{}", failures.join("\n"));
}

#[test]
fn every_malformed_case_differs_from_demo_and_demo_itself_parses() {
    Config::parse(DEMO, &[]).unwrap();
    for (case, text, _) in malformed() {
        assert_ne!(text, DEMO, "{case}: the mutation did not change the text");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. `--set` overrides

fn parse_set(text: &str, overrides: &[&str]) -> Config {
    match parse_caught(text, &sets(overrides)) {
        Err(p) => panic!("--set {overrides:?} panicked: {p}"),
        Ok(r) => r.unwrap_or_else(|e| panic!("--set {overrides:?}: {e:#}")),
    }
}

#[track_caller]
fn set_err(text: &str, overrides: &[&str], key: &str) {
    let msg = parse_err(&format!("--set {overrides:?}"), text, &sets(overrides));
    println!("--- --set {overrides:?} (must name {key:?})\n{msg}\n");
    assert!(msg.contains(key), "--set {overrides:?}: {key:?} not in {msg:?}");
}

#[test]
fn set_changes_steps_and_everything_derived_from_it() {
    let cfg = parse_set(DEMO, &["run.steps=10"]);
    assert_eq!(cfg.run.steps, 10);
    assert_eq!(cfg.schedule.total_steps, 10);
    assert_eq!(cfg.expansions()[0].at_step, 8, "at = 0.8 follows the new T");
    // Whitespace around the key and value is tolerated.
    assert_eq!(parse_set(DEMO, &[" run.steps = 10"]).run.steps, 10);
}

#[test]
fn set_float_and_later_overrides_win() {
    let cfg = parse_set(DEMO, &["schedule.lr=0.5"]);
    assert_eq!(cfg.schedule.lr, 0.5);
    let cfg = parse_set(DEMO, &["schedule.lr=0.5", "schedule.lr=0.25"]);
    assert_eq!(cfg.schedule.lr, 0.25);
    // An integer literal where a float is expected.
    assert_eq!(parse_set(DEMO, &["schedule.lr=1"]).schedule.lr, 1.0);
}

#[test]
fn set_enum_as_toml_string_or_bare_word() {
    assert_eq!(parse_set(DEMO, &["optim.kind=\"adamw\""]).optim.kind, OptimizerKind::Adamw);
    // What arrives after a shell strips the quotes: not TOML, so taken as a string.
    assert_eq!(parse_set(DEMO, &["optim.kind=muon_adamw"]).optim.kind, OptimizerKind::MuonAdamw);
    assert_eq!(parse_set(DEMO, &["schedule.decay_shape=\"1-sqrt\""]).schedule.decay_shape, DecayShape::OneMinusSqrt);
    assert_eq!(parse_set(DEMO, &["run.name=demo-2"]).run.name, "demo-2");
}

#[test]
fn set_nested_new_table_values() {
    // A key in a section the file does not have creates that section.
    let no_eval = demo_with("[eval]\nevery = 250\nbatches = 16\nsample_tokens = 64\n", "");
    let cfg = parse_set(&no_eval, &["eval.every=10"]);
    assert_eq!((cfg.eval.every, cfg.eval.batches), (10, 16));
    // A whole table as an inline TOML table replaces the section.
    let cfg = parse_set(DEMO, &["eval={ every = 5, batches = 2 }"]);
    assert_eq!((cfg.eval.every, cfg.eval.batches), (5, 2));
    // A key the file does not set, inside an existing section.
    assert_eq!(parse_set(DEMO, &["model.max_seq=256"]).max_seq(), 256);
    // A whole growth plan as an array of inline tables turns the fixed baseline progressive.
    let cfg = parse_set(
        DEMO_FIXED,
        &["model.depth=1", "growth=[{ at = 0.5, to_depth = 3 }, { at_step = 2400, to_depth = 6, init = \"copying\" }]"],
    );
    let ex = cfg.expansions();
    assert_eq!(cfg.target_depth(), 6);
    assert_eq!(ex.iter().map(|e| (e.at_step, e.to_depth)).collect::<Vec<_>>(), vec![(1500, 3), (2400, 6)]);
    assert_eq!(ex[1].init, GrowInit::Copying);
}

#[test]
fn set_without_equals_is_an_error() {
    set_err(DEMO, &["run.steps"], "run.steps");
    set_err(DEMO, &["run.steps"], "key=value");
    set_err(DEMO, &["=10"], "=10");
    set_err(DEMO, &["run..steps=10"], "run..steps");
}

#[test]
fn set_unknown_key_is_an_error_naming_it() {
    set_err(DEMO, &["run.epochs=3"], "run.epochs");
    set_err(DEMO, &["optim.lr=0.1"], "optim.lr");
    set_err(DEMO, &["colour=1"], "colour");
    set_err(DEMO, &["logging.level=1"], "logging");
}

#[test]
fn set_through_a_non_table_is_an_error() {
    set_err(DEMO, &["run.steps.x=1"], "run.steps");
    set_err(DEMO, &["growth.at=0.5"], "growth");
}

#[test]
fn set_that_makes_the_config_inconsistent_is_an_error() {
    set_err(DEMO, &["model.heads=3"], "model.heads");
    set_err(DEMO, &["run.steps=0"], "run.steps");
    set_err(DEMO, &["model.target_depth=4"], "growth[0].to_depth");
    set_err(DEMO, &["optim.kind=sgd"], "optim.kind");
    set_err(DEMO, &["run.steps=-5"], "run.steps");
    set_err(DEMO, &["run.steps=ten"], "run.steps");
    set_err(DEMO_FIXED, &["model.depth=1", "growth=[{ at = 0.8, to_depth = 6 }, { at = 0.5, to_depth = 8 }]"], "growth[1]");
}

#[test]
fn set_addresses_growth_entries_by_index() {
    let c = parse_set(DEMO, &["growth[0].init=\"zero\"", "growth[0].at=0.5"]);
    assert_eq!(c.growth[0].init, GrowInit::Zero);
    assert_eq!(c.expansions()[0].at_step, 1500);
    // The next index appends an entry.
    let c = parse_set(DEMO, &["growth[1].at=0.9", "growth[1].to_depth=8", "model.target_depth=8"]);
    assert_eq!(c.growth.len(), 2);
    assert_eq!((c.expansions()[1].at_step, c.expansions()[1].to_depth), (2700, 8));
    set_err(DEMO, &["growth[3].init=zero"], "`growth` has 1 entries, so `growth[3]` is out of range");
    set_err(DEMO, &["growth[x].init=zero"], "\"x\" is not an index");
    set_err(DEMO, &["run[0].steps=5"], "`run` is not a list");
}

#[test]
fn the_memory_estimate_follows_the_model_and_accepts_what_fits() {
    use taproot::config::memory::{estimate, parse_bytes};
    let demo = Config::parse(DEMO, &[]).unwrap();
    let e = estimate(&demo);
    // The demo at its target depth: P = 256·128 + 128·128 + 2·128 + 6·(12·128² + 13·128) floats.
    let p = (256 * 128 + 128 * 128 + 2 * 128 + 6 * (12 * 128 * 128 + 13 * 128)) as f64;
    assert_eq!(e.params, 4.0 * p);
    assert_eq!(e.grads, 4.0 * p);
    assert!(e.total() < 2.0 * 1024.0 * 1024.0 * 1024.0, "the demo needs under 2 GiB: {e:?}");
    // Twice the channels: about four times the block parameters.
    let wide = parse_set(DEMO, &["model.channels=256"]);
    assert!(estimate(&wide).params > 3.5 * e.params);
    // A limit the demo fits in is accepted.
    parse_set(DEMO, &["run.max_memory=\"4GiB\""]);
    assert_eq!(parse_bytes("512MiB"), Some(512.0 * 1024.0 * 1024.0));
    assert_eq!(parse_bytes("2GB"), Some(2e9));
    assert_eq!(parse_bytes("1000"), Some(1000.0));
    assert_eq!(parse_bytes("-1GiB"), None);
}

#[test]
fn a_bpe_tokenizer_sizes_the_vocabulary() {
    let c = parse_set(DEMO, &["data.tokenizer=\"bpe:4096\""]);
    assert_eq!(c.data.tokenizer, "bpe:4096");
    let e = taproot::config::memory::estimate(&c);
    let bytes = taproot::config::memory::estimate(&Config::parse(DEMO, &[]).unwrap());
    // 4096 rows of the tied embedding instead of 256: 3840 · 128 more parameters.
    assert_eq!(e.params - bytes.params, 4.0 * 3840.0 * 128.0);
}
