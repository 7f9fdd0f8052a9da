//! llm.c token shards (`.bin`): the on-disk format of tokenized training data.
//!
//! We use llm.c's format unchanged so shards made by its `dev/data/*.py` scripts can be
//! trained on directly, and ours can be read by llm.c:
//!
//! ```text
//! byte 0      header: 256 little-endian i32 (1024 bytes)
//!               header[0] = 20240520  (magic)
//!               header[1] = 1         (version: u16 tokens)
//!               header[2] = N         (number of tokens)
//!               header[3..256] = 0    (unused)
//! byte 1024   N little-endian u16 tokens
//! ```
//!
//! Reading is strict: a shard whose size does not match its header is an error, never a
//! silently shorter dataset, and every error names the file and the byte offset involved so a
//! corrupt download can be located. Writing goes through a temporary file that is renamed
//! into place after an fsync, so a crash mid-write never leaves a half-written shard behind
//! under the real name.

use anyhow::{bail, Context, Result};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// First header word of every llm.c token shard.
pub const SHARD_MAGIC: i32 = 20240520;
/// The only version we read and write: tokens stored as u16. (llm.c uses version 2 for
/// u32 tokens, e.g. Llama 3's 128k vocabulary.)
pub const SHARD_VERSION: i32 = 1;
/// Number of i32 words in the header.
pub const HEADER_INTS: usize = 256;
/// Header size in bytes; the first token starts at this byte offset.
pub const HEADER_BYTES: usize = HEADER_INTS * 4;

/// Byte offset of token `index` inside a shard file, for error messages.
pub fn token_offset(index: usize) -> usize {
    HEADER_BYTES + 2 * index
}

/// Writes `tokens` to `path` as an llm.c shard (version 1, u16 tokens).
///
/// Errors if `tokens` is empty (readers reject empty shards), if any token does not fit in
/// a u16 (naming the first offending index), or on any I/O failure. The data is written to
/// `<path>.tmp` in the same directory, fsynced, then renamed over `path`: a rename within one
/// directory is atomic, so readers see either the old file or the complete new one.
pub fn write_shard(path: &Path, tokens: &[u32]) -> Result<()> {
    if tokens.is_empty() {
        bail!("{}: refusing to write an empty shard (0 tokens)", path.display());
    }
    if let Some((i, &tok)) = tokens.iter().enumerate().find(|(_, &t)| t > u16::MAX as u32) {
        bail!(
            "{}: token {tok} at index {i} does not fit in u16 (max {}); \
             version-1 shards store 16-bit tokens",
            path.display(),
            u16::MAX
        );
    }
    let count = i32::try_from(tokens.len())
        .map_err(|_| anyhow::anyhow!("{}: {} tokens is more than a shard header can count (i32::MAX)", path.display(), tokens.len()))?;

    // Serialise everything into one buffer first: shards are at most a few hundred MB,
    // and a single write keeps the I/O code trivial.
    let mut buf = Vec::with_capacity(HEADER_BYTES + 2 * tokens.len());
    let mut header = [0i32; HEADER_INTS];
    header[0] = SHARD_MAGIC;
    header[1] = SHARD_VERSION;
    header[2] = count;
    for word in header {
        buf.extend_from_slice(&word.to_le_bytes());
    }
    for &tok in tokens {
        buf.extend_from_slice(&(tok as u16).to_le_bytes());
    }

    let tmp = tmp_path(path);
    let write_tmp = || -> Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?; // data on disk before the rename makes it visible
        Ok(())
    };
    if let Err(e) = write_tmp() {
        let _ = fs::remove_file(&tmp); // best effort: do not leave the partial temp file
        return Err(e).with_context(|| format!("writing shard {}", tmp.display()));
    }
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    // Persist the rename itself. Best effort: not every platform can fsync a directory.
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// `<path>.tmp`, next to `path` so the final rename stays within one filesystem.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Reads an llm.c shard and returns its tokens.
///
/// Every malformed input is an error (never a panic) naming the file and the byte offset:
/// a file shorter than the header, a wrong magic number, an unsupported version, a token
/// count of zero, or a file size that does not match the count (truncated, or trailing
/// bytes after the last token).
pub fn read_shard(path: &Path) -> Result<Vec<u16>> {
    let bytes = crate::userfile::read(path, "shard", crate::userfile::MEMORY)?;
    let p = path.display();
    if bytes.len() < HEADER_BYTES {
        bail!(
            "{p}: file is {} bytes, shorter than the {HEADER_BYTES}-byte shard header \
             (the file ends at byte offset {})",
            bytes.len(),
            bytes.len()
        );
    }
    let word = |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());

    let magic = word(0);
    if magic != SHARD_MAGIC {
        bail!(
            "{p}: bad magic at byte offset 0: expected {SHARD_MAGIC}, found {magic} \
             (not an llm.c token shard?)"
        );
    }
    let version = word(1);
    if version != SHARD_VERSION {
        bail!(
            "{p}: unsupported shard version {version} at byte offset 4: only version \
             {SHARD_VERSION} (u16 tokens) is supported"
        );
    }
    let count = word(2);
    if count < 0 {
        bail!("{p}: negative token count {count} at byte offset 8");
    }
    if count == 0 {
        bail!("{p}: empty shard: token count at byte offset 8 is 0");
    }

    let count = count as usize;
    let expected_len = HEADER_BYTES + 2 * count;
    let len = bytes.len();
    let room = (len - HEADER_BYTES) / 2; // whole tokens the data area could hold
    if len < expected_len {
        bail!(
            "{p}: truncated: header (byte offset 8) says {count} tokens, so the file should be \
             {expected_len} bytes, but it is {len} bytes (room for {room} tokens); \
             the data ends early at byte offset {len}"
        );
    }
    if len > expected_len {
        bail!(
            "{p}: trailing bytes: header (byte offset 8) says {count} tokens, so the file should \
             be {expected_len} bytes, but it is {len} bytes (room for {room} tokens); \
             {} unexpected bytes start at byte offset {expected_len}",
            len - expected_len
        );
    }

    let tokens = bytes[HEADER_BYTES..].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    Ok(tokens)
}

/// Checks that every token id is below `vocab`, so a shard made with a different tokenizer
/// (or a corrupt one) fails at load time instead of indexing out of the embedding table.
///
/// `path` is only used for the message, which names the first bad token's index and its byte
/// offset in the file (`1024 + 2 * index`).
pub fn check_tokens(tokens: &[u16], vocab: usize, path: &Path) -> Result<()> {
    if let Some((i, &tok)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
        bail!(
            "{}: token id {tok} at index {i} (byte offset {}) is out of range for vocab size \
             {vocab}; was this shard made with another tokenizer?",
            path.display(),
            token_offset(i)
        );
    }
    Ok(())
}
