//! An op profile of the CPU backend: wall time and calls per op (matrix products per shape),
//! summed while switched on. `benches/cpu.rs --profile` uses it to show where a training step's
//! time goes, beside the step's own measured time, so that the two can be compared.
//!
//! The CPU backend is synchronous, so an op's wall time from entry to return is its cost. The
//! table is process-wide (one switch, one table): it is a measuring tool for benchmarks, off by
//! default, and costs one relaxed atomic load per op when off.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<Vec<OpTime>> = Mutex::new(Vec::new());

/// One row of the profile: an op (with its shape where that tells products apart), how many
/// times it ran and its total seconds.
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    pub op: String,
    pub calls: u64,
    pub secs: f64,
}

/// Times one op from its creation to its drop (nothing when profiling is off).
pub struct Guard(Option<(Cow<'static, str>, Instant)>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some((op, t0)) = self.0.take() {
            let secs = t0.elapsed().as_secs_f64();
            let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
            match table.iter_mut().find(|r| r.op == op) {
                Some(r) => {
                    r.calls += 1;
                    r.secs += secs;
                }
                None => table.push(OpTime { op: op.into_owned(), calls: 1, secs }),
            }
        }
    }
}

/// Time op `name` until the guard drops.
#[inline]
pub fn op(name: &'static str) -> Guard {
    match ON.load(Ordering::Relaxed) {
        true => Guard(Some((Cow::Borrowed(name), Instant::now()))),
        false => Guard(None),
    }
}

/// Time an op under a name built only when profiling is on (a product's shape, say).
#[inline]
pub fn op_named(name: impl FnOnce() -> String) -> Guard {
    match ON.load(Ordering::Relaxed) {
        true => Guard(Some((Cow::Owned(name()), Instant::now()))),
        false => Guard(None),
    }
}

/// Clear the table and start recording.
pub fn start() {
    TABLE.lock().unwrap_or_else(|e| e.into_inner()).clear();
    ON.store(true, Ordering::Relaxed);
}

/// Stop recording and return the table, the most expensive op first.
pub fn stop() -> Vec<OpTime> {
    ON.store(false, Ordering::Relaxed);
    let mut rows = std::mem::take(&mut *TABLE.lock().unwrap_or_else(|e| e.into_inner()));
    rows.sort_by(|a, b| b.secs.total_cmp(&a.secs));
    rows
}
