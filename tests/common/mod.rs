//! Shared helpers of the integration tests: a small synthetic byte corpus, test configs of the
//! tiny model ([`TestConfig`]), CPU buffers, the GPU where there is one, and a bf16 count.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use taproot::backend::cpu::CpuBackend;
use taproot::backend::Backend;
use taproot::config::Config;
use taproot::rng::Rng;

/// The synthetic byte corpus (`taproot::data::synthetic`), as shards in a fresh temp dir unique
/// to `tag`.
pub fn synthetic_dataset(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("taproot-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    taproot::data::synthetic::word_corpus(&dir).unwrap();
    dir
}

/// A test config of the tiny model, built in code: a TOML table that starts as the tiny
/// preset below, changed key by key, and parsed by [`Config::parse`] like any config file.
///
/// The preset ([`TestConfig::new`]): run `tiny` with `log_every = 0` and `out_dir =
/// <dir>/<name>`; the byte corpus in `dir` (`tokenizer = "bytes"`), B = 4, T = 16; C = 32,
/// 2 heads, depth 0 (the target depth follows the growth plan); `eval` every 10 steps on 3 batches. `run.steps` has no
/// default: every test says how long it trains. Only the keys set here are in the TOML (the
/// rest take the parser's defaults), and [`TestConfig::unset`] takes one out again.
///
/// ```ignore
/// let cfg = TestConfig::new(&dir).name("grow").steps(40).grow_at(0.5, 4).devices(&["cpu:0", "cpu:1"]).build();
/// let path = TestConfig::new(&dir).name("cli").steps(40).checkpoint_every(10).write(); // <dir>/cli.toml
/// ```
#[derive(Clone, Debug)]
pub struct TestConfig {
    dir: PathBuf,
    root: toml::Table,
    /// `run.out_dir` is `<dir>/<run.name>` unless set or unset explicitly.
    out_dir_in_dir: bool,
}

impl TestConfig {
    /// The tiny preset over the corpus in `dir` (see the type's docs).
    pub fn new(dir: &Path) -> Self {
        let c = TestConfig { dir: dir.to_path_buf(), root: toml::Table::new(), out_dir_in_dir: true };
        c.name("tiny")
            .put("run.log_every", 0)
            .put("data.dir", dir.display().to_string())
            .put("data.tokenizer", "bytes")
            .batch_size(4)
            .seq_len(16)
            .channels(32)
            .heads(2)
            .depth(0)
            .eval(10, 3)
    }

    pub fn name(self, name: &str) -> Self {
        self.put("run.name", name)
    }
    pub fn steps(self, steps: u64) -> Self {
        self.put("run.steps", steps as i64)
    }
    pub fn batch_size(self, b: usize) -> Self {
        self.put("data.batch_size", b as i64)
    }
    pub fn seq_len(self, t: usize) -> Self {
        self.put("data.seq_len", t as i64)
    }
    pub fn micro_batches(self, m: usize) -> Self {
        self.put("data.micro_batches", m as i64)
    }
    pub fn channels(self, c: usize) -> Self {
        self.put("model.channels", c as i64)
    }
    pub fn heads(self, h: usize) -> Self {
        self.put("model.heads", h as i64)
    }
    /// Blocks at step 0.
    pub fn depth(self, d: usize) -> Self {
        self.put("model.depth", d as i64)
    }
    pub fn target_depth(self, d: usize) -> Self {
        self.put("model.target_depth", d as i64)
    }
    /// `schedule.lr`.
    pub fn lr(self, lr: f64) -> Self {
        self.put("schedule.lr", lr)
    }
    /// `eval.every` and `eval.batches`.
    pub fn eval(self, every: u64, batches: usize) -> Self {
        self.put("eval.every", every as i64).put("eval.batches", batches as i64)
    }
    pub fn checkpoint_every(self, steps: u64) -> Self {
        self.put("checkpoint.every", steps as i64)
    }
    pub fn checkpoint_keep(self, n: usize) -> Self {
        self.put("checkpoint.keep", n as i64)
    }
    /// `placement.devices`.
    pub fn devices(self, devices: &[&str]) -> Self {
        self.put("placement.devices", toml::Value::Array(devices.iter().map(|d| toml::Value::from(*d)).collect()))
    }
    /// A `[[growth]]` entry at a fraction `at` of the run.
    pub fn grow_at(self, at: f64, to_depth: usize) -> Self {
        self.grow("at", toml::Value::from(at), to_depth)
    }
    /// A `[[growth]]` entry at an absolute step.
    pub fn grow_at_step(self, step: u64, to_depth: usize) -> Self {
        self.grow("at_step", toml::Value::from(step as i64), to_depth)
    }
    /// The `init` of the last `[[growth]]` entry (`copying`, `copying_zero`, `zero`, ...).
    pub fn growth_init(mut self, init: &str) -> Self {
        let last = self.growth().last_mut().and_then(toml::Value::as_table_mut).expect("growth_init: no [[growth]] entry yet");
        last.insert("init".into(), init.into());
        self
    }

    /// `--set`-style: `key` is a dotted path (`daemon.linger_s`, `placement.policy`), the value
    /// (as `Display` writes it: `1.0_f64` is `1`) is read as a TOML value and, where it is not
    /// one (a bare word), as a string.
    pub fn set(self, key: &str, value: impl std::fmt::Display) -> Self {
        let raw = value.to_string();
        let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
            Ok(mut t) => t.remove("v").expect("parsed a table with key v"),
            Err(_) => toml::Value::String(raw),
        };
        self.put(key, value)
    }

    /// Take a key (`run.log_every`) or a whole section (`eval`) out of the TOML, so that the
    /// parser's default applies; `run.out_dir` unset means the default `runs/<name>`. Panics on
    /// a key that is not there (except `run.out_dir`, which `text` fills in).
    pub fn unset(mut self, key: &str) -> Self {
        if key == "run" || key == "run.out_dir" {
            self.out_dir_in_dir = false;
        }
        let (parent, last) = match key.rsplit_once('.') {
            Some((p, l)) => (Some(p), l),
            None => (None, key),
        };
        let table = match parent {
            None => Some(&mut self.root),
            Some(p) => p.split('.').try_fold(&mut self.root, |t, k| t.get_mut(k)?.as_table_mut()),
        };
        let removed = table.and_then(|t| t.remove(last));
        assert!(removed.is_some() || key == "run.out_dir", "unset: {key} is not set");
        self
    }

    /// More TOML (whole sections, such as `[faults]` or `[daemon]`), merged in: its sections
    /// join those already there (a key given twice takes the new value), its `[[growth]]`
    /// entries come after those already there.
    pub fn extra(mut self, text: &str) -> Self {
        let more: toml::Table = toml::from_str(text).unwrap_or_else(|e| panic!("extra TOML {text:?}: {e}"));
        merge(&mut self.root, more);
        self
    }

    /// The TOML text of the config, its sections in the usual order.
    pub fn text(&self) -> String {
        let mut root = self.root.clone();
        if self.out_dir_in_dir {
            let name = root["run"]["name"].as_str().expect("run.name").to_string();
            let run = root["run"].as_table_mut().expect("[run] is a table");
            run.entry("out_dir").or_insert_with(|| self.dir.join(name).display().to_string().into());
        }
        let first = ["run", "data", "model", "optim", "schedule", "eval", "checkpoint", "placement", "pipeline"];
        let mut keys: Vec<String> = first.iter().map(|k| k.to_string()).filter(|k| root.contains_key(k)).collect();
        keys.extend(root.keys().filter(|k| !first.contains(&k.as_str()) && *k != "growth").cloned());
        keys.extend(root.contains_key("growth").then(|| "growth".to_string()));
        keys.iter()
            .map(|k| {
                let mut one = toml::Table::new();
                one.insert(k.clone(), root[k].clone());
                toml::to_string(&one).unwrap()
            })
            .collect()
    }

    /// The parsed (and validated) config; panics with the parser's error.
    pub fn build(&self) -> Config {
        let text = self.text();
        Config::parse(&text, &[]).unwrap_or_else(|e| panic!("{e:#}\n{text}"))
    }

    /// The config, or the error parsing and validating it gives.
    pub fn build_result(&self) -> anyhow::Result<Config> {
        Config::parse(&self.text(), &[])
    }

    /// The config as a file `<dir>/<run.name>.toml`, for the binary's `--config`; its path.
    pub fn write(&self) -> PathBuf {
        let name = self.root["run"]["name"].as_str().expect("run.name");
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&path, self.text()).unwrap();
        path
    }

    fn growth(&mut self) -> &mut Vec<toml::Value> {
        let g = self.root.entry("growth").or_insert_with(|| toml::Value::Array(Vec::new()));
        g.as_array_mut().expect("growth is an array")
    }

    fn grow(mut self, key: &str, at: toml::Value, to_depth: usize) -> Self {
        let mut entry = toml::Table::new();
        entry.insert(key.into(), at);
        entry.insert("to_depth".into(), (to_depth as i64).into());
        self.growth().push(entry.into());
        self
    }

    /// Insert `value` at the dotted `key`, creating the tables on the way.
    fn put(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        let keys: Vec<&str> = key.split('.').collect();
        let mut table = &mut self.root;
        for k in &keys[..keys.len() - 1] {
            let entry = table.entry(k.to_string()).or_insert_with(|| toml::Table::new().into());
            table = entry.as_table_mut().unwrap_or_else(|| panic!("{key}: {k} is not a table"));
        }
        table.insert(keys[keys.len() - 1].to_string(), value.into());
        self
    }
}

/// Merge `more` into `into`: tables key by key, arrays of tables (`[[growth]]`) appended, any
/// other value replaced.
fn merge(into: &mut toml::Table, more: toml::Table) {
    for (k, v) in more {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (Some(toml::Value::Array(a)), toml::Value::Array(b)) if a.iter().chain(&b).all(toml::Value::is_table) => a.extend(b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

type B = CpuBackend;

/// A CPU buffer holding `host`.
pub fn buf(be: &B, host: &[f32]) -> <B as Backend>::Buf {
    let b = be.alloc(host.len());
    be.upload(B::whole(&b), host);
    b
}

/// A CPU buffer's contents.
pub fn host(be: &B, b: &<B as Backend>::Buf) -> Vec<f32> {
    let mut v = vec![0.0; B::buf_len(b)];
    be.download(B::whole(b), &mut v);
    v
}

/// `n` draws from N(0, std²).
pub fn randn(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    let mut v = vec![0.0; n];
    rng.fill_normal(&mut v, std);
    v
}

/// A 1 -> 3 block run grown at the bottom at step 15 (stack [1, 2, 0]), 30 steps of C = 32,
/// T = 32 on the synthetic corpus, on the actor runtime: its folder, final checkpoint and config.
pub fn grown_checkpoint(tag: &str) -> (PathBuf, taproot::checkpoint::Checkpoint, Config) {
    grown_checkpoint_with(tag, |t| t)
}

/// [`grown_checkpoint`] with `change` applied to its config (a parameterisation, say).
pub fn grown_checkpoint_with(tag: &str, change: impl Fn(TestConfig) -> TestConfig) -> (PathBuf, taproot::checkpoint::Checkpoint, Config) {
    let dir = synthetic_dataset(tag);
    let cfg =
        change(TestConfig::new(&dir).name("grown").steps(30).seq_len(32).channels(32).depth(1).target_depth(3).grow_at_step(15, 3)).build();
    let data = taproot::data::Dataset::open(&dir, 256).unwrap();
    taproot::runtime::train::<CpuBackend>(&cfg, data, taproot::runtime::RunOptions { quiet: true, ..Default::default() }, false).unwrap();
    let (ck, _, _) = taproot::checkpoint::load_newest_valid(&cfg.checkpoint_dir()).unwrap().expect("a final checkpoint");
    (dir, ck, cfg)
}

/// The sequential trainer's run `want` and the actor runtime's `got` are the same run: every
/// step's depth, learning rate and training loss bit for bit, every validation loss bit for bit,
/// and the same growth records.
pub fn assert_same_run(want: &taproot::train::TrainReport, got: &taproot::train::TrainReport) {
    assert_eq!(want.steps.len(), got.steps.len());
    for (a, b) in want.steps.iter().zip(&got.steps) {
        assert_eq!((a.step, a.depth), (b.step, b.depth));
        assert_eq!(
            a.train_loss.to_bits(),
            b.train_loss.to_bits(),
            "step {}: sequential {} vs pipeline {}",
            a.step,
            a.train_loss,
            b.train_loss
        );
        assert_eq!(a.lr, b.lr);
    }
    let ev = |r: &taproot::train::TrainReport| r.evals.iter().map(|e| (e.step, e.val_loss.to_bits())).collect::<Vec<_>>();
    assert_eq!(ev(want), ev(got), "validation losses differ");
    assert_eq!(want.growth, got.growth);
}

/// The checkpoint's model on the CPU backend: its embedding, head and blocks in stack order.
pub fn model_of(be: &CpuBackend, ck: &taproot::checkpoint::Checkpoint, dims: &taproot::model::Dims) -> taproot::model::Model<CpuBackend> {
    use taproot::checkpoint::UnitKey;
    let init = taproot::model::init::InitConfig::new(taproot::model::init::InitScheme::Gpt2, 3, 1);
    let mut model = taproot::model::Model::new(be, dims.clone(), 0, &init);
    model.embed.w.restore(be, ck.unit(UnitKey::Embed).unwrap()).unwrap();
    model.head.w.restore(be, ck.unit(UnitKey::Head).unwrap()).unwrap();
    for id in &ck.meta.stack {
        let u = ck.unit(UnitKey::Layer(*id)).unwrap();
        let mlp = taproot::model::Block::<CpuBackend>::mlp_of_len(dims, u.params.len()).expect("a block of this model");
        let mut b = taproot::model::Block::new_empty_mlp(be, dims, *id, mlp);
        b.w.restore(be, u).unwrap();
        model.blocks.push(b);
    }
    model
}

/// A byte-level BPE tokenizer file with BOS/EOS and a post-processor that puts BOS first, as
/// LLaMA's does; the second file differs by one merge.
pub fn hf_tokenizer(dir: &Path) -> PathBuf {
    let texts = ["the cat sat on the mat and the dog sat on the log"; 20];
    let bpe = taproot::data::bpe::train(&texts, 300).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    taproot::data::bpe::save(&bpe, dir).unwrap();
    let path = dir.join("tokenizer.json");
    let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let n = j["model"]["vocab"].as_object().unwrap().len();
    j["added_tokens"] = serde_json::json!([
        {"id": n, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": n + 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    ]);
    j["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [n], "tokens": ["<s>"]}},
    });
    std::fs::write(&path, serde_json::to_string_pretty(&j).unwrap()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}"#,
    )
    .unwrap();
    path
}

/// A CUDA stream on cuda:0, or None on a machine without a GPU (printing SKIP and why).
pub fn gpu() -> Option<taproot::backend::cuda::CudaBackend> {
    use taproot::backend::cuda;
    match cuda::device_count() {
        Ok(n) if n > 0 => Some(cuda::CudaBackend::open("cuda:0").expect("a CUDA device is present but could not be opened")),
        Ok(_) => {
            println!("SKIP: no CUDA device on this machine");
            None
        }
        Err(e) => {
            println!("SKIP: {e:#}");
            None
        }
    }
}

/// How many values of `x` bf16 cannot hold exactly.
pub fn not_bf16(x: &[f32]) -> usize {
    use taproot::backend::precision::{bf16_to_f32, f32_to_bf16};
    x.iter().filter(|v| bf16_to_f32(f32_to_bf16(**v)) != **v).count()
}

/// The GPU tests' run: 20 steps of C = 64, T = 32, growing 1 -> 3 blocks (copying) at step 10.
pub fn tiny_gpu_cfg(dir: &std::path::Path, name: &str) -> TestConfig {
    TestConfig::new(dir)
        .name(name)
        .steps(20)
        .seq_len(32)
        .micro_batches(2)
        .channels(64)
        .depth(1)
        .target_depth(3)
        .eval(10, 2)
        .grow_at_step(10, 3)
        .growth_init("copying")
}

/// A small corpus of a repeated sentence with noise, as shards in `dir` (made if missing).
pub fn fox_dataset(dir: &std::path::Path) -> taproot::data::Dataset {
    std::fs::create_dir_all(dir).unwrap();
    let mut r = Rng::new(11);
    let text: Vec<u32> =
        (0..40_000).map(|i| b"the quick brown fox jumps over the lazy dog. "[i % 45] as u32 + (r.below(3) == 0) as u32).collect();
    taproot::data::write_shard(&dir.join("g_train_000001.bin"), &text[..36_000]).unwrap();
    taproot::data::write_shard(&dir.join("g_val_000000.bin"), &text[36_000..]).unwrap();
    taproot::data::Dataset::open(dir, 256).unwrap()
}

/// `steps` steps of C = 64, T = 32, growing 1 -> 3 blocks (random init) half-way.
pub fn growth_cfg(dir: &std::path::Path, name: &str, steps: u64) -> TestConfig {
    TestConfig::new(dir)
        .name(name)
        .steps(steps)
        .batch_size(8)
        .seq_len(32)
        .channels(64)
        .depth(1)
        .target_depth(3)
        .lr(0.01)
        .eval(steps / 2, 8)
        .grow_at_step(steps / 2, 3)
}
