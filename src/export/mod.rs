//! `taproot export` and `taproot import`: a checkpoint as a Hugging Face model folder
//! (`config.json` + `model.safetensors`), and such a folder back as the step-0 checkpoint of a
//! run, which then trains and grows like any other (e.g. from a small pretrained model).
//!
//! The layout follows the run's block kind, whose folder holds the mapping (`model::kinds::*::hf`):
//! `gpt2` → `GPT2LMHeadModel`, `llama` → `LlamaForCausalLM`, `qwen3` → `Qwen3ForCausalLM`. Layer 0 of the folder is the
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

pub mod folder;
pub mod tokenizer;

pub use folder::{read_tensors, Exported, HfConfig, Tensors};

use crate::checkpoint::{self, Checkpoint};
use crate::model::kinds::hf as kinds;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Write `ck` as a Hugging Face folder of its block kind in `out` (created; a previous export
/// of taproot there is replaced). A folder that holds anything else is refused (see
/// [`export_into`]).
pub fn export(ck: &Checkpoint, out: &Path) -> Result<Exported> {
    export_into(ck, out, false)
}

/// [`export`], where `overwrite` first moves whatever `out` holds into `out/replaced-<time>/`
/// (nothing is deleted). Without it, a folder that holds files taproot's export did not write
/// (another model's shards or index, a tokenizer, anything) is refused: loaders would read
/// them beside the new weights.
pub fn export_into(ck: &Checkpoint, out: &Path, overwrite: bool) -> Result<Exported> {
    let cfg = ck.meta.config().context("the checkpoint's config")?;
    folder::claim(out, overwrite)?;
    let mut exported = kinds::export(cfg.model.arch, ck, out)?;
    // The tokenizer beside the weights, and its special ids in config.json.
    let specials = tokenizer::write(&cfg, out, cfg.max_seq())?;
    let cfile = out.join("config.json");
    let text = crate::userfile::read_to_string(&cfile, "config", crate::userfile::TEXT_MAX)?;
    let mut json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", cfile.display()))?;
    if let Some(o) = json.as_object_mut() {
        o.insert("bos_token_id".into(), specials.bos.into());
        o.insert("eos_token_id".into(), specials.eos.into());
        o.insert("pad_token_id".into(), serde_json::Value::Null);
    }
    std::fs::write(&cfile, serde_json::to_string_pretty(&json)? + "\n").with_context(|| format!("writing {}", cfile.display()))?;
    exported.tokenizer = specials.note;
    Ok(exported)
}

/// Export the checkpoint at `path` (a file, or a folder: its newest valid checkpoint).
pub fn export_path(path: &Path, out: &Path, overwrite: bool) -> Result<Exported> {
    export_into(&checkpoint::load_file_or_newest(path)?, out, overwrite)
}

/// A Hugging Face folder as the step-0 checkpoint of the run `cfg` describes (its
/// `model.arch` says which layout the folder must have). `loader` is the training loader's
/// state at step 0.
pub fn import(folder: &Path, cfg: &crate::config::Config, loader: crate::data::LoaderState) -> Result<Checkpoint> {
    let hf = HfConfig::read(folder)?;
    let want = kinds::model_type(cfg);
    if let Some(got) = hf.json.get("model_type").and_then(|v| v.as_str()) {
        if got != want {
            bail!("{}: `model_type` = {got:?}, but the config's `model.arch` is {want:?}", hf.path.display());
        }
    }
    // The folder's own tokenizer, where it has one and the run names an `hf:` tokenizer: the same
    // file, or the ids would mean other text.
    let own = folder.join(crate::data::hf_tokenizer::FILE);
    if own.is_file() && cfg.data.tokenizer.starts_with("hf:") {
        let theirs = crate::data::hf_tokenizer::HfTokenizer::load(folder)?;
        let ours = crate::data::Tokenizer::from_name(&cfg.data.tokenizer)?;
        if ours.digest() != Some(theirs.digest.as_str()) {
            bail!(
                "{} is not the tokenizer the run names (`data.tokenizer` = {:?}): set `data.tokenizer = \"hf:{}\"` to train the model with its own",
                own.display(),
                cfg.data.tokenizer,
                folder.display()
            );
        }
    }
    kinds::import(folder, cfg, loader, &hf)
}

/// The run config a Hugging Face folder of one of the exported classes describes, to read it as
/// a model of its own (`taproot sample FOLDER`): its kind, sizes and experts, and the tokenizer
/// the `taproot` block names (else `bytes` for a vocabulary of 256, `gpt2` for 50257).
pub fn config_of_folder(folder: &Path) -> Result<crate::config::Config> {
    let hf = HfConfig::read(folder)?;
    let kind = hf.json.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    let vocab = hf.int("vocab_size")?;
    // Its own tokenizer where it has one (`export` writes it; `save_pretrained` folders have it),
    // except that taproot's built-in `bytes` and `gpt2` are read by name.
    let has_file = folder.join(crate::data::hf_tokenizer::FILE).is_file();
    let tokenizer = match hf.json.pointer("/taproot/tokenizer").and_then(|v| v.as_str()) {
        Some(t @ ("bytes" | "gpt2")) => t.to_string(),
        _ if has_file => format!("hf:{}", folder.display()),
        Some(t) => bail!("{}: the model was trained with the tokenizer {t}, and the folder holds no tokenizer.json", hf.path.display()),
        None if vocab == 256 => "bytes".into(),
        None if vocab == 50257 => "gpt2".into(),
        None => bail!(
            "{}: no tokenizer.json, and `vocab_size` = {vocab} matches no tokenizer taproot has built in (bytes: 256, gpt2: 50257)",
            hf.path.display()
        ),
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
            model.insert("rope_theta".into(), hf.rope_theta()?.into());
            model.insert("norm_eps".into(), hf.float("rms_norm_eps")?.into());
            let moe = matches!(kind, "mixtral" | "qwen3_moe");
            let dense_ffn = if kind == "mixtral" { None } else { Some(hf.int("intermediate_size")?) };
            if let Some(f) = dense_ffn {
                model.insert("ffn_hidden".into(), (f as i64).into());
            }
            model.insert("tie_embeddings".into(), hf.flag("tie_word_embeddings", false)?.into());
            if moe {
                let mut m = toml::Table::new();
                let hidden = if kind == "mixtral" { "intermediate_size" } else { "moe_intermediate_size" };
                m.insert("experts".into(), (hf.int_any(&["num_local_experts", "num_experts"])? as i64).into());
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
    if tokenizer.starts_with("hf:") {
        data.insert("vocab_size".into(), (vocab as i64).into());
    }
    data.insert("tokenizer".into(), tokenizer.into());
    data.insert("batch_size".into(), 1.into());
    // A sampling run's window: the context the folder declares does not size any buffer.
    data.insert("seq_len".into(), (positions.min(256) as i64).into());
    root.insert("data".into(), data.into());
    root.insert("model".into(), model.into());
    let text = toml::to_string(&root)?;
    crate::config::Config::parse(&text, &[]).with_context(|| format!("{}: the run it describes", hf.path.display()))
}
