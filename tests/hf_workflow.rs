//! The Hugging Face round trip as a user runs it: a small Qwen3 model and its tokenizer written
//! in the layout `save_pretrained` of transformers 5 writes (by this test, no hub), imported,
//! trained on JSONL prepared with that tokenizer, grown in depth mid-run, exported with its
//! tokenizer, and its loss recomputed by the numpy reference; and the folder options taproot
//! does not implement, refused by name.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use taproot::rng::Rng;

const BIN: &str = env!("CARGO_BIN_EXE_taproot");

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("taproot-hfwf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> String {
    let o = Command::new(BIN).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "taproot {args:?} failed:\n{text}");
    text
}

const C: usize = 32;
const HEADS: usize = 4;
const KV: usize = 2;
const HD: usize = 8;
const F: usize = 48;
const LAYERS: usize = 2;
const POSITIONS: usize = 64;

/// A Qwen3ForCausalLM folder as transformers 5 writes it: `rope_parameters`, `layer_types`,
/// a vocabulary padded past the tokenizer's ids, random weights.
fn qwen3_folder(dir: &Path, vocab: usize) -> serde_json::Value {
    let config = serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab,
        "hidden_size": C,
        "intermediate_size": F,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "head_dim": HD,
        "hidden_act": "silu",
        "max_position_embeddings": POSITIONS,
        "rms_norm_eps": 1e-6,
        "rope_parameters": { "rope_theta": 10000.0, "rope_type": "default" },
        "attention_bias": false,
        "attention_dropout": 0.0,
        "use_sliding_window": false,
        "sliding_window": null,
        "layer_types": vec!["full_attention"; LAYERS],
        "tie_word_embeddings": false,
        "dtype": "float32",
        "transformers_version": "5.0.0",
    });
    let mut rng = Rng::new(7);
    let mut t: Vec<(String, taproot::export::folder::Tensor)> = Vec::new();
    let mut put = |name: String, shape: Vec<usize>, std: f64, rng: &mut Rng| {
        let n = shape.iter().product();
        let v: Vec<f32> = if std == 0.0 { vec![1.0; n] } else { common::randn(rng, n, std) };
        t.push((name, taproot::export::folder::tensor(shape, &v)));
    };
    put("model.embed_tokens.weight".into(), vec![vocab, C], 0.5, &mut rng);
    put("model.norm.weight".into(), vec![C], 0.0, &mut rng);
    put("lm_head.weight".into(), vec![vocab, C], 0.1, &mut rng);
    for i in 0..LAYERS {
        let l = |s: &str| format!("model.layers.{i}.{s}");
        put(l("input_layernorm.weight"), vec![C], 0.0, &mut rng);
        put(l("post_attention_layernorm.weight"), vec![C], 0.0, &mut rng);
        put(l("self_attn.q_proj.weight"), vec![HEADS * HD, C], 0.1, &mut rng);
        put(l("self_attn.k_proj.weight"), vec![KV * HD, C], 0.1, &mut rng);
        put(l("self_attn.v_proj.weight"), vec![KV * HD, C], 0.1, &mut rng);
        put(l("self_attn.o_proj.weight"), vec![C, HEADS * HD], 0.1, &mut rng);
        put(l("self_attn.q_norm.weight"), vec![HD], 0.0, &mut rng);
        put(l("self_attn.k_norm.weight"), vec![HD], 0.0, &mut rng);
        put(l("mlp.gate_proj.weight"), vec![F, C], 0.1, &mut rng);
        put(l("mlp.up_proj.weight"), vec![F, C], 0.1, &mut rng);
        put(l("mlp.down_proj.weight"), vec![C, F], 0.1, &mut rng);
    }
    let views: Vec<(String, &taproot::export::folder::Tensor)> = t.iter().map(|(k, v)| (k.clone(), v)).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    config
}

fn run_config(dir: &Path, model: &Path, shards: &Path, vocab: usize) -> common::TestConfig {
    common::TestConfig::new(shards)
        .name("qwen")
        .steps(10)
        .seq_len(16)
        .channels(C)
        .heads(HEADS)
        .depth(LAYERS)
        .target_depth(LAYERS + 1)
        .grow_at_step(5, LAYERS + 1)
        .eval(5, 2)
        .set("run.out_dir", format!("\"{}\"", dir.join("run").display()))
        .set("model.arch", "\"qwen3\"")
        .set("model.kv_heads", KV)
        .set("model.ffn_hidden", F)
        .set("model.max_seq", POSITIONS)
        .set("model.rope_theta", 10000.0)
        .set("model.norm_eps", 1e-6)
        .set("model.tie_embeddings", false)
        .set("data.tokenizer", format!("\"hf:{}\"", model.display()))
        .set("data.vocab_size", vocab)
}

fn numpy_loss(folder: &Path, windows: &[Vec<u32>], dir: &Path) -> Option<f64> {
    if !Command::new("python3").args(["-c", "import numpy"]).status().is_ok_and(|s| s.success()) {
        assert!(std::env::var("TAPROOT_REQUIRE_NUMPY").is_err(), "TAPROOT_REQUIRE_NUMPY is set but python3 cannot import numpy");
        println!("SKIP: python3 with numpy not found");
        return None;
    }
    let wfile = dir.join("windows.json");
    std::fs::write(&wfile, serde_json::to_string(windows).unwrap()).unwrap();
    let o = Command::new("python3").arg("scripts/hf_llama_loss.py").arg(folder).arg(&wfile).output().unwrap();
    assert!(o.status.success(), "the reference failed: {}", String::from_utf8_lossy(&o.stderr));
    Some(String::from_utf8_lossy(&o.stdout).trim().parse().unwrap())
}

fn eval_loss(text: &str) -> f64 {
    text.split("loss ").nth(1).and_then(|s| s.split_whitespace().next()).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{text}"))
}

#[test]
fn import_train_on_jsonl_grow_export_and_the_numpy_reference_agrees() {
    let dir = tmp("flow");
    let model = dir.join("qwen3-tiny");
    let tok_file = common::hf_tokenizer(&model);
    let tok_vocab = taproot::data::Tokenizer::from_name(&format!("hf:{}", model.display())).unwrap().vocab_size();
    let vocab = tok_vocab + 14; // padded past the tokenizer, as released models are
    qwen3_folder(&model, vocab);
    // A JSONL corpus, prepared with the model's own tokenizer.
    let words = ["the", "cat", "sat", "on", "mat", "and", "dog", "log"];
    let mut rng = Rng::new(3);
    let mut jsonl = String::new();
    for _ in 0..400 {
        let n = 4 + (rng.next_u64() % 12) as usize;
        let text: Vec<&str> = (0..n).map(|_| words[(rng.next_u64() % 8) as usize]).collect();
        jsonl.push_str(&serde_json::json!({ "text": text.join(" "), "meta": 1 }).to_string());
        jsonl.push('\n');
    }
    std::fs::write(dir.join("corpus.jsonl"), jsonl).unwrap();
    let shards = dir.join("shards");
    let hf = format!("hf:{}", model.display());
    let out = run(&[
        "data",
        "prepare",
        dir.join("corpus.jsonl").to_str().unwrap(),
        "--out",
        shards.to_str().unwrap(),
        "--tokenizer",
        &hf,
        "--val-docs",
        "60",
    ]);
    assert!(out.contains("400 documents (60 for validation)"), "{out}");
    // The imported model before training: taproot's loss on the source folder is the reference's.
    let val = taproot::data::Dataset::open(&shards, vocab).unwrap().val;
    let t = 16;
    let windows: Vec<Vec<u32>> = (0..4).map(|k| val.window(k * t, t + 1).unwrap()).collect();
    let ours =
        eval_loss(&run(&["eval", model.to_str().unwrap(), "--data", shards.to_str().unwrap(), "--seq-len", "16", "--max-windows", "4"]));
    if let Some(theirs) = numpy_loss(&model, &windows, &dir) {
        println!("source folder: taproot eval {ours:.7}, numpy {theirs:.7}");
        assert!(((ours - theirs) / theirs).abs() < 1e-5, "taproot {ours} numpy {theirs} on the transformers-5 folder");
    }
    // Import, train on, grow 2 -> 3 at step 5, export the run folder.
    let cfg_path = run_config(&dir, &model, &shards, vocab).write();
    let text = run(&["import", model.to_str().unwrap(), "--config", cfg_path.to_str().unwrap()]);
    assert!(text.contains("imported 2 layers"), "{text}");
    let text = run(&["train", "--resume", "--config", cfg_path.to_str().unwrap()]);
    let steps = std::fs::read_to_string(dir.join("run").join("steps.csv")).unwrap();
    let last: Vec<&str> = steps.lines().last().unwrap().split(',').collect();
    assert_eq!((last[0], last[1]), ("10", "3"), "trained to step 10 at depth 3:\n{text}");
    let exported = dir.join("exported");
    let text = run(&["export", dir.join("run").to_str().unwrap(), "--out", exported.to_str().unwrap()]);
    assert!(text.contains("exported 3 layers") && text.contains("Qwen3ForCausalLM"), "{text}");
    // The tokenizer travelled: the same file, its config, and the special ids in the configs.
    assert_eq!(std::fs::read(exported.join("tokenizer.json")).unwrap(), std::fs::read(&tok_file).unwrap());
    assert!(exported.join("tokenizer_config.json").is_file());
    let tok = taproot::data::Tokenizer::from_name(&hf).unwrap();
    let eos = tok.eot().unwrap();
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(exported.join("config.json")).unwrap()).unwrap();
    let gen: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(exported.join("generation_config.json")).unwrap()).unwrap();
    assert_eq!((config["eos_token_id"].as_u64(), gen["eos_token_id"].as_u64()), (Some(eos as u64), Some(eos as u64)));
    assert!((config["bos_token_id"].as_u64().unwrap() as usize) < vocab);
    assert_eq!(config["vocab_size"].as_u64(), Some(vocab as u64));
    // Its loss: `taproot eval` on the exported folder, on the run folder, and numpy agree.
    let args = |m: &Path| {
        vec![
            "eval".to_string(),
            m.display().to_string(),
            "--data".into(),
            shards.display().to_string(),
            "--seq-len".into(),
            "16".into(),
            "--max-windows".into(),
            "4".into(),
        ]
    };
    let run_s = |a: Vec<String>| run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let from_folder = eval_loss(&run_s(args(&exported)));
    let from_run = eval_loss(&run_s(args(&dir.join("run"))));
    assert!(((from_folder - from_run) / from_run).abs() < 1e-6, "exported {from_folder} vs checkpoint {from_run}");
    assert!(from_run < ours, "training lowered the loss: {ours} -> {from_run}");
    if let Some(theirs) = numpy_loss(&exported, &windows, &dir) {
        println!("exported: taproot eval {from_folder:.7}, numpy {theirs:.7}");
        assert!(((from_folder - theirs) / theirs).abs() < 1e-5, "taproot {from_folder} numpy {theirs}");
    }
    // The exported folder samples with its own tokenizer, and is scored on text as well.
    let text = run(&["sample", exported.to_str().unwrap(), "--prompt", "the cat", "--tokens", "5", "--temperature", "0"]);
    assert!(text.starts_with("<s>the cat") || text.starts_with("the cat"), "{text}");
    std::fs::write(dir.join("held.jsonl"), "{\"text\": \"the dog sat on the log and the cat sat on the mat\"}\n").unwrap();
    let text = run(&["eval", exported.to_str().unwrap(), "--data", dir.join("held.jsonl").to_str().unwrap(), "--seq-len", "8"]);
    assert!(eval_loss(&text).is_finite(), "{text}");
}

fn refused(folder: &Path, cfg: &taproot::config::Config, change: impl Fn(&mut serde_json::Value)) -> String {
    let path = folder.join("config.json");
    let orig = std::fs::read_to_string(&path).unwrap();
    let mut j: serde_json::Value = serde_json::from_str(&orig).unwrap();
    change(&mut j);
    std::fs::write(&path, j.to_string()).unwrap();
    let r = taproot::export::import(folder, cfg, Default::default());
    std::fs::write(&path, orig).unwrap();
    match r {
        Ok(_) => panic!("the import must be refused"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn folder_options_taproot_does_not_implement_are_refused_by_name() {
    let dir = tmp("refuse");
    let model = dir.join("m");
    common::hf_tokenizer(&model);
    let vocab = taproot::data::Tokenizer::from_name(&format!("hf:{}", model.display())).unwrap().vocab_size();
    qwen3_folder(&model, vocab);
    let shards = taproot::data::synthetic::word_corpus(&dir.join("d")).map(|_| dir.join("d")).unwrap();
    let cfg = run_config(&dir, &model, &shards, vocab).build();
    taproot::export::import(&model, &cfg, Default::default()).expect("the transformers-5 folder imports");
    type Change = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Change)> = vec![
        ("rope_parameters.rope_type", Box::new(|j| j["rope_parameters"]["rope_type"] = "yarn".into())),
        ("rope_scaling.rope_type", Box::new(|j| j["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 2.0}))),
        ("use_sliding_window", Box::new(|j| j["use_sliding_window"] = true.into())),
        ("layer_types[1]", Box::new(|j| j["layer_types"][1] = "sliding_attention".into())),
        ("rms_norm_eps", Box::new(|j| j["rms_norm_eps"] = 1e-5.into())),
        ("rope_theta", Box::new(|j| j["rope_parameters"]["rope_theta"] = 500000.0.into())),
    ];
    for (key, change) in cases {
        let e = refused(&model, &cfg, change);
        assert!(e.contains(&format!("`{key}`")), "{key}: {e}");
    }
    // A run that names another hf: tokenizer than the folder's own.
    let other = dir.join("other-tok");
    std::fs::create_dir_all(&other).unwrap();
    let text = std::fs::read_to_string(model.join("tokenizer.json")).unwrap().replacen("\"<s>\"", "\"<S>\"", 1);
    std::fs::write(other.join("tokenizer.json"), text).unwrap();
    let wrong = run_config(&dir, &other, &shards, vocab).build();
    let e = match taproot::export::import(&model, &wrong, Default::default()) {
        Ok(_) => panic!("another tokenizer must be refused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("is not the tokenizer the run names"), "{e}");
    // The 4.x spelling reads the same.
    let e = refused(&model, &cfg, |j| {
        j.as_object_mut().unwrap().remove("rope_parameters");
        j["rope_theta"] = 10000.0.into();
        j["hidden_size"] = 64.into(); // and then fails on the next key, proving rope_theta was read
    });
    assert!(e.contains("`hidden_size`"), "{e}");
    // A Mistral-style window shorter than the positions.
    let e = refused(&model, &cfg, |j| {
        j.as_object_mut().unwrap().remove("use_sliding_window");
        j["sliding_window"] = 16.into();
    });
    assert!(e.contains("`sliding_window` = 16"), "{e}");
}

#[test]
fn gpt2_folder_flags_that_change_the_function_are_refused() {
    let (dir, ck, cfg) = common::grown_checkpoint("hfwf-gpt2");
    let out = dir.join("hf");
    taproot::export::export(&ck, &out).unwrap();
    let next = common::TestConfig::new(&dir).name("back").steps(10).seq_len(32).channels(32).depth(3).build();
    taproot::export::import(&out, &next, Default::default()).expect("the exported folder imports");
    let _ = cfg;
    for (key, value) in [
        ("scale_attn_by_inverse_layer_idx", serde_json::json!(true)),
        ("reorder_and_upcast_attn", serde_json::json!(true)),
        ("scale_attn_weights", serde_json::json!(false)),
        ("layer_norm_epsilon", serde_json::json!(1e-6)),
    ] {
        let e = refused(&out, &next, |j| j[key] = value.clone());
        assert!(e.contains(&format!("`{key}`")), "{key}: {e}");
    }
}

#[test]
fn exported_tokenizers_encode_as_taproot_does() {
    let text = "Hello world! It's 2026, and naïve café-goers say \"hi\" \n\n  twice.<|endoftext|>";
    let gpt2 = taproot::export::tokenizer::gpt2_tokenizer().unwrap();
    let ours = taproot::data::Tokenizer::from_name("gpt2").unwrap();
    let enc = gpt2.encode(text, false).unwrap();
    let mut want = ours.encode(&text[..text.len() - 13]);
    want.push(50256);
    assert_eq!(enc.get_ids(), &want[..], "GPT-2's tokenizer.json rebuilt from the ranks encodes as tiktoken does");
    assert_eq!(gpt2.get_vocab_size(true), 50257);
    assert_eq!(gpt2.decode(&want, false).unwrap(), text);
    let bytes = taproot::export::tokenizer::bytes_tokenizer().unwrap();
    let enc = bytes.encode("héllo\n", false).unwrap();
    assert_eq!(enc.get_ids(), "héllo\n".bytes().map(u32::from).collect::<Vec<_>>());
    assert_eq!(bytes.decode(enc.get_ids(), false).unwrap(), "héllo\n");
}

/// `python3 scripts/hf_transformers_check.py ARGS` when `transformers` imports (CI installs it; a
/// missing one skips with a printed reason unless TAPROOT_REQUIRE_TRANSFORMERS is set).
fn transformers(args: &[&str]) -> Option<String> {
    if !Command::new("python3").args(["-c", "import transformers"]).status().is_ok_and(|s| s.success()) {
        assert!(
            std::env::var("TAPROOT_REQUIRE_TRANSFORMERS").is_err(),
            "TAPROOT_REQUIRE_TRANSFORMERS is set but python3 cannot import transformers (PYTHONPATH)"
        );
        println!("SKIP: python3 with transformers not found");
        return None;
    }
    let o = Command::new("python3").arg("scripts/hf_transformers_check.py").args(args).output().unwrap();
    assert!(o.status.success(), "transformers {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    Some(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// `AutoTokenizer` loads the tokenizers `export` writes and encodes as taproot does, and
/// `AutoConfig` reads the special ids.
#[test]
fn transformers_loads_the_exported_tokenizers() {
    let text = "Hello, world! naïve café\n\n  twice";
    let (dir, ck, _) = common::grown_checkpoint("hfwf-autotok");
    let out = dir.join("hf");
    taproot::export::export(&ck, &out).unwrap();
    let Some(got) = transformers(&["tokenize", out.to_str().unwrap(), text]) else { return };
    let j: serde_json::Value = serde_json::from_str(&got).unwrap();
    let want: Vec<u64> = text.bytes().map(u64::from).collect();
    assert_eq!(j["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect::<Vec<_>>(), want, "bytes: id = byte");
    assert!(j["eos"].is_null() && j["config_eos"].is_null(), "{j}");
    let g = dir.join("gpt2-tok");
    run(&["data", "tokenizer", "gpt2", "--out", g.to_str().unwrap()]);
    let j: serde_json::Value = serde_json::from_str(&transformers(&["tokenize", g.to_str().unwrap(), text]).unwrap()).unwrap();
    let ours = taproot::data::Tokenizer::from_name("gpt2").unwrap().encode(text);
    let theirs: Vec<u32> = j["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(theirs, ours, "AutoTokenizer on the exported GPT-2 tokenizer encodes as taproot's gpt2");
    assert_eq!(j["eos"].as_u64(), Some(50256));
    let m = dir.join("hf-tok");
    common::hf_tokenizer(&m);
    let hf = taproot::data::Tokenizer::from_name(&format!("hf:{}", m.display())).unwrap();
    let j: serde_json::Value = serde_json::from_str(&transformers(&["tokenize", m.to_str().unwrap(), "the cat sat"]).unwrap()).unwrap();
    let theirs: Vec<u32> = j["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(theirs, hf.encode("the cat sat"));
    assert_eq!(j["eos"].as_u64(), hf.eot().map(u64::from));
}

/// Configs as transformers' own configuration classes write them today: a Qwen3 folder imports,
/// and LLaMA and Qwen3-MoE configs read as the run they describe.
#[test]
fn configs_written_by_transformers_are_read() {
    let dir = tmp("autoconfig");
    let model = dir.join("qwen3");
    common::hf_tokenizer(&model);
    let vocab = taproot::data::Tokenizer::from_name(&format!("hf:{}", model.display())).unwrap().vocab_size();
    qwen3_folder(&model, vocab);
    let sizes = |extra: &[String]| -> Vec<String> {
        let mut v = vec![
            format!("vocab_size={vocab}"),
            format!("hidden_size={C}"),
            format!("intermediate_size={F}"),
            format!("num_hidden_layers={LAYERS}"),
            format!("num_attention_heads={HEADS}"),
            format!("num_key_value_heads={KV}"),
            format!("head_dim={HD}"),
            format!("max_position_embeddings={POSITIONS}"),
            "rms_norm_eps=1e-6".into(),
            "tie_word_embeddings=false".into(),
        ];
        v.extend_from_slice(extra);
        v
    };
    let call = |kind: &str, out: &Path, extra: &[String]| {
        let mut a = vec!["config".to_string(), kind.to_string(), out.display().to_string()];
        a.extend(sizes(extra));
        transformers(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let Some(version) = call("qwen3", &model, &[]) else { return };
    let written = std::fs::read_to_string(model.join("config.json")).unwrap();
    println!("transformers {version} wrote: {written}");
    let shards = taproot::data::synthetic::word_corpus(&dir.join("d")).map(|_| dir.join("d")).unwrap();
    let cfg = run_config(&dir, &model, &shards, vocab).build();
    taproot::export::import(&model, &cfg, Default::default()).expect("the config transformers wrote imports");
    let llama = dir.join("llama");
    common::hf_tokenizer(&llama);
    call("llama", &llama, &[]).unwrap();
    let c = taproot::export::config_of_folder(&llama).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!((c.model.arch, c.model.depth, c.model.kv_heads), (taproot::model::Arch::Llama, LAYERS, Some(KV)));
    let moe = dir.join("moe");
    common::hf_tokenizer(&moe);
    call(
        "qwen3_moe",
        &moe,
        &["num_experts=4".into(), "num_experts_per_tok=2".into(), "moe_intermediate_size=16".into(), "norm_topk_prob=true".into()],
    )
    .unwrap();
    let c = taproot::export::config_of_folder(&moe).unwrap_or_else(|e| panic!("{e:#}"));
    let m = c.model.moe.as_ref().expect("experts");
    assert_eq!((m.experts, m.top_k), (4, 2));
}
