//! The shape of the source tree, checked: module dependencies run one way (no import circles
//! between files of `src/`), and no file of `src/` is over 600 lines unless its first lines say
//! why.
//!
//! A dependency is any path `crate::a::b…` or `super::…` written in a file's code (imports and
//! inline paths alike; comments are skipped), resolved to the deepest module file it names. A
//! `mod.rs` declaring or re-exporting its own children (`pub mod x;`, `pub use x::Y;`) is
//! structure, not a dependency, and is not counted; any other use of a child by its parent is.
//! Unit-test modules at the end of a file are not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`runtime::scheduler`) of every file under `src/`.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).expect("read src").map(|e| e.expect("entry").path()).collect();
        entries.sort();
        for p in entries {
            let name = p.file_stem().expect("name").to_string_lossy().to_string();
            if p.is_dir() {
                let mut pre = prefix.to_vec();
                pre.push(p.file_name().expect("dir name").to_string_lossy().to_string());
                walk(&p, &pre, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let mut m = prefix.to_vec();
                if name != "mod" && name != "lib" && name != "main" {
                    m.push(name.clone());
                }
                if name == "main" {
                    continue; // the binary is a client of the library
                }
                out.insert(m.join("::"), p);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, &[], &mut out);
    out
}

/// The code of a file without comments (line comments and doc comments; block comments are not
/// used in this crate).
fn code_lines(text: &str) -> Vec<String> {
    // Unit tests (`#[cfg(test)] mod tests { use super::*; … }`, by convention at the end of a
    // file) are not part of the module's dependencies.
    text.lines()
        .take_while(|l| l.trim() != "#[cfg(test)]")
        .map(|l| match l.find("//") {
            // a `//` inside a string literal is rare in this crate and only shortens the line
            Some(i) => l[..i].to_string(),
            None => l.to_string(),
        })
        .collect()
}

/// Paths starting at `crate::` or `super::` in `line`, as segment lists relative to the crate root
/// (`me` is the module the line belongs to). `crate::{a, b::c}` yields `a` and `b::c`.
fn paths_in(line: &str, me: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = line.as_bytes();
    let is_ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < bytes.len() {
        if !line.is_char_boundary(i) {
            i += 1;
            continue;
        }
        let rest = &line[i..];
        let starts_word = i == 0 || !is_ident(bytes[i - 1]);
        let (base, skip): (Vec<String>, usize) = if starts_word && rest.starts_with("crate::") {
            (Vec::new(), "crate::".len())
        } else if starts_word && rest.starts_with("super::") {
            // one or more `super::`
            let mut base = me.to_vec();
            let mut k = 0;
            while line[i + k..].starts_with("super::") {
                base.pop();
                k += "super::".len();
            }
            (base, k)
        } else {
            i += 1;
            continue;
        };
        let tail = &line[i + skip..];
        let head: String = tail.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
        let mut prefix = base.clone();
        prefix.extend(head.split("::").filter(|s| !s.is_empty()).map(str::to_string));
        match tail[head.len()..].strip_prefix('{') {
            Some(group) if head.is_empty() || head.ends_with("::") => {
                let inner = group.split('}').next().unwrap_or("");
                for item in inner.split(',') {
                    let lead: String = item.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
                    let mut p = prefix.clone();
                    p.extend(lead.split("::").filter(|s| !s.is_empty()).map(str::to_string));
                    out.push(p);
                }
            }
            _ => out.push(prefix),
        }
        i += skip;
    }
    out
}

/// Paths relative to a parent module's own children (`use scheduler::X;` or `scheduler::f()` in
/// `runtime/mod.rs`).
fn child_paths(line: &str, me: &[String], mods: &BTreeMap<String, PathBuf>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = line.as_bytes();
    let is_ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < bytes.len() {
        if !line.is_char_boundary(i) {
            i += 1;
            continue;
        }
        let fresh = (i == 0 || !is_ident(bytes[i - 1]) && bytes[i - 1] != b':') && is_ident(bytes[i]);
        if fresh {
            let word: String = line[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            let mut p = me.to_vec();
            p.push(word.clone());
            if line[i + word.len()..].starts_with("::") && mods.contains_key(&p.join("::")) {
                out.push(p);
            }
            i += word.len().max(1);
        } else {
            i += 1;
        }
    }
    out
}

/// The deepest known module that `path` names.
fn resolve(path: &[String], mods: &BTreeMap<String, PathBuf>) -> Option<String> {
    (1..=path.len()).rev().map(|n| path[..n].join("::")).find(|m| mods.contains_key(m))
}

fn graph() -> (BTreeMap<String, BTreeSet<String>>, BTreeMap<String, PathBuf>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&src);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, file) in &mods {
        let me: Vec<String> = if m.is_empty() { Vec::new() } else { m.split("::").map(str::to_string).collect() };
        let is_parent = file.file_name().is_some_and(|n| n == "mod.rs" || n == "lib.rs");
        let text = std::fs::read_to_string(file).expect("read source");
        let entry = edges.entry(m.clone()).or_default();
        for line in code_lines(&text) {
            let t = line.trim_start();
            let structure = is_parent && (t.starts_with("pub mod ") || t.starts_with("mod ") || t.starts_with("pub use "));
            if structure && !t.starts_with("pub use ") {
                continue;
            }
            let mut ps = paths_in(&line, &me);
            if is_parent && !structure {
                ps.extend(child_paths(&line, &me, &mods));
            }
            for p in ps {
                let inside = p.len() > me.len() && p[..me.len()] == me[..];
                if structure && inside {
                    continue; // a parent re-exporting its own child
                }
                if let Some(target) = resolve(&p, &mods) {
                    if &target != m && !target.is_empty() {
                        entry.insert(target);
                    }
                }
            }
        }
    }
    (edges, mods)
}

/// Every cycle's strongly connected component (Tarjan), as sorted module lists.
fn circles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<String, usize>,
        low: BTreeMap<String, usize>,
        stack: Vec<String>,
        on: BTreeSet<String>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit(t: &mut T, v: &str) {
        t.index.insert(v.to_string(), t.next);
        t.low.insert(v.to_string(), t.next);
        t.next += 1;
        t.stack.push(v.to_string());
        t.on.insert(v.to_string());
        let succ: Vec<String> = t.edges.get(v).map(|s| s.iter().cloned().collect()).unwrap_or_default();
        for w in succ {
            if !t.index.contains_key(&w) {
                visit(t, &w);
                let lw = t.low[&w];
                let lv = t.low[v];
                t.low.insert(v.to_string(), lv.min(lw));
            } else if t.on.contains(&w) {
                let iw = t.index[&w];
                let lv = t.low[v];
                t.low.insert(v.to_string(), lv.min(iw));
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().expect("on stack");
                t.on.remove(&w);
                comp.push(w.clone());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T { edges, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), on: BTreeSet::new(), next: 0, out: Vec::new() };
    for v in edges.keys() {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn the_checker_finds_a_planted_circle() {
    // The checker itself must be able to fail: a two-module circle and a three-module one.
    let mut e: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    e.entry("a".into()).or_default().insert("b".into());
    e.entry("b".into()).or_default().insert("a".into());
    e.entry("c".into()).or_default().insert("d".into());
    e.entry("d".into()).or_default().insert("f".into());
    e.entry("f".into()).or_default().insert("c".into());
    e.entry("g".into()).or_default().insert("a".into());
    let found = circles(&e);
    assert_eq!(found, vec![vec!["a".to_string(), "b".to_string()], vec!["c".to_string(), "d".to_string(), "f".to_string()]]);
    // and the path reader resolves `super::` and groups
    let me = vec!["runtime".to_string(), "layer".to_string()];
    let ps = paths_in("use super::handoff::{Handoff, Peer}; let x = crate::model::Block::new();", &me);
    assert_eq!(ps[0], vec!["runtime", "handoff", "Handoff"]);
    assert_eq!(ps[1], vec!["runtime", "handoff", "Peer"]);
    assert_eq!(ps[2], vec!["model", "Block", "new"]);
}

#[test]
fn module_dependencies_run_one_way() {
    let (edges, mods) = graph();
    assert!(mods.contains_key("runtime::layer"), "the checker sees the runtime's files");
    assert!(edges.values().map(BTreeSet::len).sum::<usize>() > 50, "the checker sees the crate's imports");
    let found = circles(&edges);
    let mut msg = String::new();
    for c in &found {
        msg.push_str(&format!("\n  circle among: {}", c.join(", ")));
        for a in c {
            for b in edges[a].iter().filter(|b| c.contains(b)) {
                msg.push_str(&format!("\n    {a} -> {b}"));
            }
        }
    }
    assert!(found.is_empty(), "import circles in src/:{msg}");
}

#[test]
fn source_files_are_short_or_say_why() {
    let (_, mods) = graph();
    let mut long = Vec::new();
    for file in mods.values() {
        let text = std::fs::read_to_string(file).expect("read");
        let n = text.lines().count();
        let head: String = text.lines().take(30).collect::<Vec<_>>().join("\n");
        if n > 600 && !head.contains("Why this file is long") {
            long.push(format!("{} ({n} lines)", file.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap_or(file).display()));
        }
    }
    assert!(long.is_empty(), "files over 600 lines without a `Why this file is long` note near the top: {long:?}");
}

/// `(file, line number, line)` of every code line of the files under `src/` whose path
/// (relative to `src/`, with `/`) passes `keep`.
fn code_of(keep: impl Fn(&str) -> bool) -> Vec<(String, usize, String)> {
    let (_, mods) = graph();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    for file in mods.values() {
        let rel = file.strip_prefix(&src).unwrap_or(file).to_string_lossy().replace('\\', "/");
        if !keep(&rel) {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read");
        out.extend(code_lines(&text).into_iter().enumerate().map(|(i, l)| (rel.clone(), i + 1, l)));
    }
    out
}

/// A parameter looked up by a string: `.p("…")`, `.g("…")`, a layout's `.get("…")`,
/// `.find("…")`, `.index("…")`, or `.slice(…, "…")`.
fn string_lookup(line: &str) -> bool {
    [".p(\"", ".g(\"", ".get(\"", ".find(\"", ".index(\""].iter().any(|p| line.contains(p))
        || line.find(".slice(").is_some_and(|i| line[i..].contains(", \""))
        || line.contains("expert_tensor(")
}

#[test]
fn the_model_reads_parameters_through_typed_handles() {
    // The check can fail: it sees the lookups the model used to make.
    assert!(string_lookup(r#"        be.matmul_forward(y, x, p.p("qkvw"), None, n, c, 3 * c);"#));
    assert!(string_lookup(r#"    let s = layout.get("wte");"#));
    assert!(string_lookup(r#"    self.layout.slice(&self.p, "lnfw")"#));
    assert!(!string_lookup("        be.matmul_forward(y, x, p.p(wt.qkvw), None, n, c, 3 * c);"));
    // The Hugging Face mappings (`kinds/*/hf.rs`) map names to names by nature, off the hot path.
    let found: Vec<String> = code_of(|f| f.starts_with("model/") && !f.ends_with("/hf.rs"))
        .into_iter()
        .filter(|(_, _, l)| string_lookup(l))
        .map(|(f, n, l)| format!("src/{f}:{n}: {}", l.trim()))
        .collect();
    assert!(found.is_empty(), "parameters looked up by string in src/model/ (use the kind's typed handles):\n{}", found.join("\n"));
}

#[test]
fn no_string_is_leaked_or_interned() {
    let mut found = Vec::new();
    let (_, mods) = graph();
    for file in mods.values() {
        let text = std::fs::read_to_string(file).expect("read");
        let code = code_lines(&text).join("\n");
        // A buffer handed to MPI by `Box::leak` is taken back by `Box::from_raw` in the same file.
        if code.contains("Box::leak(") && !code.contains("Box::from_raw(") {
            found.push(format!("{}: Box::leak without Box::from_raw", file.display()));
        }
        if code.contains("&'static str>>") && code.contains("static ") && code.contains("Mutex<") {
            found.push(format!("{}: a global table of &'static str", file.display()));
        }
    }
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn only_the_kinds_branch_on_the_block_kind() {
    let kind = |l: &str| ["Arch::Gpt2", "Arch::Llama", "Arch::Qwen3", "is_gpt2()", "is_llama()"].iter().any(|k| l.contains(k));
    assert!(kind("    match d.arch { Arch::Gpt2 => 1, _ => 2 }"));
    // The kinds' folders and registries, and the enum's own definition, may name the kinds.
    let found: Vec<String> = code_of(|f| !f.starts_with("model/kinds/") && f != "model/dims.rs")
        .into_iter()
        .filter(|(_, _, l)| kind(l))
        .map(|(f, n, l)| format!("src/{f}:{n}: {}", l.trim()))
        .collect();
    assert!(found.is_empty(), "block-kind branches outside src/model/kinds/ (ask `kinds::spec(arch)` instead):\n{}", found.join("\n"));
}
