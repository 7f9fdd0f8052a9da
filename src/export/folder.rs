//! What every exported class shares: the tensors of a folder, its `config.json`, a checkpoint's
//! units laid out by name, and the step-0 checkpoint an import makes.

use crate::checkpoint::{self, Checkpoint, UnitKey};
use crate::model::Dims;
use crate::params::Layout;
use anyhow::{bail, Context, Result};
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::path::Path;

/// What an export wrote.
#[derive(Debug)]
pub struct Exported {
    pub layers: usize,
    pub tensors: usize,
    pub params: usize,
    /// The `transformers` class the folder loads as (`GPT2LMHeadModel`, `LlamaForCausalLM`, …).
    pub class: String,
    /// Which tokenizer was written beside the weights (see [`super::tokenizer`]).
    pub tokenizer: String,
}

pub struct Tensor {
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl View for &Tensor {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

pub fn tensor(shape: Vec<usize>, values: &[f32]) -> Tensor {
    Tensor { shape, bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
}

/// `rows x cols` row-major `x`, transposed.
pub fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

/// A folder's `config.json`, with typed reads that name the file and the key.
pub struct HfConfig {
    pub path: std::path::PathBuf,
    pub json: serde_json::Value,
}

impl HfConfig {
    pub fn read(folder: &Path) -> Result<HfConfig> {
        let path = folder.join("config.json");
        let text = crate::userfile::read_to_string(&path, "Hugging Face config", crate::userfile::TEXT_MAX)?;
        let json = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
        Ok(HfConfig { path, json })
    }
    pub fn int(&self, k: &str) -> Result<usize> {
        self.json.get(k).and_then(|v| v.as_u64()).map(|v| v as usize).with_context(|| format!("{}: no integer `{k}`", self.path.display()))
    }
    pub fn float(&self, k: &str) -> Result<f64> {
        self.json.get(k).and_then(|v| v.as_f64()).with_context(|| format!("{}: no number `{k}`", self.path.display()))
    }
    pub fn flag(&self, k: &str, default: bool) -> Result<bool> {
        match self.json.get(k) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v.as_bool().with_context(|| format!("{}: `{k}` is not true or false", self.path.display())),
        }
    }
    /// Check `key` against the config's value `want` (named by `ours`).
    /// An integer under either of its spellings (transformers 4.x and 5.x), the first present.
    pub fn int_any(&self, keys: &[&str]) -> Result<usize> {
        match keys.iter().find(|k| self.json.get(**k).is_some_and(|v| !v.is_null())) {
            Some(k) => self.int(k),
            None => bail!("{}: no integer `{}`", self.path.display(), keys.join("` or `")),
        }
    }

    /// RoPE's θ, from `rope_theta` (transformers 4.x) or `rope_parameters.rope_theta` (5.x),
    /// refusing, by name, any RoPE variant other than the default (`rope_scaling`, or a
    /// `rope_type` of `linear`, `yarn`, `llama3`, ...): those compute another function.
    pub fn rope_theta(&self) -> Result<f64> {
        let p = self.path.display();
        let default_type = |v: &serde_json::Value, key: &str| -> Result<()> {
            let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
            if kind != "default" {
                bail!("{p}: `{key}.rope_type` = {kind:?}; taproot implements the default RoPE only");
            }
            if let Some(f) = v.get("factor").filter(|f| !f.is_null() && f.as_f64() != Some(1.0)) {
                bail!("{p}: `{key}.factor` = {f}; taproot implements unscaled RoPE only");
            }
            Ok(())
        };
        if let Some(s) = self.json.get("rope_scaling").filter(|v| !v.is_null()) {
            default_type(s, "rope_scaling")?;
        }
        if let Some(rp) = self.json.get("rope_parameters").filter(|v| !v.is_null()) {
            default_type(rp, "rope_parameters")?;
            if let Some(t) = rp.get("rope_theta").and_then(|v| v.as_f64()) {
                return Ok(t);
            }
        }
        match self.json.get("rope_theta").and_then(|v| v.as_f64()) {
            Some(t) => Ok(t),
            None => bail!("{p}: no number `rope_theta` (nor `rope_parameters.rope_theta`)"),
        }
    }

    /// Refuse sliding-window attention, by the key that asks for it: `use_sliding_window`
    /// (Qwen), a `sliding_window` shorter than the positions (Mistral/Mixtral), or `layer_types`
    /// other than `full_attention` (transformers 5).
    pub fn refuse_sliding_window(&self, positions: usize) -> Result<()> {
        let p = self.path.display();
        let used = self.flag("use_sliding_window", false)?;
        if used {
            bail!("{p}: `use_sliding_window` is true; taproot's attention is full causal attention");
        }
        if self.json.get("use_sliding_window").is_none() {
            if let Some(w) = self.json.get("sliding_window").and_then(|v| v.as_u64()) {
                if (w as usize) < positions {
                    bail!("{p}: `sliding_window` = {w} (< {positions} positions); taproot's attention is full causal attention");
                }
            }
        }
        if let Some(types) = self.json.get("layer_types").and_then(|v| v.as_array()) {
            if let Some((i, t)) = types.iter().enumerate().find(|(_, t)| t.as_str() != Some("full_attention")) {
                bail!("{p}: `layer_types[{i}]` = {t}; taproot's layers are all `full_attention`");
            }
        }
        Ok(())
    }

    /// Refuse a flag that changes the function when it is set to `bad`.
    pub fn refuse_flag(&self, key: &str, bad: bool, why: &str) -> Result<()> {
        if self.json.get(key).and_then(|v| v.as_bool()) == Some(bad) {
            bail!("{}: `{key}` = {bad}; {why}", self.path.display());
        }
        Ok(())
    }

    pub fn expect(&self, key: &str, got: usize, want: usize, ours: &str) -> Result<()> {
        if got != want {
            bail!("{}: `{key}` = {got}, but the config wants {want} ({ours} must match the folder)", self.path.display());
        }
        Ok(())
    }
}

/// A checkpoint's units, checked against its config and laid out by name: the embedding, the
/// head and the blocks bottom to top.
pub struct Units<'a> {
    pub dims: Dims,
    pub tokenizer: String,
    el: Layout,
    hl: Layout,
    /// Each layer's layout (dense or MoE) and MLP kind, bottom to top.
    bls: Vec<(Layout, crate::model::moe::Mlp)>,
    embed: &'a [f32],
    head: &'a [f32],
    pub layers: Vec<&'a [f32]>,
}

impl<'a> Units<'a> {
    pub fn of(ck: &'a Checkpoint) -> Result<Units<'a>> {
        let cfg = ck.meta.config().context("the checkpoint's config")?;
        let dims = crate::train::dims_of(&cfg, crate::config::memory::vocab_of(&cfg.data));
        let (el, hl, _) = layouts(&dims);
        let embed = &ck.unit(UnitKey::Embed).context("the checkpoint has no embedding unit")?.params;
        let head = &ck.unit(UnitKey::Head).context("the checkpoint has no head unit")?.params;
        for (what, got, want) in [("embedding", embed.len(), el.total), ("head", head.len(), hl.total)] {
            if got != want {
                bail!("the checkpoint's {what} holds {got} values, not the {want} its config implies");
            }
        }
        let (mut layers, mut bls) = (Vec::new(), Vec::new());
        for id in &ck.meta.stack {
            let u = ck.unit(UnitKey::Layer(*id)).with_context(|| format!("the checkpoint has no unit for layer {id}"))?;
            type Cpu = crate::backend::cpu::CpuBackend;
            let mlp = crate::model::Block::<Cpu>::mlp_of_len(&dims, u.params.len()).with_context(|| {
                format!("layer {id} holds {} values, which no {} block of this config has", u.params.len(), dims.arch.name())
            })?;
            bls.push((crate::model::Block::<Cpu>::layout_of(&dims, mlp), mlp));
            layers.push(&u.params[..]);
        }
        Ok(Units { dims, tokenizer: cfg.data.tokenizer.clone(), el, hl, bls, embed, head, layers })
    }
    pub fn embed(&self, name: &str) -> &'a [f32] {
        self.el.slice(self.embed, name)
    }
    pub fn head(&self, name: &str) -> &'a [f32] {
        self.hl.slice(self.head, name)
    }
    /// Tensor `name` of the block at stack position `i` (0 = the bottom).
    pub fn layer(&self, i: usize, name: &str) -> &'a [f32] {
        self.bls[i].0.slice(self.layers[i], name)
    }
    /// The MLP kind of the block at stack position `i`.
    pub fn mlp(&self, i: usize) -> crate::model::moe::Mlp {
        self.bls[i].1
    }
}

/// The layouts of the embedding, the head and a block of `d`.
pub fn layouts(d: &Dims) -> (Layout, Layout, Layout) {
    type Cpu = crate::backend::cpu::CpuBackend;
    (crate::model::Embed::<Cpu>::layout(d), crate::model::Head::<Cpu>::layout(d), crate::model::Block::<Cpu>::layout(d))
}

/// The model shape of the run an import starts.
pub fn dims_for_import(cfg: &crate::config::Config) -> Dims {
    crate::train::dims_of(cfg, crate::config::memory::vocab_of(&cfg.data))
}

/// Divide the residual-branch multiplier α back out of an exported projection.
pub fn unfold(alpha: f32) -> impl Fn(Vec<f32>) -> Vec<f32> {
    move |v| if alpha == 1.0 { v } else { v.into_iter().map(|x| x / alpha).collect() }
}

/// The folder's `tie_word_embeddings` (`default` when absent: the model class's own default)
/// must be the config's `model.tie_embeddings`.
pub fn expect_tie(hf: &HfConfig, d: &Dims, default: bool) -> Result<()> {
    let tied = hf.flag("tie_word_embeddings", default)?;
    if tied != d.tied {
        bail!(
            "{}: `tie_word_embeddings` = {tied}, but the config's head is {} (set `model.tie_embeddings = {tied}`)",
            hf.path.display(),
            if d.tied { "tied" } else { "untied" }
        );
    }
    Ok(())
}

/// Make `out` ready for an export: absent, empty, or holding only a previous taproot export
/// (`config.json` with a `taproot` block, and `model.safetensors`). Otherwise an error listing
/// what is there, unless `overwrite`: then everything in it moves into `replaced-<time>/`.
pub fn claim(out: &Path, overwrite: bool) -> Result<()> {
    let rd = match std::fs::read_dir(out) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("export folder {}", out.display())),
    };
    let names: Vec<String> = rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    // The tokenizer files are ours when the config beside them is.
    let config_ours = crate::userfile::read_to_string(&out.join("config.json"), "config", crate::userfile::TEXT_MAX)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|j| j.get("taproot").is_some());
    let ours = |n: &str| match n {
        "model.safetensors" => true,
        "config.json" => config_ours,
        n => config_ours && super::tokenizer::FILES.contains(&n),
    };
    let foreign: Vec<&String> = names.iter().filter(|n| !ours(n)).collect();
    if foreign.is_empty() {
        return Ok(());
    }
    if !overwrite {
        let shown: Vec<String> = foreign.iter().take(8).map(|n| format!("`{n}`")).collect();
        let more = if foreign.len() > 8 { format!(" and {} more", foreign.len() - 8) } else { String::new() };
        bail!(
            "export folder {} holds files a taproot export did not write ({}{more}): a loader would read them beside the new weights. Export into an empty folder, or pass --overwrite to move what is there into a `replaced-<time>/` folder inside it first",
            out.display(),
            shown.join(", ")
        );
    }
    let stamp = crate::checkpoint::unix_now_s();
    let mut aside = out.join(format!("replaced-{stamp}"));
    let mut k = 1;
    while aside.exists() {
        aside = out.join(format!("replaced-{stamp}-{k}"));
        k += 1;
    }
    std::fs::create_dir(&aside).with_context(|| format!("creating {}", aside.display()))?;
    for n in &names {
        std::fs::rename(out.join(n), aside.join(n))
            .with_context(|| format!("moving {} into {}", out.join(n).display(), aside.display()))?;
    }
    Ok(())
}

/// Write `tensors` as `model.safetensors` and `config` as `config.json` in `out` (created).
pub fn write_folder(out: &Path, tensors: Vec<(String, Tensor)>, config: serde_json::Value, layers: usize) -> Result<Exported> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let params = tensors.iter().map(|(_, t)| t.bytes.len() / 4).sum();
    let n = tensors.len();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let views: Vec<(String, &Tensor)> = tensors.iter().map(|(k, t)| (k.clone(), t)).collect();
    let file = out.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(meta), &file).with_context(|| format!("writing {}", file.display()))?;
    let cfile = out.join("config.json");
    std::fs::write(&cfile, serde_json::to_string_pretty(&config)? + "\n").with_context(|| format!("writing {}", cfile.display()))?;
    let class = config["architectures"][0].as_str().unwrap_or("").to_string();
    Ok(Exported { layers, tensors: n, params, class, tokenizer: String::new() })
}

/// The `taproot` block of an exported `config.json`: where the weights came from.
pub fn provenance(ck: &Checkpoint, tokenizer: &str) -> serde_json::Value {
    serde_json::json!({
        "run_name": ck.meta.run_name,
        "step": ck.meta.step,
        "tokenizer": tokenizer,
        "layer_ids_bottom_to_top": ck.meta.stack,
    })
}

/// The named tensor of a folder, checked against `shape`.
pub fn get<'a>(t: &'a Tensors, folder: &Path, name: &str, shape: &[usize]) -> Result<&'a Vec<f32>> {
    let (s, v) = t.get(name).with_context(|| format!("{}: no tensor {name}", folder.join("model.safetensors").display()))?;
    if s != shape {
        bail!("tensor {name} has shape {s:?}, not {shape:?}");
    }
    Ok(v)
}

/// A unit's parameters with fresh (zero) optimizer state.
pub fn fresh(params: Vec<f32>, layout: &crate::params::Layout) -> crate::params::UnitState {
    crate::params::UnitState { m: vec![0.0; params.len()], params, v: None, steps: vec![0; layout.specs.len()] }
}

/// The step-0 checkpoint of run `cfg` holding `units`, imported from `folder`.
pub fn imported(
    folder: &Path,
    cfg: &crate::config::Config,
    loader: crate::data::LoaderState,
    units: Vec<(checkpoint::UnitKey, crate::params::UnitState)>,
    depth: usize,
) -> Result<Checkpoint> {
    let meta = checkpoint::Meta {
        format_version: checkpoint::FORMAT_VERSION,
        run_name: cfg.run.name.clone(),
        config_toml: cfg.to_toml(),
        step: 0,
        depth,
        stack: (0..depth as u64).collect(),
        next_id: depth as u64,
        loader,
        growth: Vec::new(),
        created_unix_s: checkpoint::unix_now_s(),
        run_id: Some(checkpoint::new_run_id()),
        extra: serde_json::json!({ "imported_from": folder.display().to_string() }),
    };
    let ck = Checkpoint { meta, units };
    ck.validate()?;
    Ok(ck)
}

/// Tensors by name: (shape, values as f32).
pub type Tensors = std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>;

/// The tensors of a Hugging Face folder's `model.safetensors`, as f32 (F32 or BF16 on disk).
pub fn read_tensors(folder: &Path) -> Result<Tensors> {
    let file = folder.join("model.safetensors");
    let bytes = crate::userfile::read(&file, "Hugging Face weights", crate::userfile::MEMORY)?;
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", file.display()))?;
    let mut m = std::collections::HashMap::new();
    for (name, view) in st.tensors() {
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::BF16 => {
                view.data().chunks_exact(2).map(|b| crate::backend::precision::bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect()
            }
            other => bail!("{}: tensor {name} is {other:?}; taproot imports F32 and BF16 weights", file.display()),
        };
        m.insert(name, (view.shape().to_vec(), values));
    }
    Ok(m)
}
