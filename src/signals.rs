//! Stop signals that arrive before a run exists.
//!
//! A training process installs its stop-signal handling (`runtime::supervisor::
//! watch_stop_signals`) once its pipeline is built: after MPI has started, the data is loaded
//! and the actors are spawned. Before this module, a SIGTERM in that window (mpirun forwards
//! one to every rank, and a slow rank may still be starting) killed the process with the
//! default disposition, and mpirun then killed the rest: no final checkpoint. So `train` and
//! `daemon` call [`install`] first thing; it only counts signals (a handler that does nothing
//! else is async-signal-safe), and the watcher, once it exists, acts on the count as on
//! signals it received itself. Tokio's own handlers, registered later, chain to this one.

use std::sync::atomic::{AtomicUsize, Ordering};

static EARLY: AtomicUsize = AtomicUsize::new(0);

extern "C" fn count(_: libc::c_int) {
    EARLY.fetch_add(1, Ordering::SeqCst);
}

/// Count SIGTERM and SIGINT from now on (instead of dying of the first).
pub fn install() {
    let handler = count as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: `count` only touches an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGINT, handler);
    }
}

/// Stop signals received since [`install`] (a watcher installed later also sees the ones after
/// it started: read this once, before or right after creating its streams).
pub fn received() -> usize {
    EARLY.load(Ordering::SeqCst)
}
