//! `taproot export` and `taproot import`: a checkpoint as a Hugging Face model folder
//! (`config.json` + `model.safetensors`) in the tensor names and layouts of `transformers`'
//! `GPT2LMHeadModel`, so a model trained (and grown) here loads with
//! `GPT2LMHeadModel.from_pretrained(folder)`; and such a folder back as the step-0 checkpoint of a
//! run, which then trains and grows like any other (e.g. from a small pretrained model).
//!
//! The mapping, per block at stack position i (position 0 = the bottom block, whatever its
//! layer id; the checkpoint's `stack` gives the order):
//!
//! | taproot | Hugging Face | layout |
//! |---|---|---|
//! | `wte` (Vp, C) | `transformer.wte.weight` (V, C) | the first V rows (the padding rows are zero) |
//! | `wpe` (maxT, C) | `transformer.wpe.weight` | as is |
//! | `ln1w`, `ln1b` | `transformer.h.i.ln_1.weight`, `.bias` | as is |
//! | `qkvw` (3C, C) | `transformer.h.i.attn.c_attn.weight` (C, 3C) | transposed: HF's `Conv1D` stores (in, out) |
//! | `qkvb` | `transformer.h.i.attn.c_attn.bias` | as is (q, k, v side by side, heads inside each) |
//! | `attprojw` (C, C) | `transformer.h.i.attn.c_proj.weight` | transposed |
//! | `ln2w`, `ln2b` | `transformer.h.i.ln_2.*` | as is |
//! | `fcw` (4C, C) | `transformer.h.i.mlp.c_fc.weight` (C, 4C) | transposed |
//! | `fcprojw` (C, 4C) | `transformer.h.i.mlp.c_proj.weight` (4C, C) | transposed |
//! | `lnfw`, `lnfb` | `transformer.ln_f.weight`, `.bias` | as is |
//!
//! The LM head is tied to `wte` (`tie_word_embeddings`), as in GPT-2, so no `lm_head.weight` is
//! written. `config.json` says `gelu_new` (GELU's tanh approximation, the one taproot trains
//! with), `layer_norm_epsilon` 1e-5, `n_positions` = `model.max_seq`, and `vocab_size` = V of the
//! run's tokenizer: GPT-2's 50257 BPE ids, or the 256 byte values of `bytes` (token id = byte
//! value; a GPT-2 tokenizer does not apply to such a model). Only the weights travel: optimizer
//! state and the run's bookkeeping stay in the checkpoint.

use crate::checkpoint::{self, Checkpoint, UnitKey};
use crate::config::memory::vocab_of;
use crate::model::{Block, Dims};
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
}

struct Tensor {
    shape: Vec<usize>,
    bytes: Vec<u8>,
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

fn tensor(shape: Vec<usize>, values: &[f32]) -> Tensor {
    Tensor { shape, bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
}

/// `rows x cols` row-major `x`, transposed.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

/// Write `ck` as a Hugging Face `GPT2LMHeadModel` folder in `out` (created; existing
/// `config.json` / `model.safetensors` there are replaced).
pub fn export_gpt2(ck: &Checkpoint, out: &Path) -> Result<Exported> {
    let cfg = ck.meta.config().context("the checkpoint's config")?;
    let vocab = vocab_of(&cfg.data.tokenizer);
    let dims = crate::train::dims_of(&cfg, vocab);
    let c = dims.channels;
    // GPT-2 has no residual-branch multiplier: under `depth_mup` α is folded into the two
    // residual projections (α·(xW + b) = x(αW) + αb), so the exported model computes the same.
    let alpha = dims.residual;
    let folded = |v: &[f32]| -> Vec<f32> { v.iter().map(|x| alpha * x).collect() };
    let embed = ck.unit(UnitKey::Embed).context("the checkpoint has no embedding unit")?;
    let head = ck.unit(UnitKey::Head).context("the checkpoint has no head unit")?;
    let el = crate::model::embed::Embed::<crate::backend::cpu::CpuBackend>::layout(&dims);
    let hl = crate::model::head::Head::<crate::backend::cpu::CpuBackend>::layout(&dims);
    let bl = Block::<crate::backend::cpu::CpuBackend>::layout(&dims);
    for (what, got, want) in [("embedding", embed.params.len(), el.total), ("head", head.params.len(), hl.total)] {
        if got != want {
            bail!("the checkpoint's {what} holds {got} values, not the {want} its config implies");
        }
    }
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let wte = el.slice(&embed.params, "wte");
    tensors.push(("transformer.wte.weight".into(), tensor(vec![vocab, c], &wte[..vocab * c])));
    tensors.push(("transformer.wpe.weight".into(), tensor(vec![dims.max_seq, c], el.slice(&embed.params, "wpe"))));
    for (i, id) in ck.meta.stack.iter().enumerate() {
        let u = ck.unit(UnitKey::Layer(*id)).with_context(|| format!("the checkpoint has no unit for layer {id}"))?;
        if u.params.len() != bl.total {
            bail!("layer {id} holds {} values, not the {} of a block of width {c}", u.params.len(), bl.total);
        }
        let p = |name: &str| bl.slice(&u.params, name);
        let h = |name: &str| format!("transformer.h.{i}.{name}");
        tensors.push((h("ln_1.weight"), tensor(vec![c], p("ln1w"))));
        tensors.push((h("ln_1.bias"), tensor(vec![c], p("ln1b"))));
        tensors.push((h("attn.c_attn.weight"), tensor(vec![c, 3 * c], &transpose(p("qkvw"), 3 * c, c))));
        tensors.push((h("attn.c_attn.bias"), tensor(vec![3 * c], p("qkvb"))));
        tensors.push((h("attn.c_proj.weight"), tensor(vec![c, c], &transpose(&folded(p("attprojw")), c, c))));
        tensors.push((h("attn.c_proj.bias"), tensor(vec![c], &folded(p("attprojb")))));
        tensors.push((h("ln_2.weight"), tensor(vec![c], p("ln2w"))));
        tensors.push((h("ln_2.bias"), tensor(vec![c], p("ln2b"))));
        tensors.push((h("mlp.c_fc.weight"), tensor(vec![c, 4 * c], &transpose(p("fcw"), 4 * c, c))));
        tensors.push((h("mlp.c_fc.bias"), tensor(vec![4 * c], p("fcb"))));
        tensors.push((h("mlp.c_proj.weight"), tensor(vec![4 * c, c], &transpose(&folded(p("fcprojw")), c, 4 * c))));
        tensors.push((h("mlp.c_proj.bias"), tensor(vec![c], &folded(p("fcprojb")))));
    }
    tensors.push(("transformer.ln_f.weight".into(), tensor(vec![c], hl.slice(&head.params, "lnfw"))));
    tensors.push(("transformer.ln_f.bias".into(), tensor(vec![c], hl.slice(&head.params, "lnfb"))));
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let params = tensors.iter().map(|(_, t)| t.bytes.len() / 4).sum();
    let n = tensors.len();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let views: Vec<(String, &Tensor)> = tensors.iter().map(|(k, t)| (k.clone(), t)).collect();
    let file = out.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(meta), &file).with_context(|| format!("writing {}", file.display()))?;
    let config = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab,
        "n_positions": dims.max_seq,
        "n_ctx": dims.max_seq,
        "n_embd": c,
        "n_layer": ck.meta.stack.len(),
        "n_head": dims.heads,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": true,
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
        "taproot": {
            "run_name": ck.meta.run_name,
            "step": ck.meta.step,
            "tokenizer": cfg.data.tokenizer,
            "layer_ids_bottom_to_top": ck.meta.stack,
        },
    });
    let cfile = out.join("config.json");
    std::fs::write(&cfile, serde_json::to_string_pretty(&config)? + "\n").with_context(|| format!("writing {}", cfile.display()))?;
    Ok(Exported { layers: ck.meta.stack.len(), tensors: n, params })
}

/// Export the checkpoint at `path` (a file, or a folder: its newest valid checkpoint).
pub fn export_path(path: &Path, out: &Path) -> Result<Exported> {
    export_gpt2(&checkpoint::load_file_or_newest(path)?, out)
}

/// Tensors by name: (shape, values as f32).
type Tensors = std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>;

/// The tensors of a Hugging Face folder's `model.safetensors`, as f32 (F32 or BF16 on disk).
fn read_tensors(folder: &Path) -> Result<Tensors> {
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

/// A Hugging Face `GPT2LMHeadModel` folder as the step-0 checkpoint of the run `cfg` describes:
/// its blocks become layers 0…n−1 (bottom first), its weights the parameters, with fresh
/// optimizer state. `cfg` must match the folder (`model.channels` = `n_embd`, `model.heads` =
/// `n_head`, `model.depth` = `n_layer`, the tokenizer's vocabulary = `vocab_size`,
/// `n_positions` ≥ `model.max_seq`); its growth plan then grows the imported model like any
/// other. `loader` is the training loader's state at step 0.
pub fn import_gpt2(folder: &Path, cfg: &crate::config::Config, loader: crate::data::LoaderState) -> Result<Checkpoint> {
    let cfile = folder.join("config.json");
    let text = std::fs::read_to_string(&cfile).with_context(|| format!("reading {}", cfile.display()))?;
    let hf: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", cfile.display()))?;
    let field =
        |k: &str| hf.get(k).and_then(|v| v.as_u64()).map(|v| v as usize).with_context(|| format!("{}: no integer `{k}`", cfile.display()));
    let vocab = vocab_of(&cfg.data.tokenizer);
    let (c, nh, depth, max_seq) = (cfg.model.channels, cfg.model.heads, cfg.model.depth, cfg.max_seq());
    for (key, got, want) in [
        ("n_embd", field("n_embd")?, c),
        ("n_head", field("n_head")?, nh),
        ("n_layer", field("n_layer")?, depth),
        ("vocab_size", field("vocab_size")?, vocab),
    ] {
        if got != want {
            bail!("{}: `{key}` = {got}, but the config wants {want} (model.channels, model.heads, model.depth and data.tokenizer must match the folder)", cfile.display());
        }
    }
    let positions = field("n_positions")?;
    if positions < max_seq {
        bail!("{}: `n_positions` = {positions} is fewer than the config's model.max_seq = {max_seq}", cfile.display());
    }
    let act = hf.get("activation_function").and_then(|v| v.as_str()).unwrap_or("gelu_new");
    if act != "gelu_new" {
        bail!("{}: `activation_function` = {act:?}; taproot's GELU is the tanh approximation (`gelu_new`)", cfile.display());
    }
    let t = read_tensors(folder)?;
    let get = |name: &str, shape: &[usize]| -> Result<&Vec<f32>> {
        let (s, v) = t.get(name).with_context(|| format!("{}: no tensor {name}", folder.join("model.safetensors").display()))?;
        if s != shape {
            bail!("tensor {name} has shape {s:?}, not {shape:?}");
        }
        Ok(v)
    };
    let dims = Dims::new(vocab, max_seq, c, nh);
    // Under a `depth_mup` config the residual projections are stored without α (export folds it
    // in): divide it back out.
    let alpha = cfg.model.parameterization.residual_multiplier(cfg.target_depth());
    let unfold = |v: Vec<f32>| -> Vec<f32> {
        if alpha == 1.0 {
            v
        } else {
            v.into_iter().map(|x| x / alpha).collect()
        }
    };
    let fresh = |params: Vec<f32>, layout: &Layout| crate::params::UnitState {
        m: vec![0.0; params.len()],
        params,
        v: None,
        steps: vec![0; layout.specs.len()],
    };
    let el = crate::model::embed::Embed::<crate::backend::cpu::CpuBackend>::layout(&dims);
    let hl = crate::model::head::Head::<crate::backend::cpu::CpuBackend>::layout(&dims);
    let bl = Block::<crate::backend::cpu::CpuBackend>::layout(&dims);
    let mut embed = get("transformer.wte.weight", &[vocab, c])?.clone();
    embed.resize(dims.padded_vocab * c, 0.0); // the padding rows stay zero
    embed.extend_from_slice(&get("transformer.wpe.weight", &[positions, c])?[..max_seq * c]);
    let mut head = get("transformer.ln_f.weight", &[c])?.clone();
    head.extend_from_slice(get("transformer.ln_f.bias", &[c])?);
    let mut units = vec![(UnitKey::Embed, fresh(embed, &el)), (UnitKey::Head, fresh(head, &hl))];
    for i in 0..depth {
        let h = |name: &str, shape: &[usize]| get(&format!("transformer.h.{i}.{name}"), shape).cloned();
        let mut p = Vec::with_capacity(bl.total);
        p.extend(h("ln_1.weight", &[c])?);
        p.extend(h("ln_1.bias", &[c])?);
        p.extend(transpose(&h("attn.c_attn.weight", &[c, 3 * c])?, c, 3 * c));
        p.extend(h("attn.c_attn.bias", &[3 * c])?);
        p.extend(unfold(transpose(&h("attn.c_proj.weight", &[c, c])?, c, c)));
        p.extend(unfold(h("attn.c_proj.bias", &[c])?));
        p.extend(h("ln_2.weight", &[c])?);
        p.extend(h("ln_2.bias", &[c])?);
        p.extend(transpose(&h("mlp.c_fc.weight", &[c, 4 * c])?, c, 4 * c));
        p.extend(h("mlp.c_fc.bias", &[4 * c])?);
        p.extend(unfold(transpose(&h("mlp.c_proj.weight", &[4 * c, c])?, 4 * c, c)));
        p.extend(unfold(h("mlp.c_proj.bias", &[c])?));
        debug_assert_eq!(p.len(), bl.total);
        units.push((UnitKey::Layer(i as u64), fresh(p, &bl)));
    }
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
