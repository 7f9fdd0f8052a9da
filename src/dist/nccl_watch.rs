//! A watchdog over NCCL's collectives (`parallel.timeout_s`).
//!
//! An NCCL call returns as soon as its collective is queued on a stream. When a replica is
//! stopped, stuck or gone, the others' kernels wait for it on the device, and their host threads
//! wait forever at their next synchronisation, where the MPI collectives' timeout cannot see
//! them. So each all-reduce records an event on its stream behind the collective
//! ([`watch_all_reduce`]), and a thread of its own checks a few times a second:
//! - an error NCCL met asynchronously (a peer's connection lost) stops the run at once;
//! - a collective not done `parallel.timeout_s` after it was queued stops it too.
//!
//! Either way the thread names the collective and how long it waited, aborts the communicator
//! (`ncclCommAbort` ends the kernels waiting in it) and stops every process of the run
//! (`MPI_Abort`, as the MPI timeout does; the newest checkpoint stands). A timeout of 0 watches
//! nothing.
//!
//! [`Watch`], the bookkeeping, is plain data (tested on any machine); the events and the thread
//! are CUDA's and NCCL's (the `nccl` feature).

/// The collectives in flight: what each is, when it was queued (ms), and how to ask whether it
/// is done (`E`: a CUDA event recorded behind it).
pub struct Watch<E> {
    pending: Vec<(String, u64, E)>,
}

impl<E> Default for Watch<E> {
    fn default() -> Self {
        Watch { pending: Vec::new() }
    }
}

impl<E> Watch<E> {
    /// A collective `what`, queued at `now_ms`, done when `done` says so.
    pub fn push(&mut self, what: String, now_ms: u64, done: E) {
        self.pending.push((what, now_ms, done));
    }

    /// Collectives not yet seen done.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Forget the collectives `finished` says are done (streams finish in their own orders, so
    /// every one is asked); of the others, the one that has waited longest, if it has waited more
    /// than `limit_ms` at `now_ms`: its name and how long it has waited (ms).
    pub fn overdue(&mut self, now_ms: u64, limit_ms: u64, mut finished: impl FnMut(&E) -> bool) -> Option<(String, u64)> {
        self.pending.retain(|(_, _, e)| !finished(e));
        let (what, since, _) = self.pending.iter().min_by_key(|(_, since, _)| *since)?;
        let waited = now_ms.saturating_sub(*since);
        (waited > limit_ms).then(|| (what.clone(), waited))
    }
}

#[cfg(feature = "nccl")]
pub use cuda::{stall_stream, watch_all_reduce};

#[cfg(feature = "nccl")]
mod cuda {
    use super::super::watchdog::now_ms;
    use super::Watch;
    use anyhow::{anyhow, Result};
    use cudarc::driver::sys;
    use std::sync::Mutex;
    use std::time::Duration;

    /// An event recorded behind a collective, and the context it belongs to (made current on
    /// the watchdog's thread before it is queried).
    struct Event {
        raw: sys::CUevent,
        ctx: sys::CUcontext,
    }

    // SAFETY: a CUDA event and a context handle may be used from any thread.
    unsafe impl Send for Event {}

    impl Drop for Event {
        fn drop(&mut self) {
            unsafe {
                sys::cuCtxSetCurrent(self.ctx);
                sys::cuEventDestroy_v2(self.raw);
            }
        }
    }

    static WATCH: Mutex<Option<Watch<Event>>> = Mutex::new(None);

    fn cu(r: sys::CUresult, what: &str) -> Result<()> {
        r.result().map_err(|e| anyhow!("{what} failed: {e:?}"))
    }

    /// Watch the collective `what` just queued on `stream` (whose context is current on this
    /// thread) over `comm`: record an event behind it, and start the watchdog's thread on first
    /// use. Nothing is watched when `parallel.timeout_s` is 0.
    pub fn watch_all_reduce(what: String, stream: *mut std::ffi::c_void, comm: &super::super::nccl::Comm) -> Result<()> {
        let Some(limit) = super::super::timeout() else {
            return Ok(());
        };
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        let mut raw: sys::CUevent = std::ptr::null_mut();
        unsafe {
            cu(sys::cuCtxGetCurrent(&mut ctx), "cuCtxGetCurrent")?;
            cu(sys::cuEventCreate(&mut raw, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32), "cuEventCreate")?;
        }
        let ev = Event { raw, ctx };
        unsafe { cu(sys::cuEventRecord(ev.raw, stream as sys::CUstream), "cuEventRecord")? };
        let mut w = WATCH.lock().map_err(|_| anyhow!("the NCCL watchdog's lock is poisoned"))?;
        if w.is_none() {
            *w = Some(Watch::default());
            let handle = comm.abort_handle();
            std::thread::Builder::new()
                .name("nccl-watchdog".into())
                .spawn(move || watchdog(limit, handle))
                .map_err(|e| anyhow!("starting the NCCL watchdog: {e}"))?;
        }
        w.as_mut().expect("made above").push(what, now_ms(), ev);
        Ok(())
    }

    /// The watchdog's thread: checks every tenth of the limit (at most once a second).
    fn watchdog(limit: Duration, comm: super::super::nccl::AbortHandle) {
        let limit_ms = limit.as_millis() as u64;
        let period = Duration::from_millis((limit_ms / 10).clamp(50, 1000));
        loop {
            std::thread::sleep(period);
            let problem = match comm.async_error() {
                Err(e) => Some(format!("{e:#}")),
                Ok(()) => {
                    let mut w = WATCH.lock().unwrap_or_else(|e| e.into_inner());
                    let finished = |e: &Event| unsafe {
                        sys::cuCtxSetCurrent(e.ctx);
                        // Not ready: still waiting. Done, or failed (the failure is the
                        // stream's to report): no longer this thread's to time.
                        sys::cuEventQuery(e.raw) != sys::CUresult::CUDA_ERROR_NOT_READY
                    };
                    w.as_mut().and_then(|w| w.overdue(now_ms(), limit_ms, finished)).map(|(what, waited)| {
                        format!(
                            "{what} has not completed {:.1} s after it was queued (`parallel.timeout_s` = {}): a replica is stopped, stuck or gone",
                            waited as f64 / 1e3,
                            limit.as_secs()
                        )
                    })
                }
            };
            if let Some(why) = problem {
                eprintln!(
                    "error: rank {}: NCCL: {why}; aborting the communicator and stopping the run (the newest checkpoint stands)",
                    super::super::rank()
                );
                // The abort may itself wait on the device; the run stops after 10 s regardless.
                let (done, aborted) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    unsafe { comm.abort() };
                    let _ = done.send(());
                });
                let _ = aborted.recv_timeout(Duration::from_secs(10));
                super::super::abort(75);
                // At once, without the exit handlers: CUDA's teardown could wait on the streams
                // that are stuck.
                use std::io::Write;
                let _ = std::io::stderr().flush();
                unsafe { libc::_exit(75) };
            }
        }
    }

    /// A fault for tests (`faults.stall_collectives_ms`): hold `stream` for `ms` milliseconds
    /// with a host function that sleeps, as a replica that stopped would hold its peers.
    pub fn stall_stream(stream: *mut std::ffi::c_void, ms: u64) -> Result<()> {
        unsafe extern "C" fn sleep(ms: *mut std::ffi::c_void) {
            std::thread::sleep(Duration::from_millis(ms as usize as u64));
        }
        unsafe { cu(sys::cuLaunchHostFunc(stream as sys::CUstream, Some(sleep), ms as usize as *mut std::ffi::c_void), "cuLaunchHostFunc") }
    }
}

#[cfg(test)]
mod tests {
    use super::Watch;

    #[test]
    fn the_oldest_collective_still_running_past_the_limit_is_named() {
        let mut w: Watch<u32> = Watch::default();
        w.push("all-reduce a".into(), 0, 1);
        w.push("all-reduce b".into(), 100, 2);
        w.push("all-reduce c".into(), 200, 3);
        // Nothing done, nothing past the limit yet.
        assert_eq!(w.overdue(1000, 1000, |_| false), None);
        assert_eq!(w.len(), 3);
        // a finished; b (queued at 100) is the oldest left and has waited 1001 ms.
        assert_eq!(w.overdue(1101, 1000, |&e| e == 1), Some(("all-reduce b".into(), 1001)));
        assert_eq!(w.len(), 2);
        // Exactly at the limit is not past it.
        assert_eq!(w.overdue(1100, 1000, |_| false), None);
        // Streams finish in their own orders: c done before b still counts c out.
        assert_eq!(w.overdue(1300, 1000, |&e| e == 3), Some(("all-reduce b".into(), 1200)));
        assert_eq!(w.overdue(5000, 1000, |&e| e == 2), None);
        assert!(w.is_empty());
    }
}
