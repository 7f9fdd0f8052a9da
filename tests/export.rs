//! `taproot export` / `taproot import` (src/export/): a grown run's checkpoint as a Hugging Face
//! folder of its block kind (`GPT2LMHeadModel`, `LlamaForCausalLM`, `Qwen3ForCausalLM`).
//!
//! - Every tensor of the folder is the checkpoint's tensor under the documented mapping, bit for
//!   bit (transposes included), in stack order — the run grew at the bottom, so stack positions
//!   and layer ids differ.
//! - An independent reference (`scripts/hf_gpt2_loss.py`, `scripts/hf_llama_loss.py`: each
//!   class's forward in float64 with numpy, reading the safetensors bytes itself; no PyTorch) computes the exported model's loss on a
//!   batch, and taproot's own loss on that batch, with the checkpoint's weights, agrees to 1e-5
//!   relative. Needs python3 with numpy (CI installs it; TAPROOT_REQUIRE_NUMPY=1 makes a missing
//!   numpy a failure instead of a printed skip).
//! - The CLI exports from a checkpoint folder and names a bad path.

mod common;

use common::{grown_checkpoint, grown_checkpoint_with, model_of, TestConfig};
use taproot::backend::cpu::CpuBackend;
use taproot::checkpoint::{self, UnitKey};
use taproot::data::Dataset;
use taproot::model::{Batch, Block, Dims};

/// A folder's tensors by name: (shape, values).
type Tensors = std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>;

fn read(folder: &std::path::Path) -> (serde_json::Value, Tensors) {
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(folder.join("config.json")).unwrap()).unwrap();
    let bytes = std::fs::read(folder.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut m = std::collections::HashMap::new();
    for (name, view) in st.tensors() {
        let v: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        m.insert(name, (view.shape().to_vec(), v));
    }
    (config, m)
}

#[test]
fn an_exported_checkpoint_holds_every_tensor_under_the_gpt2_mapping() {
    let (dir, ck, _) = grown_checkpoint("export-map");
    assert_ne!(ck.meta.stack, vec![0, 1, 2], "the run grew at the bottom: positions and ids differ");
    let out = dir.join("hf");
    let e = taproot::export::export(&ck, &out).unwrap();
    let (config, t) = read(&out);
    assert_eq!(config["n_layer"], 3);
    assert_eq!(config["n_embd"], 32);
    assert_eq!(config["n_head"], 2);
    assert_eq!(config["vocab_size"], 256);
    assert_eq!(config["activation_function"], "gelu_new");
    assert_eq!(e.tensors, t.len());
    assert_eq!(t.len(), 2 + 12 * 3 + 2);
    let dims = Dims::new(256, 32, 32, 2);
    let bl = Block::<CpuBackend>::layout(&dims);
    let c = 32;
    for (pos, id) in ck.meta.stack.iter().enumerate() {
        let u = ck.unit(UnitKey::Layer(*id)).unwrap();
        let part = |name: &str| bl.slice(&u.params, name).to_vec();
        // Conv1D (in, out): element [i][o] is taproot's w[o][i].
        let (shape, qkv) = &t[&format!("transformer.h.{pos}.attn.c_attn.weight")];
        assert_eq!(shape, &vec![c, 3 * c]);
        let w = part("qkvw");
        for o in 0..3 * c {
            for i in 0..c {
                assert_eq!(qkv[i * 3 * c + o].to_bits(), w[o * c + i].to_bits(), "layer {id} at position {pos}: c_attn[{i}][{o}]");
            }
        }
        let (_, proj) = &t[&format!("transformer.h.{pos}.mlp.c_proj.weight")];
        let w = part("fcprojw");
        for o in 0..c {
            for i in 0..4 * c {
                assert_eq!(proj[i * c + o].to_bits(), w[o * 4 * c + i].to_bits());
            }
        }
        assert_eq!(t[&format!("transformer.h.{pos}.ln_1.weight")].1, part("ln1w"));
        assert_eq!(t[&format!("transformer.h.{pos}.mlp.c_fc.bias")].1, part("fcb"));
    }
    let embed = ck.unit(UnitKey::Embed).unwrap();
    assert_eq!(t["transformer.wte.weight"].1, embed.params[..256 * c].to_vec());
    assert!(!t.contains_key("lm_head.weight"), "the head is tied: no separate copy");
}

#[test]
fn the_exported_model_has_taproots_loss_under_an_independent_numpy_reference() {
    check_numpy_reference("export-numpy", |t| t);
}

#[test]
fn a_depth_mup_model_exports_with_its_branch_multiplier_folded_in() {
    // GPT-2 has no residual multiplier: the export folds α = 1/sqrt(3) into the projections, and
    // the reference (which knows nothing of α) still computes taproot's loss.
    check_numpy_reference("export-mup", |t| t.set("model.parameterization", "depth_mup"));
}

#[test]
fn an_exported_llama_model_has_taproots_loss_under_an_independent_numpy_reference() {
    // Grouped-query attention, rotary positions, SwiGLU, an untied head.
    check_numpy_reference("export-llama", |t| t.set("model.arch", "\"llama\"").heads(4).set("model.kv_heads", 2));
}

#[test]
fn an_exported_qwen3_model_has_taproots_loss_under_an_independent_numpy_reference() {
    // QK-norm, a tied head, θ and ε of its own, and depth-µP's multiplier folded in.
    check_numpy_reference("export-qwen3", |t| {
        t.set("model.arch", "\"qwen3\"")
            .heads(4)
            .set("model.kv_heads", 1)
            .set("model.tie_embeddings", true)
            .set("model.rope_theta", 1000.0)
            .set("model.norm_eps", 1e-5)
            .set("model.parameterization", "\"depth_mup\"")
    });
}

#[test]
fn exported_mixtral_and_qwen3_moe_models_have_taproots_loss_under_the_numpy_reference() {
    // Mixtral: MoE in every layer. Qwen3-MoE: the bottom layer dense (mlp_only_layers).
    check_numpy_reference("export-mixtral", |t| {
        t.set("model.arch", "\"llama\"")
            .heads(4)
            .set("model.kv_heads", 2)
            .extra("[model.moe]\nexperts = 4\ntop_k = 2\nexpert_hidden = 24\n")
    });
    check_numpy_reference("export-qwen3-moe", |t| {
        t.set("model.arch", "\"qwen3\"")
            .heads(4)
            .set("model.parameterization", "\"depth_mup\"")
            .extra("[model.moe]\nexperts = 4\ntop_k = 2\nexpert_hidden = 24\nfirst_dense_layers = 1\n")
    });
}

/// MoE folders import back bit for bit; what no class computes is refused with the reason.
#[test]
fn moe_folders_import_back_bit_exactly_and_unexportable_mixtures_are_refused() {
    let change = |t: TestConfig| {
        t.set("model.arch", "\"qwen3\"").heads(4).extra("[model.moe]\nexperts = 4\ntop_k = 2\nexpert_hidden = 24\nfirst_dense_layers = 1\n")
    };
    let (dir, ck, _) = grown_checkpoint_with("export-moe-import", change);
    let out = dir.join("hf");
    assert_eq!(taproot::export::export(&ck, &out).unwrap().class, "Qwen3MoeForCausalLM");
    let (config, t) = read(&out);
    assert_eq!(config["mlp_only_layers"], serde_json::json!([0]));
    assert!(t.contains_key("model.layers.0.mlp.gate_proj.weight") && t.contains_key("model.layers.2.mlp.experts.3.down_proj.weight"));
    let next = change(TestConfig::new(&dir).name("moe-imported").steps(10).seq_len(32).channels(32).depth(3));
    let back = taproot::export::import(&out, &next.build(), taproot::data::LoaderState { rng: 1, ..Default::default() }).unwrap();
    for (pos, id) in ck.meta.stack.iter().enumerate() {
        let (a, b) = (&ck.unit(UnitKey::Layer(*id)).unwrap().params, &back.unit(UnitKey::Layer(pos as u64)).unwrap().params);
        assert!(a.len() == b.len() && a.iter().zip(b.iter()).all(|(x, y)| x.to_bits() == y.to_bits()), "layer {id}");
    }
    let (_, ck, _) = grown_checkpoint_with("export-moe-sigmoid", |t| {
        t.set("model.arch", "\"llama\"").extra("[model.moe]\nexperts = 4\ntop_k = 2\nrouting = \"sigmoid\"\n")
    });
    let err = format!("{:#}", taproot::export::export(&ck, &dir.join("hf-sigmoid")).unwrap_err());
    assert!(err.contains("no transformers class") && err.contains("Sigmoid"), "{err}");
}

fn check_numpy_reference(tag: &str, change: impl Fn(TestConfig) -> TestConfig) {
    let python_ok = std::process::Command::new("python3").args(["-c", "import numpy"]).status().is_ok_and(|s| s.success());
    if !python_ok {
        if std::env::var("TAPROOT_REQUIRE_NUMPY").is_ok() {
            panic!("TAPROOT_REQUIRE_NUMPY is set but python3 cannot import numpy (PYTHONPATH)");
        }
        println!("SKIP: python3 with numpy not found");
        return;
    }
    let (dir, ck, cfg) = grown_checkpoint_with(tag, change);
    let out = dir.join("hf");
    taproot::export::export(&ck, &out).unwrap();
    // taproot's loss on one batch, with the checkpoint's weights in stack order.
    let be = CpuBackend::default();
    let mut model = model_of(&be, &ck, &taproot::train::dims_of(&cfg, 256));
    let data = Dataset::open(&dir, 256).unwrap();
    let (b, t) = (4, 32);
    let windows: Vec<u32> = data.val.window(0, b * (t + 1)).unwrap();
    let batch = Batch::from_windows(&be, &windows, b, t);
    let ours = model.eval_loss(&be, &batch) as f64;
    let wfile = dir.join("windows.json");
    let rows: Vec<&[u32]> = windows.chunks(t + 1).collect();
    std::fs::write(&wfile, serde_json::to_string(&rows).unwrap()).unwrap();
    let script = if cfg.model.arch == taproot::model::Arch::Gpt2 { "scripts/hf_gpt2_loss.py" } else { "scripts/hf_llama_loss.py" };
    let o = std::process::Command::new("python3").arg(script).arg(&out).arg(&wfile).output().unwrap();
    assert!(o.status.success(), "the reference failed: {}", String::from_utf8_lossy(&o.stderr));
    let theirs: f64 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    let rel = ((ours - theirs) / theirs).abs();
    println!("taproot {ours:.7} numpy reference {theirs:.7} relative {rel:.2e}");
    assert!(rel < 1e-5, "taproot {ours} against the numpy reference {theirs}");
}

#[test]
fn export_from_the_command_line() {
    let (dir, _, cfg) = grown_checkpoint("export-cli");
    let bin = env!("CARGO_BIN_EXE_taproot");
    let out = dir.join("hf-cli");
    let o = std::process::Command::new(bin).args(["export"]).arg(cfg.checkpoint_dir()).arg("--out").arg(&out).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains("exported 3 layers"), "{text}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("model.safetensors").is_file() && out.join("config.json").is_file());
    let o = std::process::Command::new(bin).args(["export", "no/such/checkpoint", "--out"]).arg(&out).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("no/such/checkpoint"), "{err}");
}

/// Export, then `taproot import` into a new run: every weight comes back bit for bit (layers by
/// stack position, the vocabulary's padding rows zero, fresh optimizer state), `taproot train
/// --resume` trains it on and grows it, starting from the imported model's loss rather than a
/// fresh model's, and a folder that does not match the config is an error naming the key.
#[test]
fn an_exported_model_imports_back_bit_exactly_and_trains_and_grows() {
    let (dir, ck, _) = grown_checkpoint("export-import");
    let hf = dir.join("hf");
    taproot::export::export(&ck, &hf).unwrap();
    let bin = env!("CARGO_BIN_EXE_taproot");
    let next = TestConfig::new(&dir).name("imported").steps(10).seq_len(32).channels(32).depth(3).target_depth(4).grow_at_step(5, 4);
    let path = next.write();
    let o = std::process::Command::new(bin).arg("import").arg(&hf).arg("--config").arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains("imported 3 layers"), "{text}{}", String::from_utf8_lossy(&o.stderr));
    let cfg = next.build();
    let (back, _, _) = checkpoint::load_newest_valid(&cfg.checkpoint_dir()).unwrap().expect("the imported checkpoint");
    assert_eq!(back.meta.step, 0);
    assert_eq!(back.meta.stack, vec![0, 1, 2]);
    for (pos, id) in ck.meta.stack.iter().enumerate() {
        let (a, b) = (&ck.unit(UnitKey::Layer(*id)).unwrap().params, &back.unit(UnitKey::Layer(pos as u64)).unwrap().params);
        assert!(a.iter().zip(b.iter()).all(|(x, y)| x.to_bits() == y.to_bits()) && a.len() == b.len(), "layer {id} (position {pos})");
        assert!(back.unit(UnitKey::Layer(pos as u64)).unwrap().m.iter().all(|&m| m == 0.0), "fresh optimizer state");
    }
    for key in [UnitKey::Embed, UnitKey::Head] {
        assert_eq!(ck.unit(key).unwrap().params, back.unit(key).unwrap().params, "{key}");
    }
    // Train on from it, through a growth 3 -> 4.
    let o = std::process::Command::new(bin).args(["train", "--resume", "--config"]).arg(&path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{text}");
    let steps = std::fs::read_to_string(cfg.out_dir().join("steps.csv")).unwrap();
    let rows: Vec<Vec<String>> = steps.lines().skip(1).map(|l| l.split(',').map(str::to_string).collect()).collect();
    assert_eq!(rows.len(), 10);
    assert_eq!(rows.last().unwrap()[1], "4", "the imported model grew to 4 blocks");
    let first: f32 = rows[0][3].parse().unwrap();
    println!("first loss after import {first:.4} (a fresh model starts near ln 256 = 5.55)");
    assert!(first < 4.0, "the first step's loss {first} is a fresh model's: the weights were not imported");
    // A config that does not match the folder.
    let wrong = TestConfig::new(&dir).name("wrong").steps(10).seq_len(32).channels(64).depth(3).write();
    let o = std::process::Command::new(bin).arg("import").arg(&hf).arg("--config").arg(&wrong).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("n_embd"), "{err}");
}

/// A LLaMA-kind model's folder holds every tensor under the documented mapping (q, k, v and
/// gate, up split by rows, nothing transposed), imports back bit for bit, and the import refuses
/// a config that does not match the folder, naming the key.
#[test]
fn llama_and_qwen3_folders_hold_the_mapping_and_import_back_bit_exactly() {
    for (kind, class) in [("llama", "LlamaForCausalLM"), ("qwen3", "Qwen3ForCausalLM")] {
        let change =
            |t: TestConfig| t.set("model.arch", format!("\"{kind}\"")).heads(4).set("model.kv_heads", 2).set("model.ffn_hidden", 40);
        let (dir, ck, cfg) = grown_checkpoint_with(&format!("export-{kind}"), change);
        let out = dir.join("hf");
        let e = taproot::export::export(&ck, &out).unwrap();
        assert_eq!(e.class, class);
        let (config, t) = read(&out);
        assert_eq!((config["model_type"].as_str(), config["num_key_value_heads"].as_u64()), (Some(kind), Some(2)));
        assert_eq!((config["intermediate_size"].as_u64(), config["head_dim"].as_u64()), (Some(40), Some(8)));
        let per_layer = if kind == "qwen3" { 11 } else { 9 };
        assert_eq!(t.len(), 1 + per_layer * 3 + 1 + 1, "embedding, layers, norm, lm_head");
        let dims = taproot::train::dims_of(&cfg, 256);
        let bl = Block::<CpuBackend>::layout(&dims);
        let (c, hd) = (32, 8);
        for (pos, id) in ck.meta.stack.iter().enumerate() {
            let u = ck.unit(UnitKey::Layer(*id)).unwrap();
            let qkv = bl.slice(&u.params, "qkvw");
            let k = &t[&format!("model.layers.{pos}.self_attn.k_proj.weight")];
            assert_eq!(k.0, vec![2 * hd, c]);
            assert_eq!(k.1, qkv[4 * hd * c..6 * hd * c].to_vec(), "k_proj is the rows after q's");
            let up = &t[&format!("model.layers.{pos}.mlp.up_proj.weight")];
            assert_eq!(up.1, bl.slice(&u.params, "gate_upw")[40 * c..].to_vec(), "up_proj is the second half");
        }
        // Import it back into a run of the same shape: every unit bit for bit.
        let next = change(TestConfig::new(&dir).name(&format!("{kind}-imported")).steps(10).seq_len(32).channels(32).depth(3));
        let back = taproot::export::import(&out, &next.build(), taproot::data::LoaderState { rng: 1, ..Default::default() }).unwrap();
        for (pos, id) in ck.meta.stack.iter().enumerate() {
            let (a, b) = (&ck.unit(UnitKey::Layer(*id)).unwrap().params, &back.unit(UnitKey::Layer(pos as u64)).unwrap().params);
            assert!(a.len() == b.len() && a.iter().zip(b.iter()).all(|(x, y)| x.to_bits() == y.to_bits()), "{kind} layer {id}");
        }
        for key in [UnitKey::Embed, UnitKey::Head] {
            assert_eq!(ck.unit(key).unwrap().params, back.unit(key).unwrap().params, "{kind} {key}");
        }
        // Mismatches name the folder's key.
        for (wrong, key) in [
            (next.clone().set("model.kv_heads", 4), "num_key_value_heads"),
            (next.clone().set("model.ffn_hidden", 48), "intermediate_size"),
            (next.clone().set("model.rope_theta", 500.0), "rope_theta"),
            (next.clone().set("model.tie_embeddings", true), "tie_word_embeddings"),
            (next.clone().set("model.arch", if kind == "llama" { "\"qwen3\"" } else { "\"llama\"" }), "model_type"),
        ] {
            let err = format!(
                "{:#}",
                taproot::export::import(&out, &wrong.build(), taproot::data::LoaderState { rng: 1, ..Default::default() }).unwrap_err()
            );
            assert!(err.contains(key), "{kind}: {err}");
        }
    }
}
