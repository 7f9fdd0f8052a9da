//! A checkpoint described for people (`taproot inspect`).

use super::Checkpoint;

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

/// A human summary (for `taproot inspect`).
pub fn describe(ck: &Checkpoint) -> String {
    use std::fmt::Write as _;
    let m = &ck.meta;
    let mut s = String::new();
    let _ = writeln!(s, "run:      {}", m.run_name);
    let _ = writeln!(s, "step:     {} (updates done)", m.step);
    let _ = writeln!(s, "depth:    {}", m.depth);
    let _ = writeln!(s, "stack:    {:?} (layer ids, bottom to top; next id {})", m.stack, m.next_id);
    let _ = writeln!(s, "loader:   {} batches drawn, rng state {:#018x}", m.loader.batches, m.loader.rng);
    let _ = writeln!(s, "created:  {} (unix seconds), format v{}", m.created_unix_s, m.format_version);
    if m.growth.is_empty() {
        let _ = writeln!(s, "growth:   none yet");
    } else {
        let _ = writeln!(s, "growth:");
        for g in &m.growth {
            let _ = writeln!(
                s,
                "  at step {}: depth {} -> {}, new ids {:?}, stack {:?}",
                g.at_step, g.from_depth, g.to_depth, g.new_ids, g.stack
            );
        }
    }
    let _ = writeln!(s, "units:");
    let mut total_params = 0u64;
    let mut total_bytes = 0u64;
    for (key, u) in &ck.units {
        let n = u.params.len() as u64;
        let bytes = 4 * (u.params.len() + u.m.len() + u.v.as_ref().map_or(0, Vec::len)) as u64;
        total_params += n;
        total_bytes += bytes;
        let second = if u.v.is_some() { "m + v (AdamW second moments)" } else { "m only" };
        let _ = writeln!(s, "  {:<10} {:>12} params  {:<29} {}", key.to_string(), n, second, human_bytes(bytes));
    }
    let _ = writeln!(s, "total:    {total_params} params, {} of tensors ({total_bytes} bytes)", human_bytes(total_bytes));
    if !m.extra.is_null() {
        let _ = writeln!(s, "extra:    {}", m.extra);
    }
    s
}
