"""The GPU benchmark's reference: a nanoGPT-style GPT-2 training step in PyTorch.

benches/gpu.rs runs this beside taproot's own step, in the same run on the same GPU, and prints
both in one table (tokens/s, and MFU by the same FLOP count). The model and step are what a user
would pick instead: GPT-2 (124M at the defaults; pre-LayerNorm, GELU-tanh MLP, tied
embedding), bf16 autocast over fp32 master weights, `scaled_dot_product_attention` (causal,
flash), `torch.optim.AdamW(fused=True)`, and `torch.compile` of the whole model.

Protocol, as taproot's: random tokens, `--warmup` untimed steps (compilation included), then the
median of `--steps` timed steps, each ending with a host read of the loss. One JSON line per
batch size on stdout: {"batch": B, "seq": T, "ms": median, "tok_s": ..., "loss": ...}.

The GPU machines have torch and triton; CI does not run this (no CUDA-free torch wheel). With
`--device cpu --tiny` it runs anywhere torch does, which is how the script itself is checked.
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c, heads):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(c)
        self.c_attn = nn.Linear(c, 3 * c)
        self.c_proj = nn.Linear(c, c)
        self.ln_2 = nn.LayerNorm(c)
        self.c_fc = nn.Linear(c, 4 * c)
        self.mlp_proj = nn.Linear(4 * c, c)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, seq, c, layers, heads):
        super().__init__()
        self.wte = nn.Embedding(vocab, c)
        self.wpe = nn.Embedding(seq, c)
        self.blocks = nn.ModuleList(Block(c, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(c)
        self.lm_head = nn.Linear(c, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2 and taproot
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[16])
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer C=64 model (a check of the script)")
    a = ap.parse_args()

    torch.manual_seed(0)
    dev = torch.device(a.device)
    vocab, c, layers, heads = (256, 64, 2, 4) if a.tiny else (50257, 768, 12, 12)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f"# torch {torch.__version__} on {torch.cuda.get_device_name(dev)}", file=sys.stderr)
    else:
        print(f"# torch {torch.__version__} on the CPU", file=sys.stderr)
    model = GPT(vocab, a.seq, c, layers, heads).to(dev)
    params = sum(p.numel() for p in model.parameters())
    print(f"# {params / 1e6:.1f}M parameters, compile={not a.no_compile}", file=sys.stderr)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=dev.type == "cuda")
    step_model = model if a.no_compile else torch.compile(model)

    for b in a.batch:
        g = torch.Generator(device="cpu").manual_seed(b)
        try:
            x = torch.randint(0, vocab, (b, a.seq), generator=g).to(dev)
            y = torch.randint(0, vocab, (b, a.seq), generator=g).to(dev)
            times, loss = [], float("nan")
            for i in range(a.warmup + a.steps):
                t0 = time.perf_counter()
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
                    out = step_model(x, y)
                out.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss = out.item()  # the host read that ends the step
                if i >= a.warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
            ms = statistics.median(times)
            print(json.dumps({"batch": b, "seq": a.seq, "ms": ms, "tok_s": b * a.seq / (ms / 1e3), "loss": loss}), flush=True)
        except torch.OutOfMemoryError:
            print(json.dumps({"batch": b, "seq": a.seq, "oom": True}), flush=True)
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
