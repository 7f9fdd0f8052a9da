//! The documents `taproot data prepare` reads, one at a time, whatever the input's size:
//!
//! - a text file (`.txt`, or any file not named below) is one document, its raw bytes;
//! - `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (also `.json.gz`/`.ndjson`): one JSON object per line,
//!   the document being its string field `--field` (default `text`); blank lines are skipped;
//! - `.parquet`: one document per row, from the string column `--column` (default `text`), read
//!   row group by row group.
//!
//! Folders are walked recursively, their files in name order, and only the kinds above are taken
//! from them (`*.txt`, `*.jsonl*`, `*.parquet`). A document that cannot be read (a malformed line,
//! a missing or non-string field, a non-UTF-8 line, a null cell) is a [`Item::Bad`] naming its
//! file and line or row; a stream that ends early (a truncated gzip) is one too, after the
//! documents before it. The caller decides whether a bad item stops the run or is counted.

use anyhow::{bail, Context, Result};
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Where a document came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    /// 1-based line (JSONL) or 0-based row (Parquet); none for a whole text file.
    pub at: Option<(&'static str, u64)>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some((what, n)) => write!(f, "{}: {what} {n}", self.file.display()),
            None => write!(f, "{}", self.file.display()),
        }
    }
}

/// One thing read from the inputs.
#[derive(Debug)]
pub enum Item {
    /// A document's bytes (UTF-8 for JSONL and Parquet; whatever the file holds for text).
    Doc { bytes: Vec<u8>, at: Location },
    /// Something that is not a document, and why.
    Bad { at: Location, why: String },
}

/// What `data prepare` reads: where the documents are in files.
#[derive(Clone, Debug)]
pub struct InputSpec {
    /// The JSONL field holding the text.
    pub field: String,
    /// The Parquet column holding the text.
    pub column: String,
}

impl Default for InputSpec {
    fn default() -> Self {
        InputSpec { field: "text".into(), column: "text".into() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Text,
    Jsonl,
    JsonlGz,
    JsonlZst,
    Parquet,
}

fn kind_of(path: &Path) -> Kind {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let json = |ext: &str| [".jsonl", ".ndjson", ".json"].iter().any(|j| name.ends_with(&format!("{j}{ext}")));
    if json(".gz") {
        Kind::JsonlGz
    } else if json(".zst") || json(".zstd") {
        Kind::JsonlZst
    } else if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
        Kind::Jsonl
    } else if name.ends_with(".parquet") {
        Kind::Parquet
    } else {
        Kind::Text
    }
}

/// Whether a folder's file is taken as input.
fn wanted_in_folder(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    name.ends_with(".txt") || kind_of(path) != Kind::Text
}

/// Expands `inputs` into the files to read: files as given, folders replaced by their input
/// files (recursively, sorted by path). A path that does not exist is an error.
pub fn collect_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading input directory {}", dir.display()))?
            .map(|e| e.map(|e| e.path()).with_context(|| format!("listing {}", dir.display())))
            .collect::<Result<_>>()?;
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if p.is_file() && wanted_in_folder(&p) {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            walk(input, &mut files)?;
        } else if input.is_file() {
            files.push(input.clone());
        } else {
            bail!("input {} does not exist (or is not a file or directory)", input.display());
        }
    }
    Ok(files)
}

/// A reader that counts the bytes taken from the file (the progress bar's position).
struct Counted<R> {
    inner: R,
    seen: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

enum Open {
    Lines { reader: Box<dyn BufRead + Send>, line: u64 },
    Rows { rows: parquet::record::reader::RowIter<'static>, row: u64 },
    Done,
}

/// The documents of a list of files, in order.
pub struct Documents {
    files: Vec<PathBuf>,
    next_file: usize,
    spec: InputSpec,
    current: Open,
    file: PathBuf,
    /// Bytes read from the files so far (compressed bytes for compressed files).
    pub seen: Arc<AtomicU64>,
}

impl Documents {
    pub fn new(files: Vec<PathBuf>, spec: InputSpec) -> Documents {
        Documents { files, next_file: 0, spec, current: Open::Done, file: PathBuf::new(), seen: Arc::new(AtomicU64::new(0)) }
    }

    /// Total size of the input files in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)).sum()
    }

    fn here(&self, what: &'static str, n: u64) -> Location {
        Location { file: self.file.clone(), at: Some((what, n)) }
    }

    /// Opens the next file; a whole text file is returned at once.
    fn open_next(&mut self) -> Option<Result<Item>> {
        let path = self.files.get(self.next_file)?.clone();
        self.next_file += 1;
        self.file = path.clone();
        let at = Location { file: path.clone(), at: None };
        let kind = kind_of(&path);
        let open = || -> Result<Counted<std::fs::File>> {
            let f = std::fs::File::open(&path).with_context(|| format!("opening input {}", path.display()))?;
            Ok(Counted { inner: f, seen: self.seen.clone() })
        };
        let r = match kind {
            Kind::Text => {
                let read = || -> Result<Vec<u8>> {
                    crate::userfile::check(&path, "input")?;
                    let mut bytes = Vec::new();
                    open()?.read_to_end(&mut bytes).with_context(|| format!("reading input {}", path.display()))?;
                    Ok(bytes)
                };
                return Some(read().map(|bytes| Item::Doc { bytes, at }));
            }
            Kind::Jsonl => open().map(|f| Open::Lines { reader: Box::new(BufReader::with_capacity(1 << 20, f)), line: 0 }),
            Kind::JsonlGz => open().map(|f| Open::Lines {
                reader: Box::new(BufReader::with_capacity(1 << 20, flate2::read::MultiGzDecoder::new(BufReader::new(f)))),
                line: 0,
            }),
            Kind::JsonlZst => open().and_then(|f| {
                let d = zstd::stream::read::Decoder::new(f).with_context(|| format!("{}: not a zstd stream", path.display()))?;
                Ok(Open::Lines { reader: Box::new(BufReader::with_capacity(1 << 20, d)), line: 0 })
            }),
            Kind::Parquet => open().and_then(|f| self.open_parquet(f.inner)),
        };
        match r {
            Ok(o) => {
                self.current = o;
                self.next()
            }
            Err(e) => Some(Err(e)),
        }
    }

    fn open_parquet(&self, f: std::fs::File) -> Result<Open> {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let p = self.file.display();
        // Parquet is read through its footer and column chunks: the bar moves by whole files.
        self.seen.fetch_add(f.metadata().map(|m| m.len()).unwrap_or(0), Ordering::Relaxed);
        let reader = SerializedFileReader::new(f).with_context(|| format!("{p}: not a Parquet file"))?;
        let schema = reader.metadata().file_metadata().schema_descr_ptr();
        let root = schema.root_schema();
        let Some(field) = root.get_fields().iter().find(|f| f.name() == self.spec.column) else {
            let names: Vec<&str> = root.get_fields().iter().map(|f| f.name()).collect();
            bail!("{p}: no column {:?} (columns: {}); choose one with --column", self.spec.column, names.join(", "));
        };
        let proj = parquet::schema::types::Type::group_type_builder(root.name()).with_fields(vec![field.clone()]).build()?;
        let rows = parquet::record::reader::RowIter::from_file_into(Box::new(reader))
            .project(Some(proj))
            .with_context(|| format!("{p}: reading column {:?}", self.spec.column))?;
        Ok(Open::Rows { rows, row: 0 })
    }

    fn next_line(&mut self) -> Option<Result<Item>> {
        let Open::Lines { reader, line } = &mut self.current else { return None };
        let mut buf = Vec::new();
        loop {
            buf.clear();
            *line += 1;
            let n = *line;
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => {
                    // A stream that ends early (a truncated gzip) or cannot be decoded: said, and
                    // the rest of this file is lost.
                    self.current = Open::Done;
                    let why = format!("the file cannot be read past this line ({e}); is it truncated?");
                    return Some(Ok(Item::Bad { at: self.here("line", n), why }));
                }
            }
            if buf.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            let at = self.here("line", n);
            return Some(Ok(json_document(&buf, &self.spec.field, at)));
        }
    }

    fn next_row(&mut self) -> Option<Result<Item>> {
        use parquet::record::Field;
        let Open::Rows { rows, row } = &mut self.current else { return None };
        let n = *row;
        *row += 1;
        let r = rows.next()?;
        let at = self.here("row", n);
        Some(Ok(match r {
            Err(e) => {
                self.current = Open::Done;
                Item::Bad { at, why: format!("the file cannot be read past this row ({e})") }
            }
            Ok(r) => match r.into_columns().into_iter().next().map(|c| c.1) {
                Some(Field::Str(s)) => Item::Doc { bytes: s.into_bytes(), at },
                Some(Field::Bytes(b)) => match String::from_utf8(b.data().to_vec()) {
                    Ok(s) => Item::Doc { bytes: s.into_bytes(), at },
                    Err(e) => {
                        Item::Bad { at, why: format!("column {:?} is not UTF-8 (byte {})", self.spec.column, e.utf8_error().valid_up_to()) }
                    }
                },
                Some(Field::Null) | None => Item::Bad { at, why: format!("column {:?} is null", self.spec.column) },
                Some(other) => Item::Bad { at, why: format!("column {:?} holds {other:?}, not a string", self.spec.column) },
            },
        }))
    }
}

/// The document of one JSONL line.
fn json_document(line: &[u8], field: &str, at: Location) -> Item {
    let text = match std::str::from_utf8(line) {
        Ok(t) => t,
        Err(e) => return Item::Bad { at, why: format!("not valid UTF-8 (first bad byte at column {})", e.valid_up_to() + 1) },
    };
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return Item::Bad { at, why: format!("not a JSON object: {e}") },
    };
    let serde_json::Value::Object(mut obj) = value else {
        return Item::Bad { at, why: "not a JSON object".into() };
    };
    match obj.remove(field) {
        Some(serde_json::Value::String(s)) => Item::Doc { bytes: s.into_bytes(), at },
        Some(other) => {
            let kind = match other {
                serde_json::Value::Null => "null",
                serde_json::Value::Bool(_) => "a boolean",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Array(_) => "an array",
                _ => "an object",
            };
            Item::Bad { at, why: format!("field {field:?} is {kind}, not a string") }
        }
        None => {
            let mut keys: Vec<&String> = obj.keys().collect();
            keys.sort();
            let keys: Vec<&str> = keys.iter().take(8).map(|k| k.as_str()).collect();
            Item::Bad { at, why: format!("no field {field:?} (fields: {}); choose one with --field", keys.join(", ")) }
        }
    }
}

impl Iterator for Documents {
    type Item = Result<Item>;

    fn next(&mut self) -> Option<Result<Item>> {
        let got = match self.current {
            Open::Lines { .. } => self.next_line(),
            Open::Rows { .. } => self.next_row(),
            Open::Done => None,
        };
        match got {
            Some(item) => Some(item),
            None => {
                self.current = Open::Done;
                self.open_next()
            }
        }
    }
}
