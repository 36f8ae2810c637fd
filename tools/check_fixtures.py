#!/usr/bin/env python3
"""Independent check of tests/fixtures/*: re-derives every expected.json value with plain numpy from the files
alone, using only the formulas of SPEC sections 1 and 3 (no transformers, no FlagEmbedding, no torch modules;
torch is used only to unpickle the .pt / .bin files). Float64 throughout; passes if everything agrees to 1e-5.

    /work/refenv/bin/python tools/check_fixtures.py
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from tokenizers import Tokenizer

FIX = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
TOL = 1e-5
worst = {}


def close(name, a, b, tol=TOL):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (name, a.shape, b.shape)
    d = float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b)))) if a.size else 0.0
    key = name.split("[")[0]
    worst[key] = max(worst.get(key, 0.0), d)
    assert d <= tol, f"{name}: {d:.3g} > {tol}"


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


_erf = np.vectorize(math.erf)


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def linear(x, W, b):
    return x @ W.T + b


def encoder(W, cfg, ids, mask, roberta):
    """ids, mask: [B, L] int arrays. Returns last_hidden_state [B, L, D] (pad rows included)."""
    ids = np.asarray(ids)
    mask = np.asarray(mask)
    B, L = ids.shape
    if roberta:  # SPEC 1.2: pad-aware positions, padding_idx = pad id = 1
        pad = cfg["pad_token_id"]
        m = (ids != pad).astype(np.int64)
        pos = np.cumsum(m, axis=1) * m + pad
    else:
        pos = np.broadcast_to(np.arange(L), (B, L))
    g = lambda k: W[k].astype(np.float64)
    x = g("embeddings.word_embeddings.weight")[ids] + g("embeddings.position_embeddings.weight")[pos] \
        + g("embeddings.token_type_embeddings.weight")[0]
    eps = cfg["layer_norm_eps"]
    x = layer_norm(x, g("embeddings.LayerNorm.weight"), g("embeddings.LayerNorm.bias"), eps)
    H = cfg["num_attention_heads"]
    D = cfg["hidden_size"]
    hd = D // H
    bias = np.where(mask[:, None, None, :] == 1, 0.0, np.finfo(np.float32).min)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (linear(x, g(p + f"attention.self.{n}.weight"), g(p + f"attention.self.{n}.bias")).reshape(
            B, L, H, hd).transpose(0, 2, 1, 3) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + bias
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        a = a.transpose(0, 2, 1, 3).reshape(B, L, D)
        a = layer_norm(x + linear(a, g(p + "attention.output.dense.weight"), g(p + "attention.output.dense.bias")),
                       g(p + "attention.output.LayerNorm.weight"), g(p + "attention.output.LayerNorm.bias"), eps)
        f = linear(gelu(linear(a, g(p + "intermediate.dense.weight"), g(p + "intermediate.dense.bias"))),
                   g(p + "output.dense.weight"), g(p + "output.dense.bias"))
        x = layer_norm(a + f, g(p + "output.LayerNorm.weight"), g(p + "output.LayerNorm.bias"), eps)
    return x


def normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def load_weights(d):
    if (d / "model.safetensors").exists():
        return load_file(str(d / "model.safetensors"))
    sd = torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in sd.items()}


def load_head(path):
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy().astype(np.float64) for k, v in sd.items()}


def tokenize(tok, text, max_length):
    ids = tok.encode(text).ids
    return ids if len(ids) <= max_length else ids[:max_length - 1] + [ids[-1]]


def check_m3(d):
    cfg = json.loads((d / "config.json").read_text())
    exp = json.loads((d / "expected.json").read_text())
    W = load_weights(d)
    col, spa = load_head(d / "colbert_linear.pt"), load_head(d / "sparse_linear.pt")
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    skip = {0, 1, 2, 3}

    def heads(h, ids):
        w = np.maximum(linear(h, spa["weight"], spa["bias"])[:, 0], 0.0)
        sp = {}
        for t, x in zip(ids, w):
            if t not in skip and x > 0:
                sp[str(t)] = max(sp.get(str(t), 0.0), x)
        return normalize(h[0]), sp, normalize(linear(h[1:], col["weight"], col["bias"]))

    for i, text in enumerate(exp["texts"]):
        ids = tokenize(tok, text, exp["max_length"])
        assert ids == exp["input_ids"][i], (d.name, i, ids, exp["input_ids"][i])
        h = encoder(W, cfg, [ids], [[1] * len(ids)], roberta=True)[0]
        close(f"{d.name} last_hidden_state[{i}]", h, exp["last_hidden_state"][i])
        dense, sp, cv = heads(h, ids)
        close(f"{d.name} dense[{i}]", dense, exp["dense"][i])
        close(f"{d.name} colbert[{i}]", cv, exp["colbert"][i])
        assert set(sp) == set(exp["sparse"][i]), (d.name, i, sp, exp["sparse"][i])
        for k in sp:
            close(f"{d.name} sparse[{i}]", sp[k], exp["sparse"][i][k])

    if "batch_input_ids" in exp:
        bi, bm = np.array(exp["batch_input_ids"]), np.array(exp["batch_attention_mask"])
        hb = encoder(W, cfg, bi, bm, roberta=True)
        ref = np.array(exp["batch_last_hidden_state"])
        for i in range(len(bi)):
            n = int(bm[i].sum())
            close(f"{d.name} batch_last_hidden_state[{i}]", hb[i, :n], ref[i, :n])

    # compute_score (SPEC 3.3): queries and passages each padded as one batch
    V = cfg["vocab_size"]

    def reps(texts, ml):
        seqs = [tokenize(tok, t, ml) for t in texts]
        L = max(map(len, seqs))
        ids = np.array([s + [1] * (L - len(s)) for s in seqs])
        mask = np.array([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
        h = encoder(W, cfg, ids, mask, roberta=True)
        dense = normalize(h[:, 0])
        w = np.maximum(linear(h, spa["weight"], spa["bias"])[..., 0], 0.0)
        sp = np.zeros((len(texts), V))
        for b in range(len(texts)):
            for t, x in zip(ids[b], w[b]):
                sp[b, t] = max(sp[b, t], x)
        sp[:, sorted(skip)] = 0.0
        cv = normalize(linear(h[:, 1:], col["weight"], col["bias"]) * mask[:, 1:, None])
        return dense, sp, cv, mask

    qd, qs, qc, qm = reps([p["query"] for p in exp["pairs"]], exp["max_query_length"])
    pd, ps, pc, _ = reps([p["passage"] for p in exp["pairs"]], exp["max_passage_length"])
    s = {"dense": (qd * pd).sum(-1), "sparse": (qs * ps).sum(-1),
         "colbert": np.einsum("bid,bjd->bij", qc, pc).max(-1).sum(-1) / qm[:, 1:].sum(-1)}
    w0, w1, w2 = exp["weights"]
    s["sparse+dense"] = (w1 * s["sparse"] + w0 * s["dense"]) / (w0 + w1)
    s["colbert+sparse+dense"] = (w2 * s["colbert"] + w1 * s["sparse"] + w0 * s["dense"]) / (w0 + w1 + w2)
    for k, v in s.items():
        close(f"{d.name} scores.{k}", v, exp["scores"][k])


def check_bert(d):
    cfg = json.loads((d / "config.json").read_text())
    exp = json.loads((d / "expected.json").read_text())
    stc = json.loads((d / "sentence_bert_config.json").read_text())
    pool = json.loads((d / "1_Pooling" / "config.json").read_text())
    mods = [m["type"].rsplit(".", 1)[-1] for m in json.loads((d / "modules.json").read_text())]
    assert stc["max_seq_length"] == exp["max_length"] and pool["pooling_mode_mean_tokens"]
    assert mods == ["Transformer", "Pooling", "Normalize"]
    W = load_file(str(d / "model.safetensors"))
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    for i, text in enumerate(exp["texts"]):
        ids = tokenize(tok, text, exp["max_length"])
        assert ids == exp["input_ids"][i], (i, ids, exp["input_ids"][i])
        h = encoder(W, cfg, [ids], [[1] * len(ids)], roberta=False)[0]
        close(f"{d.name} last_hidden_state[{i}]", h, exp["last_hidden_state"][i])
        close(f"{d.name} dense[{i}]", normalize(h.mean(0)), exp["dense"][i])


def main():
    check_m3(FIX / "tiny-xlmr")
    check_m3(FIX / "tiny-bge-m3-layout")
    check_bert(FIX / "tiny-bert")
    for k, v in sorted(worst.items()):
        print(f"{k:55s} {v:.2e}")
    print("all fixtures agree with the numpy re-derivation to", TOL)


if __name__ == "__main__":
    sys.exit(main())
