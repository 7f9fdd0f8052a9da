//! `taproot export` and `taproot import`: a checkpoint as a Hugging Face model folder
//! (`config.json` + `model.safetensors`), and such a folder back as the step-0 checkpoint of a
//! run, which then trains and grows like any other (e.g. from a small pretrained model).
//!
//! The layout follows the run's block kind: `gpt2` → `GPT2LMHeadModel` ([`gpt2`]), `llama` →
//! `LlamaForCausalLM`, `qwen3` → `Qwen3ForCausalLM` ([`llama`]). Layer 0 of the folder is the
//! bottom block, whatever its layer id (the checkpoint's `stack` gives the order). Only the
//! weights travel: optimizer state and the run's bookkeeping stay in the checkpoint. Under
//! `depth_mup` the residual-branch multiplier α is folded into the residual output projections
//! (α·(xW + b) = x(αW) + αb), so the exported model computes the same without it, and divided
//! back out on import.
//!
//! **Vocabulary.** `vocab_size` is V of the run's tokenizer: GPT-2's 50257 BPE ids, a learnt
//! `bpe:N`'s N, or the 256 byte values of `bytes` (token id = byte value). The tokenizer stays
//! the user's: a GPT-2 tokenizer applies to a `gpt2`-tokenized model only, and the `taproot`
//! block of `config.json` names the tokenizer the model was trained with.

pub mod gpt2;
pub mod llama;

use crate::checkpoint::{self, Checkpoint, UnitKey};
use crate::model::Arch;
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

/// Write `ck` as a Hugging Face folder of its block kind in `out` (created; existing
/// `config.json` / `model.safetensors` there are replaced).
pub fn export(ck: &Checkpoint, out: &Path) -> Result<Exported> {
    let cfg = ck.meta.config().context("the checkpoint's config")?;
    match cfg.model.arch {
        Arch::Gpt2 => gpt2::export(ck, out),
        Arch::Llama | Arch::Qwen3 => llama::export(ck, out),
    }
}

/// Export the checkpoint at `path` (a file, or a folder: its newest valid checkpoint).
pub fn export_path(path: &Path, out: &Path) -> Result<Exported> {
    export(&checkpoint::load_file_or_newest(path)?, out)
}

/// A Hugging Face folder as the step-0 checkpoint of the run `cfg` describes (its
/// `model.arch` says which layout the folder must have). `loader` is the training loader's
/// state at step 0.
pub fn import(folder: &Path, cfg: &crate::config::Config, loader: crate::data::LoaderState) -> Result<Checkpoint> {
    let hf = HfConfig::read(folder)?;
    let want = match cfg.model.arch {
        Arch::Gpt2 => "gpt2",
        Arch::Llama | Arch::Qwen3 => llama::model_type(cfg),
    };
    if let Some(got) = hf.json.get("model_type").and_then(|v| v.as_str()) {
        if got != want {
            bail!("{}: `model_type` = {got:?}, but the config's `model.arch` is {want:?}", hf.path.display());
        }
    }
    match cfg.model.arch {
        Arch::Gpt2 => gpt2::import(folder, cfg, loader, &hf),
        Arch::Llama | Arch::Qwen3 => llama::import(folder, cfg, loader, &hf),
    }
}

/// The run config a Hugging Face folder of one of the exported classes describes, to read it as
/// a model of its own (`taproot sample FOLDER`): its kind, sizes and experts, and the tokenizer
/// the `taproot` block names (else `bytes` for a vocabulary of 256, `gpt2` for 50257).
pub fn config_of_folder(folder: &Path) -> Result<crate::config::Config> {
    let hf = HfConfig::read(folder)?;
    let kind = hf.json.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    let vocab = hf.int("vocab_size")?;
    let tokenizer = match hf.json.pointer("/taproot/tokenizer").and_then(|v| v.as_str()) {
        Some(t) if !t.starts_with("bpe:") => t.to_string(),
        Some(t) => bail!("{}: the model was trained with the learnt tokenizer {t}, whose merges live beside its run's shards: sample from that run's checkpoint", hf.path.display()),
        None if vocab == 256 => "bytes".into(),
        None if vocab == 50257 => "gpt2".into(),
        None => bail!("{}: `vocab_size` = {vocab} matches no tokenizer taproot has (bytes: 256, gpt2: 50257)", hf.path.display()),
    };
    let mut model = toml::Table::new();
    let (arch, layers, positions) = match kind {
        "gpt2" => {
            model.insert("channels".into(), (hf.int("n_embd")? as i64).into());
            model.insert("heads".into(), (hf.int("n_head")? as i64).into());
            ("gpt2", hf.int("n_layer")?, hf.int("n_positions")?)
        }
        "llama" | "qwen3" | "mixtral" | "qwen3_moe" => {
            let c = hf.int("hidden_size")?;
            model.insert("channels".into(), (c as i64).into());
            model.insert("heads".into(), (hf.int("num_attention_heads")? as i64).into());
            if hf.json.get("num_key_value_heads").is_some_and(|v| !v.is_null()) {
                model.insert("kv_heads".into(), (hf.int("num_key_value_heads")? as i64).into());
            }
            model.insert("rope_theta".into(), hf.float("rope_theta")?.into());
            model.insert("norm_eps".into(), hf.float("rms_norm_eps")?.into());
            let moe = matches!(kind, "mixtral" | "qwen3_moe");
            let dense_ffn = if kind == "mixtral" { None } else { Some(hf.int("intermediate_size")?) };
            if let Some(f) = dense_ffn {
                model.insert("ffn_hidden".into(), (f as i64).into());
            }
            model.insert("tie_embeddings".into(), hf.flag("tie_word_embeddings", false)?.into());
            if moe {
                let mut m = toml::Table::new();
                let (experts, hidden) =
                    if kind == "mixtral" { ("num_local_experts", "intermediate_size") } else { ("num_experts", "moe_intermediate_size") };
                m.insert("experts".into(), (hf.int(experts)? as i64).into());
                m.insert("top_k".into(), (hf.int("num_experts_per_tok")? as i64).into());
                m.insert("expert_hidden".into(), (hf.int(hidden)? as i64).into());
                model.insert("moe".into(), m.into());
            }
            (if kind.starts_with("qwen3") { "qwen3" } else { "llama" }, hf.int("num_hidden_layers")?, hf.int("max_position_embeddings")?)
        }
        other => bail!("{}: `model_type` = {other:?}; taproot reads gpt2, llama, qwen3, mixtral and qwen3_moe folders", hf.path.display()),
    };
    if arch != "gpt2" {
        model.insert("arch".into(), arch.into());
    }
    model.insert("depth".into(), (layers as i64).into());
    model.insert("max_seq".into(), (positions as i64).into());
    let name = folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "exported".into());
    let name: String = name.chars().map(|ch| if ch.is_ascii_alphanumeric() || ch == '-' || ch == '_' { ch } else { '-' }).collect();
    let mut root = toml::Table::new();
    root.insert("run".into(), toml::toml! { steps = 1 }.into());
    root["run"].as_table_mut().expect("a table").insert("name".into(), name.into());
    let mut data = toml::Table::new();
    data.insert("dir".into(), folder.display().to_string().into());
    data.insert("tokenizer".into(), tokenizer.into());
    data.insert("batch_size".into(), 1.into());
    data.insert("seq_len".into(), (positions.min(1 << 16) as i64).into());
    root.insert("data".into(), data.into());
    root.insert("model".into(), model.into());
    let text = toml::to_string(&root)?;
    crate::config::Config::parse(&text, &[]).with_context(|| format!("{}: the run it describes", hf.path.display()))
}

/// A folder's `config.json`, with typed reads that name the file and the key.
pub struct HfConfig {
    pub path: std::path::PathBuf,
    pub json: serde_json::Value,
}

impl HfConfig {
    pub fn read(folder: &Path) -> Result<HfConfig> {
        let path = folder.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
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
        let dims = crate::train::dims_of(&cfg, crate::config::memory::vocab_of(&cfg.data.tokenizer));
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
    crate::train::dims_of(cfg, crate::config::memory::vocab_of(&cfg.data.tokenizer))
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
    Ok(Exported { layers, tensors: n, params, class })
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
    let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
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
