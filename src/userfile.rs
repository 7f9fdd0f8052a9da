//! Reading a file a user named (a config, a token file, a Hugging Face folder's `config.json`
//! and `model.safetensors`, a tokenizer, a shard, a text to prepare): one helper, so that every
//! such read refuses what is not a regular file *before* opening it (a FIFO would block the
//! open forever, `/dev/zero` would read until memory runs out), refuses a file larger than the
//! bound its kind has, and reserves its buffer fallibly (a file larger than memory is an error
//! naming it, never an allocation abort). Every error names the file and what it was for.

use anyhow::{anyhow, bail, Context, Result};
use std::io::Read;
use std::path::Path;

/// The bound for small text files: configs, JSON, token files, corpus records.
pub const TEXT_MAX: u64 = 64 << 20;
/// The bound for tokenizer files (a 150k-token vocabulary's `tokenizer.json` is ~10 MB).
pub const TOKENIZER_MAX: u64 = 1 << 30;
/// No bound but memory (weights, shards, texts to prepare): the buffer is reserved fallibly.
pub const MEMORY: u64 = u64::MAX;

/// Check that `path` is a regular file (following symbolic links) and return its size.
pub fn check(path: &Path, what: &str) -> Result<u64> {
    let md = std::fs::metadata(path).with_context(|| format!("{what} {}: cannot read", path.display()))?;
    if !md.is_file() {
        let kind = if md.is_dir() { "a directory" } else { "not a regular file (a FIFO, socket or device)" };
        bail!("{what} {}: {kind}", path.display());
    }
    Ok(md.len())
}

/// The bytes of the regular file `path`, at most `max` of them.
pub fn read(path: &Path, what: &str, max: u64) -> Result<Vec<u8>> {
    let len = check(path, what)?;
    if len > max {
        bail!("{what} {}: {len} bytes, more than the {max} this reader accepts", path.display());
    }
    let mut f = std::fs::File::open(path).with_context(|| format!("{what} {}: cannot open", path.display()))?;
    // The file could have been swapped for something else between the check and the open.
    if !f.metadata().map(|m| m.is_file()).unwrap_or(false) {
        bail!("{what} {}: not a regular file", path.display());
    }
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(len as usize).map_err(|_| anyhow!("{what} {}: {len} bytes do not fit in memory", path.display()))?;
    // One byte past the size seen, so that a file still growing is noticed, not read forever.
    f.by_ref().take(len.saturating_add(1)).read_to_end(&mut bytes).with_context(|| format!("{what} {}: cannot read", path.display()))?;
    if bytes.len() as u64 != len {
        bail!("{what} {}: the file changed while it was read ({len} -> {} bytes)", path.display(), bytes.len());
    }
    Ok(bytes)
}

/// The text of the regular file `path` (UTF-8), at most `max` bytes.
pub fn read_to_string(path: &Path, what: &str, max: u64) -> Result<String> {
    String::from_utf8(read(path, what, max)?)
        .map_err(|e| anyhow!("{what} {}: not UTF-8 text (byte {})", path.display(), e.utf8_error().valid_up_to()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_directories_and_oversized_files_are_refused_without_reading() {
        let e = format!("{:#}", read(Path::new("/dev/zero"), "config", TEXT_MAX).unwrap_err());
        assert!(e.contains("config /dev/zero: not a regular file"), "{e}");
        let e = format!("{:#}", read(Path::new("/"), "config", TEXT_MAX).unwrap_err());
        assert!(e.contains("a directory"), "{e}");
        let dir = std::env::temp_dir().join(format!("taproot-userfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("big.toml");
        std::fs::write(&f, vec![b'x'; 100]).unwrap();
        let e = format!("{:#}", read(&f, "config", 99).unwrap_err());
        assert!(e.contains("100 bytes, more than the 99"), "{e}");
        assert_eq!(read(&f, "config", 100).unwrap().len(), 100);
        std::fs::write(&f, [0xff, 0xfe]).unwrap();
        assert!(format!("{:#}", read_to_string(&f, "config", 100).unwrap_err()).contains("not UTF-8"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_at_once() {
        let dir = std::env::temp_dir().join(format!("taproot-userfile-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("config.json");
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().map(|s| s.success()).unwrap_or(false);
        if !made {
            println!("SKIP: mkfifo is not available");
            return;
        }
        let t0 = std::time::Instant::now();
        let e = format!("{:#}", read(&fifo, "config", TEXT_MAX).unwrap_err());
        assert!(e.contains("not a regular file") && t0.elapsed().as_secs() < 5, "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
