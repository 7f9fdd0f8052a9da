//! Every process of a run agrees before step 1.
//!
//! Processes started from one command line can still differ: another config file on one host,
//! a `--set` given to one rank, another build of the binary, another copy of the data. Such a
//! run either crashes in a collective (different tensor sizes, a different number of steps) or,
//! worse, trains silently to a different loss. So before anything else, right after MPI starts,
//! every rank states its [`Facts`] — the resolved config key by key, the command-line options
//! that change the run, the binary, and a fingerprint of the data folder — and the ranks
//! compare a digest of them. Where digests differ, rank 0's facts go to every rank, each finds
//! the keys where it differs, and every rank stops with one message naming the keys and ranks.
//! The digest exchange is one all-gather of 8 bytes per rank; the rest runs only on a mismatch.

use crate::config::Config;
use std::collections::BTreeMap;
use std::path::Path;

/// What one process is about to run, key by key (`model.channels = 64`, `binary = …`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Facts(BTreeMap<String, String>);

impl Facts {
    /// The facts of a run of `cfg` with the given command-line options (name, value).
    pub fn of_run(cfg: &Config, options: &[(&str, String)]) -> Facts {
        let mut m: BTreeMap<String, String> = crate::config::changes::flat_keys(&cfg.to_toml()).unwrap_or_default().into_iter().collect();
        // The text leaves out a default `[parallel]`: its sizes are stated always.
        let p = &cfg.parallel;
        for (k, v) in
            [("parallel.data", p.data.to_string()), ("parallel.pipeline", p.pipeline.to_string()), ("parallel.zero", p.zero.to_string())]
        {
            m.insert(k.into(), v);
        }
        for (k, v) in options {
            m.insert(format!("option.{k}"), v.clone());
        }
        m.insert("binary".into(), binary_fingerprint());
        for (name, dir, _) in cfg.data.folders() {
            let key = if cfg.data.sources.is_empty() { "data.files".to_string() } else { format!("data.files.{name}") };
            m.insert(key, data_fingerprint(&dir));
        }
        Facts(m)
    }

    /// As text, one `key = value` line per fact, sorted by key (what travels on a mismatch).
    pub fn text(&self) -> String {
        self.0.iter().map(|(k, v)| format!("{k} = {v}\n")).collect()
    }

    /// The facts of [`Facts::text`].
    pub fn parse(text: &str) -> Facts {
        Facts(text.lines().filter_map(|l| l.split_once(" = ")).map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    /// A 64-bit digest of the text.
    pub fn digest(&self) -> u64 {
        crate::checkpoint::checksum::hash_bytes(self.text().as_bytes())
    }

    /// How these facts (of rank `me`) differ from rank 0's: one entry per differing key, `` `key`
    /// (X on rank me, Y on rank 0) ``, shortened to a few hundred bytes so that it fits in one fixed-size message.
    pub fn differences(&self, rank0: &Facts, me: usize) -> String {
        let keys: std::collections::BTreeSet<&String> = self.0.keys().chain(rank0.0.keys()).collect();
        let short = |v: Option<&String>| {
            let v = v.map_or("(unset)", |s| s.as_str());
            if v.len() > 40 {
                format!("{}…", &v[..v.char_indices().nth(40).map_or(v.len(), |(i, _)| i)])
            } else {
                v.to_string()
            }
        };
        let mut out = String::new();
        let mut left = 0;
        for k in keys.into_iter().filter(|k| self.0.get(*k) != rank0.0.get(*k)) {
            let item = format!("`{k}` ({} on rank {me}, {} on rank 0)", short(self.0.get(k)), short(rank0.0.get(k)));
            if out.len() + item.len() + 2 > MESSAGE_BYTES - 40 {
                left += 1;
                continue;
            }
            if !out.is_empty() {
                out.push_str(", ");
            }
            out.push_str(&item);
        }
        if left > 0 {
            out.push_str(&format!(" and {left} more"));
        }
        out
    }
}

/// The size of one rank's message of differences in the exchange.
pub const MESSAGE_BYTES: usize = 1024;

/// The one message every rank stops with, from every rank's differences (empty: agrees).
pub fn message(per_rank: &[String]) -> Option<String> {
    let lines: Vec<String> =
        per_rank.iter().enumerate().filter(|(_, d)| !d.is_empty()).map(|(r, d)| format!("  rank {r} differs from rank 0 in {d}")).collect();
    if lines.is_empty() {
        return None;
    }
    Some(format!(
        "the processes of this run do not agree, so none of them starts (give every rank the same config, options, binary and data):\n{}",
        lines.join("\n")
    ))
}

/// The crate version and a hash of this process's executable file (two builds of one version
/// differ).
fn binary_fingerprint() -> String {
    use std::io::Read;
    // Read 1 MiB at a time (the binary is ~100 MB), each chunk's hash folded into the text.
    let hash = || -> std::io::Result<String> {
        let mut f = std::fs::File::open(std::env::current_exe()?)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut text = String::new();
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            text.push_str(&format!("{:x}", crate::checkpoint::checksum::hash_bytes(&buf[..n])));
        }
        Ok(format!("{:016x}", crate::checkpoint::checksum::hash_bytes(text.as_bytes())))
    };
    format!("taproot {} {}", env!("CARGO_PKG_VERSION"), hash().unwrap_or_else(|_| "unreadable".into()))
}

/// The data folder's files by name and size, with a hash of the first and last 64 KiB of each
/// (headers, tokenizer records and the ends of shards), in name order.
fn data_fingerprint(dir: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(rd) = std::fs::read_dir(dir) else { return "(no folder)".into() };
    let mut files: Vec<_> = rd.flatten().filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false)).collect();
    files.sort_by_key(|e| e.file_name());
    let mut text = String::new();
    for e in files {
        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
        let mut buf = Vec::new();
        if let Ok(mut f) = std::fs::File::open(e.path()) {
            let mut head = vec![0u8; 65536.min(len as usize)];
            let _ = f.read_exact(&mut head);
            buf.extend_from_slice(&head);
            if len > 65536 && f.seek(SeekFrom::Start(len - 65536)).is_ok() {
                let mut tail = vec![0u8; 65536];
                let _ = f.read_exact(&mut tail);
                buf.extend_from_slice(&tail);
            }
        }
        text.push_str(&format!("{}:{len}:{:x};", e.file_name().to_string_lossy(), crate::checkpoint::checksum::hash_bytes(&buf)));
    }
    format!("{:016x}", crate::checkpoint::checksum::hash_bytes(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(pairs: &[(&str, &str)]) -> Facts {
        Facts(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn differences_name_every_key_and_both_values() {
        let r0 = facts(&[("model.channels", "64"), ("run.seed", "1"), ("schedule.lr", "0.01")]);
        let r1 = facts(&[("model.channels", "128"), ("run.seed", "1"), ("option.stop_after", "5")]);
        assert_eq!(r0.differences(&r0, 0), "");
        let d = r1.differences(&r0, 1);
        assert_eq!(d, "`model.channels` (128 on rank 1, 64 on rank 0), `option.stop_after` (5 on rank 1, (unset) on rank 0), `schedule.lr` ((unset) on rank 1, 0.01 on rank 0)");
        let msg = message(&[String::new(), d, String::new()]).unwrap();
        assert!(msg.contains("rank 1 differs from rank 0 in `model.channels`") && !msg.contains("rank 2"), "{msg}");
        assert!(message(&[String::new(), String::new()]).is_none());
        assert_eq!(Facts::parse(&r1.text()), r1);
        assert_ne!(r0.digest(), r1.digest());
    }

    #[test]
    fn a_long_list_of_differences_fits_in_one_message() {
        let r0 = facts(&[]);
        let many: Vec<(String, String)> = (0..200).map(|i| (format!("key{i:03}"), "x".repeat(60))).collect();
        let r1 = Facts(many.into_iter().collect());
        let d = r1.differences(&r0, 1);
        assert!(d.len() < MESSAGE_BYTES && d.ends_with("more"), "{} bytes: {d}", d.len());
    }

    #[test]
    fn the_run_facts_cover_config_options_binary_and_data() {
        let cfg = Config::parse("[run]\nname = \"x\"\nsteps = 10\n[data]\ndir = \"d\"\ntokenizer = \"bytes\"\nbatch_size = 2\nseq_len = 8\n[model]\nchannels = 16\nheads = 2\ndepth = 1\n", &[]).unwrap();
        let f = Facts::of_run(&cfg, &[("resume", "true".into())]);
        for k in ["model.channels", "schedule.lr", "run.seed", "data.micro_batches", "option.resume", "binary", "data.files"] {
            assert!(f.0.contains_key(k), "no `{k}` in {:?}", f.0.keys().collect::<Vec<_>>());
        }
    }
}
