//! The run folder (`run.out_dir`, and `checkpoint.dir` when it lies elsewhere): one process at a
//! time, and never a fresh run over another run's files.
//!
//! - **One process per run folder.** [`RunFolder::open`] takes an exclusive `flock` on
//!   `taproot.lock` in the folder (and in the checkpoint folder), holds it for the life of the
//!   value, and writes its pid into the file. A second process exits at once with an error naming
//!   the holder's pid. The lock belongs to the open file, so the kernel releases it when its
//!   process dies, however it dies: the lock file of a dead process is simply taken over.
//! - **A fresh run never lands on another run.** Starting without `--resume` in a folder that
//!   holds checkpoints or a `steps.csv` is refused, naming what is there. `--overwrite` starts
//!   over anyway, after moving the old checkpoints and logs into `replaced-<unix time>/` in the
//!   folder: nothing is deleted.
//! - **Resuming** (`--resume`, and the daemon always) continues the run the folder holds; the
//!   runtime then checks the checkpoint's config against the given one (`config::changes`) and
//!   appends to the logs.

use crate::checkpoint;
use crate::config::Config;
use anyhow::{bail, Context, Result};
use std::fs;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// How a run starts in its folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A new run: the folder must not hold one.
    Fresh,
    /// Continue the run the folder holds (a fresh start when it holds none).
    Resume,
    /// A new run: the folder's old checkpoints and logs are moved aside first.
    Overwrite,
}

/// The logs a run writes into its folder.
const LOGS: [&str; 2] = ["steps.csv", "evals.csv"];

/// A locked run folder; the lock is released when this is dropped (or the process ends).
#[derive(Debug)]
pub struct RunFolder {
    pub out_dir: PathBuf,
    pub checkpoint_dir: PathBuf,
    /// Files the old run left, moved aside by `Start::Overwrite`: (folder they went to).
    pub replaced: Option<PathBuf>,
    _locks: Vec<fs::File>,
}

impl RunFolder {
    /// Lock the folders of `cfg`'s run and check that `start` may proceed there.
    pub fn open(cfg: &Config, start: Start) -> Result<RunFolder> {
        let out_dir = cfg.out_dir();
        let checkpoint_dir = cfg.checkpoint_dir();
        let mut locks = vec![lock(&out_dir)?];
        if !same_dir(&out_dir, &checkpoint_dir) {
            locks.push(lock(&checkpoint_dir)?);
        }
        let existing = checkpoint::list(&checkpoint_dir)?;
        let logs: Vec<PathBuf> = LOGS.iter().map(|l| out_dir.join(l)).filter(|p| p.exists()).collect();
        let mut replaced = None;
        match start {
            Start::Resume => {}
            Start::Fresh => {
                if !existing.is_empty() || !logs.is_empty() {
                    let what = describe(&existing, &logs);
                    bail!(
                        "{} already holds a run ({what}): continue it with `--resume`, or start over with `--overwrite` \
                         (the old files are moved into a `replaced-<time>` folder, not deleted)",
                        out_dir.display()
                    );
                }
            }
            Start::Overwrite => {
                if !existing.is_empty() || !logs.is_empty() {
                    replaced = Some(move_aside(&out_dir, &checkpoint_dir, &existing, &logs)?);
                }
            }
        }
        Ok(RunFolder { out_dir, checkpoint_dir, replaced, _locks: locks })
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

fn describe(existing: &[(u64, PathBuf)], logs: &[PathBuf]) -> String {
    let mut parts = Vec::new();
    if let Some((step, _)) = existing.last() {
        parts.push(format!("{} checkpoint(s), the newest of step {step}", existing.len()));
    }
    for l in logs {
        parts.push(l.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default());
    }
    parts.join(", ")
}

/// Take the exclusive lock of `dir` (creating the folder), or fail naming the holder.
fn lock(dir: &Path) -> Result<fs::File> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("taproot.lock");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let pid = holder.lines().find_map(|l| l.strip_prefix("pid=")).unwrap_or("unknown").trim().to_string();
            bail!(
                "{} is in use by another taproot process (pid {pid}; lock file {}): one process per run folder",
                dir.display(),
                path.display()
            );
        }
        Err(fs::TryLockError::Error(e)) => return Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
    f.set_len(0)?;
    f.rewind()?;
    writeln!(f, "pid={}", std::process::id())?;
    f.flush()?;
    Ok(f)
}

/// Move the old run's checkpoints (and its `rejected/` folder) and logs into
/// `out_dir/replaced-<unix time>/`.
fn move_aside(out_dir: &Path, checkpoint_dir: &Path, existing: &[(u64, PathBuf)], logs: &[PathBuf]) -> Result<PathBuf> {
    let mut to = out_dir.join(format!("replaced-{}", checkpoint::unix_now_s()));
    let mut k = 1;
    while to.exists() {
        to = out_dir.join(format!("replaced-{}-{k}", checkpoint::unix_now_s()));
        k += 1;
    }
    let cks = to.join("checkpoints");
    fs::create_dir_all(&cks).with_context(|| format!("cannot create {}", cks.display()))?;
    let mv = |from: &Path, into: &Path| -> Result<()> {
        let name = from.file_name().context("a file name")?;
        fs::rename(from, into.join(name)).with_context(|| format!("cannot move {} into {}", from.display(), into.display()))
    };
    for (_, p) in existing {
        mv(p, &cks)?;
    }
    let rejected = checkpoint_dir.join("rejected");
    if rejected.is_dir() {
        mv(&rejected, &cks)?;
    }
    for l in logs {
        mv(l, &to)?;
    }
    Ok(to)
}
