//! Checkpoint format, atomic save, directory management and corruption handling.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use taproot::checkpoint::{self, Checkpoint, GrowthRecord, Meta, UnitKey, FORMAT_VERSION};
use taproot::data::loader::LoaderState;
use taproot::params::UnitState;

/// Prune `d` as a run would, protecting nothing, with nothing verified yet.
fn prune(d: &Path, keep: usize, run_id: &str) -> anyhow::Result<checkpoint::Pruned> {
    checkpoint::prune(d, &checkpoint::Retention { keep, run_id, protect: &[] }, &mut checkpoint::Verified::default())
}

/// A fresh, empty directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "taproot-ckpt-{tag}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Deterministic values, including the awkward ones (signed zero, infinities, NaN payloads,
/// subnormals) that a lossy round trip would change.
fn values(n: usize, salt: u32) -> Vec<f32> {
    let special = [
        0.0f32,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::from_bits(0x7fc0_1234),
        f32::from_bits(0xffa0_0001),
        f32::from_bits(1),
        f32::MIN_POSITIVE,
        f32::MAX,
        -1.5e-7,
    ];
    (0..n)
        .map(|i| {
            if i < special.len() && salt.is_multiple_of(2) {
                special[i]
            } else {
                let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(salt.wrapping_mul(40_503));
                f32::from_bits((x & 0x807f_ffff) | 0x3c00_0000) // finite, various signs/magnitudes
            }
        })
        .collect()
}

fn unit(n: usize, tensors: usize, salt: u32, with_v: bool) -> UnitState {
    UnitState {
        params: values(n, salt),
        m: values(n, salt + 1),
        v: with_v.then(|| values(n, salt + 2)),
        steps: (0..tensors as u64).map(|i| 1000 + 7 * i + salt as u64).collect(),
    }
}

const CONFIG: &str = include_str!("../config/demo.toml");
/// The run id of the sample checkpoints.
const RUN: &str = "sample-run";

fn sample(step: u64) -> Checkpoint {
    Checkpoint {
        meta: Meta {
            format_version: FORMAT_VERSION,
            run_name: "unit-test \"run\" ✓".into(),
            config_toml: CONFIG.into(),
            step,
            depth: 2,
            stack: vec![7, 3],
            next_id: 8,
            loader: LoaderState { rng: 0xdead_beef_0123_4567, batches: step * 4 + 1, source_tokens: vec![] },
            growth: vec![
                GrowthRecord { at_step: 0, from_depth: 0, to_depth: 1, new_ids: vec![3], stack: vec![3] },
                GrowthRecord { at_step: step / 2, from_depth: 1, to_depth: 2, new_ids: vec![7], stack: vec![7, 3] },
            ],
            created_unix_s: 1_700_000_000 + step,
            run_id: Some(RUN.into()),
            extra: serde_json::json!({ "note": "kept as is", "list": [1, 2.5, null] }),
        },
        units: vec![
            (UnitKey::Embed, unit(37, 2, 0, true)),
            (UnitKey::Layer(3), unit(64, 12, 10, true)),
            (UnitKey::Layer(7), unit(33, 12, 20, false)),
            (UnitKey::Head, unit(5, 2, 31, false)),
        ],
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Bitwise equality of two checkpoints (NaN-safe, unlike `==`).
fn assert_same(a: &Checkpoint, b: &Checkpoint) {
    assert_eq!(a.meta, b.meta);
    assert_eq!(a.units.len(), b.units.len());
    for ((ka, ua), (kb, ub)) in a.units.iter().zip(&b.units) {
        assert_eq!(ka, kb);
        assert_eq!(bits(&ua.params), bits(&ub.params), "{ka} params");
        assert_eq!(bits(&ua.m), bits(&ub.m), "{ka} m");
        assert_eq!(ua.v.as_deref().map(bits), ub.v.as_deref().map(bits), "{ka} v");
        assert_eq!(ua.steps, ub.steps, "{ka} steps");
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

fn err_of(r: anyhow::Result<Checkpoint>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

/// Header length in bytes, including the 8-byte length prefix.
fn header_end(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

#[test]
fn unit_key_display_and_parse() {
    assert_eq!(UnitKey::Embed.to_string(), "embed");
    assert_eq!(UnitKey::Head.to_string(), "head");
    assert_eq!(UnitKey::Layer(42).to_string(), "layer.42");
    for k in [UnitKey::Embed, UnitKey::Head, UnitKey::Layer(0), UnitKey::Layer(u64::MAX)] {
        assert_eq!(k.to_string().parse::<UnitKey>().unwrap(), k);
    }
    for bad in ["", "layer.", "layer.01", "layer.-1", "layer.x", "Layer.1", "embed.params", "layer.99999999999999999999"] {
        assert!(bad.parse::<UnitKey>().is_err(), "{bad}");
    }
    assert_eq!(checkpoint::file_name(42), "step-00000042.safetensors");
    assert_eq!(checkpoint::file_name(123_456_789), "step-123456789.safetensors");
}

#[test]
fn round_trip_is_exact() {
    let dir = TempDir::new("roundtrip");
    let ck = sample(1234);
    let path = checkpoint::save(dir.path(), &ck).unwrap();
    assert_eq!(path, dir.path().join("step-00001234.safetensors"));
    let back = checkpoint::load(&path).unwrap();
    assert_same(&ck, &back);
    assert!(back.unit(UnitKey::Layer(3)).unwrap().v.is_some());
    assert!(back.unit(UnitKey::Layer(7)).unwrap().v.is_none());
    assert!(back.unit(UnitKey::Layer(5)).is_none());

    // The embedded config is the run's config.
    let cfg = back.meta.config().unwrap();
    assert_eq!(cfg.run.name, "demo");

    // The file is plain safetensors: any reader sees the documented names, dtypes and metadata.
    let bytes = fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(
        names,
        [
            "embed.m",
            "embed.params",
            "embed.v",
            "head.m",
            "head.params",
            "layer.3.m",
            "layer.3.params",
            "layer.3.v",
            "layer.7.m",
            "layer.7.params"
        ]
    );
    for (_, t) in st.tensors() {
        assert_eq!(t.dtype(), Dtype::F32);
        assert_eq!(t.shape().len(), 1);
    }
    let on_disk: Vec<u32> =
        st.tensor("layer.3.params").unwrap().data().chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(on_disk, bits(&ck.units[1].1.params));
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let md = header.metadata().as_ref().unwrap();
    let meta: Meta = serde_json::from_str(&md["taproot"]).unwrap();
    assert_eq!(meta, ck.meta);
    assert!(md["taproot.checksum"].starts_with("fnv1a64x4:"));

    // Saving the loaded checkpoint again gives the same bytes.
    let dir2 = TempDir::new("roundtrip2");
    let path2 = checkpoint::save(dir2.path(), &back).unwrap();
    assert_eq!(fs::read(path2).unwrap(), bytes);
}

#[test]
fn zero_layer_and_empty_tensors_round_trip() {
    let dir = TempDir::new("zero");
    let mut ck = sample(0);
    ck.meta.stack.clear();
    ck.meta.depth = 0;
    ck.meta.growth.clear();
    ck.meta.extra = serde_json::Value::Null;
    ck.units = vec![(UnitKey::Head, unit(0, 0, 1, true)), (UnitKey::Embed, unit(1, 1, 3, false))];
    let back = checkpoint::load(&checkpoint::save(dir.path(), &ck).unwrap()).unwrap();
    assert_same(&ck, &back);
}

#[test]
fn save_is_atomic_and_leaves_no_tmp() {
    let dir = TempDir::new("atomic");
    let sub = dir.path().join("nested").join("ckpts");
    checkpoint::save(&sub, &sample(7)).unwrap();
    assert_eq!(names_in(&sub), ["step-00000007.safetensors"]);

    // A stale tmp of the same step (a crash mid-write) is overwritten, and the final file
    // replaced by a new save of the same step.
    fs::write(sub.join(".step-00000007.safetensors.tmp"), b"half a checkpoint").unwrap();
    let mut ck = sample(7);
    ck.meta.run_name = "second".into();
    let p = checkpoint::save(&sub, &ck).unwrap();
    assert_eq!(names_in(&sub), ["step-00000007.safetensors"]);
    assert_eq!(checkpoint::load(&p).unwrap().meta.run_name, "second");

    // An inconsistent checkpoint is refused before anything is written.
    let mut bad = sample(8);
    bad.meta.depth = 3;
    assert!(format!("{:#}", checkpoint::save(&sub, &bad).unwrap_err()).contains("depth"));
    let mut bad = sample(8);
    bad.units.retain(|(k, _)| *k != UnitKey::Layer(7));
    assert!(format!("{:#}", checkpoint::save(&sub, &bad).unwrap_err()).contains("layer.7 is missing"));
    let mut bad = sample(8);
    bad.units[2].1.m.pop();
    assert!(checkpoint::save(&sub, &bad).is_err());
    let mut bad = sample(8);
    bad.meta.format_version = FORMAT_VERSION + 1;
    assert!(checkpoint::save(&sub, &bad).is_err());
    assert_eq!(names_in(&sub), ["step-00000007.safetensors"]);
}

#[test]
fn list_and_prune() {
    let dir = TempDir::new("prune");
    let d = dir.path();
    for step in [5, 100, 20, 3, 123_456_789] {
        checkpoint::save(d, &sample(step)).unwrap();
    }
    // Unrelated or non-canonical entries that must be ignored.
    fs::write(d.join("notes.txt"), b"hello").unwrap();
    fs::write(d.join("step-5.safetensors"), b"x").unwrap();
    fs::write(d.join("step-0000000x.safetensors"), b"x").unwrap();
    fs::write(d.join("step-00000009.safetensors.bak"), b"x").unwrap();
    fs::write(d.join(".step-00000042.safetensors.tmp"), b"stale").unwrap();
    fs::create_dir(d.join("step-00000077.safetensors")).unwrap();

    let steps: Vec<u64> = checkpoint::list(d).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [3, 5, 20, 100, 123_456_789]);
    for (s, p) in checkpoint::list(d).unwrap() {
        assert_eq!(p, d.join(checkpoint::file_name(s)));
    }

    assert!(prune(d, 0, RUN).is_err());
    let mut removed = prune(d, 2, RUN).unwrap().removed;
    removed.sort();
    let mut expect = vec![
        d.join(".step-00000042.safetensors.tmp"),
        d.join("step-00000003.safetensors"),
        d.join("step-00000005.safetensors"),
        d.join("step-00000020.safetensors"),
    ];
    expect.sort();
    assert_eq!(removed, expect);
    let steps: Vec<u64> = checkpoint::list(d).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [100, 123_456_789]);
    assert!(prune(d, 10, RUN).unwrap().removed.is_empty());
    assert!(d.join("notes.txt").exists() && d.join("step-00000077.safetensors").is_dir());

    let (ck, path, warnings) = checkpoint::load_newest_valid(d).unwrap().unwrap();
    assert_eq!(ck.meta.step, 123_456_789);
    assert_eq!(path, d.join("step-123456789.safetensors"));
    assert!(warnings.is_empty());
}

#[test]
fn empty_or_missing_dir_has_no_checkpoint() {
    let dir = TempDir::new("empty");
    assert!(checkpoint::list(dir.path()).unwrap().is_empty());
    assert!(checkpoint::load_newest_valid(dir.path()).unwrap().is_none());
    fs::write(dir.path().join("unrelated.bin"), b"abc").unwrap();
    assert!(checkpoint::load_newest_valid(dir.path()).unwrap().is_none());
    let missing = dir.path().join("does-not-exist");
    assert!(checkpoint::list(&missing).unwrap().is_empty());
    assert!(checkpoint::load_newest_valid(&missing).unwrap().is_none());
    assert!(prune(&missing, 1, RUN).unwrap().removed.is_empty());
}

#[test]
fn truncated_newest_falls_back_to_previous() {
    let dir = TempDir::new("trunc");
    let d = dir.path();
    checkpoint::save(d, &sample(10)).unwrap();
    let newest = checkpoint::save(d, &sample(20)).unwrap();
    let good = fs::read(&newest).unwrap();
    let h = header_end(&good);
    for cut in [0, 1, 7, 8, 9, h / 2, h - 1, h, h + 1, h + 4, (h + good.len()) / 2, good.len() - 4, good.len() - 1] {
        fs::write(&newest, &good[..cut]).unwrap();
        let e = err_of(checkpoint::load(&newest));
        assert!(e.contains("step-00000020.safetensors"), "cut {cut}: {e}");

        let (ck, path, warnings) = checkpoint::load_newest_valid(d).unwrap().unwrap();
        assert_eq!(ck.meta.step, 10, "cut {cut}");
        assert_eq!(path, d.join("step-00000010.safetensors"));
        assert_eq!(warnings.len(), 1, "cut {cut}: {warnings:?}");
        assert!(warnings[0].starts_with("skipping ") && warnings[0].contains("step-00000020.safetensors"), "{}", warnings[0]);
    }
    // Restored, the newest is valid again.
    fs::write(&newest, &good).unwrap();
    assert_eq!(checkpoint::load_newest_valid(d).unwrap().unwrap().0.meta.step, 20);
}

#[test]
fn payload_bit_flip_is_a_checksum_error() {
    let dir = TempDir::new("payload");
    let path = checkpoint::save(dir.path(), &sample(30)).unwrap();
    let good = fs::read(&path).unwrap();
    let h = header_end(&good);
    for pos in [h, h + 1, h + 3, h + 100, (h + good.len()) / 2, good.len() - 1] {
        for bit in [0, 7] {
            let mut bad = good.clone();
            bad[pos] ^= 1 << bit;
            fs::write(&path, &bad).unwrap();
            let e = err_of(checkpoint::load(&path));
            assert!(e.contains("checksum mismatch") && e.contains("step-00000030.safetensors"), "byte {pos}: {e}");
        }
    }
}

#[test]
fn header_bit_flips_are_errors() {
    let dir = TempDir::new("header");
    let path = checkpoint::save(dir.path(), &sample(40)).unwrap();
    let good = fs::read(&path).unwrap();
    // Every byte of the header, one bit each (cycling through the bit positions).
    for pos in 0..header_end(&good) {
        let mut bad = good.clone();
        bad[pos] ^= 1 << (pos % 8);
        fs::write(&path, &bad).unwrap();
        let r = std::panic::catch_unwind(|| checkpoint::load(&path));
        let r = r.unwrap_or_else(|_| panic!("load panicked on a flip at header byte {pos}"));
        let e = err_of(r);
        assert!(e.contains("step-00000040.safetensors"), "byte {pos}: {e}");
    }
}

/// xorshift64*, for the fuzz test.
struct Xs(u64);
impl Xs {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_corruption_never_panics() {
    let dir = TempDir::new("fuzz");
    let path = checkpoint::save(dir.path(), &sample(50)).unwrap();
    let good = fs::read(&path).unwrap();
    let h = header_end(&good);
    let mut rng = Xs(0x9e37_79b9_7f4a_7c15);
    for round in 0..400 {
        let mut bad = good.clone();
        match round % 4 {
            0 => bad.truncate(rng.below(good.len())),
            1 => {
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(bad.len());
                    bad[i] ^= 1 << rng.below(8);
                }
            }
            2 => {
                // Flips concentrated in the header, where the parser is.
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(h);
                    bad[i] ^= 1 << rng.below(8);
                }
            }
            _ => {
                // Random bytes overwriting a random range, then maybe a cut.
                let a = rng.below(bad.len());
                let b = (a + 1 + rng.below(64)).min(bad.len());
                for x in &mut bad[a..b] {
                    *x = rng.next() as u8;
                }
                if rng.below(2) == 0 {
                    bad.truncate(rng.below(bad.len()));
                }
            }
        }
        if bad == good {
            continue;
        }
        fs::write(&path, &bad).unwrap();
        let r = std::panic::catch_unwind(|| checkpoint::load(&path));
        let r = r.unwrap_or_else(|_| panic!("load panicked in round {round}"));
        assert!(r.is_err(), "round {round}: corrupted file loaded");
    }
}

#[test]
fn garbage_named_like_a_checkpoint_is_skipped() {
    let dir = TempDir::new("garbage");
    let d = dir.path();
    checkpoint::save(d, &sample(50)).unwrap();
    let mut rng = Xs(42);
    let garbage: Vec<u8> = (0..5000).map(|_| rng.next() as u8).collect();
    fs::write(d.join("step-00000099.safetensors"), &garbage).unwrap();
    fs::write(d.join("step-00000098.safetensors"), b"").unwrap();
    fs::write(d.join("step-00000097.safetensors"), b"{\"not\": \"safetensors\"}").unwrap();

    let (ck, path, warnings) = checkpoint::load_newest_valid(d).unwrap().unwrap();
    assert_eq!(ck.meta.step, 50);
    assert_eq!(path, d.join("step-00000050.safetensors"));
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    for (w, step) in warnings.iter().zip([99, 98, 97]) {
        assert!(w.starts_with("skipping ") && w.contains(&checkpoint::file_name(step)), "{w}");
    }

    // With no valid checkpoint left, the error lists every failure.
    fs::remove_file(d.join("step-00000050.safetensors")).unwrap();
    let e = format!("{:#}", checkpoint::load_newest_valid(d).unwrap_err());
    for step in [99, 98, 97] {
        assert!(e.contains(&checkpoint::file_name(step)), "{e}");
    }
}

// ---- hand-made files: each structural error is reported as such ------------------------------

struct Raw {
    name: String,
    dtype: Dtype,
    data: Vec<u8>,
}

fn f32_raw(name: &str, n: usize) -> Raw {
    Raw { name: name.into(), dtype: Dtype::F32, data: values(n, 5).iter().flat_map(|v| v.to_le_bytes()).collect() }
}

/// Write a safetensors file with the given tensors and metadata (no valid checksum).
fn write_raw(path: &Path, tensors: &[Raw], metadata: Option<HashMap<String, String>>) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|r| {
            let n = 8 * r.data.len() / r.dtype.bitsize();
            (r.name.clone(), TensorView::new(r.dtype, vec![n], &r.data).unwrap())
        })
        .collect();
    fs::write(path, safetensors::serialize(views, metadata).unwrap()).unwrap();
}

/// Metadata for a 0-layer checkpoint whose units are embed and head.
fn raw_meta(version: u32) -> HashMap<String, String> {
    let mut ck = sample(60);
    ck.meta.stack.clear();
    ck.meta.depth = 0;
    let mut meta = serde_json::to_value(&ck.meta).unwrap();
    meta["format_version"] = version.into();
    HashMap::from([
        ("taproot".to_string(), meta.to_string()),
        ("taproot.units".to_string(), r#"[{"key":"embed","steps":[1,2]},{"key":"head","steps":[3]}]"#.to_string()),
        ("taproot.checksum".to_string(), "fnv1a64x4:0000000000000000".to_string()),
    ])
}

fn complete() -> Vec<Raw> {
    vec![f32_raw("embed.params", 4), f32_raw("embed.m", 4), f32_raw("head.params", 2), f32_raw("head.m", 2), f32_raw("head.v", 2)]
}

#[test]
fn structural_errors_are_named() {
    let dir = TempDir::new("structure");
    let path = dir.path().join("step-00000060.safetensors");
    let check = |tensors: Vec<Raw>, md: Option<HashMap<String, String>>, want: &str| {
        write_raw(&path, &tensors, md);
        let e = err_of(checkpoint::load(&path));
        assert!(e.contains(want) && e.contains("step-00000060.safetensors"), "want `{want}`, got: {e}");
    };

    check(complete(), None, "not a taproot checkpoint");
    let mut md = raw_meta(FORMAT_VERSION);
    md.remove("taproot");
    check(complete(), Some(md), "not a taproot checkpoint");
    check(complete(), Some(raw_meta(FORMAT_VERSION + 1)), &format!("unsupported format_version {}", FORMAT_VERSION + 1));

    // Complete and consistent, but the checksum is not the file's.
    check(complete(), Some(raw_meta(FORMAT_VERSION)), "checksum mismatch");

    let mut t = complete();
    t[0] = Raw { name: "embed.params".into(), dtype: Dtype::F64, data: vec![0; 32] };
    check(t, Some(raw_meta(FORMAT_VERSION)), "dtype F64");

    let mut t = complete();
    t.remove(0);
    check(t, Some(raw_meta(FORMAT_VERSION)), "unit embed has no `embed.params`");

    let mut t = complete();
    t.remove(3);
    check(t, Some(raw_meta(FORMAT_VERSION)), "unit head has no `head.m`");

    let mut t = complete();
    t[1] = f32_raw("embed.m", 3);
    check(t, Some(raw_meta(FORMAT_VERSION)), "`embed.m` has 3 values but `embed.params` has 4");

    let mut t = complete();
    t[4] = f32_raw("head.v", 5);
    check(t, Some(raw_meta(FORMAT_VERSION)), "`head.v` has 5 values but `head.params` has 2");

    let mut t = complete();
    t.push(f32_raw("layer.9.params", 1));
    check(t, Some(raw_meta(FORMAT_VERSION)), "`layer.9.params` belongs to no unit");

    // A 2-D tensor.
    let data = vec![0u8; 16];
    let mut views: Vec<(String, TensorView)> = Vec::new();
    let owned = complete();
    for r in owned.iter().skip(1) {
        views.push((r.name.clone(), TensorView::new(r.dtype, vec![r.data.len() / 4], &r.data).unwrap()));
    }
    views.push(("embed.params".into(), TensorView::new(Dtype::F32, vec![2, 2], &data).unwrap()));
    fs::write(&path, safetensors::serialize(views, Some(raw_meta(FORMAT_VERSION))).unwrap()).unwrap();
    let e = err_of(checkpoint::load(&path));
    assert!(e.contains("expected 1-D"), "{e}");
}

#[test]
fn describe_summarises() {
    let ck = sample(1234);
    let s = checkpoint::describe(&ck);
    for want in [
        "step:     1234",
        "depth:    2",
        "[7, 3]",
        "next id 8",
        "layer.3",
        "layer.7",
        "embed",
        "head",
        "at step 617: depth 1 -> 2",
        "AdamW",
    ] {
        assert!(s.contains(want), "missing `{want}` in:\n{s}");
    }
    let total: usize = ck.units.iter().map(|(_, u)| 4 * (u.params.len() + u.m.len() + u.v.as_ref().map_or(0, Vec::len))).sum();
    assert!(s.contains(&format!("({total} bytes)")), "{s}");
    // Units with and without second moments are told apart.
    let l3 = s.lines().find(|l| l.contains("layer.3")).unwrap();
    let l7 = s.lines().find(|l| l.contains("layer.7")).unwrap();
    assert!(l3.contains("m + v") && !l7.contains("m + v"), "{s}");
    assert!(l3.contains("64 params") && l7.contains("33 params"), "{s}");
}

// ---------------------------------------------------------------------------------------------
// Pruning deletes only the run's own checkpoints; sizes are checked before a file is read.

/// A checkpoint of run `run` at `step`.
fn of_run(step: u64, run: &str) -> Checkpoint {
    let mut ck = sample(step);
    ck.meta.run_id = Some(run.into());
    ck
}

#[test]
fn garbage_of_a_higher_step_cannot_push_out_the_runs_only_checkpoint() {
    let dir = TempDir::new("prune-garbage");
    let d = dir.path();
    let mine = checkpoint::save(d, &of_run(10, RUN)).unwrap();
    let garbage = d.join(checkpoint::file_name(99));
    fs::write(&garbage, vec![0xAB; 4096]).unwrap();
    let pruned = prune(d, 1, RUN).unwrap();
    assert!(mine.exists(), "keep = 1 deleted the run's only loadable checkpoint");
    assert!(pruned.removed.is_empty(), "{pruned:?}");
    assert!(!garbage.exists(), "the garbage file stayed where it is counted");
    assert_eq!(pruned.moved_aside.len(), 1);
    let (to, why) = &pruned.moved_aside[0];
    assert!(to.starts_with(d.join("rejected")) && to.exists() && !why.is_empty(), "{to:?}: {why}");
    assert_eq!(checkpoint::load_newest_valid(d).unwrap().unwrap().0.meta.step, 10);
}

#[test]
fn pruning_never_touches_another_runs_checkpoints() {
    let dir = TempDir::new("prune-foreign");
    let d = dir.path();
    let theirs: Vec<PathBuf> = (20..25).map(|s| checkpoint::save(d, &of_run(s, "another-run")).unwrap()).collect();
    let mine: Vec<PathBuf> = (1..5).map(|s| checkpoint::save(d, &of_run(s, RUN)).unwrap()).collect();
    let pruned = prune(d, 2, RUN).unwrap();
    assert!(theirs.iter().all(|p| p.exists()), "another run's checkpoint was deleted");
    assert_eq!(pruned.foreign.len(), 5);
    let mut removed = pruned.removed.clone();
    removed.sort();
    assert_eq!(removed, mine[..2].to_vec(), "not the run's own oldest");
    assert!(mine[2..].iter().all(|p| p.exists()));
}

#[test]
fn a_size_that_disagrees_with_the_header_is_an_error_before_the_payload_is_read() {
    let dir = TempDir::new("sizes");
    let d = dir.path();
    let good = checkpoint::save(d, &sample(7)).unwrap();
    let bytes = fs::read(&good).unwrap();
    // One byte short, and one byte long: the header's own arithmetic says so.
    let short = d.join("short.safetensors");
    fs::write(&short, &bytes[..bytes.len() - 1]).unwrap();
    let e = err_of(checkpoint::load(&short));
    assert!(e.contains(&format!("has {} bytes but its header describes {}", bytes.len() - 1, bytes.len())), "{e}");
    let long = d.join("long.safetensors");
    let mut more = bytes.clone();
    more.push(0);
    fs::write(&long, &more).unwrap();
    let e = err_of(checkpoint::load(&long));
    assert!(e.contains("but its header describes"), "{e}");
    // Garbage whose first 8 bytes claim a huge header: refused on those 8 bytes.
    let garbage = d.join("garbage.safetensors");
    let mut g = (u64::MAX / 3).to_le_bytes().to_vec();
    g.extend(std::iter::repeat_n(7u8, 1 << 20));
    fs::write(&garbage, &g).unwrap();
    let e = err_of(checkpoint::load(&garbage));
    assert!(e.contains("header claims") && e.contains(&format!("the file has {}", g.len())), "{e}");
    let e = checkpoint::read_meta(&garbage).unwrap_err().to_string();
    assert!(e.contains("header claims"), "{e}");
}

#[test]
fn non_regular_files_are_refused() {
    // `/dev/zero` reads forever: a reader that does not check first would exhaust memory.
    let t0 = std::time::Instant::now();
    let e = err_of(checkpoint::load(Path::new("/dev/zero")));
    assert!(e.contains("not a regular file"), "{e}");
    let e = checkpoint::read_meta(Path::new("/dev/zero")).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let dir = TempDir::new("dir-as-file");
    let e = err_of(checkpoint::load(dir.path()));
    assert!(e.contains("not a regular file"), "{e}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(5));
}

/// Flip one bit in the middle of a checkpoint's tensor data (header and size intact).
fn flip_a_data_bit(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    let h = header_end(&bytes);
    let pos = (h + bytes.len()) / 2;
    bytes[pos] ^= 0x10;
    fs::write(path, &bytes).unwrap();
}

#[test]
fn verify_passes_good_files_and_names_a_flipped_data_bit() {
    let dir = TempDir::new("verify");
    let path = checkpoint::save(dir.path(), &of_run(30, RUN)).unwrap();
    assert_eq!(checkpoint::verify(&path).unwrap(), checkpoint::load(&path).unwrap().meta);
    flip_a_data_bit(&path);
    let e = format!("{:#}", checkpoint::verify(&path).unwrap_err());
    assert!(e.contains("checksum mismatch") && e.contains("step-00000030"), "{e}");
    // The cache sees the change (another modification time or size) and verifies again.
    let mut v = checkpoint::Verified::default();
    assert!(v.check(&path).is_err());
}

/// The hostile case: a resumed run (from step 10, the newest good file) writes step 15 while a
/// corrupt step 20 (one flipped data bit) sits in the folder. With `keep = 1`, pruning by
/// header alone kept the corrupt file and deleted both good ones.
#[test]
fn a_corrupt_newest_checkpoint_never_costs_the_good_ones() {
    let dir = TempDir::new("prune-corrupt-newest");
    let d = dir.path();
    let resumed = checkpoint::save(d, &of_run(10, RUN)).unwrap();
    let corrupt = checkpoint::save(d, &of_run(20, RUN)).unwrap();
    flip_a_data_bit(&corrupt);
    let written = checkpoint::save(d, &of_run(15, RUN)).unwrap();
    let protect = [written.clone(), resumed.clone()];
    let mut verified = checkpoint::Verified::default();
    let pruned = checkpoint::prune(d, &checkpoint::Retention { keep: 1, run_id: RUN, protect: &protect }, &mut verified).unwrap();
    assert!(written.exists() && resumed.exists(), "a good checkpoint was deleted: {pruned:?}");
    assert!(!corrupt.exists(), "the corrupt file stayed where it is counted");
    assert_eq!(pruned.moved_aside.len(), 1, "{pruned:?}");
    assert!(pruned.moved_aside[0].0.starts_with(d.join("rejected")) && pruned.moved_aside[0].1.contains("checksum"), "{pruned:?}");
    assert_eq!(checkpoint::load_newest_valid(d).unwrap().unwrap().0.meta.step, 15);

    // The next checkpoint: the resumed-from file stays (protected), the older written one goes.
    let next = checkpoint::save(d, &of_run(25, RUN)).unwrap();
    let protect = [next.clone(), resumed.clone()];
    let pruned = checkpoint::prune(d, &checkpoint::Retention { keep: 1, run_id: RUN, protect: &protect }, &mut verified).unwrap();
    assert_eq!(pruned.removed, vec![written], "{pruned:?}");
    assert!(next.exists() && resumed.exists());
}

/// With `keep = 3`, a corrupt file does not count toward the three: every good one stays.
#[test]
fn a_corrupt_checkpoint_does_not_count_toward_keep() {
    let dir = TempDir::new("prune-corrupt-keep");
    let d = dir.path();
    let good: Vec<PathBuf> = [10, 20, 40].iter().map(|&s| checkpoint::save(d, &of_run(s, RUN)).unwrap()).collect();
    let corrupt = checkpoint::save(d, &of_run(30, RUN)).unwrap();
    flip_a_data_bit(&corrupt);
    let pruned = prune(d, 3, RUN).unwrap();
    assert!(pruned.removed.is_empty(), "{pruned:?}");
    assert!(good.iter().all(|p| p.exists()), "a good checkpoint was deleted for a corrupt one");
    assert!(!corrupt.exists() && pruned.moved_aside.len() == 1, "{pruned:?}");
}

/// A `next_id` with no room for the ids growth gives is refused when the checkpoint is checked
/// (on load and on save), not found at the next save of a resumed run.
#[test]
fn a_next_id_without_room_is_refused() {
    let dir = TempDir::new("next-id");
    let mut ck = sample(5);
    ck.meta.next_id = u64::MAX;
    let e = format!("{:#}", checkpoint::save(dir.path(), &ck).unwrap_err());
    assert!(e.contains("next_id 18446744073709551615 is beyond the largest layer id"), "{e}");
    assert!(ck.validate().is_err());
}

/// A named unit's table must be the layout its config gives (shapes, names, order).
#[test]
fn a_unit_table_that_disagrees_with_the_config_is_refused() {
    let text = "[run]\nname = \"t\"\nsteps = 10\n[data]\ndir = \"d\"\ntokenizer = \"bytes\"\nbatch_size = 2\nseq_len = 8\n[model]\nchannels = 16\nheads = 2\ndepth = 1\n";
    let cfg = taproot::config::Config::parse(text, &[]).unwrap();
    let dims = taproot::train::dims_of(&cfg, 256);
    let state = |n: usize| UnitState { params: vec![0.0; n], m: vec![0.0; n], v: None, steps: vec![] };
    let (embed, head, layer) = (
        taproot::model::Embed::<taproot::backend::cpu::CpuBackend>::layout(&dims),
        taproot::model::Head::<taproot::backend::cpu::CpuBackend>::layout(&dims),
        taproot::model::Block::<taproot::backend::cpu::CpuBackend>::layout(&dims),
    );
    let meta = Meta {
        format_version: FORMAT_VERSION,
        run_name: "t".into(),
        config_toml: cfg.to_toml(),
        step: 1,
        depth: 1,
        stack: vec![0],
        next_id: 1,
        loader: taproot::data::LoaderState::default(),
        growth: vec![],
        created_unix_s: 0,
        run_id: None,
        extra: serde_json::Value::Null,
    };
    let ck = Checkpoint {
        meta,
        units: vec![(UnitKey::Embed, state(embed.total)), (UnitKey::Head, state(head.total)), (UnitKey::Layer(0), state(layer.total))],
    };
    let good = checkpoint::named::entries(&layer);
    checkpoint::check_named_tables(&ck, &[(UnitKey::Layer(0), good.clone())]).unwrap();
    // The first matrix transposed: the same size, another shape.
    let mut bad = good.clone();
    let i = bad.iter().position(|e| e.shape.len() == 2 && e.shape[0] != e.shape[1]).unwrap();
    bad[i].shape.reverse();
    let e = format!("{:#}", checkpoint::check_named_tables(&ck, &[(UnitKey::Layer(0), bad)]).unwrap_err());
    assert!(e.contains("unit layer.0: tensor") && e.contains("the config's layout has"), "{e}");
    // Two tensors swapped, and one missing.
    let mut swapped = good.clone();
    swapped.swap(0, 1);
    assert!(checkpoint::check_named_tables(&ck, &[(UnitKey::Layer(0), swapped)]).is_err());
    let e = format!("{:#}", checkpoint::check_named_tables(&ck, &[(UnitKey::Layer(0), good[1..].to_vec())]).unwrap_err());
    assert!(e.contains("unit layer.0"), "{e}");
}
