"""taproot's CPU training step beside PyTorch's, measured side by side in one invocation.

Run through scripts/bench-torch.sh, which installs PyTorch (and transformers) into git-ignored
folders under target/ on request and builds the taproot benchmark binary.

Every case is one training step (forward, backward, AdamW lr 1e-4, betas (0.9, 0.999), wd 0) of
the same model at the same shapes, on random tokens drawn fresh before each step outside the
timed region, fp32, the same number of threads on both sides. Each round runs every case on every
side in a fresh process, alternating which side goes first, and times a fixed reference loop
before each run to show how much the machine's speed moved (interference). A case's ratio in one
round is PyTorch's median ms/step divided by taproot's (above 1: taproot is faster); the table
gives the median over rounds and the range.

Usage: bench_torch.py --taproot BIN [--rounds 5] [--threads 2] [--cases a,b] [--quick]
       bench_torch.py --worker CASE OPT --warmup W --steps N --threads K  (one PyTorch run)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# Case id -> (kind, vocab, channels, heads, kv heads, depth, B, T, warmup, steps)
# gpt2 cases are nanoGPT-style GPT-2 written here (tied embedding, vocabulary padded to a
# multiple of 128 as taproot pads it, tanh GELU, biases, scaled_dot_product_attention); the
# llama, qwen3 and MoE cases are `transformers` models built from a config in code.
CASES = {
    "gpt2-124m": ("gpt2", 50257, 768, 12, 12, 12, 4, 64, 1, 4),
    "demo-6": ("gpt2", 256, 128, 4, 4, 6, 16, 128, 3, 12),
    "demo-1": ("gpt2", 256, 128, 4, 4, 1, 16, 128, 3, 30),
    "demo-0": ("gpt2", 256, 128, 4, 4, 0, 16, 128, 5, 80),
    "llama": ("llama", 256, 128, 4, 2, 6, 16, 128, 3, 12),
    "qwen3": ("qwen3", 256, 128, 4, 2, 6, 16, 128, 3, 12),
    "moe": ("moe", 256, 128, 4, 2, 6, 16, 128, 3, 12),
}
FFN = 344  # taproot's default SwiGLU width at C = 128: ceil(ceil(8C/3)/8)*8
MOE_HIDDEN, EXPERTS, TOP_K = 172, 8, 2


def gpt2_model(torch, vocab, c, nh, depth, t):
    nn, F = torch.nn, torch.nn.functional
    vp = (vocab + 127) // 128 * 128

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(c), nn.LayerNorm(c)
            self.c_attn, self.c_proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
            self.c_fc, self.mlp_proj = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

        def forward(self, x):
            b, tt, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
            q, k, v = (z.view(b, tt, nh, c // nh).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, tt, c))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vp, c), nn.Embedding(t, c)
            self.h = nn.ModuleList(Block() for _ in range(depth))
            self.ln_f = nn.LayerNorm(c)
            self.lm_head = nn.Linear(c, vp, bias=False)
            self.lm_head.weight = self.wte.weight

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for blk in self.h:
                x = blk(x)
            return self.lm_head(self.ln_f(x))

    model = GPT()
    # GPT-2's initialisation, as taproot's (and nanoGPT's): N(0, 0.02), zero biases, the
    # residual projections scaled by 1/sqrt(2L).
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.zeros_(p)
        elif p.dim() == 1:
            torch.nn.init.ones_(p)
        else:
            std = 0.02 / (2 * max(depth, 1)) ** 0.5 if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
            torch.nn.init.normal_(p, 0.0, std)
    return model


def hf_model(kind, vocab, c, nh, kv, depth, t):
    import transformers as tf

    common = dict(
        vocab_size=vocab,
        hidden_size=c,
        num_hidden_layers=depth,
        num_attention_heads=nh,
        num_key_value_heads=kv,
        max_position_embeddings=t,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    if kind == "llama":
        cfg = tf.LlamaConfig(intermediate_size=FFN, rms_norm_eps=1e-6, **common)
        return tf.LlamaForCausalLM(cfg)
    if kind == "qwen3":
        cfg = tf.Qwen3Config(intermediate_size=FFN, head_dim=c // nh, rms_norm_eps=1e-6, **common)
        return tf.Qwen3ForCausalLM(cfg)
    cfg = tf.Qwen3MoeConfig(
        intermediate_size=FFN,
        moe_intermediate_size=MOE_HIDDEN,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        head_dim=c // nh,
        rms_norm_eps=1e-6,
        **common,
    )
    return tf.Qwen3MoeForCausalLM(cfg)


def worker(case, opt_kind, warmup, steps, threads):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    kind, vocab, c, nh, kv, depth, b, t, _, _ = CASES[case]
    model = gpt2_model(torch, vocab, c, nh, depth, t) if kind == "gpt2" else hf_model(kind, vocab, c, nh, kv, depth, t)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, **({"fused": True} if opt_kind == "fused" else {})
    )
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(42)
    times = []
    for i in range(warmup + steps):
        w = torch.randint(0, vocab, (b, t + 1), generator=gen)
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
        t0 = time.perf_counter()
        out = model(x)
        logits = out if torch.is_tensor(out) else out.logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt * 1e3)
    print(json.dumps({"case": case, "opt": opt_kind, "threads": torch.get_num_threads(), "ms": times}))


def reference_loop():
    """Seconds of a fixed pure-Python loop: its spread over the run shows interference."""
    t0 = time.perf_counter()
    s = 0
    for i in range(2_000_000):
        s += i * i % 7
    return time.perf_counter() - t0


def run(cmd, env):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    line = [l for l in out.stdout.splitlines() if l.startswith("{")][-1]
    return json.loads(line)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=2)
    ap.add_argument("--taproot")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="write every round's medians here")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker[0], a.worker[1], a.warmup, a.steps, a.threads)
    import torch

    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    cases = a.cases.split(",")
    sides = ["taproot", "default", "fused"]
    med = {(c, s): [] for c in cases for s in sides}
    interference = []
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown CPU")
    print(f"CPU: {cpu}, {os.cpu_count()} cores; {a.threads} threads each; PyTorch {torch.__version__}; {a.rounds} rounds")
    for r in range(a.rounds):
        for case in cases:
            _, *_, warmup, steps = CASES[case]
            if a.quick:
                steps = max(2, steps // 3)
            order = sides if (r + cases.index(case)) % 2 == 0 else sides[::-1]
            for side in order:
                interference.append(reference_loop())
                if side == "taproot":
                    cmd = [a.taproot, "--emit", case, "--warmup", str(warmup), "--steps", str(steps)]
                else:
                    cmd = [sys.executable, __file__, "--worker", case, side, "--warmup", str(warmup), "--steps", str(steps)]
                    cmd += ["--threads", str(a.threads)]
                res = run(cmd, env)
                med[(case, side)].append(statistics.median(res["ms"]))
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    spread = max(interference) / min(interference)
    print(f"interference: the reference loop's slowest run took {spread:.2f}x its fastest ({len(interference)} runs)\n")
    print(f"{'case':<10} {'taproot ms':>11} {'PyTorch ms':>11} {'fused ms':>9}   {'PyTorch ÷ taproot (range)':<28} {'fused ÷ taproot (range)':<26}")
    rows = {}
    for case in cases:
        t = med[(case, "taproot")]
        ratios = {s: [m / tm for m, tm in zip(med[(case, s)], t)] for s in ("default", "fused")}
        rng = {s: f"{statistics.median(v):.2f} ({min(v):.2f}–{max(v):.2f})" for s, v in ratios.items()}
        print(
            f"{case:<10} {statistics.median(t):>11.1f} {statistics.median(med[(case, 'default')]):>11.1f}"
            f" {statistics.median(med[(case, 'fused')]):>9.1f}   {rng['default']:<28} {rng['fused']:<26}"
        )
        rows[case] = {s: med[(case, s)] for s in sides}
    if a.json:
        json.dump({"cpu": cpu, "threads": a.threads, "torch": torch.__version__, "interference": spread, "medians": rows}, open(a.json, "w"))


if __name__ == "__main__":
    main()
