//! Helpers shared by the examples: a scratch folder, the synthetic corpus in it, and paths as
//! TOML strings.
#![allow(dead_code)]

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// A fresh directory under the system's temp dir.
pub fn scratch_dir(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("taproot-example-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The synthetic byte corpus (`taproot::data::synthetic`) as shards in `dir/data`.
pub fn synthetic_corpus(dir: &Path) -> Result<PathBuf> {
    let data = dir.join("data");
    taproot::data::synthetic::word_corpus(&data)?;
    Ok(data)
}

/// A path as a TOML string literal.
pub fn toml_path(p: &Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}
