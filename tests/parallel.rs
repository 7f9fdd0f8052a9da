//! Data parallelism across processes (`[parallel] data = D`, `crate::dist`): real `mpirun`
//! (OpenMPI) starting the `taproot` binary built with the `mpi` feature.
//!
//! The tolerance: D replicas sum each unit's gradient as (their local sums) added across
//! ranks, one process as one running sum, so the two differ by the order of floating-point
//! additions (~1e-7 relative per step). Over these runs of 12 steps the final parameters agree
//! to 1e-5 and every logged loss to 1e-5 relative; anything else (a lost micro-batch, a doubled
//! gradient, replicas drifting apart) is off by orders of magnitude more.
//!
//! Without MPI (no `mpirun`, or a build without the feature) the MPI tests print why they skip;
//! with TAPROOT_REQUIRE_MPI=1 (CI) that is a failure.

mod common;

use common::{synthetic_dataset, TestConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use taproot::checkpoint;

fn mpi_ready() -> bool {
    let have_mpirun = Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success());
    let ready = cfg!(feature = "mpi") && have_mpirun;
    if !ready {
        let why = if cfg!(feature = "mpi") { "mpirun not found" } else { "built without the `mpi` feature" };
        if std::env::var("TAPROOT_REQUIRE_MPI").is_ok() {
            panic!("TAPROOT_REQUIRE_MPI is set but MPI is not usable: {why}");
        }
        println!("SKIP: {why}");
    }
    ready
}

/// The `taproot` binary under test: this build's, or `TAPROOT_BIN` (a prebuilt binary run
/// where no toolchain is, as `scripts/gpu-check.sh` runs these tests on a GPU machine).
fn bin() -> String {
    std::env::var("TAPROOT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_taproot").to_string())
}

fn taproot() -> Command {
    Command::new(bin())
}

/// `taproot ARGS` under `mpirun -np N` (as root, and with more ranks than cores, as CI needs).
fn mpirun(n: usize, args: &[&str]) -> Output {
    let mut c = Command::new("mpirun");
    c.args(["-np", &n.to_string(), "--oversubscribe"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .arg(bin())
        .args(args);
    c.output().expect("mpirun starts")
}

/// `taproot train --config cfg` under mpirun with `n` processes, writing into `out`, with
/// `--set` overrides `sets`.
fn mpirun_train(n: usize, cfg: &Path, out: &Path, sets: &[&str]) -> Output {
    let out = format!("run.out_dir={}", out.display());
    let mut args = vec!["train", "--config", cfg.to_str().unwrap(), "--set", &out];
    for set in sets {
        args.extend(["--set", set]);
    }
    mpirun(n, &args)
}

fn ok(what: &str, o: &Output) {
    assert!(o.status.success(), "{what} failed:\n{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

/// 12 steps of 4 micro-batches, 1 block grown to 3 by copying at step 6, evaluated every 6.
fn config(dir: &Path, name: &str) -> PathBuf {
    TestConfig::new(dir)
        .name(name)
        .steps(12)
        .micro_batches(4)
        .depth(1)
        .target_depth(3)
        .grow_at_step(6, 3)
        .growth_init("copying")
        .eval(6, 2)
        .write()
}

/// Every tensor of the newest checkpoint in `run`, by name.
fn tensors(run: &Path) -> HashMap<String, Vec<f32>> {
    let (ck, _, _) = taproot::checkpoint::load_newest_valid(&run.join("checkpoints")).unwrap().expect("a checkpoint");
    let mut out = HashMap::new();
    for (k, u) in &ck.units {
        out.insert(format!("{k}.params"), u.params.clone());
        out.insert(format!("{k}.m"), u.m.clone());
    }
    out
}

fn assert_close_runs(a: &Path, b: &Path) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.keys().collect::<std::collections::BTreeSet<_>>(), tb.keys().collect(), "the two runs hold different units");
    let mut worst = 0.0f32;
    for (k, va) in &ta {
        let vb = &tb[k];
        assert_eq!(va.len(), vb.len(), "{k}");
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs());
        }
    }
    println!("final state: max |difference| {worst:e}");
    assert!(worst <= 1e-5, "the runs' final states differ by {worst:e}");
    let losses = |run: &Path| -> Vec<(String, f64)> {
        std::fs::read_to_string(run.join("steps.csv"))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f[0].to_string(), f[3].parse().unwrap())
            })
            .collect()
    };
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.len(), 12);
    assert_eq!(la.iter().map(|x| &x.0).collect::<Vec<_>>(), lb.iter().map(|x| &x.0).collect::<Vec<_>>());
    for ((s, x), (_, y)) in la.iter().zip(&lb) {
        assert!(((x - y) / x).abs() <= 1e-5, "step {s}: training loss {x} against {y}");
    }
}

/// Train `cfg` to step 8 with 2 processes and `sets` (into `dir/name`), then resume it in one
/// process (with `one_sets`) to the end; returns the run folder.
fn split_run(dir: &Path, cfg: &Path, name: &str, sets: &[&str], one_sets: &[&str]) -> PathBuf {
    let split = dir.join(name);
    let out = format!("run.out_dir={}", split.display());
    let mut first = vec!["train", "--config", cfg.to_str().unwrap(), "--set", &out, "--stop-after", "8"];
    let mut then = vec!["train", "--config", cfg.to_str().unwrap(), "--set", &out, "--resume"];
    for s in sets {
        first.extend(["--set", s]);
    }
    for s in one_sets {
        then.extend(["--set", s]);
    }
    ok("2 processes, first part", &mpirun(2, &first));
    ok("one process, resumed", &taproot().args(&then).output().unwrap());
    split
}

#[test]
fn two_replicas_train_as_one_process_through_growth() {
    if !mpi_ready() {
        return;
    }
    let dir = synthetic_dataset("dp-two");
    let cfg = config(&dir, "one");
    ok("one process", &taproot().args(["train", "--config", cfg.to_str().unwrap()]).output().unwrap());
    let two = dir.join("two");
    let o = mpirun_train(2, &cfg, &two, &["parallel.data=2"]);
    ok("two replicas", &o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(stdout.matches("done steps=12").count(), 1, "rank 0 alone reports: {stdout}");
    assert!(stdout.contains("2 data-parallel replicas"), "{stdout}");
    // One checkpoint set, written by rank 0; the growth event is in it.
    let (ck, _, _) = taproot::checkpoint::load_newest_valid(&two.join("checkpoints")).unwrap().unwrap();
    assert_eq!((ck.meta.step, ck.meta.depth), (12, 3));
    assert_close_runs(&dir.join("one"), &two);
    // Four replicas of one micro-batch each: the same again.
    let four = dir.join("four");
    ok("four replicas", &mpirun_train(4, &cfg, &four, &["parallel.data=4"]));
    assert_close_runs(&dir.join("one"), &four);
}

#[test]
fn a_run_resumes_onto_another_number_of_replicas() {
    if !mpi_ready() {
        return;
    }
    let dir = synthetic_dataset("dp-resume");
    let cfg = config(&dir, "straight");
    ok("straight", &taproot().args(["train", "--config", cfg.to_str().unwrap()]).output().unwrap());
    // 2 replicas to step 8 (after growth), then one process to the end.
    let split = split_run(&dir, &cfg, "split", &["parallel.data=2"], &[]);
    assert_close_runs(&dir.join("straight"), &split);
}

#[test]
fn replicas_the_launch_does_not_provide_are_a_clear_error() {
    // Needs no MPI: without the feature the error says to build with it; with it, MPI starts as
    // one process and the error names the key and the launcher.
    let dir = synthetic_dataset("dp-bad");
    let cfg = config(&dir, "bad");
    let o = taproot().args(["train", "--config", cfg.to_str().unwrap(), "--set", "parallel.data=2"]).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    if cfg!(feature = "mpi") {
        assert!(err.contains("`parallel.data` × `parallel.pipeline` = 2 × 1 = 2") && err.contains("mpirun -np 2"), "{err}");
    } else {
        assert!(err.contains("--features mpi"), "{err}");
    }
    assert!(!dir.join("bad").join("checkpoints").exists(), "a run that cannot start wrote nothing");
    // Micro-batches the replicas cannot split evenly: a config error naming both keys.
    let o = taproot().args(["train", "--config", cfg.to_str().unwrap(), "--set", "parallel.data=3"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("`data.micro_batches` (4)") && err.contains("`parallel.data` (3)"), "{err}");
    let o = taproot().args(["train", "--config", cfg.to_str().unwrap(), "--set", "parallel.pipeline=0"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("parallel.pipeline"), "{err}");
}

#[test]
fn replicas_that_grow_different_layers_stop_the_run() {
    if !mpi_ready() {
        return;
    }
    let dir = synthetic_dataset("dp-diverge");
    // Random init (copying would copy the same trained layer in every replica).
    let cfg = TestConfig::new(&dir)
        .name("diverge")
        .steps(12)
        .micro_batches(4)
        .depth(1)
        .target_depth(3)
        .grow_at_step(6, 3)
        .growth_init("random")
        .write();
    let o = mpirun(2, &["train", "--config", cfg.to_str().unwrap(), "--set", "parallel.data=2", "--set", "faults.diverge_replica=1"]);
    assert!(!o.status.success(), "the run went on with replicas that differ");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("after growth at step 6, layer 1 is not the same in every data-parallel replica"), "{err}");
    // Without the fault the same run passes the check.
    let out = format!("run.out_dir={}", dir.join("agree").display());
    ok("replicas that agree", &mpirun(2, &["train", "--config", cfg.to_str().unwrap(), "--set", "parallel.data=2", "--set", &out]));
}

#[test]
fn launch_prints_the_mpirun_and_srun_lines_of_the_config() {
    let dir = synthetic_dataset("dp-launch-line");
    let cfg = TestConfig::new(&dir)
        .name("hosts")
        .steps(4)
        .micro_batches(4)
        .set("parallel.data", 4)
        .set("parallel.hosts", "[\"gpu-a\", \"gpu-b\"]")
        .write();
    let o = taproot().args(["launch", "--config", cfg.to_str().unwrap(), "--dry-run", "--set", "run.seed=3"]).output().unwrap();
    ok("launch --dry-run", &o);
    let line = String::from_utf8_lossy(&o.stdout);
    let want = format!("train --config {} --set run.seed=3", cfg.display());
    assert!(line.starts_with("mpirun -np 4 --host gpu-a:2,gpu-b:2 ") && line.trim_end().ends_with(&want), "{line}");
    let o = taproot().args(["launch", "--config", cfg.to_str().unwrap(), "--dry-run"]).env("SLURM_JOB_ID", "1").output().unwrap();
    ok("launch under Slurm", &o);
    let line = String::from_utf8_lossy(&o.stdout);
    assert!(line.starts_with("srun --ntasks=4 --ntasks-per-node=2 "), "{line}");
    // Under Slurm, without --dry-run, launch runs srun itself: here there is none, so it fails
    // saying so (it printed the line and exited 0 having started nothing, ending a batch job).
    let o = taproot()
        .args(["launch", "--config", cfg.to_str().unwrap()])
        .env("SLURM_JOB_ID", "1")
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("starting srun"), "{err}");
    // Printed lines are shell-quoted (they run when pasted), and launcher options come first.
    let o = taproot()
        .args(["launch", "--config", cfg.to_str().unwrap(), "--dry-run", "--set", r#"parallel.hosts=["a","b"]"#])
        .args(["--launcher-arg=--oversubscribe", "--launcher-arg", "--bind-to", "--launcher-arg", "none"])
        .output()
        .unwrap();
    ok("launch with launcher options", &o);
    let line = String::from_utf8_lossy(&o.stdout);
    assert!(line.starts_with("mpirun --oversubscribe --bind-to none -np 4 --host a:2,b:2 "), "{line}");
    assert!(line.trim_end().ends_with(r#"--set 'parallel.hosts=["a","b"]'"#), "{line}");
    let sh = Command::new("sh").arg("-c").arg(format!("printf '%s\\n' {}", line.trim_end())).output().unwrap();
    let words: Vec<String> = String::from_utf8_lossy(&sh.stdout).lines().map(String::from).collect();
    assert_eq!(words.last().map(String::as_str), Some(r#"parallel.hosts=["a","b"]"#), "the shell reads back {words:?}");
    // Daemons instead of a training run; pipeline stages count as processes.
    let o = taproot()
        .args(["launch", "--config", cfg.to_str().unwrap(), "--daemon", "--dry-run", "--set", "parallel.pipeline=2"])
        .output()
        .unwrap();
    ok("launch --daemon", &o);
    let line = String::from_utf8_lossy(&o.stdout);
    assert!(
        line.starts_with("mpirun -np 8 --host gpu-a:4,gpu-b:4 ") && line.contains(&format!(" daemon --config {} ", cfg.display())),
        "{line}"
    );
    let o = taproot().args(["launch", "--config", cfg.to_str().unwrap(), "--daemon", "--resume"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("a daemon always resumes"));
}

#[test]
fn launch_starts_a_two_process_run() {
    if !mpi_ready() {
        return;
    }
    let dir = synthetic_dataset("dp-launch");
    let cfg = config(&dir, "launched");
    let o = taproot()
        .args(["launch", "--config", cfg.to_str().unwrap(), "--set", "parallel.data=2"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .output()
        .unwrap();
    ok("launch", &o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("2 data-parallel replicas"));
    let (ck, _, _) = taproot::checkpoint::load_newest_valid(&dir.join("launched").join("checkpoints")).unwrap().unwrap();
    assert_eq!((ck.meta.step, ck.meta.depth), (12, 3));
}

/// A long 2-replica run under mpirun in the background, checkpointing every 10 steps; returns
/// once its first checkpoint is on disk.
fn start_long_run(dir: &Path, name: &str) -> (std::process::Child, PathBuf, PathBuf) {
    start_long_run_with(dir, name, 2, 1, &["parallel.data=2"])
}

/// A long run of `n` processes and `depth` blocks with the settings `sets`, as [`start_long_run`].
fn start_long_run_with(dir: &Path, name: &str, n: usize, depth: usize, sets: &[&str]) -> (std::process::Child, PathBuf, PathBuf) {
    let cfg = TestConfig::new(dir).name(name).steps(100_000).micro_batches(2).depth(depth).checkpoint_every(10).write();
    let mut c = Command::new("mpirun");
    c.args(["-np", &n.to_string(), "--oversubscribe"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .arg(bin())
        .args(["train", "--config", cfg.to_str().unwrap()]);
    for s in sets {
        c.args(["--set", s]);
    }
    let mut child = c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let run = dir.join(name);
    let t0 = std::time::Instant::now();
    while taproot::checkpoint::load_newest_valid(&run.join("checkpoints")).ok().flatten().is_none() {
        assert!(t0.elapsed().as_secs() < 60, "no checkpoint after 60 s");
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!("the run ended early: {st}\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    (child, cfg, run)
}

/// Wait for `child` at most `secs` seconds.
fn wait_within(child: &mut std::process::Child, secs: u64) -> std::process::ExitStatus {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t0.elapsed().as_secs() >= secs {
            let _ = child.kill();
            panic!("still running {secs} s later");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The pids of the ranks of the run of config `cfg` (their command lines name it).
fn rank_pids(cfg: &Path) -> Vec<String> {
    let pids = Command::new("pgrep").args(["-f", &format!("train --config {}", cfg.display())]).output().unwrap();
    let pids: Vec<String> = String::from_utf8_lossy(&pids.stdout).split_whitespace().map(String::from).collect();
    assert!(pids.len() >= 2, "found ranks {pids:?}");
    pids
}

/// Both replicas stopped after the same step (a replica that went on would wait forever in
/// the next reduction), and rank 0 checkpointed that step.
fn assert_clean_stop(run: &Path, out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("done steps="), "rank 0 did not finish:\n{stdout}\n{stderr}");
    assert!(!stderr.contains("error") && !stderr.contains("signal 9"), "{stderr}");
    let (ck, _, _) = taproot::checkpoint::load_newest_valid(&run.join("checkpoints")).unwrap().unwrap();
    let rows = std::fs::read_to_string(run.join("steps.csv")).unwrap();
    let last: u64 = rows.lines().last().unwrap().split(',').next().unwrap().parse().unwrap();
    assert_eq!(ck.meta.step, last, "the final checkpoint is the last logged step");
    assert!(last < 100_000);
}

/// SIGTERM to the last rank of `child`'s run (the highest pid: the last rank started), then a
/// clean stop of every rank within 30 s.
fn sigterm_last_rank_stops_cleanly(mut child: std::process::Child, cfg: &Path, run: &Path) {
    Command::new("kill").args(["-TERM", rank_pids(cfg).last().unwrap()]).status().unwrap();
    let st = wait_within(&mut child, 30);
    let out = child.wait_with_output().unwrap();
    assert!(st.success(), "mpirun exited {st}: a rank failed:\n{}", String::from_utf8_lossy(&out.stderr));
    assert_clean_stop(run, &out);
}

/// SIGKILL to the last rank of `child`'s run: the run stops within 20 s, and `n` processes with
/// `sets` resume it for 15 more steps. Returns the resumed checkpoint's depth.
fn sigkill_last_rank_then_resume(mut child: std::process::Child, cfg: &Path, run: &Path, n: usize, sets: &[&str]) -> usize {
    Command::new("kill").args(["-KILL", rank_pids(cfg).last().unwrap()]).status().unwrap();
    let st = wait_within(&mut child, 20);
    assert!(!st.success(), "the run ended well although a rank was killed");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // mpirun sends the survivors SIGTERM before it ends them: they must not promise a
    // checkpoint that a dead rank makes impossible.
    if err.contains("finishing the current step") {
        assert!(err.contains("if every rank is still there (a rank that is gone makes that impossible"), "{err}");
    }
    let (ck, _, _) = taproot::checkpoint::load_newest_valid(&run.join("checkpoints")).unwrap().unwrap();
    let from = ck.meta.step;
    let until = (from + 15).to_string();
    let mut args = vec!["train", "--config", cfg.to_str().unwrap(), "--resume", "--stop-after", &until];
    for s in sets {
        args.extend(["--set", s]);
    }
    ok("resumed", &mpirun(n, &args));
    let (ck, _, _) = taproot::checkpoint::load_newest_valid(&run.join("checkpoints")).unwrap().unwrap();
    assert_eq!(ck.meta.step, from + 15);
    ck.meta.depth
}

#[test]
fn sigterm_to_one_rank_stops_every_replica_after_the_same_step() {
    if !mpi_ready() {
        return;
    }
    let dir = synthetic_dataset("dp-sigterm-rank");
    let (child, cfg, run) = start_long_run(&dir, "term-rank");
    // Only the last rank hears it: the stop wish travels with the next step's reduction.
    sigterm_last_rank_stops_cleanly(child, &cfg, &run);
}

#[test]
fn sigterm_to_the_launcher_checkpoints_and_stops_every_rank() {
    if !mpi_ready() {
        return;
    }
    let dir = synthetic_dataset("dp-sigterm");
    let (mut child, _, run) = start_long_run(&dir, "term");
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    // mpirun forwards SIGTERM to every rank; each exits 0 after the agreed step (OpenMPI's
    // mpirun itself then exits 1 for having been signalled, whatever its ranks did).
    wait_within(&mut child, 30);
    let out = child.wait_with_output().unwrap();
    assert_clean_stop(&run, &out);
}

#[test]
fn a_killed_rank_stops_the_run_and_it_resumes() {
    if !mpi_ready() {
        return;
    }
    let dir = synthetic_dataset("dp-kill");
    let (child, cfg, run) = start_long_run(&dir, "killed");
    sigkill_last_rank_then_resume(child, &cfg, &run, 2, &["parallel.data=2"]);
}

/// Every byte of the newest checkpoint's tensors and every logged loss, as text: two runs are
/// bitwise equal when these are.
fn exact_trajectory(run: &Path) -> (Vec<(String, Vec<u32>)>, Vec<String>) {
    let (ck, _, _) = taproot::checkpoint::load_newest_valid(&run.join("checkpoints")).unwrap().expect("a checkpoint");
    let mut tensors: Vec<(String, Vec<u32>)> = Vec::new();
    for (k, u) in &ck.units {
        tensors.push((format!("{k}.params"), u.params.iter().map(|x| x.to_bits()).collect()));
        tensors.push((format!("{k}.m"), u.m.iter().map(|x| x.to_bits()).collect()));
        tensors.push((format!("{k}.v"), u.v.iter().flatten().map(|x| x.to_bits()).collect()));
    }
    tensors.sort();
    // step, depth, lr, loss (wall times differ).
    let steps = std::fs::read_to_string(run.join("steps.csv")).unwrap();
    let evals = std::fs::read_to_string(run.join("evals.csv")).unwrap_or_default();
    let cols = |l: &str, n: usize| l.split(',').take(n).collect::<Vec<_>>().join(",");
    let mut log: Vec<String> = steps.lines().map(|l| cols(l, 4)).collect();
    log.extend(evals.lines().map(|l| cols(l, 3)));
    (tensors, log)
}

fn assert_bitwise_runs(a: &Path, b: &Path) {
    let (ta, la) = exact_trajectory(a);
    let (tb, lb) = exact_trajectory(b);
    assert_eq!(la.len(), lb.len(), "logged rows");
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(x, y, "logged row");
    }
    assert_eq!(ta.iter().map(|t| &t.0).collect::<Vec<_>>(), tb.iter().map(|t| &t.0).collect::<Vec<_>>(), "units");
    for ((k, x), (_, y)) in ta.iter().zip(&tb) {
        assert!(x == y, "{k} differs between the runs");
    }
}

#[test]
fn pipeline_stages_in_processes_equal_the_one_process_pipeline_bitwise() {
    if !mpi_ready() {
        return;
    }
    let dir = synthetic_dataset("pp-equal");
    for (p, policy) in [(2usize, "balanced"), (3, "balanced"), (2, "fill")] {
        // One process, P devices; against P processes of one device each. Growth 1 -> 3 at step
        // 6 under `balanced` moves the old layer from stage 0 to the last stage; under `fill`
        // nothing moves and the ring crosses between the processes twice (0, 1, 0).
        let devices: Vec<String> = (0..p).map(|i| format!("cpu:{i}")).collect();
        let one = config(&dir, &format!("one-{p}-{policy}"));
        let one_out = dir.join(format!("one-{p}-{policy}"));
        let list = format!("placement.devices=[{}]", devices.iter().map(|d| format!("\"{d}\"")).collect::<Vec<_>>().join(","));
        let pol = format!("placement.policy=\"{policy}\"");
        ok("one process", &taproot().args(["train", "--config", one.to_str().unwrap(), "--set", &list, "--set", &pol]).output().unwrap());
        let multi = dir.join(format!("p{p}-{policy}"));
        let o = mpirun_train(p, &one, &multi, &[&format!("parallel.pipeline={p}"), "run.log_every=1", &pol]);
        ok(&format!("{p} pipeline stages"), &o);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(stdout.contains(&format!("1 data-parallel replicas × {p} pipeline stages")), "{stdout}");
        if policy == "balanced" {
            assert!(stdout.contains("moved=1"), "the growth moved a layer across processes: {stdout}");
            let last = format!("cpu:0@{}", p - 1);
            assert!(stdout.contains(&last), "the stack reached the last stage: {stdout}");
        } else {
            assert!(stdout.contains("moved=0 placement=cpu:0,cpu:0@1,cpu:0"), "{stdout}");
        }
        assert_bitwise_runs(&one_out, &multi);
    }
}

#[test]
fn a_pipelined_run_resumes_onto_one_process_bitwise() {
    if !mpi_ready() {
        return;
    }
    let dir = synthetic_dataset("pp-resume");
    let cfg = config(&dir, "straight");
    let two = "placement.devices=[\"cpu:0\",\"cpu:1\"]";
    ok("straight", &taproot().args(["train", "--config", cfg.to_str().unwrap(), "--set", two]).output().unwrap());
    // Two stages to step 8 (after growth moved a layer to stage 1), then one process of two
    // devices to the end: the checkpoint is keyed by layer id, not by process.
    let split = split_run(&dir, &cfg, "split", &["parallel.pipeline=2"], &[two]);
    assert_bitwise_runs(&dir.join("straight"), &split);
}

#[test]
fn two_replicas_of_two_stages_train_as_one_process() {
    if !mpi_ready() {
        return;
    }
    let dir = synthetic_dataset("dp-pp");
    let cfg = config(&dir, "one");
    ok("one process", &taproot().args(["train", "--config", cfg.to_str().unwrap()]).output().unwrap());
    let four = dir.join("four");
    let o = mpirun_train(4, &cfg, &four, &["parallel.data=2", "parallel.pipeline=2", "run.log_every=1"]);
    ok("2 x 2", &o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("2 data-parallel replicas × 2 pipeline stages"), "{stdout}");
    assert!(stdout.contains("placement=cpu:0,cpu:0,cpu:0@1"), "{stdout}");
    // Growth happened in both replicas and the newborn layers were checked equal across them.
    assert_close_runs(&dir.join("one"), &four);
}

#[test]
fn sigterm_to_a_pipeline_stage_stops_the_run_cleanly() {
    if !mpi_ready() {
        return;
    }
    let dir = synthetic_dataset("pp-sigterm");
    let (child, cfg, run) = start_long_run_with(&dir, "term-stage", 2, 2, &["parallel.pipeline=2"]);
    // The last rank is stage 1, which hosts the top layer: it passes the stop to stage 0.
    sigterm_last_rank_stops_cleanly(child, &cfg, &run);
}

#[test]
fn a_killed_rank_of_a_two_by_two_run_stops_it_and_it_resumes() {
    if !mpi_ready() {
        return;
    }
    let dir = synthetic_dataset("dp-pp-kill");
    let sets = ["parallel.data=2", "parallel.pipeline=2"];
    let (child, cfg, run) = start_long_run_with(&dir, "killed", 4, 2, &sets);
    assert_eq!(sigkill_last_rank_then_resume(child, &cfg, &run, 4, &sets), 2);
}

#[test]
fn zero_1_shards_the_optimizer_state_and_trains_bitwise_as_unsharded_replicas() {
    if !mpi_ready() {
        return;
    }
    let dir = synthetic_dataset("dp-zero");
    // Muon-NSGD (momentum only) and Muon-AdamW (a second moment on the embeddings, gains and
    // biases); checkpoints every 4 steps gather the sharded state mid-run, growth copies it.
    for kind in ["muon_nsgd", "muon_adamw"] {
        let cfg = TestConfig::new(&dir)
            .name(&format!("z-{kind}"))
            .steps(12)
            .micro_batches(4)
            .depth(1)
            .target_depth(3)
            .grow_at_step(6, 3)
            .growth_init("copying")
            .eval(6, 2)
            .checkpoint_every(4)
            .set("optim.kind", format!("\"{kind}\""))
            .write();
        let run = |name: &str, zero: u8| -> (PathBuf, u64) {
            let out = dir.join(format!("{kind}-{name}"));
            let o = mpirun_train(2, &cfg, &out, &["parallel.data=2", &format!("parallel.zero={zero}")]);
            ok(&format!("{kind} zero={zero}"), &o);
            let stdout = String::from_utf8_lossy(&o.stdout).to_string();
            let n = stdout.split("allreduce rank=0 reductions=").nth(1).and_then(|r| r.split_whitespace().next()?.parse().ok());
            (out, n.expect("the all-reduce summary"))
        };
        let ((plain, n_plain), (zero, n_zero)) = (run("plain", 0), run("zero", 1));
        // Sharded, every unit's new weights are gathered from their owners after every update:
        // 2 ends units x 12 steps + 1 layer x 6 steps + 3 layers x 6 steps = 48 more reductions.
        // (Were the state not sharded, the gather would add every value twice and the weights
        // below would differ.)
        assert!(n_zero >= n_plain + 48, "{kind}: {n_zero} reductions sharded, {n_plain} not");
        // The weights, the gathered optimizer state (m, and v under AdamW) and every logged loss.
        assert_bitwise_runs(&plain, &zero);
        let (ck, _, _) = taproot::checkpoint::load_newest_valid(&zero.join("checkpoints")).unwrap().unwrap();
        let has_v = ck.units.iter().any(|(_, u)| u.v.is_some());
        assert_eq!(has_v, kind == "muon_adamw", "{kind}: second moments in the checkpoint");
    }
    // A sharded run resumes on one process (the checkpoint holds the whole state).
    let cfg = config(&dir, "z-straight");
    ok("straight", &taproot().args(["train", "--config", cfg.to_str().unwrap()]).output().unwrap());
    let split = split_run(&dir, &cfg, "z-split", &["parallel.data=2", "parallel.zero=1"], &[]);
    assert_close_runs(&dir.join("z-straight"), &split);
}

/// `mpirun -np 1 taproot ARGS0 : -np 1 taproot ARGS1`: two ranks given different command lines.
fn mpirun_two(args0: &[&str], args1: &[&str]) -> Output {
    let bin = &bin();
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-np", "1", bin])
        .args(args0)
        .args([":", "-np", "1", bin])
        .args(args1)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c.output().expect("mpirun starts")
}

/// Ranks that disagree on anything that changes the run stop before step 1, every one of them,
/// with one message naming the key and the rank. Before, another `model.channels` segfaulted
/// rank 0, another `schedule.lr`, `model.heads`, `run.seed` or `data.micro_batches` trained
/// silently to another loss, and another `run.steps` or growth step aborted in MPI_ERR_TRUNCATE.
#[test]
fn ranks_that_disagree_stop_before_step_1_naming_the_key_and_rank() {
    if !mpi_ready() {
        return;
    }
    let dir = synthetic_dataset("dp-disagree");
    let cfg = config(&dir, "disagree");
    let c = cfg.to_str().unwrap();
    let out = format!("run.out_dir={}", dir.join("out").display());
    let base = ["train", "--config", c, "--set", &out, "--set", "parallel.data=2"];
    let cases: [(&[&str], &str); 9] = [
        (&["--set", "model.channels=128"], "`model.channels` (128 on rank 1, 32 on rank 0)"),
        (&["--set", "schedule.lr=0.03"], "`schedule.lr`"),
        (&["--set", "model.heads=4"], "`model.heads`"),
        (&["--set", "run.seed=12345"], "`run.seed`"),
        (&["--set", "data.micro_batches=8"], "`data.micro_batches`"),
        (&["--set", "run.steps=13"], "`run.steps`"),
        (&["--set", "growth[0].at_step=5"], "`growth[0].at_step`"),
        (&["--stop-after", "5"], "`option.stop_after`"),
        (&["--set", "parallel.data=1"], "`parallel.data` (1 on rank 1, 2 on rank 0)"),
    ];
    for (extra, key) in cases {
        let args1: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let o = mpirun_two(&base, &args1);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?}: the run went on");
        assert!(
            err.contains("do not agree")
                && err.contains("rank 1 differs from rank 0 in")
                && err.contains(key)
                && !err.contains("rank 0 differs"),
            "{extra:?}: {err}"
        );
        assert!(!dir.join("out").join("disagree").join("checkpoints").exists(), "{extra:?}: a checkpoint was written");
    }
    // The same command lines agree.
    ok("ranks that agree", &mpirun_two(&base, &base));
}

/// Replicas compare a checksum of their weights at every checkpoint: a replica whose embedding
/// drifted (here: initialised with another seed) stops the run at the first one, naming the unit
/// and the step, before a checkpoint of either replica's weights is written.
#[test]
fn replicas_whose_weights_drift_apart_stop_at_the_next_checkpoint() {
    if !mpi_ready() {
        return;
    }
    let dir = synthetic_dataset("dp-drift");
    let cfg = TestConfig::new(&dir).name("drift").steps(12).micro_batches(4).depth(2).checkpoint_every(5).write();
    let c = cfg.to_str().unwrap();
    let o = mpirun(2, &["train", "--config", c, "--set", "parallel.data=2", "--set", "faults.drift_replica=1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the run went on with replicas that differ:\n{err}");
    assert!(err.contains("at the checkpoint of step 5, the embedding is not the same in every data-parallel replica"), "{err}");
    assert!(checkpoint::list(&dir.join("drift").join("checkpoints")).unwrap().is_empty(), "a checkpoint was written");
    // Without the fault the same run passes every comparison.
    let out = format!("run.out_dir={}", dir.join("agree").display());
    ok("replicas that agree", &mpirun(2, &["train", "--config", c, "--set", "parallel.data=2", "--set", &out]));
}

/// The pid of world rank `rank` of the run of config `cfg` (from its MPI environment).
fn pid_of_rank(cfg: &Path, rank: usize) -> String {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    rank_pids(cfg)
        .into_iter()
        .find(|p| std::fs::read(format!("/proc/{p}/environ")).is_ok_and(|e| e.split(|b| *b == 0).any(|v| v == want.as_bytes())))
        .unwrap_or_else(|| panic!("no process of rank {rank}"))
}

/// A long run of 2 processes with `sets`, whose rank 1 is then stopped (SIGSTOP: as a process
/// stuck on its device looks to the others), and `then` done: the run must end non-zero within
/// 30 s; its stderr.
fn stop_rank_1(tag: &str, depth: usize, sets: &[&str], then: impl FnOnce(&Path)) -> String {
    let dir = synthetic_dataset(tag);
    let (mut child, cfg, _) = start_long_run_with(&dir, tag, 2, depth, sets);
    let stopped = pid_of_rank(&cfg, 1);
    assert!(Command::new("kill").args(["-STOP", &stopped]).status().unwrap().success());
    then(&cfg);
    let t0 = std::time::Instant::now();
    let st = wait_within(&mut child, 60);
    let took = t0.elapsed();
    let _ = Command::new("kill").args(["-KILL", &stopped]).status();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!st.success(), "{tag}: the run ended well with rank 1 stopped:\n{err}");
    assert!(took < std::time::Duration::from_secs(30), "{tag}: took {took:?}");
    println!("{tag}: rank 1 stopped, the run ended in {took:?}");
    err
}

/// A rank that stops answering stalled the run forever while the others spun a core each. Now
/// the others wait at most `parallel.timeout_s` in the collective, then stop the run with a
/// message naming the rank.
#[test]
fn a_rank_that_stops_answering_is_named_within_the_timeout() {
    if !mpi_ready() {
        return;
    }
    let err = stop_rank_1("dp-hung", 1, &["parallel.data=2", "parallel.timeout_s=3"], |_| {});
    assert!(err.contains("rank 1 (replica 1) did not join") && err.contains("within 3 s (`parallel.timeout_s`)"), "{err}");
}

/// A pipeline stage that stops answering is named by stage 0 within `parallel.timeout_s`: its
/// frames are point-to-point, so no collective would ever time out.
#[test]
fn a_pipeline_stage_that_stops_answering_is_named_within_the_timeout() {
    if !mpi_ready() {
        return;
    }
    let err = stop_rank_1("pp-hung", 2, &["parallel.pipeline=2", "parallel.timeout_s=3"], |_| {});
    assert!(err.contains("pipeline stage 1 (rank 1) sent nothing for 3 s during step"), "{err}");
}

/// SIGTERM to a run one of whose ranks is gone (here: stopped) cannot write the final
/// checkpoint: the waiting ranks say so plainly within 10 s of the signal, name the rank, and
/// exit non-zero (they waited for it until `parallel.timeout_s`, 600 s, or forever before).
#[test]
fn a_stop_with_a_rank_gone_says_plainly_that_no_checkpoint_can_follow() {
    if !mpi_ready() {
        return;
    }
    let err = stop_rank_1("dp-stop-gone", 1, &["parallel.data=2"], |cfg| {
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(Command::new("kill").args(["-TERM", &pid_of_rank(cfg, 0)]).status().unwrap().success());
    });
    assert!(err.contains("rank 1 (replica 1) did not join") && err.contains("no final checkpoint can be written"), "{err}");
}

/// `taproot check-collectives` under mpirun: two replicas sum a buffer over MPI and check every
/// element; with `collectives = "nccl"` replica 1 gets replica 0's NCCL id over MPI (both print
/// the same digest). Without a GPU each then says that it has none and the check fails with
/// that; with two GPUs it passes; on one GPU the NCCL part is left out (NCCL refuses two ranks
/// on one device).
#[test]
fn check_collectives_sums_over_the_replicas_and_hands_out_one_nccl_id() {
    if !mpi_ready() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("taproot-check-coll-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config(&dir, "check");
    let cfg = cfg.to_str().unwrap();
    let o = mpirun(2, &["check-collectives", "--config", cfg, "--set", "parallel.data=2"]);
    ok("host collectives check", &o);
    let out = String::from_utf8_lossy(&o.stdout);
    for r in 0..2 {
        assert!(out.contains(&format!("rank {r} (stage 0, replica {r} of 2) on cpu:0: sum of 4 MiB over 2 replica(s) correct")), "{out}");
    }
    assert!(out.contains("collectives check passed: 2 process(es), host collectives (MPI)"), "{out}");

    #[cfg(feature = "nccl")]
    {
        if let Err(e) = taproot::dist::nccl::version() {
            if std::env::var("TAPROOT_REQUIRE_NCCL").is_ok_and(|v| v == "1") {
                panic!("TAPROOT_REQUIRE_NCCL is set but NCCL cannot be loaded: {e:#}");
            }
            return println!("SKIP (NCCL part): {e:#}");
        }
        let gpus = taproot::backend::cuda::device_count().unwrap_or(0);
        if gpus == 1 {
            return println!("SKIP (NCCL part): NCCL refuses two ranks on this machine's one GPU");
        }
        let sets = ["--set", "parallel.data=2", "--set", "placement.devices=[\"cuda:0\"]", "--set", "parallel.collectives=nccl"];
        let o = mpirun(2, &[&["check-collectives", "--config", cfg][..], &sets[..]].concat());
        let out = String::from_utf8_lossy(&o.stdout);
        let digest = |r: usize| {
            let head = format!("rank {r} (stage 0, replica {r} of 2) on cuda:{r}: NCCL 2.");
            let line = out.lines().find(|l| l.starts_with(&head)).unwrap_or_else(|| panic!("no NCCL line of rank {r}:\n{out}"));
            line.rsplit_once("communicator id ").expect("an id digest").1.to_string()
        };
        assert_eq!(digest(0), digest(1), "the replicas hold different NCCL ids:\n{out}");
        if gpus >= 2 {
            ok("NCCL collectives check", &o);
        } else {
            assert!(!o.status.success(), "the NCCL check passed without a GPU:\n{out}");
            for r in 0..2 {
                assert!(out.contains(&format!("rank {r} (stage 0, replica {r} of 2) on cuda:{r}: FAILED: no CUDA driver")), "{out}");
            }
        }
    }
}

/// `parallel.devices = "as_listed"`: every process takes `[placement]` as written, so two
/// replicas share one GPU over the host path. Without a GPU, each process's line names the
/// device it opened (`cuda:0` for both; by local rank, `cuda:1` for the second). With one, two
/// processes on `cuda:0` train as one process on it (to the tolerance of the CPU runs above:
/// only the order of the gradient sums differs), and their collectives check passes.
#[test]
fn two_processes_share_one_gpu_over_the_host_path() {
    if !mpi_ready() {
        return;
    }
    let dir = synthetic_dataset("one-gpu");
    let cfg = config(&dir, "one-gpu");
    let cfg = cfg.to_str().unwrap();
    let on_gpu = ["--set", "parallel.data=2", "--set", "placement.devices=[\"cuda:0\"]"];
    let check = |map: &str| {
        let set = format!("parallel.devices={map}");
        let o = mpirun(2, &[&["check-collectives", "--config", cfg, "--set", &set][..], &on_gpu[..]].concat());
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned(), o)
    };
    let gpus = taproot::backend::cuda::device_count().unwrap_or(0);
    let (passed, out, o) = check("as_listed");
    if gpus == 0 {
        assert!(!passed, "a CUDA check passed without a GPU:\n{out}");
        for r in 0..2 {
            assert!(out.contains(&format!("rank {r} (stage 0, replica {r} of 2) on cuda:0: FAILED: ")), "{out}");
        }
        let (_, by_rank, _) = check("local_rank");
        assert!(by_rank.contains("rank 1 (stage 0, replica 1 of 2) on cuda:1: FAILED: "), "{by_rank}");
        let _ = std::fs::remove_dir_all(&dir);
        return println!("SKIP (the training part): no GPU");
    }
    ok("two processes' host collectives on one GPU", &o);
    for r in 0..2 {
        assert!(out.contains(&format!("rank {r} (stage 0, replica {r} of 2) on cuda:0: sum of ")), "{out}");
    }
    let (one, two) = (dir.join("one"), dir.join("two"));
    let one_out = format!("run.out_dir={}", one.display());
    ok(
        "one process on cuda:0",
        &taproot().args(["train", "--config", cfg, "--set", &one_out, "--set", "placement.devices=[\"cuda:0\"]"]).output().unwrap(),
    );
    let o = mpirun_train(2, Path::new(cfg), &two, &["parallel.data=2", "placement.devices=[\"cuda:0\"]", "parallel.devices=as_listed"]);
    ok("two processes on cuda:0", &o);
    assert_close_runs(&two, &one);
    let _ = std::fs::remove_dir_all(&dir);
}
