//! Verifying a checkpoint file without loading it: the header, the metadata and the checksum
//! over every tensor byte, streamed from the file in bounded memory. Pruning trusts a file only
//! after this (or a full [`super::load`]) has passed on it, so that a corrupt file can never
//! count as one of the checkpoints a run keeps.

use super::checksum::{file_checksum, StreamHash};
use super::{meta_of, open_checked, Meta, KEY_CHECKSUM, KEY_META, KEY_UNITS};
use anyhow::{anyhow, ensure, Context, Result};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Check one checkpoint file in full (its size against its header, its metadata, and the
/// checksum over every tensor byte) and return its [`Meta`]. Reads the file once, 1 MiB at a
/// time. Errors do not repeat the path.
pub(super) fn verify_unnamed(path: &Path) -> Result<Meta> {
    let (mut f, _, json) = open_checked(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).context("cannot read")?;
    let data_start = 8 + u64::from_le_bytes(len);
    let md = json
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .ok_or_else(|| anyhow!("no `{KEY_META}` metadata: not a taproot checkpoint"))?;
    let text = |key: &str| md.get(key).and_then(|v| v.as_str()).ok_or_else(|| anyhow!("no `{key}` metadata"));
    let (meta_json, units_json, stored) = (text(KEY_META)?, text(KEY_UNITS)?, text(KEY_CHECKSUM)?);
    let meta = meta_of(meta_json)?;

    // Every tensor, in name order (the checksum's order), with its byte range.
    let mut tensors = Vec::new();
    for (name, t) in json.as_object().into_iter().flatten().filter(|(k, _)| k.as_str() != "__metadata__") {
        ensure!(t.get("dtype").and_then(|d| d.as_str()) == Some("F32"), "tensor `{name}` is not F32");
        let shape: Vec<u64> = t
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
            .ok_or_else(|| anyhow!("tensor `{name}` has no shape"))?;
        let off = |i| t.get("data_offsets").and_then(|o| o.get(i)).and_then(|x| x.as_u64());
        let (start, end) = off(0).zip(off(1)).ok_or_else(|| anyhow!("tensor `{name}` has no data_offsets"))?;
        let numel = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).ok_or_else(|| anyhow!("tensor `{name}`: shape overflows"))?;
        ensure!(start <= end && end - start == numel.saturating_mul(4), "tensor `{name}`: its byte range does not match its shape");
        tensors.push((name.as_str(), numel, start, end));
    }
    tensors.sort_unstable_by(|a, b| a.0.cmp(b.0));

    let mut buf = vec![0u8; 1 << 20];
    let mut hashes = Vec::with_capacity(tensors.len());
    for &(name, numel, start, end) in &tensors {
        f.seek(SeekFrom::Start(data_start + start)).context("cannot read")?;
        let mut left = end - start;
        let mut h = StreamHash::new();
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            f.read_exact(&mut buf[..n]).with_context(|| format!("cannot read tensor `{name}`"))?;
            h.feed(&buf[..n]);
            left -= n as u64;
        }
        hashes.push((name, numel, h.finish()));
    }
    let sum = file_checksum(meta_json, units_json, hashes.into_iter());
    ensure!(sum == stored, "checksum mismatch (stored {stored}, computed {sum}): the file is corrupt");
    Ok(meta)
}

/// [`verify_unnamed`] with the path in the error.
pub fn verify(path: &Path) -> Result<Meta> {
    verify_unnamed(path).map_err(|e| anyhow!("checkpoint {}: {e:#}", path.display()))
}

/// The files a run has verified in full, by path, size and modification time, so that each
/// checkpoint is read once per run however often the folder is pruned. A file that changed
/// since (another size or time) is verified again.
#[derive(Debug, Default)]
pub struct Verified {
    seen: HashMap<PathBuf, (u64, Option<SystemTime>, Meta)>,
}

impl Verified {
    /// The file's [`Meta`] once it has passed [`verify`] (now or earlier in this run).
    pub fn check(&mut self, path: &Path) -> Result<Meta> {
        let md = std::fs::metadata(path).with_context(|| format!("checkpoint {}: cannot read", path.display()))?;
        let stamp = (md.len(), md.modified().ok());
        if let Some((len, time, meta)) = self.seen.get(path) {
            if (*len, *time) == stamp {
                return Ok(meta.clone());
            }
        }
        let meta = verify_unnamed(path)?;
        self.seen.insert(path.to_path_buf(), (stamp.0, stamp.1, meta.clone()));
        Ok(meta)
    }

    /// Record a file this run has just read back in full (as [`check`](Self::check) would).
    pub fn record(&mut self, path: &Path, meta: Meta) {
        if let Ok(md) = std::fs::metadata(path) {
            self.seen.insert(path.to_path_buf(), (md.len(), md.modified().ok(), meta));
        }
    }

    /// Forget a file (deleted or moved).
    pub fn forget(&mut self, path: &Path) {
        self.seen.remove(path);
    }
}
