//! The LLaMA kinds as Hugging Face folders: `llama` → `LlamaForCausalLM`, `qwen3` →
//! `Qwen3ForCausalLM`; with `[model.moe]`, `llama` → `MixtralForCausalLM` (every layer MoE)
//! and `qwen3` → `Qwen3MoeForCausalLM` (dense layers listed in `mlp_only_layers`).
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
//! | MoE `routerw` (E, C) | Mixtral `…block_sparse_moe.gate.weight`, Qwen3-MoE `…mlp.gate.weight` | as is |
//! | `expert.<e>.gate_upw` (2F, C) | Mixtral `…experts.<e>.w1`, `w3`; Qwen3-MoE `…mlp.experts.<e>.gate_proj`, `up_proj` | rows split |
//! | `expert.<e>.downw` (C, F) | Mixtral `…experts.<e>.w2`; Qwen3-MoE `…down_proj` | × α |
//!
//! Both MoE classes route by the softmax over every expert, the top k renormalised
//! (`norm_topk_prob`), which is taproot's `softmax` routing; a model with `sigmoid` routing or
//! shared experts has no such class, and its export is refused saying so.
//!
//! Rotary positions already use the `rotate_half` pairing of `transformers` (dimension i with
//! i + hd/2), so q and k need no permutation. `config.json` carries `rope_theta`,
//! `rms_norm_eps`, `num_key_value_heads`, `head_dim`, `intermediate_size`, `hidden_act` =
//! `silu`, no biases and no rope scaling; a folder with rope scaling, biases or another
//! activation is refused on import rather than imported as a different function.

use crate::checkpoint::{Checkpoint, UnitKey};
use crate::export::folder::{fresh, get, imported, provenance, read_tensors, tensor, write_folder, Exported, HfConfig, Tensor};
use crate::model::dims::{Arch, Dims};
use crate::model::moe::{Mlp, Routing};
use anyhow::{bail, Result};
use std::path::Path;

/// Write `ck` (a `llama` or `qwen3` run) as a Hugging Face folder of its class in `out`.
pub fn export(ck: &Checkpoint, out: &Path) -> Result<Exported> {
    let u = crate::export::folder::Units::of(ck)?;
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
        if u.mlp(i) == Mlp::Dense {
            let gu = p("gate_upw");
            tensors.push((h("mlp.gate_proj.weight"), tensor(vec![f, c], &gu[..f * c])));
            tensors.push((h("mlp.up_proj.weight"), tensor(vec![f, c], &gu[f * c..])));
            tensors.push((h("mlp.down_proj.weight"), tensor(vec![c, f], &folded(p("downw")))));
            continue;
        }
        let m = d.moe.as_ref().expect("an MoE layer has [model.moe]");
        let fe = m.hidden;
        let (gate, [w_gate, w_up, w_down]) = if d.arch == Arch::Qwen3 {
            ("mlp.gate", ["gate_proj", "up_proj", "down_proj"])
        } else {
            ("block_sparse_moe.gate", ["w1", "w3", "w2"])
        };
        let experts = if d.arch == Arch::Qwen3 { "mlp.experts" } else { "block_sparse_moe.experts" };
        tensors.push((h(&format!("{gate}.weight")), tensor(vec![m.experts, c], p("routerw"))));
        for e in 0..m.experts {
            let gu = p(&format!("expert.{e}.gate_upw"));
            let x = |part: &str| h(&format!("{experts}.{e}.{part}.weight"));
            tensors.push((x(w_gate), tensor(vec![fe, c], &gu[..fe * c])));
            tensors.push((x(w_up), tensor(vec![fe, c], &gu[fe * c..])));
            tensors.push((x(w_down), tensor(vec![c, fe], &folded(p(&format!("expert.{e}.downw"))))));
        }
    }
    tensors.push(("model.norm.weight".into(), tensor(vec![c], u.head("normw"))));
    if !d.tied {
        tensors.push(("lm_head.weight".into(), tensor(vec![vocab, c], &u.head("lm_head")[..vocab * c])));
    }
    let dense_layers: Vec<usize> = (0..u.layers.len()).filter(|&i| u.mlp(i) == Mlp::Dense).collect();
    let (class, kind) = hf_class(d, dense_layers.len() == u.layers.len())?;
    let mut config = serde_json::json!({
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
    if let Some(m) = &d.moe {
        let extra = if kind == "qwen3_moe" {
            serde_json::json!({
                "num_experts": m.experts,
                "num_experts_per_tok": m.top_k,
                "moe_intermediate_size": m.hidden,
                "norm_topk_prob": true,
                "decoder_sparse_step": 1,
                "mlp_only_layers": dense_layers,
                "router_aux_loss_coef": 0.0,
                "output_router_logits": false,
            })
        } else if dense_layers.is_empty() {
            serde_json::json!({
                "num_local_experts": m.experts,
                "num_experts_per_tok": m.top_k,
                "intermediate_size": m.hidden,
                "router_aux_loss_coef": 0.0,
                "output_router_logits": false,
                "sliding_window": null,
            })
        } else {
            bail!("MixtralForCausalLM has no dense layers, but layers {dense_layers:?} of this model are dense (first_dense_layers): use model.arch = \"qwen3\" (Qwen3MoeForCausalLM lists them in mlp_only_layers)");
        };
        config.as_object_mut().expect("an object").extend(extra.as_object().expect("an object").clone());
    }
    write_folder(out, tensors, config, u.layers.len())
}

/// The `transformers` class and `model_type` of a LLaMA-kind model; an MoE model needs
/// softmax routing without shared experts (what Mixtral and Qwen3-MoE compute).
fn hf_class(d: &Dims, all_dense: bool) -> Result<(&'static str, &'static str)> {
    match (&d.moe, d.arch) {
        (Some(m), _) if m.routing != Routing::Softmax || m.shared > 0 => bail!(
            "no transformers class computes this mixture of experts (routing {:?}, {} shared experts): Mixtral and Qwen3-MoE route by renormalised softmax without shared experts",
            m.routing,
            m.shared
        ),
        (Some(_), Arch::Qwen3) => Ok(("Qwen3MoeForCausalLM", "qwen3_moe")),
        (Some(_), _) if !all_dense => Ok(("MixtralForCausalLM", "mixtral")),
        (_, Arch::Qwen3) => Ok(("Qwen3ForCausalLM", "qwen3")),
        _ => Ok(("LlamaForCausalLM", "llama")),
    }
}

/// The `model_type` a folder for run `cfg` must have.
pub fn model_type(cfg: &crate::config::Config) -> &'static str {
    match (cfg.model.moe.is_some(), cfg.model.arch) {
        (true, Arch::Qwen3) => "qwen3_moe",
        (true, _) => "mixtral",
        (false, Arch::Qwen3) => "qwen3",
        (false, _) => "llama",
    }
}

/// A `LlamaForCausalLM` / `Qwen3ForCausalLM` folder as the step-0 checkpoint of the run `cfg`
/// describes (its `model.arch` says which). `cfg` must match the folder: `model.channels` =
/// `hidden_size`, `model.heads` = `num_attention_heads`, `model.kv_heads` =
/// `num_key_value_heads`, `model.ffn_hidden` = `intermediate_size`, `model.depth` =
/// `num_hidden_layers`, `model.rope_theta`, `model.norm_eps`, `model.tie_embeddings`, the
/// tokenizer's vocabulary = `vocab_size`, and `max_position_embeddings` ≥ `model.max_seq`.
pub fn import(folder: &Path, cfg: &crate::config::Config, loader: crate::data::LoaderState, hf: &HfConfig) -> Result<Checkpoint> {
    let d = crate::export::folder::dims_for_import(cfg);
    let (c, depth, vocab, hd, f) = (d.channels, cfg.model.depth, d.vocab, d.head_size(), d.ffn_hidden);
    hf.expect("hidden_size", hf.int("hidden_size")?, c, "model.channels")?;
    hf.expect("num_attention_heads", hf.int("num_attention_heads")?, d.heads, "model.heads")?;
    let kv = if hf.json.get("num_key_value_heads").is_some_and(|v| !v.is_null()) { hf.int("num_key_value_heads")? } else { d.heads };
    hf.expect("num_key_value_heads", kv, d.kv_heads, "model.kv_heads")?;
    match &d.moe {
        Some(m) => {
            // transformers 4.x writes Qwen3-MoE's `num_experts` and Mixtral's `num_local_experts`;
            // 5.x writes `num_local_experts` for both.
            let n = hf.int_any(&["num_local_experts", "num_experts"])?;
            hf.expect("num_local_experts", n, m.experts, "model.moe.experts")?;
            hf.expect("num_experts_per_tok", hf.int("num_experts_per_tok")?, m.top_k, "model.moe.top_k")?;
            let hidden = if d.arch == Arch::Qwen3 { "moe_intermediate_size" } else { "intermediate_size" };
            hf.expect(hidden, hf.int(hidden)?, m.hidden, "model.moe.expert_hidden")?;
            if m.routing != Routing::Softmax || m.shared > 0 {
                bail!("{}: Mixtral and Qwen3-MoE route by renormalised softmax without shared experts; set model.moe.routing = \"softmax\" and shared_experts = 0", hf.path.display());
            }
            if d.arch == Arch::Qwen3 {
                if !hf.flag("norm_topk_prob", false)? {
                    bail!("{}: `norm_topk_prob` is false; taproot renormalises the top-k weights", hf.path.display());
                }
                hf.expect("intermediate_size", hf.int("intermediate_size")?, f, "model.ffn_hidden")?;
            }
        }
        None => hf.expect("intermediate_size", hf.int("intermediate_size")?, f, "model.ffn_hidden")?,
    }
    // Qwen3-MoE's dense layers (`mlp_only_layers`; a `decoder_sparse_step` other than 1 is refused).
    let dense_layers: Vec<usize> = match (&d.moe, d.arch) {
        (Some(_), Arch::Qwen3) => {
            if hf.json.get("decoder_sparse_step").is_some_and(|v| v.as_u64() != Some(1)) {
                bail!("{}: `decoder_sparse_step` other than 1 is not supported; list dense layers in `mlp_only_layers`", hf.path.display());
            }
            hf.json
                .get("mlp_only_layers")
                .and_then(|v| v.as_array())
                .map(|a| a.iter().filter_map(|x| x.as_u64()).map(|x| x as usize).collect())
                .unwrap_or_default()
        }
        (Some(_), _) => Vec::new(),
        (None, _) => (0..depth).collect(),
    };
    // The run decides which of its blocks are dense (`first_dense_layers`); the folder must agree.
    let run_dense: Vec<usize> =
        (0..depth).filter(|&i| crate::model::block::mlp_at_birth(&d, i, depth, cfg.target_depth(), false) == Mlp::Dense).collect();
    if d.moe.is_some() && dense_layers != run_dense {
        bail!(
            "{}: `mlp_only_layers` = {dense_layers:?}, but the run's `model.moe.first_dense_layers` makes layers {run_dense:?} \
             of these {depth} dense: set first_dense_layers to agree",
            hf.path.display()
        );
    }
    hf.expect("num_hidden_layers", hf.int("num_hidden_layers")?, depth, "model.depth")?;
    hf.expect("vocab_size", hf.int("vocab_size")?, vocab, "data.tokenizer")?;
    if hf.json.get("head_dim").is_some_and(|v| !v.is_null()) {
        hf.expect("head_dim", hf.int("head_dim")?, hd, "model.channels / model.heads")?;
    }
    let positions = hf.int("max_position_embeddings")?;
    if positions < d.max_seq {
        bail!("{}: `max_position_embeddings` = {positions} is fewer than the config's model.max_seq = {}", hf.path.display(), d.max_seq);
    }
    hf.refuse_sliding_window(positions)?;
    for (key, ours, name) in
        [("rope_theta", d.rope_theta as f64, "model.rope_theta"), ("rms_norm_eps", d.norm_eps as f64, "model.norm_eps")]
    {
        let got = if key == "rope_theta" { hf.rope_theta()? } else { hf.float(key)? };
        if (got - ours).abs() > 1e-6 * ours.abs() {
            bail!("{}: `{key}` = {got}, but the config has {ours} (set `{name} = {got}`)", hf.path.display());
        }
    }
    let act = hf.json.get("hidden_act").and_then(|v| v.as_str()).unwrap_or("silu");
    if act != "silu" {
        bail!("{}: `hidden_act` = {act:?}; taproot's SwiGLU gates with silu", hf.path.display());
    }
    for key in ["attention_bias", "mlp_bias"] {
        if hf.json.get(key).is_some_and(|v| !(v.is_null() || v == &serde_json::Value::Bool(false))) {
            bail!("{}: `{key}` is set; taproot's {} blocks have none", hf.path.display(), d.arch.name());
        }
    }
    crate::export::folder::expect_tie(hf, &d, false)?;
    let t = read_tensors(folder)?;
    let get = |name: &str, shape: &[usize]| get(&t, folder, name, shape);
    let unfold = crate::export::folder::unfold(d.residual);
    let (el, hl, _) = crate::export::folder::layouts(&d);
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
        let mlp = if dense_layers.contains(&i) { Mlp::Dense } else { Mlp::Moe };
        let bl = crate::model::Block::<crate::backend::cpu::CpuBackend>::layout_of(&d, mlp);
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
        match (mlp, &d.moe) {
            (Mlp::Moe, Some(m)) => {
                let fe = m.hidden;
                let (gate, experts, [w_gate, w_up, w_down]) = if d.arch == Arch::Qwen3 {
                    ("mlp.gate", "mlp.experts", ["gate_proj", "up_proj", "down_proj"])
                } else {
                    ("block_sparse_moe.gate", "block_sparse_moe.experts", ["w1", "w3", "w2"])
                };
                p.extend(h(&format!("{gate}.weight"), &[m.experts, c])?);
                for e in 0..m.experts {
                    let x = |part: &str, shape: &[usize]| h(&format!("{experts}.{e}.{part}.weight"), shape);
                    p.extend(x(w_gate, &[fe, c])?);
                    p.extend(x(w_up, &[fe, c])?);
                    p.extend(unfold(x(w_down, &[c, fe])?));
                }
            }
            _ => {
                p.extend(h("mlp.gate_proj.weight", &[f, c])?);
                p.extend(h("mlp.up_proj.weight", &[f, c])?);
                p.extend(unfold(h("mlp.down_proj.weight", &[c, f])?));
            }
        }
        debug_assert_eq!(p.len(), bl.total);
        units.push((UnitKey::Layer(i as u64), fresh(p, &bl)));
    }
    imported(folder, cfg, loader, units, depth)
}
