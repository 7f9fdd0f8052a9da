//! Data at scale: u32 shards, windows across shard boundaries, streamed JSONL and Parquet
//! preparation (bad input named by file and line, `--skip-bad`), thread-count independence,
//! Hugging Face tokenizers recorded by digest, and `[[data.sources]]` mixtures.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use taproot::data::{prepare, read_shard, write_shard, write_shard_as, Dataset, Loader, PrepareArgs, Tokens, Width};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("taproot-scale-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn err<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

fn args(inputs: Vec<PathBuf>, out: &Path, tokenizer: &str) -> PrepareArgs {
    PrepareArgs { inputs, out_dir: out.to_path_buf(), tokenizer: tokenizer.into(), name: "c".into(), ..PrepareArgs::default() }
}

/// Every shard of a split, concatenated in file-name order.
fn split(out: &Path, which: &str) -> Vec<u32> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(&format!("_{which}_")))
        .collect();
    files.sort();
    files.iter().flat_map(|p| read_shard(p).unwrap()).collect()
}

#[test]
fn u32_shards_round_trip_and_u16_shards_refuse_wide_tokens() {
    let d = tmp("u32");
    let toks: Vec<u32> = vec![0, 65_535, 65_536, 151_935, 7];
    write_shard_as(&d.join("big_val_000000.bin"), &toks, Width::U32).unwrap();
    write_shard_as(&d.join("big_train_000001.bin"), &toks, Width::U32).unwrap();
    let bytes = std::fs::read(d.join("big_val_000000.bin")).unwrap();
    assert_eq!(i32::from_le_bytes(bytes[4..8].try_into().unwrap()), 2, "llm.c's version 2 header");
    assert_eq!(bytes.len(), 1024 + 4 * toks.len());
    assert_eq!(read_shard(&d.join("big_val_000000.bin")).unwrap(), toks);
    let ds = Dataset::open(&d, 151_936).unwrap();
    assert_eq!(ds.val.to_vec().unwrap(), toks);
    let e = err(Dataset::open(&d, 100_000));
    assert!(e.contains("151935") && e.contains("byte offset 1036"), "{e}");
    let e = err(write_shard(&d.join("x_val_000000.bin"), &[1, 70_000]));
    assert!(e.contains("70000") && e.contains("index 1") && e.contains("version-2"), "{e}");
    assert!(!d.join("x_val_000000.bin").exists() && !d.join("x_val_000000.bin.tmp").exists(), "nothing left behind");
    // Windows longer than one read's buffer (16 KB) come back whole, in both widths.
    let long: Vec<u32> = (0..30_000u32).map(|i| i.wrapping_mul(2_654_435_761) % 151_936).collect();
    write_shard_as(&d.join("big_train_000001.bin"), &long, Width::U32).unwrap();
    let ds = Dataset::open(&d, 151_936).unwrap();
    assert_eq!(ds.train().window(3, 29_000).unwrap(), long[3..29_003]);
    let short: Vec<u32> = long.iter().map(|t| t % 65_536).collect();
    write_shard(&d.join("big_train_000001.bin"), &short).unwrap();
    write_shard(&d.join("big_val_000000.bin"), &short[..10]).unwrap();
    assert_eq!(Dataset::open(&d, 65_536).unwrap().train().to_vec().unwrap(), short);
    assert_eq!(Width::for_vocab(65_536), Width::U16);
    assert_eq!(Width::for_vocab(65_537), Width::U32);
}

#[test]
fn windows_across_shards_equal_those_of_the_concatenation() {
    let d = tmp("shards");
    let text: String = (0..3000).map(|i| format!("line {i} of a text that goes on. ")).collect();
    std::fs::write(d.join("a.txt"), &text).unwrap();
    let out = d.join("many");
    let rep = prepare(&PrepareArgs { shard_tokens: 997, ..args(vec![d.join("a.txt")], &out, "bytes") }).unwrap();
    assert!(rep.paths.len() > 50, "{} shards", rep.paths.len());
    assert!(rep.split_inside_document, "one document: split inside it");
    let one = d.join("one");
    prepare(&args(vec![d.join("a.txt")], &one, "bytes")).unwrap();
    let (many, single) = (Dataset::open(&out, 256).unwrap(), Dataset::open(&one, 256).unwrap());
    assert_eq!(many.train().to_vec().unwrap(), single.train().to_vec().unwrap());
    assert_eq!(many.val.to_vec().unwrap(), single.val.to_vec().unwrap());
    assert!(many.train().parts() > 50);
    let (mut a, mut b) = (Loader::of(&many, 8, 200, 5).unwrap(), Loader::of(&single, 8, 200, 5).unwrap());
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        a.next_batch(&mut x).unwrap();
        b.next_batch(&mut y).unwrap();
        assert_eq!(x, y);
    }
    // Re-preparing into the same folder with bigger shards removes the stale ones.
    prepare(&PrepareArgs { shard_tokens: 100_000, ..args(vec![d.join("a.txt")], &out, "bytes") }).unwrap();
    let n = std::fs::read_dir(&out).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "bin")).count();
    assert_eq!(n, 2, "one val and one train shard, the old ones gone");
}

fn write_jsonl(path: &Path, docs: &[&str], field: &str) -> Vec<u8> {
    let mut s = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        writeln!(s, "{}", serde_json::json!({ "id": i, field: d })).unwrap();
    }
    std::fs::write(path, &s).unwrap();
    s
}

#[test]
fn jsonl_plain_gzip_and_zstd_give_the_same_documents_split_by_document() {
    let d = tmp("jsonl");
    let docs: Vec<String> = (0..40).map(|i| format!("document {i}: {}", "words ".repeat(i % 7 + 1))).collect();
    let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
    let raw = write_jsonl(&d.join("a.jsonl"), &refs, "content");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).unwrap();
    std::fs::write(d.join("b.jsonl.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(d.join("c.jsonl.zst"), zstd::encode_all(&raw[..], 3).unwrap()).unwrap();
    let mut got = Vec::new();
    for f in ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst"] {
        let out = d.join(format!("out-{f}"));
        let mut a = args(vec![d.join(f)], &out, "bytes");
        a.spec.field = "content".into();
        a.val_docs = Some(4);
        let rep = prepare(&a).unwrap();
        assert_eq!((rep.documents, rep.val_documents), (40, 4));
        let val = split(&out, "val");
        let want: Vec<u32> = docs[..4].concat().bytes().map(u32::from).collect();
        assert_eq!(val, want, "the first 4 documents are validation, whole");
        got.push((val, split(&out, "train")));
    }
    assert!(got.windows(2).all(|w| w[0] == w[1]));
    // The fraction rule: every 1/f-th document, whole.
    let out = d.join("frac");
    let mut a = args(vec![d.join("a.jsonl")], &out, "bytes");
    a.spec.field = "content".into();
    a.val_fraction = 0.25;
    let rep = prepare(&a).unwrap();
    assert_eq!(rep.val_documents, 10);
    let want: Vec<u32> = [3, 7, 11, 15, 19, 23, 27, 31, 35, 39].iter().flat_map(|&i| docs[i].bytes().map(u32::from)).collect();
    assert_eq!(split(&out, "val"), want);
}

#[test]
fn bad_documents_are_named_by_file_and_line_and_skip_bad_counts_them() {
    let d = tmp("bad");
    let f = d.join("bad.jsonl");
    std::fs::write(
        &f,
        b"{\"text\": \"fine\"}\n{\"text\": \"also fine\"}\n{not json\n{\"body\": \"x\"}\n{\"text\": 3}\n\xff\xfe\n{\"text\": \"last\"}\n",
    )
    .unwrap();
    let out = d.join("out");
    let e = err(prepare(&args(vec![f.clone()], &out, "bytes")));
    assert!(e.contains("bad.jsonl: line 3") && e.contains("not a JSON object") && e.contains("--skip-bad"), "{e}");
    let rep = prepare(&PrepareArgs { skip_bad: true, ..args(vec![f.clone()], &out, "bytes") }).unwrap();
    assert_eq!((rep.documents, rep.skipped), (3, 4));
    let shown = rep.to_string();
    assert!(shown.contains("line 4") && shown.contains("no field \"text\" (fields: body)"), "{shown}");
    assert!(shown.contains("line 5") && shown.contains("a number"), "{shown}");
    assert!(shown.contains("line 6") && shown.contains("UTF-8"), "{shown}");
    // A truncated gzip: named, and with --skip-bad the documents before the cut are kept.
    let many: Vec<String> = (0..4000u64).map(|i| format!("document {} of many", i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20)).collect();
    let raw = write_jsonl(&d.join("t.jsonl"), &many.iter().map(String::as_str).collect::<Vec<_>>(), "text");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).unwrap();
    let z = gz.finish().unwrap();
    std::fs::write(d.join("t.jsonl.gz"), &z[..z.len() / 2]).unwrap();
    let e = err(prepare(&args(vec![d.join("t.jsonl.gz")], &d.join("o2"), "bytes")));
    assert!(e.contains("t.jsonl.gz: line") && e.contains("truncated"), "{e}");
    let rep = prepare(&PrepareArgs { skip_bad: true, ..args(vec![d.join("t.jsonl.gz")], &d.join("o3"), "bytes") }).unwrap();
    assert!(rep.documents > 1000 && rep.skipped == 1, "{rep}");
    // A non-UTF-8 text file under a text tokenizer.
    std::fs::write(d.join("latin.txt"), b"caf\xe9 au lait").unwrap();
    let e = err(prepare(&args(vec![d.join("latin.txt"), f], &d.join("o4"), "gpt2")));
    assert!(e.contains("latin.txt") && e.contains("UTF-8"), "{e}");
}

#[test]
fn parquet_columns_are_read_row_by_row() {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::writer::SerializedFileWriter;
    let d = tmp("parquet");
    let path = d.join("docs.parquet");
    let schema = std::sync::Arc::new(
        parquet::schema::parser::parse_message_type("message doc { required binary body (UTF8); required int32 n; }").unwrap(),
    );
    let docs: Vec<String> = (0..300).map(|i| format!("row {i} says hello")).collect();
    let mut w = SerializedFileWriter::new(std::fs::File::create(&path).unwrap(), schema, Default::default()).unwrap();
    for chunk in docs.chunks(100) {
        let mut rg = w.next_row_group().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        let vals: Vec<ByteArray> = chunk.iter().map(|s| ByteArray::from(s.as_str())).collect();
        col.typed::<ByteArrayType>().write_batch(&vals, None, None).unwrap();
        col.close().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        let ns: Vec<i32> = (0..chunk.len() as i32).collect();
        col.typed::<parquet::data_type::Int32Type>().write_batch(&ns, None, None).unwrap();
        col.close().unwrap();
        rg.close().unwrap();
    }
    w.close().unwrap();
    let out = d.join("out");
    let e = err(prepare(&args(vec![path.clone()], &out, "bytes")));
    assert!(e.contains("no column \"text\"") && e.contains("body, n"), "{e}");
    let mut a = args(vec![d.clone()], &out, "bytes");
    a.spec.column = "body".into();
    a.val_docs = Some(1);
    let rep = prepare(&a).unwrap();
    assert_eq!(rep.documents, 300);
    let all: Vec<u32> = split(&out, "val").into_iter().chain(split(&out, "train")).collect();
    assert_eq!(all, docs.concat().bytes().map(u32::from).collect::<Vec<_>>());
    let mut a = args(vec![path], &d.join("o2"), "bytes");
    a.spec.column = "n".into();
    let e = err(prepare(&a));
    assert!(e.contains("docs.parquet: row 0") && e.contains("not a string"), "{e}");
}

#[test]
fn shards_do_not_depend_on_the_thread_count() {
    let d = tmp("threads");
    let docs: Vec<String> = (0..3000).map(|i| format!("Document {i}. The quick brown fox {} jumps.", i * 7919 % 1000)).collect();
    let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
    write_jsonl(&d.join("d.jsonl"), &refs, "text");
    let run = |threads: usize| {
        let out = d.join(format!("t{threads}"));
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| prepare(&PrepareArgs { shard_tokens: 5000, ..args(vec![d.join("d.jsonl")], &out, "gpt2") })).unwrap();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files.iter().filter(|p| p.extension().is_some_and(|x| x == "bin")).map(|p| std::fs::read(p).unwrap()).collect::<Vec<_>>()
    };
    let (one, four) = (run(1), run(4));
    assert!(one.len() > 5);
    assert_eq!(one, four, "byte-identical shards with 1 and 4 threads");
}

#[test]
fn an_hf_tokenizer_prepares_documents_with_its_specials_and_is_known_by_digest() {
    let d = tmp("hf");
    let tok_dir = d.join("tok");
    common::hf_tokenizer(&tok_dir);
    let docs = ["the cat sat", "on the mat", "the dog sat on the log"];
    write_jsonl(&d.join("d.jsonl"), &docs, "text");
    let out = d.join("out");
    let name = format!("hf:{}", tok_dir.display());
    let rep = prepare(&PrepareArgs { val_docs: Some(1), ..args(vec![d.join("d.jsonl")], &out, &name) }).unwrap();
    let tok = taproot::data::Tokenizer::from_name(&name).unwrap();
    let (bos, eos) = match &tok {
        taproot::data::Tokenizer::Hf { model, .. } => (model.bos.unwrap(), model.eos.unwrap()),
        _ => unreachable!(),
    };
    let doc = |t: &str| -> Vec<u32> { [vec![bos], tok.encode(t), vec![eos]].concat() };
    assert_eq!(split(&out, "val"), doc(docs[0]));
    assert_eq!(split(&out, "train"), [doc(docs[1]), doc(docs[2])].concat());
    assert_eq!(rep.documents, 3);
    assert_eq!(tok.decode(&tok.encode("the dog sat")), "the dog sat");
    // The same file under another path is the same tokenizer; another file is refused.
    let copy = d.join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::copy(tok_dir.join("tokenizer.json"), copy.join("tokenizer.json")).unwrap();
    std::fs::copy(tok_dir.join("tokenizer_config.json"), copy.join("tokenizer_config.json")).unwrap();
    let cfg = |t: &Path| common::TestConfig::new(&out).steps(10).set("data.tokenizer", format!("\"hf:{}\"", t.display())).build();
    let c = cfg(&copy);
    assert_eq!(c.data.vocab_size, Some(tok.vocab_size()), "filled in from the tokenizer");
    let t2 = taproot::data::Tokenizer::from_name(&c.data.tokenizer).unwrap();
    Dataset::open_config(&c.data, &t2).unwrap();
    let other = d.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let text = std::fs::read_to_string(copy.join("tokenizer.json")).unwrap().replacen("\"<s>\"", "\"<S>\"", 1);
    std::fs::write(other.join("tokenizer.json"), text).unwrap();
    let c = cfg(&other);
    let t3 = taproot::data::Tokenizer::from_name(&c.data.tokenizer).unwrap();
    let e = err(Dataset::open_config(&c.data, &t3));
    assert!(e.contains("file digest") && e.contains("tokenized with"), "{e}");
    let e = err(taproot::data::Tokenizer::from_name(&format!("hf:{}", d.join("nowhere").display())));
    assert!(e.contains("nowhere") && e.contains("does not exist"), "{e}");
}

#[test]
fn a_mixture_draws_by_weight_counts_tokens_per_source_and_resumes_exactly() {
    let a: Vec<u32> = (0..5000).map(|i| i % 100).collect();
    let b: Vec<u32> = (0..5000).map(|i| 100 + i % 100).collect();
    let sources = || vec![("a".to_string(), 3.0, Tokens::from(a.clone())), ("b".to_string(), 1.0, Tokens::from(b.clone()))];
    let (bs, t) = (4, 16);
    let mut l = Loader::mixture(sources(), bs, t, 9).unwrap();
    let mut out = Vec::new();
    let (mut from_a, mut rows) = (0, 0);
    for _ in 0..200 {
        l.next_batch(&mut out).unwrap();
        for row in out.chunks(t + 1) {
            rows += 1;
            let is_a = row.iter().all(|&x| x < 100);
            assert!(is_a || row.iter().all(|&x| x >= 100), "a window never mixes sources");
            from_a += is_a as usize;
        }
    }
    let share = from_a as f64 / rows as f64;
    assert!((share - 0.75).abs() < 0.04, "source a drew {share:.3} of the windows, weight 3/4");
    let st = l.cursor();
    assert_eq!(st.source_tokens, vec![(from_a * t) as u64, ((rows - from_a) * t) as u64]);
    let mut again = Loader::mixture(sources(), bs, t, 1234).unwrap();
    again.restore(&st);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        l.next_batch(&mut x).unwrap();
        again.next_batch(&mut y).unwrap();
        assert_eq!(x, y);
    }
    // One source draws no pick: the batches of a plain loader.
    let mut one = Loader::mixture(vec![("a".into(), 2.0, Tokens::from(a.clone()))], bs, t, 9).unwrap();
    let mut plain = Loader::new(a.clone(), bs, t, 9).unwrap();
    one.next_batch(&mut x).unwrap();
    plain.next_batch(&mut y).unwrap();
    assert_eq!(x, y);
    let e = err(Loader::mixture(vec![("z".into(), 1.0, Tokens::from(vec![1u32, 2]))], bs, t, 0));
    assert!(e.contains("of z"), "{e}");
}

#[test]
fn data_sources_are_configured_and_checked() {
    let d = tmp("sources");
    let (x, y) = (d.join("x"), d.join("y"));
    taproot::data::synthetic::word_corpus(&x).unwrap();
    taproot::data::synthetic::word_corpus(&y).unwrap();
    let base = common::TestConfig::new(&x).steps(10).unset("data.dir");
    let mix = |wx: f64| {
        base.clone().extra(&format!(
            "[[data.sources]]\ndir = \"{}\"\nweight = {wx}\n[[data.sources]]\ndir = \"{}\"\nweight = 1.0\nname = \"web\"\n",
            x.display(),
            y.display()
        ))
    };
    let cfg = mix(2.0).build();
    let tok = taproot::data::Tokenizer::from_name("bytes").unwrap();
    let ds = Dataset::open_config(&cfg.data, &tok).unwrap();
    let names: Vec<&str> = ds.sources.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["x", "web"]);
    assert_eq!(ds.val.len(), 2 * Dataset::open(&x, 256).unwrap().val.len(), "both sources' validation");
    let e = err(mix(0.0).build_result());
    assert!(e.contains("data.sources[0].weight"), "{e}");
    let e = err(mix(1.0).set("data.dir", format!("\"{}\"", x.display())).build_result());
    assert!(e.contains("both `dir` and `[[data.sources]]`"), "{e}");
    let e = err(base.build_result());
    assert!(e.contains("`data.dir` is missing"), "{e}");
}

/// A run over a mixture reports, at every step, the tokens drawn from each source by name; the
/// actor pipeline and the sequential trainer draw the same windows, and the counts add up to
/// every window of every step.
#[test]
fn a_run_over_a_mixture_reports_tokens_per_source() {
    use std::sync::{Arc, Mutex};
    use taproot::runtime::events::Event;
    let d = tmp("mixrun");
    let (x, y) = (d.join("x"), d.join("y"));
    taproot::data::synthetic::word_corpus(&x).unwrap();
    taproot::data::synthetic::word_corpus(&y).unwrap();
    let cfg = common::TestConfig::new(&x)
        .name("mix")
        .steps(12)
        .unset("data.dir")
        .extra(&format!(
            "[[data.sources]]\ndir = \"{}\"\nweight = 3.0\nname = \"prose\"\n[[data.sources]]\ndir = \"{}\"\nweight = 1.0\nname = \"more\"\n",
            x.display(),
            y.display()
        ))
        .build();
    let tok = taproot::data::Tokenizer::from_name("bytes").unwrap();
    let data = Dataset::open_config(&cfg.data, &tok).unwrap();
    type PerStep = Vec<Vec<(String, u64)>>;
    let seen: Arc<Mutex<PerStep>> = Arc::default();
    let s = seen.clone();
    let observer: taproot::runtime::events::Observer = Arc::new(move |e: &Event| {
        if let Event::Step { sources, .. } = e {
            s.lock().unwrap().push(sources.clone());
        }
    });
    let opts = taproot::train::RunOptions { quiet: true, ..Default::default() };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let report = rt.block_on(async {
        taproot::runtime::start::<taproot::backend::cpu::CpuBackend>(&cfg, data.clone(), opts.clone(), observer)
            .await
            .unwrap()
            .wait()
            .await
            .unwrap()
    });
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 12);
    let last = seen.last().unwrap();
    let names: Vec<&str> = last.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["prose", "more"]);
    let (b, t) = (cfg.data.batch_size as u64, cfg.data.seq_len as u64);
    assert_eq!(last.iter().map(|(_, k)| k).sum::<u64>(), 12 * b * t * cfg.data.micro_batches as u64);
    assert!(last[0].1 > last[1].1 && last[1].1 > 0, "{last:?}");
    // The sequential trainer draws the same windows: the same losses.
    let mut seq = taproot::train::sequential::Sequential::new(taproot::backend::cpu::CpuBackend::default(), &cfg, &data).unwrap();
    let oracle = seq.run(&opts).unwrap();
    common::assert_same_run(&oracle, &report);
}
