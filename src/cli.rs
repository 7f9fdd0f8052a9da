//! The command line: `taproot train`, `taproot data prepare`.

use crate::backend::cpu::CpuBackend;
use crate::config::Config;
use crate::data::{prepare, Dataset, PrepareArgs, Tokenizer};
use crate::train::sequential::{RunOptions, Sequential};
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
    },
    /// Data preparation.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
}

#[derive(Subcommand, Debug)]
pub enum DataCmd {
    /// Tokenize text files into llm.c-format train/val token shards.
    Prepare {
        /// Text files, or directories whose *.txt files are taken (sorted).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output directory for the shards.
        #[arg(long)]
        out: PathBuf,
        /// `bytes` or `gpt2`.
        #[arg(long, default_value = "bytes")]
        tokenizer: String,
        /// Fraction of the token stream (its tail) kept for validation.
        #[arg(long, default_value_t = 0.1)]
        val_fraction: f64,
        /// File-name prefix of the shards.
        #[arg(long, default_value = "corpus")]
        name: String,
    },
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Train { config, set, stop_after } => {
            let cfg = Config::load(&config, &set)?;
            let tok = Tokenizer::from_name(&cfg.data.tokenizer)?;
            let data = Dataset::open(&cfg.data.dir, tok.vocab_size())
                .with_context(|| format!("loading data for run {:?} (data.dir; run scripts/fetch-data.sh and `taproot data prepare` first)", cfg.run.name))?;
            println!(
                "run={} tokenizer={} train_tokens={} val_tokens={} depth={} target_depth={} steps={}",
                cfg.run.name,
                tok.name(),
                data.train.len(),
                data.val.len(),
                cfg.model.depth,
                cfg.target_depth(),
                cfg.run.steps
            );
            let mut trainer = Sequential::new(CpuBackend::default(), &cfg, &data)?;
            let report = trainer.run(&RunOptions { quiet: false, stop_after, stop_below_val: None })?;
            let dir = cfg.out_dir();
            report.write_csv(&dir)?;
            if let Some(v) = report.final_val_loss() {
                println!("done steps={} final_val_loss={v:.4} wall_s={:.1} logs={}", trainer.step, report.wall_s, dir.display());
            }
            Ok(())
        }
        Cmd::Data { cmd: DataCmd::Prepare { inputs, out, tokenizer, val_fraction, name } } => {
            let rep = prepare(&PrepareArgs { inputs, out_dir: out, tokenizer, val_fraction, name })?;
            println!("{rep}");
            Ok(())
        }
    }
}
