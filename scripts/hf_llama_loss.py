#!/usr/bin/env python3
"""The mean next-token loss of a Hugging Face LlamaForCausalLM, Qwen3ForCausalLM,
MixtralForCausalLM or Qwen3MoeForCausalLM folder
(config.json + model.safetensors) on a batch of token windows, computed in float64 with numpy
alone, from the published definitions of those models: an independent check of `taproot export`
that needs neither PyTorch nor transformers.

RMSNorm x / sqrt(mean(x^2) + eps) * w; rotary positions with the rotate_half pairing
(inv_freq = theta^(-2i/hd)); grouped-query attention (query head h reads key/value head
h // (heads / kv_heads)); Qwen3's per-head RMSNorm on q and k before the rotation; SwiGLU
down(silu(gate(x)) * up(x)); a mixture of experts as those classes define it (softmax over
every expert's router logit, the top k, their probabilities renormalised to sum to 1, each
expert a SwiGLU; Qwen3-MoE's `mlp_only_layers` dense); an untied lm_head or the tied
embedding.

usage: hf_llama_loss.py FOLDER WINDOWS.json   (a JSON list of B windows of T+1 token ids)
prints the loss (nats per token)."""
import json
import sys

import numpy as np

from hf_gpt2_loss import load_safetensors


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rotate(x, theta):
    # x (B, heads, T, hd): rotate_half layout
    t, hd = x.shape[2], x.shape[3]
    inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.outer(np.arange(t, dtype=np.float64), inv)  # (T, hd/2)
    cos = np.concatenate([np.cos(ang)] * 2, -1)
    sin = np.concatenate([np.sin(ang)] * 2, -1)
    half = hd // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def silu(x):
    return x / (1.0 + np.exp(-x))


def swiglu(h, gate, up, down):
    return (silu(h @ gate.T) * (h @ up.T)) @ down.T


def moe(cfg, kind, p, h):
    if kind == "mixtral":
        gate, experts, names = p("block_sparse_moe.gate.weight"), "block_sparse_moe.experts", ("w1", "w3", "w2")
        n = cfg.get("num_local_experts") or cfg["num_experts"]
    else:
        gate, experts, names = p("mlp.gate.weight"), "mlp.experts", ("gate_proj", "up_proj", "down_proj")
        n = cfg.get("num_experts") or cfg["num_local_experts"]  # transformers 4.x / 5.x
        assert cfg.get("norm_topk_prob", False)
    k = cfg["num_experts_per_tok"]
    logits = h @ gate.T  # (B, T, E)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(h)
    # top k by probability (ties to the lower index, as a stable sort of -p gives)
    top = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    w = np.take_along_axis(probs, top, -1)
    w /= w.sum(-1, keepdims=True)
    for e in range(n):
        y = swiglu(h, *(p(f"{experts}.{e}.{name}.weight") for name in names))
        weight = ((top == e) * w).sum(-1, keepdims=True)
        out = out + weight * y
    return out


def loss(folder, windows):
    cfg = json.load(open(f"{folder}/config.json"))
    kind = cfg["model_type"]
    assert kind in ("llama", "qwen3", "mixtral", "qwen3_moe"), kind
    assert cfg["hidden_act"] == "silu" and not cfg.get("rope_scaling")
    w = load_safetensors(f"{folder}/model.safetensors")
    # transformers 4.x writes `rope_theta`; 5.x `rope_parameters: {rope_theta, rope_type}`
    theta = cfg["rope_theta"] if cfg.get("rope_theta") is not None else cfg["rope_parameters"]["rope_theta"]
    eps = cfg["rms_norm_eps"]
    nh, c = cfg["num_attention_heads"], cfg["hidden_size"]
    kv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or c // nh
    ids = np.array(windows)
    inp, tgt = ids[:, :-1], ids[:, 1:]
    b, t = inp.shape
    x = w["model.embed_tokens.weight"][inp]
    mask = np.triu(np.ones((t, t), dtype=bool), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = lambda name: w[f"model.layers.{i}.{name}"]
        h = rms_norm(x, p("input_layernorm.weight"), eps)
        q = (h @ p("self_attn.q_proj.weight").T).reshape(b, t, nh, hd).transpose(0, 2, 1, 3)
        k = (h @ p("self_attn.k_proj.weight").T).reshape(b, t, kv, hd).transpose(0, 2, 1, 3)
        v = (h @ p("self_attn.v_proj.weight").T).reshape(b, t, kv, hd).transpose(0, 2, 1, 3)
        if kind in ("qwen3", "qwen3_moe"):
            q = rms_norm(q, p("self_attn.q_norm.weight"), eps)
            k = rms_norm(k, p("self_attn.k_norm.weight"), eps)
        q, k = rotate(q, theta), rotate(k, theta)
        k = np.repeat(k, nh // kv, axis=1)
        v = np.repeat(v, nh // kv, axis=1)
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
        s[..., mask] = -np.inf
        s = np.exp(s - s.max(-1, keepdims=True))
        a = s / s.sum(-1, keepdims=True)
        y = (a @ v).transpose(0, 2, 1, 3).reshape(b, t, nh * hd)
        x = x + y @ p("self_attn.o_proj.weight").T
        h = rms_norm(x, p("post_attention_layernorm.weight"), eps)
        dense = kind in ("llama", "qwen3") or (kind == "qwen3_moe" and i in cfg.get("mlp_only_layers", []))
        if dense:
            x = x + swiglu(h, p("mlp.gate_proj.weight"), p("mlp.up_proj.weight"), p("mlp.down_proj.weight"))
        else:
            x = x + moe(cfg, kind, p, h)
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    logits = x @ head.T
    mx = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - mx).sum(-1)) + mx[..., 0]
    picked = np.take_along_axis(logits, tgt[..., None], -1)[..., 0]
    return float((lse - picked).mean())


if __name__ == "__main__":
    print(f"{loss(sys.argv[1], json.load(open(sys.argv[2]))):.10f}")
