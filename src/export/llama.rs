//! The LLaMA kinds as Hugging Face folders: `llama` → `LlamaForCausalLM`, `qwen3` →
//! `Qwen3ForCausalLM`.
//!
//! The mapping, per block at stack position i (0 = the bottom); every matrix is an `nn.Linear`
//! weight (out, in), which is taproot's layout too, so nothing is transposed:
//!
//! | taproot | Hugging Face | layout |
//! |---|---|---|
//! | `wte` (Vp, C) | `model.embed_tokens.weight` (V, C) | the first V rows |
//! | `attn_norm` | `model.layers.i.input_layernorm.weight` | as is |
//! | `qkvw` ((NH+2KV)·hd, C) | `…self_attn.q_proj.weight` (NH·hd, C), `k_proj` (KV·hd, C), `v_proj` (KV·hd, C) | rows split in that order |
//! | `q_norm`, `k_norm` (qwen3) | `…self_attn.q_norm.weight`, `…self_attn.k_norm.weight` (hd) | as is |
//! | `ow` (C, NH·hd) | `…self_attn.o_proj.weight` | × α |
//! | `mlp_norm` | `…post_attention_layernorm.weight` | as is |
//! | `gate_upw` (2F, C) | `…mlp.gate_proj.weight` (F, C), `…mlp.up_proj.weight` (F, C) | rows split |
//! | `downw` (C, F) | `…mlp.down_proj.weight` | × α |
//! | `normw` | `model.norm.weight` | as is |
//! | `lm_head` (Vp, C), untied | `lm_head.weight` (V, C) | the first V rows |
//!
//! Rotary positions already use the `rotate_half` pairing of `transformers` (dimension i with
//! i + hd/2), so q and k need no permutation. `config.json` carries `rope_theta`,
//! `rms_norm_eps`, `num_key_value_heads`, `head_dim`, `intermediate_size`, `hidden_act` =
//! `silu`, no biases and no rope scaling; a folder with rope scaling, biases or another
//! activation is refused on import rather than imported as a different function.

use super::{fresh, get, imported, provenance, read_tensors, tensor, write_folder, Exported, HfConfig, Tensor};
use crate::checkpoint::{Checkpoint, UnitKey};
use crate::model::Arch;
use anyhow::{bail, Result};
use std::path::Path;

/// Write `ck` (a `llama` or `qwen3` run) as a Hugging Face folder of its class in `out`.
pub fn export(ck: &Checkpoint, out: &Path) -> Result<Exported> {
    let u = super::Units::of(ck)?;
    let d = &u.dims;
    let (vocab, c, hd, f) = (d.vocab, d.channels, d.head_size(), d.ffn_hidden);
    let (q_rows, kv_rows) = (d.heads * hd, d.kv_heads * hd);
    let folded = |v: &[f32]| -> Vec<f32> { v.iter().map(|x| d.residual * x).collect() };
    let mut tensors: Vec<(String, Tensor)> =
        vec![("model.embed_tokens.weight".into(), tensor(vec![vocab, c], &u.embed("wte")[..vocab * c]))];
    for i in 0..u.layers.len() {
        let p = |name: &str| u.layer(i, name);
        let h = |name: &str| format!("model.layers.{i}.{name}");
        let qkv = p("qkvw");
        tensors.push((h("input_layernorm.weight"), tensor(vec![c], p("attn_norm"))));
        tensors.push((h("self_attn.q_proj.weight"), tensor(vec![q_rows, c], &qkv[..q_rows * c])));
        tensors.push((h("self_attn.k_proj.weight"), tensor(vec![kv_rows, c], &qkv[q_rows * c..(q_rows + kv_rows) * c])));
        tensors.push((h("self_attn.v_proj.weight"), tensor(vec![kv_rows, c], &qkv[(q_rows + kv_rows) * c..])));
        if d.arch == Arch::Qwen3 {
            tensors.push((h("self_attn.q_norm.weight"), tensor(vec![hd], p("q_norm"))));
            tensors.push((h("self_attn.k_norm.weight"), tensor(vec![hd], p("k_norm"))));
        }
        tensors.push((h("self_attn.o_proj.weight"), tensor(vec![c, q_rows], &folded(p("ow")))));
        tensors.push((h("post_attention_layernorm.weight"), tensor(vec![c], p("mlp_norm"))));
        let gu = p("gate_upw");
        tensors.push((h("mlp.gate_proj.weight"), tensor(vec![f, c], &gu[..f * c])));
        tensors.push((h("mlp.up_proj.weight"), tensor(vec![f, c], &gu[f * c..])));
        tensors.push((h("mlp.down_proj.weight"), tensor(vec![c, f], &folded(p("downw")))));
    }
    tensors.push(("model.norm.weight".into(), tensor(vec![c], u.head("normw"))));
    if !d.tied {
        tensors.push(("lm_head.weight".into(), tensor(vec![vocab, c], &u.head("lm_head")[..vocab * c])));
    }
    let (class, kind) = if d.arch == Arch::Qwen3 { ("Qwen3ForCausalLM", "qwen3") } else { ("LlamaForCausalLM", "llama") };
    let config = serde_json::json!({
        "architectures": [class],
        "model_type": kind,
        "vocab_size": vocab,
        "hidden_size": c,
        "intermediate_size": f,
        "num_hidden_layers": u.layers.len(),
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "head_dim": hd,
        "hidden_act": "silu",
        "max_position_embeddings": d.max_seq,
        "rms_norm_eps": d.norm_eps,
        "rope_theta": d.rope_theta,
        "rope_scaling": null,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "use_sliding_window": false,
        "tie_word_embeddings": d.tied,
        "torch_dtype": "float32",
        "taproot": provenance(ck, &u.tokenizer),
    });
    write_folder(out, tensors, config, u.layers.len())
}

/// A `LlamaForCausalLM` / `Qwen3ForCausalLM` folder as the step-0 checkpoint of the run `cfg`
/// describes (its `model.arch` says which). `cfg` must match the folder: `model.channels` =
/// `hidden_size`, `model.heads` = `num_attention_heads`, `model.kv_heads` =
/// `num_key_value_heads`, `model.ffn_hidden` = `intermediate_size`, `model.depth` =
/// `num_hidden_layers`, `model.rope_theta`, `model.norm_eps`, `model.tie_embeddings`, the
/// tokenizer's vocabulary = `vocab_size`, and `max_position_embeddings` ≥ `model.max_seq`.
pub fn import(folder: &Path, cfg: &crate::config::Config, loader: crate::data::LoaderState, hf: &HfConfig) -> Result<Checkpoint> {
    let d = super::dims_for_import(cfg);
    let (c, depth, vocab, hd, f) = (d.channels, cfg.model.depth, d.vocab, d.head_size(), d.ffn_hidden);
    hf.expect("hidden_size", hf.int("hidden_size")?, c, "model.channels")?;
    hf.expect("num_attention_heads", hf.int("num_attention_heads")?, d.heads, "model.heads")?;
    let kv = if hf.json.get("num_key_value_heads").is_some_and(|v| !v.is_null()) { hf.int("num_key_value_heads")? } else { d.heads };
    hf.expect("num_key_value_heads", kv, d.kv_heads, "model.kv_heads")?;
    hf.expect("intermediate_size", hf.int("intermediate_size")?, f, "model.ffn_hidden")?;
    hf.expect("num_hidden_layers", hf.int("num_hidden_layers")?, depth, "model.depth")?;
    hf.expect("vocab_size", hf.int("vocab_size")?, vocab, "data.tokenizer")?;
    if hf.json.get("head_dim").is_some_and(|v| !v.is_null()) {
        hf.expect("head_dim", hf.int("head_dim")?, hd, "model.channels / model.heads")?;
    }
    let positions = hf.int("max_position_embeddings")?;
    if positions < d.max_seq {
        bail!("{}: `max_position_embeddings` = {positions} is fewer than the config's model.max_seq = {}", hf.path.display(), d.max_seq);
    }
    for (key, ours, name) in
        [("rope_theta", d.rope_theta as f64, "model.rope_theta"), ("rms_norm_eps", d.norm_eps as f64, "model.norm_eps")]
    {
        let got = hf.float(key)?;
        if (got - ours).abs() > 1e-6 * ours.abs() {
            bail!("{}: `{key}` = {got}, but the config has {ours} (set `{name} = {got}`)", hf.path.display());
        }
    }
    let act = hf.json.get("hidden_act").and_then(|v| v.as_str()).unwrap_or("silu");
    if act != "silu" {
        bail!("{}: `hidden_act` = {act:?}; taproot's SwiGLU gates with silu", hf.path.display());
    }
    for key in ["rope_scaling", "attention_bias", "mlp_bias"] {
        if hf.json.get(key).is_some_and(|v| !(v.is_null() || v == &serde_json::Value::Bool(false))) {
            bail!("{}: `{key}` is set; taproot's {} blocks have none", hf.path.display(), d.arch.name());
        }
    }
    super::expect_tie(hf, &d, false)?;
    let t = read_tensors(folder)?;
    let get = |name: &str, shape: &[usize]| get(&t, folder, name, shape);
    let unfold = super::unfold(d.residual);
    let (el, hl, bl) = super::layouts(&d);
    let (q_rows, kv_rows) = (d.heads * hd, d.kv_heads * hd);
    let mut embed = get("model.embed_tokens.weight", &[vocab, c])?.clone();
    embed.resize(d.padded_vocab * c, 0.0); // the padding rows stay zero
    let mut head = get("model.norm.weight", &[c])?.clone();
    if !d.tied {
        head.extend_from_slice(get("lm_head.weight", &[vocab, c])?);
        head.resize(hl.total, 0.0);
    }
    let mut units = vec![(UnitKey::Embed, fresh(embed, &el)), (UnitKey::Head, fresh(head, &hl))];
    for i in 0..depth {
        let h = |name: &str, shape: &[usize]| get(&format!("model.layers.{i}.{name}"), shape).cloned();
        let mut p = Vec::with_capacity(bl.total);
        p.extend(h("input_layernorm.weight", &[c])?);
        p.extend(h("self_attn.q_proj.weight", &[q_rows, c])?);
        p.extend(h("self_attn.k_proj.weight", &[kv_rows, c])?);
        p.extend(h("self_attn.v_proj.weight", &[kv_rows, c])?);
        if d.arch == Arch::Qwen3 {
            p.extend(h("self_attn.q_norm.weight", &[hd])?);
            p.extend(h("self_attn.k_norm.weight", &[hd])?);
        }
        p.extend(unfold(h("self_attn.o_proj.weight", &[c, q_rows])?));
        p.extend(h("post_attention_layernorm.weight", &[c])?);
        p.extend(h("mlp.gate_proj.weight", &[f, c])?);
        p.extend(h("mlp.up_proj.weight", &[f, c])?);
        p.extend(unfold(h("mlp.down_proj.weight", &[c, f])?));
        debug_assert_eq!(p.len(), bl.total);
        units.push((UnitKey::Layer(i as u64), fresh(p, &bl)));
    }
    imported(folder, cfg, loader, units, depth)
}
