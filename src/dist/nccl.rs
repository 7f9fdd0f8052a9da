//! NCCL: collectives on the device, for CUDA runs (the `nccl` cargo feature).
//!
//! With `[parallel] collectives = "nccl"` the replicas of a stage sum each unit's gradients with
//! `ncclAllReduce` in place on the unit's own stream, instead of downloading them for MPI and
//! uploading the sum (`runtime::grad_sync`). MPI still starts the processes, agrees on the
//! facts, carries the pipeline frames and hands the communicator's id from replica 0 to the
//! others.
//!
//! **Loading.** NCCL is opened at run time, like every CUDA library of this build, by its soname
//! `libnccl.so.2` (then `libnccl.so`), from the loader's path: `LD_LIBRARY_PATH` pointing at a
//! system install or at pip's `nvidia/nccl/lib` (package `nvidia-nccl-cu13`). `TAPROOT_NCCL`
//! names the file instead. cudarc's own NCCL module is not used: its loader tries
//! `libnccl.so`, `libnccl.so.13` and older majors, never `libnccl.so.2`, so it would need a
//! hand-made link beside pip's library. The dozen entry points taproot calls are bound here.
//!
//! **Order.** NCCL needs every rank to issue the collectives of one communicator in the same
//! order, and no two threads to use it at once. Each process has one communicator per stage's
//! replica group ([`with_replica_comm`]), behind a lock; the units issue their all-reduces in the
//! order the host path already relies on (each unit starts its own before it hands its input
//! gradient down, so the order is the stack's, top first, on every rank).
//!
//! **What has run.** Without a GPU (CI): loading by soname, the version, ids, the id's trip
//! through MPI, and the clear error of a rank that has no device (`tests/nccl.rs`). On a GPU,
//! `scripts/gpu-check.sh` runs world size 1: an all-reduce, a send and receive to itself, and a
//! training run whose gradients go through NCCL against the same run without. NCCL refuses two
//! ranks on one GPU, so a run of two replicas over NCCL needs two GPUs and has never been run.

use anyhow::{anyhow, bail, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Mutex, OnceLock};

type RawResult = c_int;
type RawComm = *mut c_void;

/// The sonames tried, in order, when `TAPROOT_NCCL` is unset.
pub const LIBRARY_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// NCCL's element types (`ncclDataType_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum DataType {
    F32 = 7,
    F64 = 8,
    Bf16 = 9,
}

/// A communicator's id (`ncclUniqueId`): made by one rank, handed to the others out of band.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct UniqueId {
    pub bytes: [u8; 128],
}

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UniqueId({:02x?}…)", &self.bytes[..8])
    }
}

impl UniqueId {
    /// A fresh id (NCCL opens its bootstrap socket here; no GPU needed).
    pub fn new() -> Result<UniqueId> {
        let api = api()?;
        let mut id = UniqueId { bytes: [0; 128] };
        check(api, unsafe { (api.get_unique_id)(&mut id) }, "ncclGetUniqueId")?;
        Ok(id)
    }
    /// The id as 16 words, to travel through a collective of integers.
    pub fn to_words(&self) -> [u64; 16] {
        std::array::from_fn(|i| u64::from_le_bytes(self.bytes[8 * i..8 * i + 8].try_into().expect("8 bytes")))
    }
    pub fn from_words(w: &[u64; 16]) -> UniqueId {
        let mut bytes = [0u8; 128];
        for (i, x) in w.iter().enumerate() {
            bytes[8 * i..8 * i + 8].copy_from_slice(&x.to_le_bytes());
        }
        UniqueId { bytes }
    }
}

struct Api {
    _lib: libloading::Library,
    get_version: unsafe extern "C" fn(*mut c_int) -> RawResult,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> RawResult,
    comm_init_rank: unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> RawResult,
    comm_destroy: unsafe extern "C" fn(RawComm) -> RawResult,
    comm_abort: unsafe extern "C" fn(RawComm) -> RawResult,
    comm_get_async_error: unsafe extern "C" fn(RawComm, *mut RawResult) -> RawResult,
    error_string: unsafe extern "C" fn(RawResult) -> *const c_char,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, *mut c_void) -> RawResult,
    send: unsafe extern "C" fn(*const c_void, usize, c_int, c_int, RawComm, *mut c_void) -> RawResult,
    recv: unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, RawComm, *mut c_void) -> RawResult,
    group_start: unsafe extern "C" fn() -> RawResult,
    group_end: unsafe extern "C" fn() -> RawResult,
}

fn api() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(|e| anyhow!("{e}"))
}

fn load() -> std::result::Result<Api, String> {
    let names: Vec<String> = match std::env::var("TAPROOT_NCCL") {
        Ok(path) if !path.is_empty() => vec![path],
        _ => LIBRARY_NAMES.iter().map(|s| s.to_string()).collect(),
    };
    let mut tried = Vec::new();
    for name in &names {
        // SAFETY: loading NCCL runs its initialisers, which only set up its own state.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => return bind(lib).map_err(|e| format!("{name} is not a usable NCCL: {e}")),
            Err(e) => tried.push(format!("{name}: {e}")),
        }
    }
    Err(format!(
        "NCCL could not be loaded ({}): install it (pip package nvidia-nccl-cu13, with its nvidia/nccl/lib on LD_LIBRARY_PATH, or the system's libnccl2) or set TAPROOT_NCCL to the library file",
        tried.join("; ")
    ))
}

fn bind(lib: libloading::Library) -> std::result::Result<Api, libloading::Error> {
    // SAFETY: each symbol is declared with NCCL's C signature (nccl.h, stable across 2.x).
    unsafe {
        Ok(Api {
            get_version: *lib.get(b"ncclGetVersion\0")?,
            get_unique_id: *lib.get(b"ncclGetUniqueId\0")?,
            comm_init_rank: *lib.get(b"ncclCommInitRank\0")?,
            comm_destroy: *lib.get(b"ncclCommDestroy\0")?,
            comm_abort: *lib.get(b"ncclCommAbort\0")?,
            comm_get_async_error: *lib.get(b"ncclCommGetAsyncError\0")?,
            error_string: *lib.get(b"ncclGetErrorString\0")?,
            all_reduce: *lib.get(b"ncclAllReduce\0")?,
            send: *lib.get(b"ncclSend\0")?,
            recv: *lib.get(b"ncclRecv\0")?,
            group_start: *lib.get(b"ncclGroupStart\0")?,
            group_end: *lib.get(b"ncclGroupEnd\0")?,
            _lib: lib,
        })
    }
}

fn check(api: &Api, r: RawResult, what: &str) -> Result<()> {
    if r == 0 {
        return Ok(());
    }
    // SAFETY: NCCL returns a static string for every result code.
    let msg = unsafe { CStr::from_ptr((api.error_string)(r)) }.to_string_lossy();
    bail!("{what} failed: NCCL error {r}: {msg}")
}

/// Whether NCCL can be loaded here.
pub fn available() -> bool {
    api().is_ok()
}

/// NCCL's version (major, minor, patch); an error says why it could not be loaded.
pub fn version() -> Result<(u32, u32, u32)> {
    let api = api()?;
    let mut v: c_int = 0;
    check(api, unsafe { (api.get_version)(&mut v) }, "ncclGetVersion")?;
    let v = v as u32;
    // NCCL ≥ 2.9 codes its version as major·10000 + minor·100 + patch.
    Ok((v / 10000, v / 100 % 100, v % 100))
}

/// One rank's handle on a communicator.
pub struct Comm {
    raw: RawComm,
    rank: usize,
    size: usize,
}

// SAFETY: a communicator may move between threads; it is used by one at a time (`&mut`-free
// calls below are serialized by the caller, as `with_replica_comm` does with its lock).
unsafe impl Send for Comm {}

impl Comm {
    /// Join the communicator `id` names, as `rank` of `size`. Collective: it returns once every
    /// rank has joined. The CUDA context of this rank's device must be current on this thread.
    pub fn init_rank(id: &UniqueId, rank: usize, size: usize) -> Result<Comm> {
        if rank >= size {
            bail!("NCCL rank {rank} is outside a communicator of {size}");
        }
        let api = api()?;
        let mut raw: RawComm = std::ptr::null_mut();
        let r = unsafe { (api.comm_init_rank)(&mut raw, size as c_int, *id, rank as c_int) };
        check(api, r, &format!("ncclCommInitRank (rank {rank} of {size})"))?;
        Ok(Comm { raw, rank, size })
    }
    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn size(&self) -> usize {
        self.size
    }

    /// `recv[i] = Σ over ranks of send[i]`, for `count` elements, ordered on `stream`
    /// (`send == recv` sums in place).
    ///
    /// # Safety
    /// `send` and `recv` are device addresses of at least `count` elements of `dtype` on this
    /// communicator's device, live until `stream` has run the operation; `stream` is a
    /// `CUstream` of that device.
    pub unsafe fn all_reduce_sum(&self, send: u64, recv: u64, count: usize, dtype: DataType, stream: *mut c_void) -> Result<()> {
        let api = api()?;
        let r = (api.all_reduce)(send as *const c_void, recv as *mut c_void, count, dtype as c_int, 0, self.raw, stream);
        check(api, r, "ncclAllReduce")
    }

    /// Send `count` elements at `buf` to `peer`, ordered on `stream`.
    ///
    /// # Safety
    /// As [`Comm::all_reduce_sum`].
    pub unsafe fn send(&self, buf: u64, count: usize, dtype: DataType, peer: usize, stream: *mut c_void) -> Result<()> {
        let api = api()?;
        check(api, (api.send)(buf as *const c_void, count, dtype as c_int, peer as c_int, self.raw, stream), "ncclSend")
    }

    /// Receive `count` elements from `peer` into `buf`, ordered on `stream`.
    ///
    /// # Safety
    /// As [`Comm::all_reduce_sum`].
    pub unsafe fn recv(&self, buf: u64, count: usize, dtype: DataType, peer: usize, stream: *mut c_void) -> Result<()> {
        let api = api()?;
        check(api, (api.recv)(buf as *mut c_void, count, dtype as c_int, peer as c_int, self.raw, stream), "ncclRecv")
    }

    /// An error NCCL met asynchronously (a peer gone, a network failure), if any.
    pub fn async_error(&self) -> Result<()> {
        async_error(self.raw)
    }

    /// A handle for another thread (the watchdog) to poll this communicator's asynchronous
    /// errors and abort it: both calls NCCL allows while other threads use it.
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle(self.raw)
    }
}

fn async_error(raw: RawComm) -> Result<()> {
    let api = api()?;
    let mut e: RawResult = 0;
    check(api, unsafe { (api.comm_get_async_error)(raw, &mut e) }, "ncclCommGetAsyncError")?;
    check(api, e, "a collective of this communicator")
}

/// A communicator seen from a watchdog thread ([`Comm::abort_handle`]).
pub struct AbortHandle(RawComm);

// SAFETY: NCCL allows ncclCommGetAsyncError and ncclCommAbort from any thread while others use
// the communicator.
unsafe impl Send for AbortHandle {}

impl AbortHandle {
    pub fn async_error(&self) -> Result<()> {
        async_error(self.0)
    }

    /// `ncclCommAbort`: end the kernels waiting in the communicator and free it.
    ///
    /// # Safety
    /// The communicator is not used again afterwards (the process stops).
    pub unsafe fn abort(&self) {
        if let Ok(api) = api() {
            (api.comm_abort)(self.0);
        }
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            unsafe { (api.comm_destroy)(self.raw) };
        }
    }
}

/// Run `f`'s point-to-point calls as one NCCL group (`ncclGroupStart` … `ncclGroupEnd`), so a
/// send and its matching receive on one rank do not wait for each other. The group is closed
/// even when `f` fails.
pub fn group<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let api = api()?;
    check(api, unsafe { (api.group_start)() }, "ncclGroupStart")?;
    let out = f();
    let end = check(api, unsafe { (api.group_end)() }, "ncclGroupEnd");
    let out = out?;
    end?;
    Ok(out)
}

/// The id of this process's communicator over its stage's replicas: replica 0 makes it and
/// every replica receives it through MPI ([`crate::dist::all_max_u64`]). Collective on its first
/// call; later calls return the same id.
pub fn replica_id() -> Result<UniqueId> {
    static ID: Mutex<Option<UniqueId>> = Mutex::new(None);
    let mut slot = ID.lock().map_err(|_| anyhow!("the NCCL id's lock is poisoned"))?;
    if let Some(id) = *slot {
        return Ok(id);
    }
    let mut words = if crate::dist::replica() == 0 { UniqueId::new()?.to_words() } else { [0; 16] };
    crate::dist::all_max_u64(&mut words);
    let id = UniqueId::from_words(&words);
    *slot = Some(id);
    Ok(id)
}

/// Run `f` on this process's communicator over its stage's replicas ([`replica_id`]), made on
/// first use. Collective like every call on it: the first unit to start its gradients' sum
/// makes it, on every rank the same unit, with its device's context current. The lock keeps
/// any two threads from using it at once.
pub fn with_replica_comm<R>(f: impl FnOnce(&Comm) -> Result<R>) -> Result<R> {
    static COMM: Mutex<Option<Comm>> = Mutex::new(None);
    let mut slot = COMM.lock().map_err(|_| anyhow!("the NCCL communicator's lock is poisoned"))?;
    if slot.is_none() {
        *slot = Some(Comm::init_rank(&replica_id()?, crate::dist::replica(), crate::dist::replicas())?);
    }
    f(slot.as_ref().expect("made above"))
}
