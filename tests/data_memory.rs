//! The resident memory of a run's data, in a test binary of its own: RSS is per process, and the
//! other tests of a binary run beside it.

use taproot::data::{write_shard, Dataset, Loader, Width};

fn tmp(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("taproot-scale-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Peak memory of a run's data does not grow with the corpus: drawing batches from a
/// 256 MB shard leaves the resident set within a few MB of where it was (windows are read,
/// never mapped).
#[test]
fn a_large_corpus_costs_no_resident_memory() {
    let d = tmp("rss");
    let n = 128 << 20; // u16 tokens: 256 MB
    {
        let mut w = taproot::data::ShardWriter::create(&d.join("big_train_000001.bin"), Width::U16).unwrap();
        let chunk: Vec<u32> = (0..1 << 20).map(|i| i % 256).collect();
        for _ in 0..n >> 20 {
            w.push(&chunk).unwrap();
        }
        w.finish().unwrap();
    }
    write_shard(&d.join("big_val_000000.bin"), &(0..10_000).map(|i| i % 256).collect::<Vec<u32>>()).unwrap();
    let rss = || -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        s.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    };
    let before = rss();
    let ds = Dataset::open(&d, 256).unwrap();
    println!("after open: {} KB", rss().saturating_sub(before) / 1024);
    assert_eq!(ds.train().len(), n);
    let mut l = Loader::of(&ds, 8, 64, 1).unwrap();
    let mut out = Vec::new();
    for _ in 0..100 {
        l.next_batch(&mut out).unwrap();
    }
    let grew = rss().saturating_sub(before);
    println!("RSS grew {} KB over a {} MB corpus", grew / 1024, (2 * n) >> 20);
    assert!(grew < 24 << 20, "RSS grew {grew} bytes");
}
