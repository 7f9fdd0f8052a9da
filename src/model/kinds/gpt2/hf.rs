//! The `gpt2` kind as a Hugging Face model folder
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
//! written; under `model.tie_embeddings = false` taproot's own `lm_head` goes to `lm_head.weight`
//! (its first V rows). `config.json` says `gelu_new` (GELU's tanh approximation, the one taproot
//! trains with), `layer_norm_epsilon` 1e-5 and `n_positions` = `model.max_seq`.

use crate::checkpoint::{Checkpoint, UnitKey};
use crate::export::folder::{fresh, get, imported, provenance, read_tensors, tensor, transpose, write_folder, Exported, HfConfig, Tensor};
use anyhow::{bail, Result};
use std::path::Path;

/// Write `ck` (a `gpt2` run) as a Hugging Face `GPT2LMHeadModel` folder in `out`.
pub fn export(ck: &Checkpoint, out: &Path) -> Result<Exported> {
    let u = crate::export::folder::Units::of(ck)?;
    let (dims, vocab, c) = (&u.dims, u.dims.vocab, u.dims.channels);
    let folded = |v: &[f32]| -> Vec<f32> { v.iter().map(|x| dims.residual * x).collect() };
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    tensors.push(("transformer.wte.weight".into(), tensor(vec![vocab, c], &u.embed("wte")[..vocab * c])));
    tensors.push(("transformer.wpe.weight".into(), tensor(vec![dims.max_seq, c], u.embed("wpe"))));
    for i in 0..u.layers.len() {
        let p = |name: &str| u.layer(i, name);
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
    tensors.push(("transformer.ln_f.weight".into(), tensor(vec![c], u.head("lnfw"))));
    tensors.push(("transformer.ln_f.bias".into(), tensor(vec![c], u.head("lnfb"))));
    if !dims.tied {
        tensors.push(("lm_head.weight".into(), tensor(vec![vocab, c], &u.head("lm_head")[..vocab * c])));
    }
    let config = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab,
        "n_positions": dims.max_seq,
        "n_ctx": dims.max_seq,
        "n_embd": c,
        "n_layer": u.layers.len(),
        "n_head": dims.heads,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": true,
        "tie_word_embeddings": dims.tied,
        "torch_dtype": "float32",
        "taproot": provenance(ck, &u.tokenizer),
    });
    write_folder(out, tensors, config, u.layers.len())
}

/// A Hugging Face `GPT2LMHeadModel` folder as the step-0 checkpoint of the run `cfg` describes:
/// its blocks become layers 0…n−1 (bottom first), its weights the parameters, with fresh
/// optimizer state. `cfg` must match the folder (`model.channels` = `n_embd`, `model.heads` =
/// `n_head`, `model.depth` = `n_layer`, the tokenizer's vocabulary = `vocab_size`,
/// `n_positions` ≥ `model.max_seq`); its growth plan then grows the imported model like any
/// other. `loader` is the training loader's state at step 0.
pub fn import(folder: &Path, cfg: &crate::config::Config, loader: crate::data::LoaderState, hf: &HfConfig) -> Result<Checkpoint> {
    let dims = crate::export::folder::dims_for_import(cfg);
    let (c, depth, vocab, max_seq) = (dims.channels, cfg.model.depth, dims.vocab, dims.max_seq);
    hf.expect("n_embd", hf.int("n_embd")?, c, "model.channels")?;
    hf.expect("n_head", hf.int("n_head")?, dims.heads, "model.heads")?;
    hf.expect("n_layer", hf.int("n_layer")?, depth, "model.depth")?;
    hf.expect("vocab_size", hf.int("vocab_size")?, vocab, "data.tokenizer")?;
    let positions = hf.int("n_positions")?;
    if positions < max_seq {
        bail!("{}: `n_positions` = {positions} is fewer than the config's model.max_seq = {max_seq}", hf.path.display());
    }
    let act = hf.json.get("activation_function").and_then(|v| v.as_str()).unwrap_or("gelu_new");
    if act != "gelu_new" {
        bail!("{}: `activation_function` = {act:?}; taproot's GELU is the tanh approximation (`gelu_new`)", hf.path.display());
    }
    hf.refuse_flag("scale_attn_by_inverse_layer_idx", true, "taproot scales every layer's attention by 1/√d only")?;
    hf.refuse_flag("reorder_and_upcast_attn", true, "taproot computes attention in one order only")?;
    hf.refuse_flag("scale_attn_weights", false, "taproot scales attention scores by 1/√d")?;
    hf.refuse_flag("add_cross_attention", true, "taproot's GPT-2 blocks have no cross-attention")?;
    if let Some(eps) = hf.json.get("layer_norm_epsilon").and_then(|v| v.as_f64()) {
        if (eps - dims.norm_eps as f64).abs() > 1e-9 {
            bail!("{}: `layer_norm_epsilon` = {eps}; taproot's GPT-2 LayerNorm uses ε = {}", hf.path.display(), dims.norm_eps);
        }
    }
    crate::export::folder::expect_tie(hf, &dims, true)?;
    let t = read_tensors(folder)?;
    let get = |name: &str, shape: &[usize]| get(&t, folder, name, shape);
    let unfold = crate::export::folder::unfold(dims.residual);
    let (el, hl, bl) = crate::export::folder::layouts(&dims);
    let mut embed = get("transformer.wte.weight", &[vocab, c])?.clone();
    embed.resize(dims.padded_vocab * c, 0.0); // the padding rows stay zero
    embed.extend_from_slice(&get("transformer.wpe.weight", &[positions, c])?[..max_seq * c]);
    let mut head = get("transformer.ln_f.weight", &[c])?.clone();
    head.extend_from_slice(get("transformer.ln_f.bias", &[c])?);
    if !dims.tied {
        head.extend_from_slice(get("lm_head.weight", &[vocab, c])?);
        head.resize(hl.total, 0.0);
    }
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
    imported(folder, cfg, loader, units, depth)
}
