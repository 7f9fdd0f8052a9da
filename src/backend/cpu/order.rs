//! Stream-order checking: a happens-before race detector over the CPU backend's streams.
//!
//! The CPU backend finishes every op inside the call, so a missing event wait never gives a
//! wrong number on it — while on a GPU the same code would race. So that CI catches such bugs
//! anyway, every CPU stream keeps a vector clock and every buffer remembers who last wrote it
//! and who read it since, as a GPU race detector would:
//!
//! - A stream's own clock entry is its *epoch*. Its writes and reads are stamped with it;
//!   `record` returns an event holding the whole clock and then starts a new epoch.
//! - `wait(event)` joins the event's clock into the waiting stream's clock.
//! - An access by stream S is ordered after an earlier access by stream T (T ≠ S) at epoch e
//!   iff S's clock has seen T at e or later, that is, S waited on an event T recorded after it.
//!   A read must be ordered after the last write; a write after the last write and after every
//!   read since. Anything else panics, naming both streams: it is a race on a GPU.
//!
//! Allocation counts as a write by the allocating stream (on a GPU, `alloc_zeros` is a memset
//! queued on that stream).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// A vector clock: (stream id, epoch) pairs, sorted by id. Small: one entry per stream that
/// handed this one something.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Clock(Vec<(u32, u64)>);

impl Clock {
    fn get(&self, id: u32) -> u64 {
        self.0.binary_search_by_key(&id, |e| e.0).map_or(0, |i| self.0[i].1)
    }
    fn set(&mut self, id: u32, epoch: u64) {
        match self.0.binary_search_by_key(&id, |e| e.0) {
            Ok(i) => self.0[i].1 = epoch,
            Err(i) => self.0.insert(i, (id, epoch)),
        }
    }
    fn join(&mut self, other: &Clock) {
        for &(id, e) in &other.0 {
            if self.get(id) < e {
                self.set(id, e);
            }
        }
    }
}

/// A point in a CPU stream's work: the stream's clock when it was recorded.
#[derive(Clone, Debug)]
pub struct CpuEvent {
    clock: Clock,
}

/// One stream's identity and clock.
#[derive(Debug)]
pub struct Stream {
    id: u32,
    clock: Mutex<Clock>,
}

static NEXT_STREAM: AtomicU32 = AtomicU32::new(1);

impl Default for Stream {
    fn default() -> Self {
        Self::new()
    }
}

impl Stream {
    /// A new stream, with an id no other stream of this process has.
    pub fn new() -> Self {
        let id = NEXT_STREAM.fetch_add(1, Ordering::Relaxed);
        let mut clock = Clock::default();
        clock.set(id, 1);
        Stream { id, clock: Mutex::new(clock) }
    }

    fn epoch(&self) -> (u32, u64) {
        let c = self.clock.lock().expect("stream clock");
        (self.id, c.get(self.id))
    }

    pub fn record(&self) -> CpuEvent {
        let mut c = self.clock.lock().expect("stream clock");
        let ev = CpuEvent { clock: c.clone() };
        let next = c.get(self.id) + 1;
        c.set(self.id, next);
        ev
    }

    pub fn wait(&self, ev: &CpuEvent) {
        self.clock.lock().expect("stream clock").join(&ev.clock);
    }

    /// Whether this stream's work is ordered after stream `id`'s work of `epoch`.
    fn has_seen(&self, id: u32, epoch: u64) -> bool {
        id == self.id || self.clock.lock().expect("stream clock").get(id) >= epoch
    }
}

/// Who touched a buffer: the last write, and the reads since (latest epoch per stream).
#[derive(Debug, Default)]
pub struct Access {
    write: Option<(u32, u64)>,
    reads: Vec<(u32, u64)>,
}

impl Access {
    /// A buffer just allocated by `stream` (written by it).
    pub fn born(stream: &Stream) -> Self {
        Access { write: Some(stream.epoch()), reads: Vec::new() }
    }
}

fn race(stream: &Stream, device: &str, what: &str, other: u32, epoch: u64) -> ! {
    panic!(
        "stream order: stream {} ({device}) {what} a buffer that stream {other} used in its epoch {epoch} without waiting on an event recorded after that use — a missing `wait`, a race on a GPU",
        stream.id
    )
}

/// Check and note a read by `stream`.
pub fn read(stream: &Stream, device: &str, acc: &mut Access) {
    if let Some((w, e)) = acc.write {
        if !stream.has_seen(w, e) {
            race(stream, device, "reads", w, e);
        }
    }
    let (id, now) = stream.epoch();
    match acc.reads.iter_mut().find(|r| r.0 == id) {
        Some(r) => r.1 = now,
        None => acc.reads.push((id, now)),
    }
}

/// Check and note a write by `stream` (read-modify-writes included).
pub fn write(stream: &Stream, device: &str, acc: &mut Access) {
    if let Some((w, e)) = acc.write {
        if !stream.has_seen(w, e) {
            race(stream, device, "writes", w, e);
        }
    }
    for &(r, e) in &acc.reads {
        if !stream.has_seen(r, e) {
            race(stream, device, "overwrites", r, e);
        }
    }
    acc.write = Some(stream.epoch());
    acc.reads.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_needs_a_wait_on_an_event_recorded_after_the_write() {
        let (a, b) = (Stream::new(), Stream::new());
        let mut acc = Access::born(&a); // written by a, epoch 1
        b.wait(&a.record());
        read(&b, "cpu:0", &mut acc); // ordered
        let mut later = Access::born(&a); // written by a after that event
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(&b, "cpu:0", &mut later)));
        assert!(r.is_err(), "a read of a write b never waited for must panic");
        b.wait(&a.record());
        read(&b, "cpu:0", &mut later); // ordered now
    }

    #[test]
    fn a_write_after_another_streams_read_needs_a_wait() {
        let (a, b) = (Stream::new(), Stream::new());
        let mut acc = Access::born(&a);
        b.wait(&a.record());
        read(&b, "cpu:0", &mut acc);
        // a overwrites what b read, without waiting on b: a race
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write(&a, "cpu:0", &mut acc)));
        assert!(r.is_err());
        // with the wait it is ordered
        let mut acc = Access::born(&a);
        b.wait(&a.record());
        read(&b, "cpu:0", &mut acc);
        a.wait(&b.record());
        write(&a, "cpu:0", &mut acc);
    }
}
