//! Named tensors: how a unit's flat buffers are written as one safetensors tensor per parameter
//! tensor, each with its name and shape, so that any safetensors reader sees `layer.3/qkvw`
//! as a (3C, C) matrix without taproot's source.
//!
//! A unit is written named when its config gives it a layout whose size is the unit's: its
//! parameters as `<unit>/<name>` (the tensor's shape), its first moments as `<unit>/<name>.m`,
//! AdamW's second moments as `<unit>/<name>.v`, and the unit's entry in the unit table lists
//! the names and shapes in layout order (the order of the flat buffer). A unit without such a
//! layout, and every unit of a format-1 file, is one flat tensor per part: `<unit>.params`,
//! `<unit>.m`, `<unit>.v`.

use crate::params::Layout;
use serde::{Deserialize, Serialize};

/// One named tensor of a unit, as the unit table lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
}

/// The table entries of a unit written named under `layout`.
pub fn entries(layout: &Layout) -> Vec<TensorEntry> {
    layout.specs.iter().map(|s| TensorEntry { name: s.name.to_string(), shape: s.shape.clone() }).collect()
}

/// The file's tensor name of part `part` ("params", "m" or "v") of tensor `name` of unit `key`.
pub fn tensor_name(key: impl std::fmt::Display, name: &str, part: &str) -> String {
    match part {
        "params" => format!("{key}/{name}"),
        _ => format!("{key}/{name}.{part}"),
    }
}

/// The pieces of one flat buffer, cut by `entries` (which must sum to its length).
pub fn pieces<'a, 'b>(flat: &'a [f32], entries: &'b [TensorEntry]) -> Vec<(&'a [f32], &'b TensorEntry)> {
    let mut off = 0;
    entries
        .iter()
        .map(|e| {
            let n: usize = e.shape.iter().product();
            let p = &flat[off..off + n];
            off += n;
            (p, e)
        })
        .collect()
}
