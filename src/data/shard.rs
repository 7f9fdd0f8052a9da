//! llm.c token shards (`.bin`): the on-disk format of tokenized training data.
//!
//! We use llm.c's format unchanged so shards made by its `dev/data/*.py` scripts can be
//! trained on directly, and ours can be read by llm.c:
//!
//! ```text
//! byte 0      header: 256 little-endian i32 (1024 bytes)
//!               header[0] = 20240520  (magic)
//!               header[1] = 1 or 2    (version: 1 = u16 tokens, 2 = u32 tokens)
//!               header[2] = N         (number of tokens)
//!               header[3..256] = 0    (unused)
//! byte 1024   N little-endian u16 (version 1) or u32 (version 2) tokens
//! ```
//!
//! Version 1 is written whenever the vocabulary fits 16 bits (GPT-2, bytes, `bpe:N`); version 2
//! (llm.c's for LLaMA 3's 128k vocabulary) when it does not ([`Width::for_vocab`]).
//!
//! Reading is strict: a shard whose size does not match its header is an error, never a
//! silently shorter dataset, and every error names the file and the byte offset involved so a
//! corrupt download can be located. Writing goes through a temporary file that is renamed
//! into place after an fsync, so a crash mid-write never leaves a half-written shard behind
//! under the real name. Training reads windows of open shards ([`open_shard`]) and never holds
//! a shard in memory.

use anyhow::{bail, Context, Result};
use std::fs;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// First header word of every llm.c token shard.
pub const SHARD_MAGIC: i32 = 20240520;
/// The version of u16 shards (the default, llm.c's GPT-2 shards).
pub const SHARD_VERSION: i32 = 1;
/// The version of u32 shards (llm.c's for vocabularies above 65,536).
pub const SHARD_VERSION_U32: i32 = 2;
/// Number of i32 words in the header.
pub const HEADER_INTS: usize = 256;
/// Header size in bytes; the first token starts at this byte offset.
pub const HEADER_BYTES: usize = HEADER_INTS * 4;

/// How wide a shard's tokens are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// Version 1: u16 tokens.
    U16,
    /// Version 2: u32 tokens.
    U32,
}

impl Width {
    /// u16 where every id of a `vocab`-token vocabulary fits, else u32.
    pub fn for_vocab(vocab: usize) -> Width {
        if vocab <= 1 << 16 {
            Width::U16
        } else {
            Width::U32
        }
    }

    /// Bytes per token.
    pub fn bytes(self) -> usize {
        match self {
            Width::U16 => 2,
            Width::U32 => 4,
        }
    }

    fn version(self) -> i32 {
        match self {
            Width::U16 => SHARD_VERSION,
            Width::U32 => SHARD_VERSION_U32,
        }
    }

    fn max(self) -> u32 {
        match self {
            Width::U16 => u16::MAX as u32,
            Width::U32 => u32::MAX,
        }
    }
}

/// Byte offset of token `index` inside a version-1 shard file, for error messages.
pub fn token_offset(index: usize) -> usize {
    HEADER_BYTES + 2 * index
}

/// Writes `tokens` to `path` as an llm.c shard of version 1 (u16 tokens).
///
/// Errors if `tokens` is empty (readers reject empty shards), if any token does not fit in
/// a u16 (naming the first offending index), or on any I/O failure. See [`ShardWriter`].
pub fn write_shard(path: &Path, tokens: &[u32]) -> Result<()> {
    write_shard_as(path, tokens, Width::U16)
}

/// Writes `tokens` to `path` as an llm.c shard of the given width.
pub fn write_shard_as(path: &Path, tokens: &[u32], width: Width) -> Result<()> {
    let mut w = ShardWriter::create(path, width)?;
    w.push(tokens)?;
    w.finish()
}

/// A shard written token by token, so a corpus of any size streams through bounded memory:
/// the tokens go to `<path>.tmp`, [`ShardWriter::finish`] writes the count into the header,
/// fsyncs and renames over `path` (a rename within one directory is atomic, so readers see
/// either the old file or the complete new one). Dropped unfinished, the temporary file is
/// removed and `path` is untouched.
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<fs::File>>,
    width: Width,
    count: usize,
}

impl ShardWriter {
    pub fn create(path: &Path, width: Width) -> Result<ShardWriter> {
        let tmp = tmp_path(path);
        let f = fs::File::create(&tmp).with_context(|| format!("creating shard {}", tmp.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        out.write_all(&[0u8; HEADER_BYTES]).with_context(|| format!("writing shard {}", tmp.display()))?;
        Ok(ShardWriter { path: path.to_path_buf(), tmp, out: Some(out), width, count: 0 })
    }

    /// The shard's final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tokens written so far.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends `tokens`. A token too wide for the shard is an error naming its index.
    pub fn push(&mut self, tokens: &[u32]) -> Result<()> {
        let max = self.width.max();
        if let Some((i, &tok)) = tokens.iter().enumerate().find(|(_, &t)| t > max) {
            bail!(
                "{}: token {tok} at index {} does not fit in u16 (max {max}); version-1 shards store 16-bit tokens \
                 (a vocabulary above 65,536 is written as version-2 u32 shards)",
                self.path.display(),
                self.count + i
            );
        }
        let out = self.out.as_mut().context("shard writer already finished")?;
        let mut buf = Vec::with_capacity(tokens.len() * self.width.bytes());
        match self.width {
            Width::U16 => tokens.iter().for_each(|&t| buf.extend_from_slice(&(t as u16).to_le_bytes())),
            Width::U32 => tokens.iter().for_each(|&t| buf.extend_from_slice(&t.to_le_bytes())),
        }
        out.write_all(&buf).with_context(|| format!("writing shard {}", self.tmp.display()))?;
        self.count += tokens.len();
        Ok(())
    }

    /// Writes the header, fsyncs and renames the shard into place.
    pub fn finish(mut self) -> Result<()> {
        if self.count == 0 {
            bail!("{}: refusing to write an empty shard (0 tokens)", self.path.display());
        }
        let count = i32::try_from(self.count).map_err(|_| {
            anyhow::anyhow!("{}: {} tokens is more than a shard header can count (i32::MAX)", self.path.display(), self.count)
        })?;
        let out = self.out.take().context("shard writer already finished")?;
        let tmp = self.tmp.clone();
        let width = self.width;
        let seal = move || -> Result<()> {
            let mut f = out.into_inner().map_err(|e| e.into_error())?;
            let mut header = [0i32; HEADER_INTS];
            header[0] = SHARD_MAGIC;
            header[1] = width.version();
            header[2] = count;
            let bytes: Vec<u8> = header.iter().flat_map(|w| w.to_le_bytes()).collect();
            f.seek(SeekFrom::Start(0))?;
            f.write_all(&bytes)?;
            f.sync_all()?; // data on disk before the rename makes it visible
            Ok(())
        };
        seal().with_context(|| format!("writing shard {}", tmp.display()))?;
        fs::rename(&tmp, &self.path).with_context(|| format!("renaming {} to {}", tmp.display(), self.path.display()))?;
        // Persist the rename itself. Best effort: not every platform can fsync a directory.
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
            if let Ok(d) = fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = fs::remove_file(&self.tmp); // unfinished: do not leave the partial file
        }
    }
}

/// `<path>.tmp`, next to `path` so the final rename stays within one filesystem.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// A checked shard header: the token width and count, with the file's size agreeing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub width: Width,
    pub count: usize,
}

/// Checks a shard's header against its file length `len`. Every malformed input is an error
/// naming the file and the byte offset: a file shorter than the header, a wrong magic number,
/// an unsupported version, a token count of zero, or a file size that does not match the count
/// (truncated, or trailing bytes after the last token).
pub fn parse_header(path: &Path, head: &[u8], len: u64) -> Result<Header> {
    let p = path.display();
    if head.len() < HEADER_BYTES {
        bail!(
            "{p}: file is {len} bytes, shorter than the {HEADER_BYTES}-byte shard header \
             (the file ends at byte offset {len})"
        );
    }
    let word = |i: usize| i32::from_le_bytes(head[4 * i..4 * i + 4].try_into().unwrap());
    let magic = word(0);
    if magic != SHARD_MAGIC {
        bail!("{p}: bad magic at byte offset 0: expected {SHARD_MAGIC}, found {magic} (not an llm.c token shard?)");
    }
    let width = match word(1) {
        SHARD_VERSION => Width::U16,
        SHARD_VERSION_U32 => Width::U32,
        v => bail!(
            "{p}: unsupported shard version {v} at byte offset 4: version {SHARD_VERSION} (u16 tokens) and \
             {SHARD_VERSION_U32} (u32 tokens) are supported"
        ),
    };
    let count = word(2);
    if count < 0 {
        bail!("{p}: negative token count {count} at byte offset 8");
    }
    if count == 0 {
        bail!("{p}: empty shard: token count at byte offset 8 is 0");
    }
    let count = count as usize;
    let w = width.bytes() as u64;
    let expected_len = HEADER_BYTES as u64 + w * count as u64;
    let room = (len - HEADER_BYTES as u64) / w; // whole tokens the data area could hold
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
    Ok(Header { width, count })
}

/// Reads an llm.c shard (either version) and returns its tokens. For tests and tools: a run
/// reads windows of open shards instead ([`open_shard`]).
pub fn read_shard(path: &Path) -> Result<Vec<u32>> {
    let bytes = crate::userfile::read(path, "shard", crate::userfile::MEMORY)?;
    let h = parse_header(path, &bytes[..bytes.len().min(HEADER_BYTES)], bytes.len() as u64)?;
    Ok(decode(&bytes[HEADER_BYTES..], h.width))
}

/// Tokens of a shard's data bytes.
pub fn decode(data: &[u8], width: Width) -> Vec<u32> {
    let mut out = Vec::with_capacity(data.len() / width.bytes());
    extend_decoded(data, width, &mut out);
    out
}

/// Appends the tokens of a shard's data bytes to `out`.
fn extend_decoded(data: &[u8], width: Width, out: &mut Vec<u32>) {
    match width {
        Width::U16 => out.extend(data.chunks_exact(2).map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))),
        Width::U32 => out.extend(data.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
    }
}

/// An open shard, read window by window with positional reads (`pread`): the tokens go through
/// the page cache into the caller's buffer and never become the run's own memory, whatever the
/// corpus's size. (A mapping would do the same in principle, but kernels that cache files in
/// large folios map a whole folio, hundreds of KB, into the process at every fault, so a run's
/// resident set would grow towards the corpus's size as it draws windows.)
pub struct ShardFile {
    pub path: PathBuf,
    pub header: Header,
    file: fs::File,
}

impl std::fmt::Debug for ShardFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShardFile({}, {:?})", self.path.display(), self.header)
    }
}

impl ShardFile {
    /// Appends tokens `start .. start + n` (in range) to `out`.
    pub fn read_into(&self, start: usize, n: usize, out: &mut Vec<u32>) -> Result<()> {
        use std::os::unix::fs::FileExt;
        // Through a buffer on the stack: a window is read at every row of every batch, and a
        // heap buffer per read would be an allocation per row.
        let w = self.header.width.bytes();
        let mut buf = [0u8; 16 << 10];
        let per_read = buf.len() / w;
        let mut done = 0;
        while done < n {
            let k = per_read.min(n - done);
            let at = (HEADER_BYTES + (start + done) * w) as u64;
            self.file.read_exact_at(&mut buf[..k * w], at).with_context(|| {
                format!(
                    "reading tokens {start}..{} of shard {} (was it changed or truncated under the run?)",
                    start + n,
                    self.path.display()
                )
            })?;
            extend_decoded(&buf[..k * w], self.header.width, out);
            done += k;
        }
        Ok(())
    }
}

/// Opens the shard at `path` after checking its header and size (see [`parse_header`]), and
/// checks every token against `vocab` by reading the file in bounded chunks.
pub fn open_shard(path: &Path, vocab: usize) -> Result<ShardFile> {
    let len = crate::userfile::check(path, "shard")?;
    let mut f = fs::File::open(path).with_context(|| format!("opening shard {}", path.display()))?;
    let mut head = vec![0u8; HEADER_BYTES.min(len as usize)];
    f.read_exact(&mut head).with_context(|| format!("reading the header of shard {}", path.display()))?;
    let header = parse_header(path, &head, len)?;
    scan_vocab(&mut f, path, header, vocab)?;
    Ok(ShardFile { path: path.to_path_buf(), header, file: f })
}

/// Checks every token of the open shard `f` (positioned after its header) against `vocab`.
fn scan_vocab(f: &mut fs::File, path: &Path, header: Header, vocab: usize) -> Result<()> {
    let w = header.width.bytes();
    let mut buf = vec![0u8; (1 << 20) * w];
    let mut done = 0usize;
    while done < header.count {
        let n = (header.count - done).min(1 << 20);
        f.read_exact(&mut buf[..n * w]).with_context(|| format!("reading shard {} at token {done}", path.display()))?;
        let bad = match header.width {
            Width::U16 => buf[..n * 2].chunks_exact(2).position(|c| u16::from_le_bytes([c[0], c[1]]) as usize >= vocab),
            Width::U32 => buf[..n * 4].chunks_exact(4).position(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize >= vocab),
        };
        if let Some(i) = bad {
            let at = done + i;
            let tok = decode(&buf[i * w..(i + 1) * w], header.width)[0];
            bail!(
                "{}: token id {tok} at index {at} (byte offset {}) is out of range for vocab size {vocab}; \
                 was this shard made with another tokenizer?",
                path.display(),
                HEADER_BYTES + at * w
            );
        }
        done += n;
    }
    Ok(())
}

/// Checks that every token id is below `vocab`, so a shard made with a different tokenizer
/// (or a corrupt one) fails at load time instead of indexing out of the embedding table.
///
/// `path` is only used for the message, which names the first bad token's index and its byte
/// offset in a version-1 file (`1024 + 2 * index`).
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
