#!/usr/bin/env python3
"""`taproot data prepare` beside the Python `tokenizers` library, in one run (scripts/bench-data.sh).

Builds a JSONL corpus of at least --mb MB from the texts in data/raw (paragraphs as documents,
each tagged with its index so no two are equal), then, alternating for --rounds rounds:
- taproot: `taproot data prepare corpus.jsonl --tokenizer T` (read, parse, tokenize, write shards);
- Python: the same file read line by line, `json.loads`, and `Tokenizer.encode_batch` of 1,000
  documents at a time with the same tokenizer file (what a `datasets.map` does, minus writing).
Both use --threads threads (RAYON_NUM_THREADS / RAYON_RS_NUM_THREADS). Wall time and peak RSS come
from /usr/bin/time. Cases: GPT-2 (taproot's tiktoken ranks; Python the tokenizer.json taproot
exports for them) and a learnt byte-level BPE (one tokenizer.json for both, `hf:` in taproot).

Then the memory of a training run: the demo model for --steps steps over a multi-GB synthetic
corpus and over a small one, peak RSS side by side."""
import argparse
import json
import os
import subprocess
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--mb", type=int, default=200)
ap.add_argument("--threads", type=int, default=os.cpu_count())
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--work", default="target/bench-data")
ap.add_argument("--train-gb", type=float, default=2.0)
ap.add_argument("--steps", type=int, default=40)
a = ap.parse_args()
W = a.work
os.makedirs(W, exist_ok=True)
BIN = "target/release/taproot"


def timed(cmd, env=None):
    """(seconds, peak RSS in MB, stdout) of a command under /usr/bin/time."""
    e = dict(os.environ, **(env or {}))
    out = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M"] + cmd, capture_output=True, text=True, env=e)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")
    line = [l for l in out.stderr.splitlines() if l.startswith("TIME ")][-1].split()
    return float(line[1]), int(line[2]) / 1024, out.stdout


# --- the corpus
corpus = f"{W}/corpus-{a.mb}mb.jsonl"
if not os.path.exists(corpus):
    paras = []
    for root, _, files in os.walk("data/raw"):
        for f in sorted(files):
            if f.endswith(".txt"):
                text = open(os.path.join(root, f), encoding="utf-8", errors="replace").read()
                paras += [p.strip() for p in text.split("\n\n") if len(p.strip()) > 40]
    if not paras:
        sys.exit("no texts in data/raw: run scripts/fetch-data.sh")
    # documents of ~2 KB: runs of consecutive paragraphs
    docs, cur = [], []
    for p in paras:
        cur.append(p)
        if sum(map(len, cur)) > 2000:
            docs.append("\n\n".join(cur))
            cur = []
    size, i = 0, 0
    with open(corpus + ".tmp", "w") as f:
        while size < a.mb << 20:
            line = json.dumps({"id": i, "text": f"[{i}] " + docs[i % len(docs)]}) + "\n"
            f.write(line)
            size += len(line)
            i += 1
    os.rename(corpus + ".tmp", corpus)
mb = os.path.getsize(corpus) / (1 << 20)

# --- the tokenizers
subprocess.run([BIN, "data", "tokenizer", "gpt2", "--out", f"{W}/gpt2"], check=True, capture_output=True)
if not os.path.exists(f"{W}/bpe/tokenizer.json"):
    subprocess.run([BIN, "data", "prepare", "data/raw/shakespeare", "data/raw/milton", "--out", f"{W}/bpe", "--tokenizer",
                    "bpe:16384", "--name", "learn"], check=True, capture_output=True)

PY = r'''
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
n, batch = 0, []
with open(sys.argv[2], encoding="utf-8") as f:
    for line in f:
        batch.append(json.loads(line)["text"])
        if len(batch) == 1000:
            n += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
            batch = []
if batch:
    n += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
print(n)
'''
pyenv = {"RAYON_RS_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "true",
         "PYTHONPATH": os.pathsep.join(filter(None, ["target/pytok", os.environ.get("PYTHONPATH")]))}
tpenv = {"RAYON_NUM_THREADS": str(a.threads)}
cases = [("GPT-2", "gpt2", f"{W}/gpt2/tokenizer.json", 1), ("learnt BPE 16k", f"hf:{W}/bpe/tokenizer.json", f"{W}/bpe/tokenizer.json", 0)]
print(f"corpus: {mb:.0f} MB of JSONL, {a.threads} threads each, {a.rounds} alternating rounds; CPU: "
      + next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), '?'))
rows = []
for name, ours, theirs, per_doc in cases:
    t_ours, t_py, rss_ours, rss_py = [], [], 0, 0
    for r in range(a.rounds):
        out = f"{W}/shards-{r}"
        s, m, text = timed([BIN, "data", "prepare", corpus, "--out", out, "--tokenizer", ours, "--name", "b", "--overwrite"], tpenv)
        t_ours.append(s)
        rss_ours = max(rss_ours, m)
        rec = json.load(open(f"{out}/corpus.json"))
        n_ours = rec["train_tokens"] + rec["val_tokens"] - per_doc * rec["documents"]
        s, m, text = timed([sys.executable, "-c", PY, theirs, corpus], pyenv)
        t_py.append(s)
        rss_py = max(rss_py, m)
        n_py = int(text.strip())
        if n_ours != n_py:
            print(f"  note: {name}: taproot {n_ours} tokens, Python {n_py} (the same text, tokenized differently)")
    med = lambda v: sorted(v)[len(v) // 2]
    o, p = med(t_ours), med(t_py)
    rows.append((name, mb / o, mb / p, p / o, min(p / x for x in t_ours), max(p / x for x in t_ours), rss_ours, rss_py))
print()
print("| tokenizer | taproot MB/s (per core) | Python tokenizers MB/s (per core) | taproot ÷ Python speed (median, range) | peak RSS taproot / Python |")
print("|---|---|---|---|---|")
for name, o, p, ratio, lo, hi, ro, rp in rows:
    print(f"| {name} | {o:.1f} ({o / a.threads:.1f}) | {p:.1f} ({p / a.threads:.1f}) | {ratio:.2f}× ({lo:.2f}–{hi:.2f}) | {ro:.0f} MB / {rp:.0f} MB |")

# --- a training run's memory: a multi-GB corpus against a small one
def synthetic(folder, tokens):
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train_000001", tokens), ("val_000000", 1 << 16)):
        path = f"{folder}/syn_{split}.bin"
        if os.path.exists(path) and os.path.getsize(path) == 1024 + 2 * n:
            continue
        header = (20240520).to_bytes(4, "little") + (1).to_bytes(4, "little") + n.to_bytes(4, "little") + bytes(1012)
        block = bytes(b for i in range(1 << 20) for b in ((i * 7919 >> 3) % 256, 0))  # 1M u16 tokens < 256
        with open(path, "wb") as f:
            f.write(header)
            for _ in range(n >> 20):
                f.write(block)
            f.write(block[: 2 * (n % (1 << 20))])

big_tokens = int(a.train_gb * (1 << 30) / 2)
synthetic(f"{W}/big", big_tokens)
synthetic(f"{W}/small", 1 << 20)
res = []
for folder in ("small", "big"):
    cmd = [BIN, "train", "--config", "config/demo.toml", "--overwrite", "--set", f"data.dir=\"{W}/{folder}\"",
           "--set", f"run.steps={a.steps}", "--set", f"run.out_dir=\"{W}/run-{folder}\"", "--set", "eval.every=0",
           "--set", "eval.sample_tokens=0", "--set", "checkpoint.every=0", "--set", "run.log_every=0"]
    s, m, _ = timed(cmd, tpenv)
    res.append((folder, os.path.getsize(f"{W}/{folder}/syn_train_000001.bin") / (1 << 20), m, s))
print()
print(f"| training run ({a.steps} steps of the demo model) | corpus | peak RSS |")
print("|---|---|---|")
for folder, size, m, s in res:
    print(f"| {folder} | {size:,.0f} MB | {m:.1f} MB |")
print(f"peak RSS difference: {res[1][2] - res[0][2]:+.1f} MB over {res[1][1] - res[0][1]:,.0f} MB more corpus")
