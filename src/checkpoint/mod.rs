//! Checkpoints: everything needed to resume a progressive-training run exactly, in one file.
//!
//! **What.** A [`Checkpoint`] is the run's [`Meta`] (step, the config as TOML text, the layer
//! stack by stable id, the loader's PRNG state, the growth history, ...) plus a host snapshot
//! ([`UnitState`]) of every unit: the embedding, the head and each layer, keyed by [`UnitKey`].
//! Layers are keyed by their stable id, never by their position, because growth inserts new
//! layers below the old ones: position 0 at step 100 and position 0 at step 900 are different
//! layers, `layer.3` is the same layer for its whole life.
//!
//! **Why one safetensors file.** A run must survive being killed at any moment and resume from
//! the newest *complete* checkpoint. One self-describing file per checkpoint makes "complete"
//! a property of a single file (no directory of parts that can be half-updated), and the
//! safetensors layout lets any standard tool open the weights.
//!
//! **Format** (version [`FORMAT_VERSION`]). `step-<step, 8+ digits>.safetensors` holding:
//! - every parameter tensor of every unit under its name and shape: `<unitkey>/<name>` (e.g.
//!   `layer.3/qkvw`, a (3C, C) matrix), its first moments `<unitkey>/<name>.m` and, only when
//!   the unit has AdamW second moments, `<unitkey>/<name>.v`; all F32, little-endian;
//!   `<unitkey>` is `embed`, `head` or `layer.<id>` ([`named`]). A unit the config gives no
//!   layout of its size is written flat instead: `<unitkey>.params`, `<unitkey>.m`, `<unitkey>.v`
//!   (1-D), as every unit of a version-1 file is; both versions load.
//! - in the safetensors `__metadata__` string map:
//!   - `taproot`: the [`Meta`] as JSON;
//!   - `taproot.units`: a JSON array `[{"key": "<unitkey>", "steps": [..], "tensors": [{"name",
//!     "shape"}, ..]}, ..]` in the order of [`Checkpoint::units`], carrying each unit's
//!     per-tensor optimizer step counters and, for a named unit, its tensors in buffer order;
//!   - `taproot.checksum`: `fnv1a64x4:<16 hex digits>`, a checksum over the two JSON strings
//!     above, every tensor's name and length, and every tensor byte (see `checksum::Checksum`). It is
//!     verified on load, so a flipped bit anywhere in the payload is detected, not only a
//!     truncation (which the safetensors header already catches).
//!
//! **Atomicity.** [`save`] writes `.step-<step>.safetensors.tmp` in the same directory,
//! `fsync`s it, renames it to the final name (atomic on POSIX file systems) and `fsync`s the
//! directory. A file under the final name is therefore always complete; a crash leaves at
//! worst a stale `.tmp` file, which [`list`] ignores and [`prune`] removes. Corruption that
//! happens anyway (a bad disk, a copy cut short) is caught by [`load`], and
//! [`load_newest_valid`] then falls back to the previous checkpoint with a warning.
//!
//! [`load`] never panics, whatever the bytes: every failure is an error naming the file.

use crate::config::Config;
use crate::data::loader::LoaderState;
pub use crate::model::growth::GrowthRecord;
use crate::params::Layout;
use crate::params::UnitState;
use anyhow::{anyhow, bail, ensure, Context, Result};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The on-disk format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 2;
/// The largest layer id a checkpoint may hold (2^53: exact as a JSON number too).
pub const MAX_LAYER_ID: u64 = 1 << 53;
/// The oldest format version this build still reads.
pub const OLDEST_READABLE: u32 = 1;

/// Metadata key of the [`Meta`] JSON.
pub(crate) mod checksum;
mod describe;
mod folder;
pub mod named;
pub use describe::describe;

use checksum::{file_checksum, hash_bytes, hash_f32};
pub use folder::{checkpoints_of, list, load_file_or_newest, load_newest_valid, new_run_id, prune, reject, Pruned, Retention};
mod verify;
pub use verify::{verify, Verified};

const KEY_META: &str = "taproot";
/// Metadata key of the unit table (order and step counters).
const KEY_UNITS: &str = "taproot.units";
/// Metadata key of the checksum.
const KEY_CHECKSUM: &str = "taproot.checksum";

/// Which unit a snapshot belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UnitKey {
    Embed,
    Head,
    /// A transformer block, by its stable layer id.
    Layer(u64),
}

impl fmt::Display for UnitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnitKey::Embed => f.write_str("embed"),
            UnitKey::Head => f.write_str("head"),
            UnitKey::Layer(id) => write!(f, "layer.{id}"),
        }
    }
}

impl FromStr for UnitKey {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "embed" => Ok(UnitKey::Embed),
            "head" => Ok(UnitKey::Head),
            _ => {
                let id = s.strip_prefix("layer.").ok_or_else(|| anyhow!("unknown unit key `{s}`"))?;
                // Canonical decimal only, so that one unit has exactly one spelling.
                ensure!(
                    !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) && (id == "0" || !id.starts_with('0')),
                    "unknown unit key `{s}`"
                );
                Ok(UnitKey::Layer(id.parse().map_err(|_| anyhow!("unknown unit key `{s}`"))?))
            }
        }
    }
}

/// Everything about the run except the tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Must be [`FORMAT_VERSION`] to save; checked on load.
    pub format_version: u32,
    pub run_name: String,
    /// The run's configuration as TOML text (see [`Meta::config`]).
    pub config_toml: String,
    /// Optimizer updates done: resuming continues with update `step`.
    pub step: u64,
    /// Number of layers; always `stack.len()`.
    pub depth: usize,
    /// Layer ids, bottom to top.
    pub stack: Vec<u64>,
    /// The id the next newborn layer will get.
    pub next_id: u64,
    /// The training loader's state after the last drawn batch.
    pub loader: LoaderState,
    /// Expansions done so far, in order.
    pub growth: Vec<GrowthRecord>,
    /// Seconds since the Unix epoch when the checkpoint was made.
    pub created_unix_s: u64,
    /// The run this checkpoint belongs to: made when a run starts fresh, carried through every
    /// resume. Pruning deletes only checkpoints of its own run (none in files written before
    /// the field existed: those are never pruned).
    #[serde(default)]
    pub run_id: Option<String>,
    /// Free-form, for later additions that do not need a format bump.
    #[serde(default)]
    pub extra: serde_json::Value,
}

impl Meta {
    /// Parse [`Meta::config_toml`] as a run configuration (strictly, with validation).
    pub fn config(&self) -> Result<Config> {
        Config::parse(&self.config_toml, &[]).context("checkpoint's embedded config")
    }
}

/// A whole run state: metadata and one snapshot per unit.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub meta: Meta,
    /// Every unit exactly once: `Embed`, `Head` and one `Layer(id)` per id of `meta.stack`.
    /// [`load`] returns them in the order they were saved.
    pub units: Vec<(UnitKey, UnitState)>,
}

impl Checkpoint {
    /// The snapshot of one unit.
    pub fn unit(&self, key: UnitKey) -> Option<&UnitState> {
        self.units.iter().find(|(k, _)| *k == key).map(|(_, s)| s)
    }

    /// Check the invariants [`save`] and [`load`] rely on (see [`Checkpoint::units`]).
    pub fn validate(&self) -> Result<()> {
        let m = &self.meta;
        ensure!(
            (OLDEST_READABLE..=FORMAT_VERSION).contains(&m.format_version),
            "unsupported format_version {} (this build handles {OLDEST_READABLE} to {FORMAT_VERSION})",
            m.format_version
        );
        // Room for every id a run could still give (growth adds `next_id + j`).
        ensure!(m.next_id <= MAX_LAYER_ID, "next_id {} is beyond the largest layer id {MAX_LAYER_ID}", m.next_id);
        ensure!(m.depth == m.stack.len(), "depth is {} but the stack has {} layer ids", m.depth, m.stack.len());
        let mut stack_ids = HashSet::new();
        for &id in &m.stack {
            ensure!(stack_ids.insert(id), "layer id {id} appears twice in the stack {:?}", m.stack);
            ensure!(id < m.next_id, "layer id {id} in the stack is not below next_id {}", m.next_id);
        }
        let mut seen = HashSet::new();
        for (key, s) in &self.units {
            ensure!(seen.insert(*key), "unit {key} appears twice");
            if let UnitKey::Layer(id) = key {
                ensure!(stack_ids.contains(id), "unit {key} is not in the stack {:?}", m.stack);
            }
            ensure!(s.m.len() == s.params.len(), "unit {key}: {} first-moment values for {} parameters", s.m.len(), s.params.len());
            if let Some(v) = &s.v {
                ensure!(v.len() == s.params.len(), "unit {key}: {} second-moment values for {} parameters", v.len(), s.params.len());
            }
        }
        for key in [UnitKey::Embed, UnitKey::Head].into_iter().chain(m.stack.iter().map(|&id| UnitKey::Layer(id))) {
            ensure!(seen.contains(&key), "unit {key} is missing");
        }
        Ok(())
    }
}

/// Seconds since the Unix epoch (for [`Meta::created_unix_s`]).
pub fn unix_now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The file name of the checkpoint of `step`: `step-<8+ digit step>.safetensors`.
pub fn file_name(step: u64) -> String {
    format!("step-{step:08}.safetensors")
}

fn tmp_name(step: u64) -> String {
    format!(".{}.tmp", file_name(step))
}

/// The step of a canonical checkpoint file name, if `name` is one.
fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?.strip_suffix(".safetensors")?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let step: u64 = digits.parse().ok()?;
    (file_name(step) == name).then_some(step)
}

fn is_tmp_name(name: &str) -> bool {
    name.starts_with(".step-") && name.ends_with(".safetensors.tmp")
}

// ------------------------------------------------------------------------------------------
// Save

#[derive(Serialize, Deserialize)]
struct UnitEntry {
    key: String,
    steps: Vec<u64>,
    /// The unit's named tensors in buffer order; empty for a flat unit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tensors: Vec<named::TensorEntry>,
}

/// Write `ck` to `dir/step-<step>.safetensors` atomically (see the module docs) and return the
/// path. Creates `dir` if needed; replaces an existing checkpoint of the same step.
pub fn save(dir: &Path, ck: &Checkpoint) -> Result<PathBuf> {
    let step = ck.meta.step;
    let path = dir.join(file_name(step));
    ck.validate().with_context(|| format!("refusing to save an inconsistent checkpoint to {}", path.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create checkpoint directory {}", dir.display()))?;

    // Tensors in name order (the order safetensors itself writes, and the checksum order), each
    // with its shape: named per parameter tensor where the config gives the unit's layout.
    let layouts = unit_layouts(&ck.meta, &ck.units);
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    let mut units: Vec<UnitEntry> = Vec::new();
    for (key, s) in &ck.units {
        let entries = layouts.get(key).filter(|l| l.total == s.params.len()).map(named::entries).unwrap_or_default();
        let parts = [("params", Some(&s.params)), ("m", Some(&s.m)), ("v", s.v.as_ref())];
        for (part, flat) in parts.into_iter().filter_map(|(p, x)| x.map(|x| (p, x))) {
            if entries.is_empty() {
                tensors.push((format!("{key}.{part}"), vec![flat.len()], flat));
            } else {
                for (piece, e) in named::pieces(flat, &entries) {
                    tensors.push((named::tensor_name(*key, &e.name, part), e.shape.clone(), piece));
                }
            }
        }
        units.push(UnitEntry { key: key.to_string(), steps: s.steps.clone(), tensors: entries });
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));

    // Always written as this build's version (a run resumed from an older file saves the new one).
    let meta = Meta { format_version: FORMAT_VERSION, ..ck.meta.clone() };
    let meta_json = serde_json::to_string(&meta).context("cannot serialise checkpoint metadata")?;
    let units_json = serde_json::to_string(&units)?;
    let checksum = file_checksum(&meta_json, &units_json, tensors.iter().map(|(n, _, x)| (n.as_str(), x.len() as u64, hash_f32(x))));

    // The safetensors header: JSON, space-padded to a multiple of 8 bytes.
    let mut header = serde_json::Map::new();
    let mut md = serde_json::Map::new();
    md.insert(KEY_META.into(), meta_json.into());
    md.insert(KEY_UNITS.into(), units_json.into());
    md.insert(KEY_CHECKSUM.into(), checksum.into());
    header.insert("__metadata__".into(), md.into());
    let mut off = 0usize;
    for (name, shape, x) in &tensors {
        let end = off + 4 * x.len();
        header.insert(name.clone(), serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [off, end] }));
        off = end;
    }
    let mut header = serde_json::to_vec(&header)?;
    header.resize(header.len().next_multiple_of(8), b' ');

    let tmp = dir.join(tmp_name(step));
    let written = (|| -> Result<()> {
        let f = fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        let mut buf = Vec::with_capacity(1 << 16);
        for (_, _, x) in &tensors {
            for chunk in x.chunks(1 << 14) {
                buf.clear();
                for v in chunk {
                    buf.extend_from_slice(&v.to_le_bytes());
                }
                w.write_all(&buf)?;
            }
        }
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e.context(format!("cannot write checkpoint {}", tmp.display())));
    }
    if let Err(e) = fs::rename(&tmp, &path) {
        let _ = fs::remove_file(&tmp);
        return Err(anyhow::Error::from(e).context(format!("cannot rename {} to {}", tmp.display(), path.display())));
    }
    sync_dir(dir).with_context(|| format!("cannot sync directory {}", dir.display()))?;
    Ok(path)
}

/// The layouts the run's config gives its units (none when the config does not parse).
/// A layer's layout is the dense or the MoE one, whichever has its size.
fn unit_layouts(meta: &Meta, units: &[(UnitKey, crate::params::UnitState)]) -> HashMap<UnitKey, Layout> {
    type Cpu = crate::backend::cpu::CpuBackend;
    let Ok(cfg) = meta.config() else { return HashMap::new() };
    let dims = crate::train::dims_of(&cfg, crate::config::memory::vocab_of(&cfg.data));
    let mut m = HashMap::from([
        (UnitKey::Embed, crate::model::Embed::<Cpu>::layout(&dims)),
        (UnitKey::Head, crate::model::Head::<Cpu>::layout(&dims)),
    ]);
    for (key, u) in units {
        if let (UnitKey::Layer(_), Some(mlp)) = (key, crate::model::Block::<Cpu>::mlp_of_len(&dims, u.params.len())) {
            m.insert(*key, crate::model::Block::<Cpu>::layout_of(&dims, mlp));
        }
    }
    m
}

/// Make a rename in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------
// Load

/// Read and fully verify one checkpoint file. Every error names the file.
pub fn load(path: &Path) -> Result<Checkpoint> {
    // One flat message, so that `{}` shows the reason as well as `{:#}` does.
    load_unnamed(path).map_err(|e| anyhow!("checkpoint {}: {e:#}", path.display()))
}

/// [`load`] with errors that do not repeat the path (the caller names the file).
fn load_unnamed(path: &Path) -> Result<Checkpoint> {
    use std::io::Read;
    let (mut f, file_len, _) = open_checked(path)?;
    // The header's claims match the file's size: only now is the payload read, into a buffer of
    // exactly that size.
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(file_len as usize).map_err(|_| anyhow!("{file_len} bytes do not fit in memory"))?;
    f.read_to_end(&mut bytes).context("cannot read")?;
    ensure!(bytes.len() as u64 == file_len, "the file changed while it was read ({file_len} -> {} bytes)", bytes.len());
    parse(&bytes)
}

/// The largest safetensors header this reader accepts (a checkpoint's is a few kB per unit).
const MAX_HEADER: u64 = 100 << 20;

/// Open a checkpoint file and check, before reading its payload, that it is a regular file and
/// that its size is exactly what its safetensors header describes (8 + header + tensor data).
/// Returns the file (positioned at its start), its length and the parsed header.
fn open_checked(path: &Path) -> Result<(fs::File, u64, serde_json::Value)> {
    use std::io::{Read, Seek};
    let md = fs::metadata(path).context("cannot read")?;
    ensure!(md.is_file(), "not a regular file");
    let file_len = md.len();
    let mut f = fs::File::open(path).context("cannot read")?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| anyhow!("{file_len} bytes: too short for a safetensors header"))?;
    let n = u64::from_le_bytes(len);
    ensure!(
        n <= MAX_HEADER && n <= file_len.saturating_sub(8),
        "its header claims {n} bytes but the file has {file_len}: truncated, or not a checkpoint"
    );
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).context("truncated safetensors header")?;
    let json: serde_json::Value = serde_json::from_slice(&header).map_err(|e| anyhow!("the safetensors header is not JSON: {e}"))?;
    let obj = json.as_object().ok_or_else(|| anyhow!("the safetensors header is not a JSON object"))?;
    let mut data_len = 0u64;
    for (name, t) in obj.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
        let end = t
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|e| e.as_u64())
            .ok_or_else(|| anyhow!("tensor `{name}` has no data_offsets in the header"))?;
        data_len = data_len.max(end);
    }
    let want = 8 + n + data_len;
    ensure!(
        file_len == want,
        "the file has {file_len} bytes but its header describes {want} (8 + {n} header + {data_len} data): truncated or corrupt"
    );
    f.rewind().context("cannot read")?;
    Ok((f, file_len, json))
}

/// The [`Meta`] of its JSON text: the version first, so that a newer file says so rather than
/// failing on a changed field.
fn meta_of(meta_json: &str) -> Result<Meta> {
    let raw: serde_json::Value = serde_json::from_str(meta_json).map_err(|e| anyhow!("`{KEY_META}` metadata is not JSON: {e}"))?;
    let version =
        raw.get("format_version").and_then(|v| v.as_u64()).ok_or_else(|| anyhow!("`{KEY_META}` metadata has no format_version"))?;
    ensure!(
        (OLDEST_READABLE as u64..=FORMAT_VERSION as u64).contains(&version),
        "unsupported format_version {version} (this build reads {OLDEST_READABLE} to {FORMAT_VERSION})"
    );
    let meta: Meta = serde_json::from_value(raw).map_err(|e| anyhow!("bad `{KEY_META}` metadata: {e}"))?;
    Ok(meta)
}

fn parse(bytes: &[u8]) -> Result<Checkpoint> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| anyhow!("not a valid safetensors file (truncated or corrupt?): {e}"))?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| anyhow!("not a valid safetensors file: {e}"))?;
    let md = header.metadata().as_ref().ok_or_else(|| anyhow!("no `{KEY_META}` metadata: not a taproot checkpoint"))?;
    let meta_json = md.get(KEY_META).ok_or_else(|| anyhow!("no `{KEY_META}` metadata: not a taproot checkpoint"))?;

    let meta = meta_of(meta_json)?;

    let units_json = md.get(KEY_UNITS).ok_or_else(|| anyhow!("no `{KEY_UNITS}` metadata"))?;
    let entries: Vec<UnitEntry> = serde_json::from_str(units_json).map_err(|e| anyhow!("bad `{KEY_UNITS}` metadata: {e}"))?;
    let stored_sum = md.get(KEY_CHECKSUM).ok_or_else(|| anyhow!("no `{KEY_CHECKSUM}` metadata"))?;

    // Structure: every tensor F32, belongs to a listed unit, and each unit is complete. A flat
    // unit's tensors are 1-D; a named unit's have the shapes its table entry lists.
    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    let mut views = BTreeMap::new();
    for &name in &names {
        let t = st.tensor(name).map_err(|e| anyhow!("tensor `{name}`: {e}"))?;
        ensure!(t.dtype() == Dtype::F32, "tensor `{name}` has dtype {:?}, expected F32", t.dtype());
        views.insert(name, t);
    }
    // Per unit and part, the file's tensors that make up its flat buffer, in order, with shapes.
    let mut keys = Vec::with_capacity(entries.len());
    let mut claimed = HashSet::new();
    let mut layout_of: Vec<Vec<(String, Vec<usize>)>> = Vec::new();
    for e in &entries {
        let key: UnitKey = e.key.parse()?;
        ensure!(!keys.contains(&key), "unit {key} is listed twice");
        keys.push(key);
        let pieces: Vec<(String, Vec<usize>)> = if e.tensors.is_empty() {
            vec![(String::new(), Vec::new())]
        } else {
            e.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect()
        };
        for part in ["params", "m", "v"] {
            for (name, _) in &pieces {
                claimed.insert(if e.tensors.is_empty() { format!("{key}.{part}") } else { named::tensor_name(key, name, part) });
            }
        }
        layout_of.push(pieces);
    }
    if let Some(stray) = names.iter().find(|n| !claimed.contains(**n)) {
        bail!("tensor `{stray}` belongs to no unit listed in `{KEY_UNITS}`");
    }
    let file_name = |key: UnitKey, name: &str, part: &str| {
        if name.is_empty() {
            format!("{key}.{part}")
        } else {
            named::tensor_name(key, name, part)
        }
    };
    for (key, pieces) in keys.iter().zip(&layout_of) {
        for (name, shape) in pieces {
            for part in ["params", "m", "v"] {
                let n = file_name(*key, name, part);
                let Some(t) = views.get(n.as_str()) else {
                    ensure!(part == "v", "unit {key} has no `{n}` tensor");
                    continue;
                };
                if name.is_empty() {
                    ensure!(t.shape().len() == 1, "tensor `{n}` has shape {:?}, expected 1-D", t.shape());
                } else {
                    ensure!(t.shape() == &shape[..], "tensor `{n}` has shape {:?}, but the unit table says {shape:?}", t.shape());
                }
            }
        }
        let len = |part: &str| -> usize {
            pieces
                .iter()
                .filter_map(|(name, _)| views.get(file_name(*key, name, part).as_str()))
                .map(|t| t.shape().iter().product::<usize>())
                .sum()
        };
        let has_v = |name: &str| views.contains_key(file_name(*key, name, "v").as_str());
        ensure!(
            pieces.iter().all(|(n, _)| has_v(n)) || !pieces.iter().any(|(n, _)| has_v(n)),
            "unit {key}: second moments for some of its tensors but not all"
        );
        let n = len("params");
        for part in ["m", "v"] {
            let got = len(part);
            let flat = pieces.len() == 1 && pieces[0].0.is_empty();
            let absent = part == "v" && !pieces.iter().any(|(name, _)| has_v(name));
            ensure!(
                got == n || absent,
                "unit {key}: {} {got} values but {} {n}",
                if flat { format!("`{key}.{part}` has") } else { format!("its `{part}` tensors have") },
                if flat { format!("`{key}.params` has") } else { "its parameters".to_string() }
            );
        }
    }

    // Integrity: the checksum over the metadata and every tensor byte.
    let numel = |t: &safetensors::tensor::TensorView| t.shape().iter().product::<usize>() as u64;
    let sum = file_checksum(meta_json, units_json, views.iter().map(|(n, t)| (*n, numel(t), hash_bytes(t.data()))));
    ensure!(&sum == stored_sum, "checksum mismatch (stored {stored_sum}, computed {sum}): the file is corrupt");

    // Each part's flat buffer: its tensors concatenated in table order.
    let flat = |key: UnitKey, pieces: &[(String, Vec<usize>)], part: &str| -> Option<Vec<f32>> {
        let mut out = Vec::new();
        for (name, _) in pieces {
            let t = views.get(file_name(key, name, part).as_str())?;
            out.extend(t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        }
        Some(out)
    };
    let tables: Vec<(UnitKey, Vec<named::TensorEntry>)> =
        keys.iter().zip(&entries).filter(|(_, e)| !e.tensors.is_empty()).map(|(k, e)| (*k, e.tensors.clone())).collect();
    let mut units = Vec::with_capacity(keys.len());
    for ((key, e), pieces) in keys.into_iter().zip(entries).zip(&layout_of) {
        let params = flat(key, pieces, "params").unwrap_or_default();
        let m = flat(key, pieces, "m").unwrap_or_default();
        let v = flat(key, pieces, "v");
        units.push((key, UnitState { params, m, v, steps: e.steps }));
    }
    let ck = Checkpoint { meta, units };
    ck.validate()?;
    check_named_tables(&ck, &tables)?;
    Ok(ck)
}

/// Only the [`Meta`] of a checkpoint file, from its safetensors header (a few kB read, no
/// tensor bytes, no checksum verification; the file's size is checked against the header): for
/// monitoring and pruning, which must not read gigabytes to learn a step, a run and a growth
/// history. Use [`load`] to trust the file.
pub fn read_meta(path: &Path) -> Result<Meta> {
    let inner = || -> Result<Meta> {
        let (_, _, json) = open_checked(path)?;
        let meta = json
            .get("__metadata__")
            .and_then(|m| m.get(KEY_META))
            .and_then(|m| m.as_str())
            .ok_or_else(|| anyhow!("no `{KEY_META}` metadata: not a taproot checkpoint"))?;
        serde_json::from_str(meta).map_err(|e| anyhow!("bad `{KEY_META}` metadata: {e}"))
    };
    inner().map_err(|e| anyhow!("checkpoint {}: {e:#}", path.display()))
}

/// Check (on every [`load`]) that each named unit's table — names and shapes in buffer order —
/// is the layout its config gives: a file whose shapes disagree with the model is refused.
pub fn check_named_tables(ck: &Checkpoint, tables: &[(UnitKey, Vec<named::TensorEntry>)]) -> Result<()> {
    if tables.is_empty() {
        return Ok(());
    }
    ck.meta.config().map_err(|e| anyhow!("its named tensors cannot be checked against its config: {e:#}"))?;
    let layouts = unit_layouts(&ck.meta, &ck.units);
    for (key, table) in tables {
        let n = ck.unit(*key).map_or(0, |u| u.params.len());
        let layout =
            layouts.get(key).ok_or_else(|| anyhow!("unit {key}: its tensors are named, but its config gives no layout of {n} values"))?;
        let want = named::entries(layout);
        ensure!(table.len() == want.len(), "unit {key}: the file has {} tensors, but the config's layout has {}", table.len(), want.len());
        if let Some((i, (g, w))) = table.iter().zip(&want).enumerate().find(|(_, (g, w))| g != w) {
            let (got, want) = (format!("`{}` of shape {:?}", g.name, g.shape), format!("`{}` of shape {:?}", w.name, w.shape));
            bail!("unit {key}: tensor {i} is {got} in the file, but the config's layout has {want}");
        }
    }
    Ok(())
}
