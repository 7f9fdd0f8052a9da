//! NCCL (`--features nccl`, `src/dist/nccl.rs`).
//!
//! Without a GPU (CI): NCCL loads by its soname `libnccl.so.2` from `LD_LIBRARY_PATH` (`.ci/run`
//! installs pip's `nvidia-nccl-cu13` into `target/pydeps` and puts its `nvidia/nccl/lib`, which
//! holds no `libnccl.so` link, on the path), reports its version, makes fresh ids that survive
//! their trip through integers, and a rank without a device gets a clear error. With
//! `TAPROOT_REQUIRE_NCCL=1` a library that cannot be loaded fails instead of skipping. The
//! config's checks of `parallel.collectives` run everywhere.
//!
//! With a GPU (`scripts/gpu-check.sh`; these print SKIP without one), at world size 1, since
//! NCCL refuses two ranks on one GPU: an all-reduce in place and out of place, a send and
//! receive to itself in one group, and a training run with growth whose gradients go through
//! NCCL, against the same run through the host path, loss for loss and bit for bit.

mod common;

use common::TestConfig;
use taproot::backend::cuda::{self, CudaBackend};
use taproot::backend::{Backend, View};
use taproot::config::Collectives;
use taproot::dist::nccl::{self, Comm, DataType, UniqueId};

/// Whether NCCL loads here; without it, SKIP (or fail under TAPROOT_REQUIRE_NCCL=1).
fn nccl_here() -> bool {
    match nccl::version() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("TAPROOT_REQUIRE_NCCL").is_ok_and(|v| v == "1") {
                panic!("TAPROOT_REQUIRE_NCCL is set but NCCL cannot be loaded: {e:#}");
            }
            println!("SKIP: {e:#}");
            false
        }
    }
}

fn gpu() -> Option<CudaBackend> {
    if !nccl_here() {
        return None;
    }
    common::gpu()
}

#[test]
fn nccl_loads_by_its_soname_and_reports_its_version() {
    if !nccl_here() {
        return;
    }
    assert_eq!(nccl::LIBRARY_NAMES[0], "libnccl.so.2");
    let (major, minor, patch) = nccl::version().unwrap();
    println!("NCCL {major}.{minor}.{patch}");
    assert_eq!(major, 2, "NCCL {major}.{minor}.{patch}: taproot binds NCCL 2's entry points");
    assert!(minor >= 18, "NCCL {major}.{minor}.{patch} is older than 2.18 (the oldest with every entry point used here)");
    assert!(nccl::available());
}

#[test]
fn ids_are_fresh_and_survive_their_trip_through_integers() {
    if !nccl_here() {
        return;
    }
    let a = UniqueId::new().unwrap();
    let b = UniqueId::new().unwrap();
    assert_ne!(a, b, "two ids made in turn are the same");
    assert_ne!(a.bytes, [0u8; 128]);
    assert_eq!(UniqueId::from_words(&a.to_words()), a);
    // Integers that differ from the id in one byte make another id: every byte travels.
    let mut w = a.to_words();
    w[15] ^= 1 << 56;
    assert_ne!(UniqueId::from_words(&w), a);
}

#[test]
fn a_rank_without_a_device_gets_a_clear_error() {
    if !nccl_here() {
        return;
    }
    let id = UniqueId::new().unwrap();
    let e = Comm::init_rank(&id, 1, 1).err().expect("rank 1 of 1 was accepted");
    assert!(e.to_string().contains("rank 1 is outside a communicator of 1"), "{e}");
    if matches!(cuda::device_count(), Ok(n) if n > 0) {
        println!("a GPU is here: the device-less error is not what this machine can show");
        return;
    }
    let e = Comm::init_rank(&id, 0, 1).err().expect("a communicator was made without a GPU");
    let msg = format!("{e:#}");
    println!("{msg}");
    assert!(msg.contains("ncclCommInitRank (rank 0 of 1) failed: NCCL error"), "{msg}");
}

#[test]
fn the_config_admits_nccl_only_for_one_cuda_device_per_process() {
    let dir = std::env::temp_dir().join(format!("taproot-nccl-cfg-{}", std::process::id()));
    let base = || TestConfig::new(&dir).name("nccl-cfg").steps(10).set("parallel.collectives", "nccl");
    let e = format!("{:#}", base().build_result().unwrap_err());
    assert!(e.contains("`parallel.collectives` = \"nccl\" sums gradients on CUDA devices"), "{e}");
    let e = format!("{:#}", base().devices(&["cuda:0", "cuda:1"]).build_result().unwrap_err());
    assert!(e.contains("one device per process") && e.contains("lists 2"), "{e}");
    let e = format!("{:#}", base().devices(&["cuda:0"]).set("placement.ends", "cuda:1").build_result().unwrap_err());
    assert!(e.contains("one device per process") && e.contains("lists 2"), "{e}");
    let cfg = base().devices(&["cuda:0"]).build();
    assert_eq!(cfg.parallel.collectives, Collectives::Nccl);
    // The host path stays the default, and a misspelt value names the key and the choices.
    assert_eq!(TestConfig::new(&dir).name("nccl-cfg").steps(10).build().parallel.collectives, Collectives::Host);
    let e =
        format!("{:#}", TestConfig::new(&dir).name("nccl-cfg").steps(10).set("parallel.collectives", "nvlink").build_result().unwrap_err());
    assert!(e.contains("collectives") && e.contains("`host`") && e.contains("`nccl`"), "{e}");
    // The watchdog's fault holds NCCL's all-reduces: on the host path it is an error, not ignored.
    let e = format!(
        "{:#}",
        TestConfig::new(&dir).name("nccl-cfg").steps(10).set("faults.stall_collectives_ms", 100).build_result().unwrap_err()
    );
    assert!(e.contains("`faults.stall_collectives_ms`") && e.contains("\"nccl\""), "{e}");
    assert_eq!(base().devices(&["cuda:0"]).set("faults.stall_collectives_ms", 100).build().faults.stall_collectives_ms, 100);
}

fn up(be: &CudaBackend, h: &[f32]) -> <CudaBackend as Backend>::Buf {
    let b = be.alloc(h.len());
    be.upload(CudaBackend::whole(&b), h);
    b
}

fn down(be: &CudaBackend, b: &<CudaBackend as Backend>::Buf) -> Vec<f32> {
    let mut h = vec![0.0; CudaBackend::buf_len(b)];
    be.download(CudaBackend::whole(b), &mut h);
    h
}

/// World size 1: the sum over one rank is the rank's own values, in place and into another
/// buffer; a send to itself arrives whole when it and its receive are one group.
#[test]
fn world_of_one_all_reduces_and_sends_to_itself_on_the_gpu() {
    let Some(g) = gpu() else { return };
    let n = 100_003;
    let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    let a = up(&g, &x);
    let b = up(&g, &vec![0.0; n]);
    let va = g.device_view(View::new(&a, 0, n)).unwrap();
    let vb = g.device_view(View::new(&b, 0, n)).unwrap();
    let comm = Comm::init_rank(&UniqueId::new().unwrap(), 0, 1).unwrap();
    assert_eq!((comm.rank(), comm.size()), (0, 1));
    unsafe { comm.all_reduce_sum(va.ptr, va.ptr, n, DataType::F32, va.stream).unwrap() };
    assert_eq!(down(&g, &a), x, "in place");
    unsafe { comm.all_reduce_sum(va.ptr, vb.ptr, n, DataType::F32, va.stream).unwrap() };
    assert_eq!(down(&g, &b), x, "out of place");
    // Send the second half to itself into the start of b.
    let c = up(&g, &vec![-1.0; n]);
    let vc = g.device_view(View::new(&c, 0, n)).unwrap();
    let half = n / 2;
    nccl::group(|| unsafe {
        comm.send(va.ptr + 4 * half as u64, n - half, DataType::F32, 0, va.stream)?;
        comm.recv(vc.ptr, n - half, DataType::F32, 0, va.stream)
    })
    .unwrap();
    let got = down(&g, &c);
    assert_eq!(&got[..n - half], &x[half..], "the received half");
    assert!(got[n - half..].iter().all(|&v| v == -1.0), "a receive wrote past its count");
    comm.async_error().unwrap();
}

/// The actor runtime on one GPU, 20 steps growing 1 → 3 blocks: every unit's gradients summed
/// over NCCL (a communicator of one) against the same run through the host path. The sum over
/// one rank is exact, so the losses are the same bits.
#[test]
fn training_with_gradients_over_nccl_matches_the_host_path_on_the_gpu() {
    if gpu().is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("taproot-nccl-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |name: &str, c: Collectives| {
        let mut cfg = common::tiny_gpu_cfg(&dir, name).devices(&["cuda:0"]).build();
        cfg.parallel.collectives = c;
        cfg.validate().unwrap();
        taproot::dist::set_collectives(c).unwrap();
        let data = common::fox_dataset(&dir);
        let out =
            taproot::runtime::train::<CudaBackend>(&cfg, data, taproot::runtime::RunOptions { quiet: true, ..Default::default() }, false);
        taproot::dist::set_collectives(Collectives::Host).unwrap();
        out.unwrap()
    };
    let host = run("nccl-host", Collectives::Host);
    let dev = run("nccl-dev", Collectives::Nccl);
    assert_eq!(host.steps.len(), 20);
    assert_eq!(host.growth, dev.growth);
    for (a, b) in host.steps.iter().zip(&dev.steps) {
        assert_eq!(a.depth, b.depth);
        assert_eq!(a.train_loss.to_bits(), b.train_loss.to_bits(), "step {}: host {} nccl {}", a.step, a.train_loss, b.train_loss);
    }
}

/// The NCCL watchdog: a collective held on its stream past `parallel.timeout_s` (the fault
/// `faults.stall_collectives_ms`, as a stopped replica would hold the others) stops the run
/// within about the timeout, naming the collective and the key, instead of leaving the process
/// waiting at its next synchronisation. Run as a process of its own (the watchdog ends it);
/// `TAPROOT_BIN` names a prebuilt binary where no toolchain is (`scripts/gpu-check.sh`).
#[test]
fn a_collective_held_past_the_timeout_stops_the_run_naming_it() {
    if gpu().is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("taproot-nccl-stall-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    common::fox_dataset(&dir);
    let cfg = common::tiny_gpu_cfg(&dir, "stall").devices(&["cuda:0"]).write();
    let bin = std::env::var("TAPROOT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_taproot").to_string());
    let t0 = std::time::Instant::now();
    let mut child = std::process::Command::new(bin)
        .args(["train", "--config", cfg.to_str().unwrap()])
        .args(["--set", "parallel.collectives=nccl", "--set", "parallel.timeout_s=2", "--set", "faults.stall_collectives_ms=30000"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Without the watchdog, every all-reduce would wait 30 s: give up on it after 25.
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed().as_secs() > 25 {
            let _ = child.kill();
            panic!("the run was still going 25 s after it started: no watchdog stopped it");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    println!("stopped after {:.1} s ({status}):\n{err}", t0.elapsed().as_secs_f64());
    assert_eq!(status.code(), Some(75), "{err}");
    assert!(err.contains("NCCL all-reduce #1 (") && err.contains("has not completed") && err.contains("`parallel.timeout_s` = 2"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
