//! Checkpoints name and shape every tensor (format 2), and files of format 1 still load.
//!
//! - A grown LLaMA run's checkpoint, read with the `safetensors` crate alone: every parameter
//!   tensor is there under `<unit>/<name>` with its shape and the unit's values, its first and
//!   second moments beside it, and no flat buffer is left.
//! - A format-1 file (flat buffers; written by the previous release and kept in
//!   `tests/data/`) loads, holds a trained model, and is saved again as format 2 with the same
//!   values.

mod common;

use common::grown_checkpoint_with;
use safetensors::SafeTensors;
use taproot::backend::cpu::CpuBackend;
use taproot::checkpoint::{self, UnitKey, FORMAT_VERSION};
use taproot::model::{Block, Embed, Head};

type B = CpuBackend;

fn f32s(t: &safetensors::tensor::TensorView) -> Vec<f32> {
    t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

#[test]
fn a_runs_checkpoint_names_and_shapes_every_tensor() {
    let change =
        |t: common::TestConfig| t.set("model.arch", "\"llama\"").heads(4).set("model.kv_heads", 2).set("optim.kind", "\"muon_adamw\"");
    let (_, ck, cfg) = grown_checkpoint_with("named-ckpt", change);
    let (path, _, _) = checkpoint::load_newest_valid(&cfg.checkpoint_dir()).unwrap().map(|(c, p, w)| (p, c, w)).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let dims = taproot::train::dims_of(&cfg, 256);
    assert!(st.names().iter().all(|n| !n.ends_with(".params")), "no flat buffers: {:?}", st.names());
    let units = [(UnitKey::Embed, Embed::<B>::layout(&dims)), (UnitKey::Head, Head::<B>::layout(&dims))]
        .into_iter()
        .chain(ck.meta.stack.iter().map(|&id| (UnitKey::Layer(id), Block::<B>::layout(&dims))));
    let mut seen = 0;
    for (key, layout) in units {
        let u = ck.unit(key).unwrap();
        for s in &layout.specs {
            let t = st.tensor(&format!("{key}/{}", s.name)).unwrap_or_else(|e| panic!("{key}/{}: {e}", s.name));
            assert_eq!(t.shape(), &s.shape[..], "{key}/{}", s.name);
            assert_eq!(f32s(&t), layout.slice(&u.params, &s.name), "{key}/{}", s.name);
            assert_eq!(f32s(&st.tensor(&format!("{key}/{}.m", s.name)).unwrap()), layout.slice(&u.m, &s.name));
            let v = u.v.as_ref().map(|v| layout.slice(v, &s.name).to_vec());
            assert_eq!(st.tensor(&format!("{key}/{}.v", s.name)).ok().map(|t| f32s(&t)), v, "{key}/{}.v", s.name);
            seen += 1;
        }
    }
    // A GQA projection as a matrix: (NH + 2·KV)·hd rows of C.
    let id = ck.meta.stack[0];
    assert_eq!(st.tensor(&format!("layer.{id}/qkvw")).unwrap().shape(), &[(4 + 2 * 2) * 8, 32]);
    assert_eq!(st.tensor("head/lm_head").unwrap().shape(), &[256, 32]);
    println!("{seen} named tensors, each with its moments");
    assert_eq!(ck.meta.format_version, FORMAT_VERSION);
}

#[test]
fn a_format_1_checkpoint_loads_and_is_saved_as_format_2_with_the_same_values() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/format-1.safetensors");
    let old = checkpoint::load(&fixture).unwrap();
    assert_eq!(old.meta.format_version, 1);
    let cfg = old.meta.config().unwrap();
    let dims = taproot::train::dims_of(&cfg, 256);
    for &id in &old.meta.stack {
        assert_eq!(old.unit(UnitKey::Layer(id)).unwrap().params.len(), Block::<B>::layout(&dims).total);
    }
    // Saved again: format 2, named, the same values bit for bit.
    let dir = std::env::temp_dir().join(format!("taproot-format1-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = checkpoint::save(&dir, &old).unwrap();
    let new = checkpoint::load(&path).unwrap();
    assert_eq!(new.meta.format_version, FORMAT_VERSION);
    for ((ka, a), (kb, b)) in old.units.iter().zip(&new.units) {
        assert_eq!(ka, kb);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.params), bits(&b.params), "{ka}");
        assert_eq!(bits(&a.m), bits(&b.m), "{ka}");
        assert_eq!(a.v.as_deref().map(bits), b.v.as_deref().map(bits), "{ka}");
        assert_eq!(a.steps, b.steps);
    }
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.names().iter().any(|n| n.ends_with("/qkvw")), "{:?}", st.names());
    // The model it holds is the trained one (below the uniform loss ln 256 = 5.55).
    let be = B::default();
    let mut model = common::model_of(&be, &old, &dims);
    // Two windows of its 16 positions from a line of the play.
    let w: Vec<u32> = b"To be, or not to be, that is the quest".iter().map(|&c| c as u32).collect();
    let loss = model.eval_loss(&be, &taproot::model::Batch::from_windows(&be, &w[..34], 2, 16));
    assert!(loss.is_finite() && loss < 5.55, "the old checkpoint's model: loss {loss}");
    let _ = std::fs::remove_dir_all(&dir);
}
