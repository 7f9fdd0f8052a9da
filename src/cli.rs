//! The command line: `taproot train`, `taproot daemon`, `taproot inspect`, `taproot plan`,
//! `taproot experiment`, `taproot data prepare`.

use crate::backend::cpu::CpuBackend;
use crate::checkpoint;
use crate::config::Config;
use crate::data::{prepare, Dataset, PrepareArgs, Tokenizer};
use crate::experiment::commands::{experiment_command, plan_command, ExperimentArgs, PlanArgs};
use crate::run_folder::{RunFolder, Start};
use crate::runtime;
use crate::train::{sequential::Sequential, RunOptions};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "taproot", version, about = "Deep progressive training: grow a 0/1-layer transformer to full depth mid-run")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Train a model from a TOML config.
    Train {
        /// The run configuration.
        #[arg(long)]
        config: PathBuf,
        /// Override a config value, e.g. `--set run.steps=100` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Stop after this many steps (the schedule still spans run.steps).
        #[arg(long)]
        stop_after: Option<u64>,
        /// Continue from the newest valid checkpoint of the run (fresh if there is none).
        #[arg(long, conflicts_with = "overwrite")]
        resume: bool,
        /// Start over in a run folder that holds another run: its checkpoints and logs are moved
        /// into `replaced-<time>/` inside the folder first (nothing is deleted).
        #[arg(long)]
        overwrite: bool,
        /// Resume although these config keys (or sections) differ from the checkpoint's and
        /// change the trajectory, e.g. `--allow-config-change run.steps schedule`.
        #[arg(long, value_name = "KEY", num_args = 1.., requires = "resume")]
        allow_config_change: Vec<String>,
        /// Run the sequential trainer (the runtime's test oracle) instead of the actor pipeline.
        #[arg(long, conflicts_with = "resume")]
        sequential: bool,
    },
    /// Run training as a long-running service: resumes from the newest checkpoint, serves
    /// /metrics (Prometheus), /status and token-protected /control/* over HTTP.
    Daemon {
        /// The run configuration (its `[daemon]` section configures the service).
        #[arg(long)]
        config: PathBuf,
        /// Override a config value, e.g. `--set checkpoint.every=100` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Address to serve on (overrides daemon.listen; port 0 picks a free port).
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<String>,
        /// Append log lines to this file (reopened on SIGHUP) instead of stdout.
        #[arg(long)]
        log_file: Option<PathBuf>,
        /// Resume although these config keys (or sections) differ from the checkpoint's and
        /// change the trajectory.
        #[arg(long, value_name = "KEY", num_args = 1..)]
        allow_config_change: Vec<String>,
    },
    /// The τ pilot: train the fixed-size model and the progressive model grown right after
    /// warmup, measure the mixing time t_mix, recommend τ = T_decay_start − t_mix.
    Plan {
        /// A progressive run configuration (one [[growth]] entry).
        #[arg(long)]
        config: PathBuf,
        /// Steps the pilot runs train for (the config's schedule, truncated; default: up to
        /// the decay start). Also `plan.budget`.
        #[arg(long)]
        budget: Option<u64>,
        /// Relative tolerance of "mixed" (default 0.005). Also `plan.mix_tolerance`.
        #[arg(long)]
        tolerance: Option<f64>,
        /// Evaluation interval of the pilot (the resolution of t_mix). Also `plan.eval_every`.
        #[arg(long)]
        eval_every: Option<u64>,
        /// Write the input config with its expansion at the recommended τ here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override a config value (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Retrain runs found in the result cache (runs/_cache).
        #[arg(long)]
        fresh: bool,
    },
    /// Reproduce one of the paper's experiments (or `all`): CSV, PNG plots and a markdown table
    /// under runs/NAME/.
    Experiment {
        /// progressive-vs-fixed, tau-sweep, init-ablation, stages, optimizer-state, or all.
        name: String,
        /// A short version (60 steps, under a minute), written under runs/quick/NAME/.
        #[arg(long)]
        quick: bool,
        /// Base config (default: config/experiments/planned.toml for progressive-vs-fixed,
        /// config/experiments/base.toml for the others).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a config value (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Output directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Retrain runs found in the result cache (<out>/_cache).
        #[arg(long)]
        fresh: bool,
        /// Neither read nor write the result cache.
        #[arg(long)]
        no_cache: bool,
    },
    /// Start the processes of a multi-process run (`[parallel]`): `mpirun` over the config's
    /// hosts, running `taproot train` on each; under Slurm, print the `srun` line instead.
    Launch {
        /// The run configuration.
        #[arg(long)]
        config: PathBuf,
        /// Override a config value (repeatable; passed on to every process).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Print the command line, start nothing.
        #[arg(long)]
        dry_run: bool,
        /// Passed on to `taproot train`.
        #[arg(long)]
        resume: bool,
        /// Start `taproot daemon` on every process instead of `taproot train` (every rank serves
        /// its metrics; control goes to rank 0).
        #[arg(long)]
        daemon: bool,
        /// Start `taproot check-collectives` on every process instead.
        #[arg(long, conflicts_with = "daemon")]
        check: bool,
        /// An option for the launcher (mpirun, or srun under Slurm), placed before the program:
        /// repeat it per word, e.g. `--launcher-arg=--bind-to --launcher-arg=none`,
        /// `--launcher-arg=--oversubscribe`, `--launcher-arg=--mpi=pmix`
        #[arg(long = "launcher-arg", value_name = "ARG", allow_hyphen_values = true)]
        launcher_args: Vec<String>,
    },
    /// Check a multi-process config's collectives before a run (start it as the run starts, or
    /// with `taproot launch --check`): every process sums a buffer on its device over
    /// `parallel.collectives`, checks the sum and prints the bandwidth.
    CheckCollectives {
        #[arg(long)]
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Describe a checkpoint file (or the newest valid one in a directory).
    Inspect { path: PathBuf },
    /// Read a Hugging Face folder (GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM, as the
    /// config's model.arch says) as the step-0 checkpoint of the run a config describes (its
    /// model must match the folder); `taproot train --resume` then trains and grows it (docs:
    /// src/export/)
    Import {
        /// The folder (config.json + model.safetensors)
        folder: PathBuf,
        #[arg(long)]
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Import into a run folder that holds a run, after moving it aside (as `train --overwrite`)
        #[arg(long)]
        overwrite: bool,
    },
    /// Text from a checkpoint (a file, or the newest valid one in a directory): the prompt, then
    /// tokens drawn one at a time with a KV cache (docs: src/sample.rs)
    Sample {
        /// A checkpoint file, a folder of checkpoints, or a Hugging Face folder from `taproot export`
        path: PathBuf,
        #[arg(long, default_value = "\n")]
        prompt: String,
        /// New tokens to draw
        #[arg(long, default_value_t = 200)]
        tokens: usize,
        /// 0: always the most likely token
        #[arg(long, default_value_t = 0.8)]
        temperature: f32,
        /// Keep the k most likely tokens (0: all)
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Nucleus sampling: the most likely tokens up to this probability (1: all)
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// The loss and perplexity of a model on given tokens or text
    Eval {
        /// A checkpoint file, a folder of checkpoints, a run folder, or a Hugging Face folder
        path: PathBuf,
        /// A folder of shards (its validation split), one .bin shard, or a text/JSONL file
        /// tokenized with the model's tokenizer
        #[arg(long)]
        data: PathBuf,
        /// Window length T (default: the model's data.seq_len)
        #[arg(long)]
        seq_len: Option<usize>,
        /// Score at most this many windows
        #[arg(long, default_value_t = usize::MAX)]
        max_windows: usize,
        /// Score a shard folder's training split instead of its validation split
        #[arg(long)]
        train_split: bool,
        /// The JSONL field (or Parquet column) holding the text
        #[arg(long, default_value = "text")]
        field: String,
    },
    /// Write a checkpoint (a file, or the newest valid one in a directory) as a Hugging Face
    /// folder of its block kind (GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM):
    /// config.json + model.safetensors (docs: src/export/)
    Export {
        /// Checkpoint file, or a directory of checkpoints
        path: PathBuf,
        /// Output folder
        #[arg(long)]
        out: PathBuf,
        /// Export into a folder that holds other files: they are moved into `replaced-<time>/`
        /// inside it first (nothing is deleted)
        #[arg(long)]
        overwrite: bool,
    },
    /// Data preparation.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
}

#[derive(Subcommand, Debug)]
pub enum DataCmd {
    /// Write a tokenizer as a Hugging Face tokenizer.json (with tokenizer_config.json and
    /// generation_config.json): `bytes`, `gpt2`, `bpe:N` (from --from, its shard folder) or `hf:PATH`
    Tokenizer {
        name: String,
        /// Output folder
        #[arg(long)]
        out: PathBuf,
        /// The shard folder a `bpe:N` tokenizer was learnt in
        #[arg(long, default_value = ".")]
        from: PathBuf,
        /// `model_max_length` in tokenizer_config.json
        #[arg(long, default_value_t = 1024)]
        max_length: usize,
    },
    /// Tokenize documents (text, JSONL, Parquet) into llm.c-format train/val token shards.
    Prepare {
        /// Text files, JSONL (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`), Parquet files, or folders
        /// whose such files are taken (recursively, sorted).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output directory for the shards.
        #[arg(long)]
        out: PathBuf,
        /// `bytes`, `gpt2`, `bpe:N` (learnt here) or `hf:PATH` (a tokenizer.json or a folder with one).
        #[arg(long, default_value = "bytes")]
        tokenizer: String,
        /// Fraction of documents kept for validation (every 1/f-th document; a one-document
        /// corpus gives its tail).
        #[arg(long, default_value_t = 0.1)]
        val_fraction: f64,
        /// The first N documents are the validation set (instead of --val-fraction).
        #[arg(long)]
        val_docs: Option<u64>,
        /// The JSONL field that holds the text.
        #[arg(long, default_value = "text")]
        field: String,
        /// The Parquet column that holds the text.
        #[arg(long, default_value = "text")]
        column: String,
        /// Count and skip bad documents (malformed lines, missing fields, non-UTF-8 text) instead
        /// of stopping at the first.
        #[arg(long)]
        skip_bad: bool,
        /// Tokens per shard at most.
        #[arg(long, default_value_t = 100_000_000)]
        shard_tokens: usize,
        /// File-name prefix of the shards.
        #[arg(long, default_value = "corpus")]
        name: String,
        /// Write into a folder that holds another corpus, after moving its shards into a
        /// `replaced-<time>` folder (nothing is merged).
        #[arg(long)]
        overwrite: bool,
    },
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Import { folder, config, set, overwrite } => {
            let cfg = Config::load(&config, &set)?;
            let tok = Tokenizer::from_name(&cfg.data.tokenizer)?;
            let data = Dataset::open_config(&cfg.data, &tok)
                .with_context(|| format!("loading data for run {:?} (data.dir or data.sources)", cfg.run.name))?;
            let loader = crate::data::Loader::of(&data, cfg.data.batch_size, cfg.data.seq_len, cfg.run.seed)?.cursor();
            let ck = crate::export::import(&folder, &cfg, loader)?;
            let _folder = RunFolder::open(&cfg, if overwrite { Start::Overwrite } else { Start::Fresh })?;
            let path = checkpoint::save(&cfg.checkpoint_dir(), &ck)?;
            println!(
                "imported {} layers from {} as {}; continue with: taproot train --config {} --resume",
                ck.meta.depth,
                folder.display(),
                path.display(),
                config.display()
            );
            Ok(())
        }
        Cmd::Launch { config, set, dry_run, resume, daemon, check, launcher_args } => {
            if daemon && resume {
                anyhow::bail!("`--resume` is for `train`: a daemon always resumes from the run's newest checkpoint");
            }
            let command = if check {
                "check-collectives"
            } else if daemon {
                "daemon"
            } else {
                "train"
            };
            crate::dist::launch_command(&Config::load(&config, &set)?, &config, &set, command, resume && !check, dry_run, launcher_args)
        }
        Cmd::CheckCollectives { config, set } => crate::dist::check::check_collectives(Config::load(&config, &set)?),
        Cmd::Sample { path, prompt, tokens, temperature, top_k, top_p, seed } => {
            // A checkpoint (file or folder), or a Hugging Face folder an export wrote.
            let ck = crate::eval::load_model(&path)?;
            let cfg = ck.meta.config()?;
            let tok = crate::sample::tokenizer_of(&cfg)?;
            let model = crate::sample::HostModel::from_checkpoint(&ck)?;
            let opts = crate::sample::SampleOptions { tokens, temperature, top_k, top_p, seed };
            let ids = crate::sample::generate(&model, &tok.encode(&prompt), &opts)?;
            println!("{}", tok.decode(&ids));
            Ok(())
        }
        Cmd::Eval { path, data, seq_len, max_windows, train_split, field } => {
            let r = crate::eval::eval_command(&path, &data, seq_len, max_windows, train_split, &field)?;
            println!("{r}");
            Ok(())
        }
        Cmd::Export { path, out, overwrite } => {
            let e = crate::export::export_path(&path, &out, overwrite)?;
            println!(
                "exported {} layers ({} tensors, {} parameters) to {} as a {} folder; tokenizer: {}",
                e.layers,
                e.tensors,
                e.params,
                out.display(),
                e.class,
                e.tokenizer
            );
            Ok(())
        }
        Cmd::Inspect { path } => {
            let path = checkpoint::checkpoints_of(&path);
            let ck = if path.is_dir() {
                match checkpoint::load_newest_valid(&path)? {
                    Some((ck, p, warnings)) => {
                        for w in warnings {
                            eprintln!("warning: {w}");
                        }
                        println!("{}", p.display());
                        ck
                    }
                    None => anyhow::bail!("no checkpoint in {}", path.display()),
                }
            } else {
                checkpoint::load(&path)?
            };
            println!("{}", checkpoint::describe(&ck));
            Ok(())
        }
        Cmd::Train { config, set, stop_after, resume, overwrite, allow_config_change, sequential } => {
            // Before anything slow: a stop signal during start-up is kept for the run (the
            // sequential trainer has no stop handling: a signal ends it as it would any program).
            if !sequential {
                crate::signals::install();
            }
            let cfg = Config::load(&config, &set)?;
            std::thread::sleep(std::time::Duration::from_millis(cfg.faults.start_delay_ms));
            // Several processes (`parallel.data` × `parallel.pipeline`, or an MPI launcher): rank 0
            // leads, owning the run folder, the logs and the checkpoints; the other replicas train
            // their share quietly, and the other pipeline stages host the layers placed on them.
            let facts = || {
                crate::dist::Facts::of_run(
                    &cfg,
                    &[
                        ("command", "train".into()),
                        ("resume", resume.to_string()),
                        ("overwrite", overwrite.to_string()),
                        ("stop_after", format!("{stop_after:?}")),
                        ("allow_config_change", format!("{allow_config_change:?}")),
                        ("sequential", sequential.to_string()),
                    ],
                )
            };
            crate::dist::set_timeout(cfg.parallel.timeout_s);
            crate::dist::set_collectives(cfg.parallel.collectives)?;
            crate::dist::set_collective_stall(cfg.faults.stall_collectives_ms);
            let topo = crate::dist::init(cfg.parallel.data, cfg.parallel.pipeline, facts)?;
            let lead = topo.is_lead();
            let mut cfg = cfg;
            crate::dist::map_devices(&mut cfg);
            if sequential && topo.size() > 1 {
                anyhow::bail!("`--sequential` trains in one process; `parallel.data` and `parallel.pipeline` must be 1");
            }
            let start = match (resume, overwrite) {
                (true, _) => Start::Resume,
                (false, true) => Start::Overwrite,
                (false, false) => Start::Fresh,
            };
            // The data first: a run that cannot start must not move an old run aside.
            let tok = Tokenizer::from_name(&cfg.data.tokenizer)?;
            let data = Dataset::open_config(&cfg.data, &tok).with_context(|| {
                format!(
                    "loading data for run {:?} (data.dir or data.sources; run scripts/fetch-data.sh and `taproot data prepare` first)",
                    cfg.run.name
                )
            })?;
            if topo.stage > 0 {
                // A hosting stage: its layers until stage 0 shuts it down.
                return if cfg.on_cuda() {
                    runtime::host::serve::<crate::backend::cuda::CudaBackend>(&cfg, data.vocab, topo)
                } else {
                    runtime::host::serve::<CpuBackend>(&cfg, data.vocab, topo)
                };
            }
            // Held until the run ends: one process per run folder (rank 0's, in a parallel run).
            let folder = if lead { Some(RunFolder::open(&cfg, start)?) } else { None };
            if let Some(r) = folder.as_ref().and_then(|f| f.replaced.as_ref()) {
                println!("overwrite: the previous run's checkpoints and logs were moved to {}", r.display());
            }
            if lead {
                if topo.size() > 1 {
                    println!(
                        "parallel: {} data-parallel replicas × {} pipeline stages (rank 0 logs and checkpoints)",
                        topo.replicas, topo.stages
                    );
                }
                println!(
                    "run={} tokenizer={} train_tokens={} val_tokens={} depth={} target_depth={} steps={}",
                    cfg.run.name,
                    tok.name(),
                    data.train_tokens(),
                    data.val.len(),
                    cfg.model.depth,
                    cfg.target_depth(),
                    cfg.run.steps
                );
            }
            let dir = cfg.out_dir();
            let data_vocab = data.vocab;
            let report = if sequential {
                let mut trainer = Sequential::new(CpuBackend::default(), &cfg, &data)?;
                trainer.run(&RunOptions { quiet: false, stop_after, ..Default::default() })?
            } else {
                // The other ranks train quietly; every rank takes stop signals (mpirun forwards
                // them), and the replicas agree on the step to stop at.
                let opts = RunOptions { quiet: !lead, stop_after, resume, allow_config_change, topology: topo, ..Default::default() };
                if cfg.on_cuda() {
                    runtime::train::<crate::backend::cuda::CudaBackend>(&cfg, data, opts, true)?
                } else {
                    runtime::train::<CpuBackend>(&cfg, data, opts, true)?
                }
            };
            if !lead {
                return Ok(());
            }
            if sequential {
                report.write_csv(&dir)?; // the runtime streams its CSV files as it goes
            }
            let steps = report.steps.last().map_or(0, |s| s.step);
            let val = report.final_val_loss().map(|v| format!(" final_val_loss={v:.4}")).unwrap_or_default();
            let rss = peak_rss_mib().map(|m| format!(" peak_rss_mib={m:.1}")).unwrap_or_default();
            let ck = report.final_checkpoint.as_ref().map(|p| format!(" checkpoint={}", p.display())).unwrap_or_default();
            println!("done steps={steps}{val} wall_s={:.1}{rss} logs={}{ck}", report.wall_s, dir.display());
            if topo.size() > 1 {
                let st = crate::dist::stats();
                let hidden = if st.reduce_s > 0.0 { 100.0 * (1.0 - st.wait_s / st.reduce_s).max(0.0) } else { 100.0 };
                println!(
                    "allreduce rank=0 reductions={} mib={:.2} reduce_s={:.3} waited_s={:.3} hidden_pct={hidden:.0}",
                    st.reductions,
                    st.bytes as f64 / (1 << 20) as f64,
                    st.reduce_s,
                    st.wait_s
                );
                if cfg.parallel.zero == 1 && topo.replicas > 1 {
                    // The share of the target-depth model's optimizer state rank 0 keeps (the
                    // same dealing as the units do: `params::Shard`).
                    use crate::params::Shard;
                    let dims = crate::train::dims_of(&cfg, data_vocab);
                    let d = topo.replicas;
                    let mut units = vec![
                        (crate::model::Embed::<CpuBackend>::layout(&dims), u64::MAX),
                        (crate::model::Head::<CpuBackend>::layout(&dims), u64::MAX - 1),
                    ];
                    units.extend((0..cfg.target_depth() as u64).map(|id| (crate::model::Block::<CpuBackend>::layout(&dims), id)));
                    let (kept, all): (usize, usize) = units
                        .iter()
                        .map(|(l, salt)| (Shard::new(l, 0, d, *salt).total, l.total))
                        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
                    println!("zero rank=0 optimizer_state_values={kept} of {all} ({:.1}%, {d} replicas)", 100.0 * kept as f64 / all as f64);
                }
                if topo.stages > 1 {
                    println!(
                        "frames rank=0 sent={} mib_sent={:.2} mib_received={:.2}",
                        st.frames_sent,
                        st.frame_bytes_sent as f64 / (1 << 20) as f64,
                        st.frame_bytes_received as f64 / (1 << 20) as f64
                    );
                }
            }
            drop(folder);
            Ok(())
        }
        Cmd::Daemon { config, set, listen, log_file, allow_config_change } => {
            crate::signals::install();
            let code = crate::daemon::run(crate::daemon::DaemonOptions { config, sets: set, listen, log_file, allow_config_change })?;
            if code != 0 {
                // Under MPI the other ranks may be waiting on this one: end them all.
                crate::dist::abort(code);
                std::process::exit(code);
            }
            Ok(())
        }
        Cmd::Plan { config, budget, tolerance, eval_every, out, set, fresh } => {
            let args = PlanArgs {
                config,
                set,
                budget,
                tolerance,
                eval_every,
                out,
                report_dir: None,
                cache: Some(PathBuf::from("runs/_cache")),
                fresh,
                quiet: false,
            };
            plan_command(&args).map(|_| ())
        }
        Cmd::Experiment { name, quick, config, set, out, fresh, no_cache } => {
            experiment_command(&ExperimentArgs { name, quick, config, set, out, fresh, no_cache }).map(|_| ())
        }
        Cmd::Data { cmd: DataCmd::Tokenizer { name, out, from, max_length } } => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let s = crate::export::tokenizer::write_named(&name, &from, &out, max_length)?;
            println!("wrote {} into {} (bos {:?}, eos {:?})", s.note, out.display(), s.bos, s.eos);
            Ok(())
        }
        Cmd::Data {
            cmd: DataCmd::Prepare { inputs, out, tokenizer, val_fraction, val_docs, field, column, skip_bad, shard_tokens, name, overwrite },
        } => {
            let spec = crate::data::input::InputSpec { field, column };
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let args = PrepareArgs {
                inputs,
                out_dir: out,
                tokenizer,
                val_fraction,
                val_docs,
                name,
                overwrite,
                spec,
                skip_bad,
                shard_tokens,
                progress,
            };
            let rep = prepare(&args)?;
            if let Some(r) = &rep.replaced {
                println!("overwrite: the folder's previous shards were moved to {}", r.display());
            }
            println!("{rep}");
            Ok(())
        }
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
