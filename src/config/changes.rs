//! What a resumed run may change in its config.
//!
//! A checkpoint embeds the whole config of the run that wrote it. Resuming compares it with the
//! config given now, key by key (`optim.kind`, `growth[1].init`, …):
//! - keys that change the **trajectory** — the architecture (`model.*`), the optimizer
//!   (`optim.*`), the schedule (`schedule.*`), `run.steps`, `run.seed`, `run.name`, the data
//!   (`data.*`) and the growth plan (`growth[N].*`) — are an error listing every difference,
//!   unless `--allow-config-change KEY` names the key (or a section prefix of it, `optim`);
//! - **harmless** keys — log, evaluation and checkpoint cadence, output paths, placement and
//!   device settings, supervision, fault injection, the pipeline's in-flight bound, the daemon,
//!   the pilot of `taproot plan` — may change freely; each change is reported so it is logged.
//!
//! Why strict: a resumed run that silently changed `heads` or the optimizer would continue the
//! old weights under a different model, and its log would read as one run. (A change of `heads`
//! keeps every tensor's size, so the tensor-size checks of the checkpoint cannot catch it.)

use super::Config;
use anyhow::{bail, Result};

/// One key whose value differs between the checkpoint's config and the config given now.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub key: String,
    /// The value in the checkpoint's config, as TOML text (`(unset)` when absent).
    pub was: String,
    /// The value now.
    pub now: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {} -> {}", self.key, self.was, self.now)
    }
}

/// Keys (or section prefixes) that do not change what a run computes.
///
/// `precision` is here because checkpoints hold fp32 master weights whatever the precision: a
/// run resumed under another precision continues the same model (the change is reported).
///
/// `parallel` is here because D replicas of one global batch compute the same step as one
/// process (up to the order of floating-point sums): a run may resume onto another D.
const HARMLESS: [&str; 17] = [
    "parallel",
    "run.log_every",
    "run.max_memory",
    "run.stop_grace_s",
    "run.out_dir",
    "eval",
    "checkpoint",
    "placement",
    "cuda",
    "precision",
    "kernels",
    "daemon",
    "supervision",
    "faults",
    "pipeline",
    "plan",
    "schedule.total_steps",
];

/// Whether `key` is `prefix` or lies under it (`optim.kind` under `optim`, `growth[1].init` under
/// `growth`).
fn under(key: &str, prefix: &str) -> bool {
    key == prefix || key.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
}

/// Whether changing `key` leaves the trajectory of a resumed run unchanged.
pub fn is_harmless(key: &str) -> bool {
    HARMLESS.iter().any(|p| under(key, p))
}

/// Every key that differs between two config texts (as written by [`Config::to_toml`]).
pub fn diff_texts(was: &str, now: &str) -> Result<Vec<Change>> {
    let parse = |t: &str, what: &str| -> Result<toml::Table> {
        toml::from_str(t).map_err(|e| anyhow::anyhow!("the {what} config is not TOML: {e}"))
    };
    let (a, b) = (parse(was, "checkpoint's")?, parse(now, "given")?);
    let mut fa = Vec::new();
    let mut fb = Vec::new();
    flatten("", &toml::Value::Table(a), &mut fa);
    flatten("", &toml::Value::Table(b), &mut fb);
    let ma: std::collections::BTreeMap<String, String> = fa.into_iter().collect();
    let mb: std::collections::BTreeMap<String, String> = fb.into_iter().collect();
    let keys: std::collections::BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
    let unset = || "(unset)".to_string();
    Ok(keys
        .into_iter()
        .filter(|k| ma.get(*k) != mb.get(*k))
        .map(|k| Change { key: k.clone(), was: ma.get(k).cloned().unwrap_or_else(unset), now: mb.get(k).cloned().unwrap_or_else(unset) })
        .collect())
}

/// A config text's keys and values, flattened as [`diff_texts`] compares them.
pub fn flat_keys(text: &str) -> Result<Vec<(String, String)>> {
    let t: toml::Table = toml::from_str(text).map_err(|e| anyhow::anyhow!("the config is not TOML: {e}"))?;
    let mut out = Vec::new();
    flatten("", &toml::Value::Table(t), &mut out);
    Ok(out)
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, x) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, x, out);
            }
        }
        toml::Value::Array(items) if items.iter().all(|x| x.is_table()) && !items.is_empty() => {
            for (i, x) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), x, out);
            }
        }
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// Check that a run may resume from a checkpoint written with `was` (its embedded config text)
/// under the config `now`. `allowed` names trajectory keys (or section prefixes) the user accepts
/// changing (`--allow-config-change`). Returns the accepted changes, for the log; an error lists
/// every change that is not accepted.
pub fn check_resume(was: &str, now: &Config, allowed: &[String]) -> Result<Vec<Change>> {
    let changes = diff_texts(was, &now.to_toml())?;
    let (ok, refused): (Vec<Change>, Vec<Change>) =
        changes.into_iter().partition(|c| is_harmless(&c.key) || allowed.iter().any(|a| under(&c.key, a.trim())));
    if !refused.is_empty() {
        let list: Vec<String> = refused.iter().map(|c| format!("  {c}")).collect();
        let keys: Vec<&str> = refused.iter().map(|c| c.key.as_str()).collect();
        bail!(
            "the config differs from the checkpoint's in keys that change the run's trajectory:\n{}\n\
             resume with the checkpoint's values, or accept the change with `--allow-config-change {}`",
            list.join("\n"),
            keys.join(" ")
        );
    }
    Ok(ok)
}
