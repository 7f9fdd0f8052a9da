//! The checkpoint folder: listing a run's checkpoints, finding the newest that loads, and
//! pruning (which deletes only the run's own older checkpoints, see [`prune`]).

use super::verify::Verified;
use super::{is_tmp_name, load_unnamed, parse_file_name, read_meta, sync_dir, Checkpoint};
use anyhow::{bail, ensure, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

/// The checkpoints in `dir` as (step, path), oldest first. Only canonical names count
/// (`step-<8+ digits>.safetensors`, regular files); temporary and unrelated files are ignored.
/// A directory that does not exist holds no checkpoints.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list checkpoint directory {}", dir.display())),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.with_context(|| format!("cannot list checkpoint directory {}", dir.display()))?;
        let Some(step) = entry.file_name().to_str().and_then(parse_file_name) else { continue };
        let path = entry.path();
        if fs::metadata(&path).map(|m| m.is_file()).unwrap_or(false) {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest checkpoint of `dir` that loads, with its path and one warning
/// (`skipping <file>: <reason>`) per newer checkpoint that did not.
///
/// `Ok(None)` when `dir` has no checkpoints at all; an error when it has some but none loads.
pub fn load_newest_valid(dir: &Path) -> Result<Option<(Checkpoint, PathBuf, Vec<String>)>> {
    let all = list(dir)?;
    if all.is_empty() {
        return Ok(None);
    }
    let mut warnings = Vec::new();
    for (_, path) in all.into_iter().rev() {
        match load_unnamed(&path) {
            Ok(ck) => return Ok(Some((ck, path, warnings))),
            Err(e) => warnings.push(format!("skipping {}: {:#}", path.display(), e)),
        }
    }
    bail!("no valid checkpoint in {}:\n  {}", dir.display(), warnings.join("\n  "))
}

/// What [`prune`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pruned {
    /// Older checkpoints of the run, and stale temporary files, deleted.
    pub removed: Vec<PathBuf>,
    /// Files named like the run's checkpoints that do not verify (a header that cannot be read, a
    /// size that is not what the header says, a checksum that fails): moved into `rejected/`
    /// beside them (never deleted, never counted), with why.
    pub moved_aside: Vec<(PathBuf, String)>,
    /// Checkpoints of another run (or of no recorded run), left alone and not counted.
    pub foreign: Vec<PathBuf>,
}

/// A fresh run id: the time in nanoseconds and the process id, in hex.
pub fn new_run_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:x}-{:x}", nanos, std::process::id())
}

/// Which of a run's checkpoints [`prune`] keeps.
#[derive(Clone, Copy, Debug)]
pub struct Retention<'a> {
    /// How many of the run's newest verified checkpoints to keep (at least 1).
    pub keep: usize,
    /// The run whose checkpoints count (see [`super::Meta::run_id`]).
    pub run_id: &'a str,
    /// Never deleted by this prune, whatever `keep` says: the checkpoint just written and read
    /// back, and the one the run resumed from.
    pub protect: &'a [PathBuf],
}

/// Move a checkpoint that failed to load or verify into `rejected/` beside it (never deleted:
/// a person may want it), under a name not taken there yet. Returns where it went.
pub fn reject(path: &Path) -> Result<PathBuf> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let aside = dir.join("rejected");
    fs::create_dir_all(&aside).with_context(|| format!("cannot create {}", aside.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let mut to = aside.join(&name);
    let mut k = 1;
    while to.exists() {
        to = aside.join(format!("{name}.{k}"));
        k += 1;
    }
    fs::rename(path, &to).with_context(|| format!("cannot move {} to {}", path.display(), to.display()))?;
    sync_dir(dir).with_context(|| format!("cannot sync directory {}", dir.display()))?;
    Ok(to)
}

/// Delete the older checkpoints of run `r.run_id` in `dir`, keeping its newest `r.keep` that
/// verify, and the stale temporary files of interrupted saves.
///
/// Only files that pass [`super::verify`] (in full: header, size and the checksum over every
/// byte; cached in `verified` so that each file is read once per run) count toward `keep`. A file
/// of the run that fails is moved into `dir/rejected/` at once, reported and never counted, so
/// a corrupt checkpoint can never push a good one out. A file whose header cannot be read is
/// moved aside the same way. A checkpoint of another run (or of no recorded run) is never
/// touched. The files of `r.protect` are never deleted.
pub fn prune(dir: &Path, r: &Retention, verified: &mut Verified) -> Result<Pruned> {
    ensure!(r.keep >= 1, "prune must keep at least one checkpoint");
    let mut out = Pruned::default();
    let mut own = Vec::new();
    for (step, path) in list(dir)? {
        // read_meta checks the file's size against its header too (`open_checked`).
        let checked = match read_meta(&path) {
            Ok(meta) if meta.run_id.as_deref() != Some(r.run_id) => {
                out.foreign.push(path);
                continue;
            }
            Ok(_) => verified.check(&path),
            Err(e) => Err(e),
        };
        match checked {
            Ok(_) => own.push((step, path)),
            Err(e) => {
                verified.forget(&path);
                let to = reject(&path)?;
                out.moved_aside.push((to, format!("{e:#}")));
            }
        }
    }
    let mut doomed: Vec<PathBuf> =
        own[..own.len().saturating_sub(r.keep)].iter().map(|(_, p)| p.clone()).filter(|p| !r.protect.contains(p)).collect();
    if let Ok(rd) = fs::read_dir(dir) {
        for entry in rd.flatten() {
            if entry.file_name().to_str().is_some_and(is_tmp_name) && entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
                doomed.push(entry.path());
            }
        }
    }
    for p in &doomed {
        fs::remove_file(p).with_context(|| format!("cannot remove {}", p.display()))?;
        verified.forget(p);
    }
    if !doomed.is_empty() {
        sync_dir(dir).with_context(|| format!("cannot sync directory {}", dir.display()))?;
    }
    out.removed = doomed;
    Ok(out)
}

// ------------------------------------------------------------------------------------------
// Inspection

/// The checkpoint at `path`: the file itself, or the newest valid one of a folder.
/// The checkpoint folder `path` names: a run folder (one holding `checkpoints/`) means its
/// `checkpoints/`; anything else is itself.
pub fn checkpoints_of(path: &Path) -> std::path::PathBuf {
    let inner = path.join("checkpoints");
    if path.is_dir() && inner.is_dir() {
        inner
    } else {
        path.to_path_buf()
    }
}

pub fn load_file_or_newest(path: &Path) -> Result<Checkpoint> {
    let path = &checkpoints_of(path);
    if path.is_dir() {
        load_newest_valid(path)?.map(|(ck, _, _)| ck).with_context(|| format!("no valid checkpoint in {}", path.display()))
    } else {
        super::load(path)
    }
}
