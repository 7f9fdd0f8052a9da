#!/usr/bin/env python3
"""The mean next-token loss of a Hugging Face GPT2LMHeadModel folder (config.json +
model.safetensors) on a batch of token windows, computed in float64 with numpy alone: an
independent check of `taproot export` that needs neither PyTorch nor transformers.

usage: hf_gpt2_loss.py FOLDER WINDOWS.json   (a JSON list of B windows of T+1 token ids)
prints the loss (nats per token)."""
import json
import struct
import sys

import numpy as np


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", f"{name}: dtype {info['dtype']}"
        start, end = info["data_offsets"]
        raw = np.frombuffer(data[8 + n + start : 8 + n + end], dtype="<f4")
        tensors[name] = raw.reshape(info["shape"]).astype(np.float64)
    return tensors


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def gelu_new(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def loss(folder, windows):
    cfg = json.load(open(f"{folder}/config.json"))
    assert cfg["activation_function"] == "gelu_new" and cfg["tie_word_embeddings"]
    w = load_safetensors(f"{folder}/model.safetensors")
    eps, nh, c = cfg["layer_norm_epsilon"], cfg["n_head"], cfg["n_embd"]
    hs = c // nh
    ids = np.array(windows)
    inp, tgt = ids[:, :-1], ids[:, 1:]
    b, t = inp.shape
    x = w["transformer.wte.weight"][inp] + w["transformer.wpe.weight"][:t]
    mask = np.triu(np.ones((t, t), dtype=bool), 1)
    for i in range(cfg["n_layer"]):
        p = lambda name: w[f"transformer.h.{i}.{name}"]
        h = layer_norm(x, p("ln_1.weight"), p("ln_1.bias"), eps)
        qkv = h @ p("attn.c_attn.weight") + p("attn.c_attn.bias")
        q, k, v = (qkv[..., j * c : (j + 1) * c].reshape(b, t, nh, hs).transpose(0, 2, 1, 3) for j in range(3))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hs)
        s[..., mask] = -np.inf
        s = np.exp(s - s.max(-1, keepdims=True))
        a = s / s.sum(-1, keepdims=True)
        y = (a @ v).transpose(0, 2, 1, 3).reshape(b, t, c)
        x = x + y @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
        h = layer_norm(x, p("ln_2.weight"), p("ln_2.bias"), eps)
        x = x + gelu_new(h @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias")) @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
    x = layer_norm(x, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], eps)
    logits = x @ w["transformer.wte.weight"].T
    m = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
    picked = np.take_along_axis(logits, tgt[..., None], -1)[..., 0]
    return float((lse - picked).mean())


if __name__ == "__main__":
    print(f"{loss(sys.argv[1], json.load(open(sys.argv[2]))):.10f}")
