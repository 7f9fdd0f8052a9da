//! A 2-process data-parallel run, launched by the program itself (needs the `mpi` feature and
//! an MPI library: Debian's openmpi-bin libopenmpi-dev libclang-dev).
//!
//! Started plainly, it writes a synthetic corpus and a tiny config (1 block grown to 3 at step
//! 10, 4 micro-batches per step) into a scratch folder, trains it in one process for the
//! reference, then starts itself twice under `mpirun -np 2`: each rank joins MPI
//! (`taproot::dist::init`) and trains its half of every step's micro-batches on the actor
//! runtime, the two summing their gradients layer by layer. At the end rank 0 prints both runs'
//! final losses and how far apart their final weights are (the order of floating-point sums is
//! the only difference).
//!
//! ```sh
//! cargo run --release --features mpi --example data_parallel
//! ```

mod common;

use anyhow::{bail, Context, Result};
use common::{scratch_dir, synthetic_corpus, toml_path};
use std::path::{Path, PathBuf};
use taproot::backend::cpu::CpuBackend;
use taproot::config::Config;
use taproot::data::Dataset;
use taproot::runtime::RunOptions;

fn config(dir: &Path, data: &Path, name: &str, replicas: usize) -> String {
    format!(
        "[run]\nname = \"{name}\"\nsteps = 20\nlog_every = 0\nout_dir = {}\n\n[data]\ndir = {}\ntokenizer = \"bytes\"\nbatch_size = 4\nseq_len = 16\nmicro_batches = 4\n\n[model]\nchannels = 32\nheads = 2\ndepth = 1\n\n[eval]\nevery = 10\nbatches = 2\n\n[parallel]\ndata = {replicas}\n\n[[growth]]\nat_step = 10\nto_depth = 3\ninit = \"copying\"\n",
        toml_path(&dir.join(name)),
        toml_path(data)
    )
}

/// Train `cfg` on the actor runtime (quietly on ranks other than 0); the final validation loss.
fn train(cfg: &Config, topology: taproot::dist::Topology) -> Result<f32> {
    let data = Dataset::open(&cfg.data.dir, 256)?;
    let quiet = !topology.is_lead();
    let report = taproot::runtime::train::<CpuBackend>(cfg, data, RunOptions { quiet, topology, ..Default::default() }, false)?;
    report.final_val_loss().context("the run evaluated")
}

fn final_params(run: &Path) -> Result<Vec<f32>> {
    let (ck, _, _) = taproot::checkpoint::load_newest_valid(&run.join("checkpoints"))?.context("a final checkpoint")?;
    Ok(ck.units.iter().flat_map(|(_, u)| u.params.iter().copied()).collect())
}

fn main() -> Result<()> {
    if let Some(dir) = std::env::var_os("DATA_PARALLEL_EXAMPLE_DIR") {
        // A rank of the launched run.
        let dir = PathBuf::from(dir);
        let text = std::fs::read_to_string(dir.join("two.toml"))?;
        let cfg = Config::parse(&text, &[])?;
        let topology = taproot::dist::init(cfg.parallel.data, cfg.parallel.pipeline, || taproot::dist::Facts::of_run(&cfg, &[]))?;
        let loss = train(&cfg, topology);
        if loss.is_err() {
            taproot::dist::abort(1);
        }
        let loss = loss?;
        if topology.is_lead() {
            std::fs::write(dir.join("two.loss"), loss.to_string())?;
        }
        taproot::dist::finalize();
        return Ok(());
    }
    let dir = scratch_dir("data_parallel")?;
    let data = synthetic_corpus(&dir)?;
    let one = Config::parse(&config(&dir, &data, "one", 1), &[])?;
    let l1 = train(&one, taproot::dist::Topology::ALONE)?;
    println!("one process: final validation loss {l1:.5}");
    std::fs::write(dir.join("two.toml"), config(&dir, &data, "two", 2))?;
    let exe = std::env::current_exe()?;
    println!("launching: mpirun -np 2 {}", exe.display());
    let status = std::process::Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe"])
        .arg(&exe)
        .env("DATA_PARALLEL_EXAMPLE_DIR", &dir)
        .status()
        .context("starting mpirun (Debian: openmpi-bin; as root also OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)")?;
    if !status.success() {
        bail!("the 2-process run failed ({status})");
    }
    let l2: f32 = std::fs::read_to_string(dir.join("two.loss"))?.trim().parse()?;
    let (p1, p2) = (final_params(&dir.join("one"))?, final_params(&dir.join("two"))?);
    let worst = p1.iter().zip(&p2).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    println!("two processes: final validation loss {l2:.5}; final weights within {worst:.1e} of the one-process run");
    if worst > 1e-4 {
        bail!("the runs disagree by {worst:e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
