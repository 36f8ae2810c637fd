#!/usr/bin/env python3
"""Golden loss, scores and gradients of FlagEmbedding's OWN M3 unified fine-tuning loss on the tiny XLM-R fixture.

The reference is FlagEmbedding 1.4.2 (the pinned reference env, SPEC section 12):
  FlagEmbedding/finetune/embedder/encoder_only/m3/modeling.py   EncoderOnlyEmbedderM3Model   ([MOD-new])
  FlagEmbedding/finetune/embedder/encoder_only/m3/runner.py     EncoderOnlyEmbedderM3Runner.get_model
  FlagEmbedding/abc/finetune/embedder/AbsModeling.py            AbsEmbedderModel (loss helpers, [ABS])
  FlagEmbedding/abc/finetune/embedder/AbsDataset.py             AbsEmbedderCollator (tokenization / padding)
The model's forward runs UNMODIFIED on one fixed batch (B=3 queries, G=4 passages each), float32, with dropout off,
for three variants (no teacher scores; teacher scores with kd_loss_type m3_kd_loss; with kl_div). See
docs/fixtures.md, section "m3-loss".

    /work/refenv/bin/python tools/dump_m3_loss.py

Writes tests/fixtures/m3-loss/{batch.json,plain,m3_kd,kl_div}.safetensors (byte-identical on every run) and
prints a JSON report of the checks it ran. Nothing is downloaded.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import importlib.metadata
import json
import random
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(1)

from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore")

from FlagEmbedding.abc.finetune.embedder import AbsEmbedderCollator  # noqa: E402
from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import EncoderOnlyEmbedderM3Model  # noqa: E402
import FlagEmbedding.finetune.embedder.encoder_only.m3.runner as R  # noqa: E402
from FlagEmbedding.finetune.embedder.encoder_only.m3.runner import EncoderOnlyEmbedderM3Runner  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
XLMR_DIR = ROOT / "tests" / "fixtures" / "tiny-xlmr"
OUT_DIR = ROOT / "tests" / "fixtures" / "m3-loss"

SEED = 20240612
TEMPERATURE = 0.02
QUERY_MAX_LEN = 12
PASSAGE_MAX_LEN = 20
G = 4

# B = 3 queries; passages query-major, positive first in each group. Negatives are listed in DESCENDING teacher
# score order, so the research-code re-sort (SPEC 4.2) and the [ABS] no-sort give the same batch.
QUERIES = [
    "what animal is a fox?",
    "Wo liegt der Bahnhof in Berlin und wie komme ich dorthin?",  # longer than 12 tokens: truncated
    "中国的首都是哪里？",
]
PASSAGES = [
    # query 0
    "A fox is a small wild animal of the dog family.",
    "The quick brown fox jumps over the lazy dog.",
    "Pizza comes from Naples in Italy.",
    "Pi is about 3.14.",
    # query 1
    "Der Bahnhof liegt im Zentrum der Stadt, neben dem großen Park.",
    "Berlin is the capital of Germany.",
    "Die Größe der Bäume überrascht Jürgen: schön!",
    "Москва — столица России, город большой.",
    # query 2
    "北京是中国的首都，人口很多。",
    "The Forbidden City is in Beijing.",
    "In 1998 researchers in Berlin and Beijing compared many retrieval systems, measuring recall, precision and "
    "latency across languages and document lengths, and the results surprised everyone.",  # truncated at 20
    "Hello Welt 你好 мир 2024",
]
# reranker-like raw logits; group 1 has a negative that the teacher ranks above the positive
TEACHER_SCORES = [
    3.25, 1.5, -0.5, -2.0,
    1.75, 2.25, 0.25, -1.75,
    4.0, 1.0, 0.5, -3.0,
]

VARIANTS = [
    # name, kd_loss_type, teacher scores passed?, temperature
    ("plain", "m3_kd_loss", False, TEMPERATURE),  # kd_loss_type is irrelevant without teacher scores
    ("m3_kd", "m3_kd_loss", True, TEMPERATURE),
    ("kl_div", "kl_div", True, TEMPERATURE),
    # extra: at tau 0.02 the tiny model's sparse scores (up to ~450) saturate every softmax that involves them;
    # tau 1 keeps all four score matrices in a range where every column gets a non-trivial gradient
    ("plain_tau1", "m3_kd_loss", False, 1.0),
]


def seed_all():
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)


# --------------------------------------------------------------------------------------------------------------
# Reference model
# --------------------------------------------------------------------------------------------------------------

def build_model(tok, kd_loss_type, tau, attn=None):
    """Model exactly as EncoderOnlyEmbedderM3Runner.load_tokenizer_and_model builds it (runner.py:129-143)."""
    seed_all()  # AutoModel initialises a fresh (unused) pooler: keep it deterministic
    if attn is None:
        base = EncoderOnlyEmbedderM3Runner.get_model(str(XLMR_DIR), False, -1)
    else:
        # only for the eager cross-check (the runner uses the transformers default, sdpa): the attention class is
        # chosen at construction, so hand attn_implementation to the AutoModel call inside get_model
        saved = R.AutoModel
        R.AutoModel = types.SimpleNamespace(
            from_pretrained=lambda *a, **k: saved.from_pretrained(*a, attn_implementation=attn, **k))
        try:
            base = EncoderOnlyEmbedderM3Runner.get_model(str(XLMR_DIR), False, -1)
        finally:
            R.AutoModel = saved
    assert base["model"].config._attn_implementation == (attn or "sdpa")
    model = EncoderOnlyEmbedderM3Model(
        base,
        tokenizer=tok,
        negatives_cross_device=False,
        temperature=tau,
        sub_batch_size=None,  # AbsEmbedderTrainingArguments default
        kd_loss_type=kd_loss_type,
        use_mrl=False,
        mrl_dims=[],
        sentence_pooling_method="cls",
        normalize_embeddings=True,
        unified_finetuning=True,
        use_self_distill=True,
        self_distill_start_step=0,
    )
    # The loss branch of forward() and the [B,L,V] scatter+max sparse path are gated on the WRAPPER's
    # self.training, so the wrapper stays in train mode; dropout lives only in the backbone, which goes to eval.
    model.train()
    model.model.eval()
    assert model.training and not model.model.training
    assert all(not m.training for m in model.model.modules())
    assert not any(isinstance(m, torch.nn.Dropout) for m in list(model.colbert_linear.modules()) +
                   list(model.sparse_linear.modules()))
    # self-distillation runs only if self.step > self_distill_start_step (strict, modeling.py:461); step starts at 0,
    # so with start 0 the FIRST forward has no self-distillation. Put the model at step 1 (its second micro-batch).
    model.step = 1
    return model


class Recorder:
    """Wraps the instance's loss helpers to record what forward() computed (the helpers themselves run unchanged)."""

    def __init__(self, model):
        self.calls = []
        self.distill = []
        orig_inbatch = model._compute_in_batch_neg_loss
        orig_distill = model.distill_loss

        def inbatch(q_reps, p_reps, teacher_targets=None, compute_score_func=None, **kw):
            scores, loss = orig_inbatch(q_reps, p_reps, teacher_targets=teacher_targets,
                                        compute_score_func=compute_score_func, **kw)
            self.calls.append((compute_score_func.__name__, q_reps, p_reps, kw, scores, loss.detach().clone()))
            return scores, loss

        def distill(kd_loss_type, teacher_targets, student_scores, group_size=None):
            out = orig_distill(kd_loss_type, teacher_targets, student_scores, group_size)
            self.distill.append((kd_loss_type, teacher_targets, student_scores, out.detach().clone()))
            return out

        model._compute_in_batch_neg_loss = inbatch
        model.distill_loss = distill


def named_grads(model):
    out = {}
    for n, p in model.model.named_parameters():
        if n.startswith("pooler."):
            assert p.grad is None, n  # the pooler is not part of the loss (and not in model.safetensors)
            continue
        assert p.grad is not None, n
        out["grad." + n] = p.grad.detach().clone()
    for head in ("colbert_linear", "sparse_linear"):
        for n, p in getattr(model, head).named_parameters():
            out[f"grad.{head}.{n}"] = p.grad.detach().clone()
    return out


def run_reference(tok, batch, kd_loss_type, with_teacher, tau, dtype=torch.float32, attn=None):
    model = build_model(tok, kd_loss_type, tau, attn=attn).to(dtype)
    rec = Recorder(model)
    # forward() builds the teacher tensor with torch.tensor(list) (default dtype): make it f64 in the f64 run
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        out = model(queries=batch["queries"], passages=batch["passages"],
                    teacher_scores=batch["teacher_scores"] if with_teacher else None, no_in_batch_neg_flag=False)
    finally:
        torch.set_default_dtype(old)
    assert model.step == 2
    out.loss.backward()
    names = [c[0] for c in rec.calls]
    assert names == ["compute_dense_score", "compute_sparse_score", "compute_colbert_score", "ensemble_score"], names
    n_kd = 4 if with_teacher else 0
    assert len(rec.distill) == n_kd + 3, len(rec.distill)
    assert all(d[0] == kd_loss_type for d in rec.distill[:n_kd])
    assert all(d[0] == "kl_div" for d in rec.distill[n_kd:])
    c = {n.split("_")[1]: rec.calls[i] for i, n in enumerate(names)}  # dense/sparse/colbert/score(=ensemble)
    c["ensemble"] = c.pop("score")
    sd = [d[3] for d in rec.distill[n_kd:]]
    res = {
        "loss": out.loss.detach().reshape(1),
        "loss.dense": c["dense"][5].reshape(1),
        "loss.sparse": c["sparse"][5].reshape(1),
        "loss.colbert": c["colbert"][5].reshape(1),
        "loss.ensemble": c["ensemble"][5].reshape(1),
        "loss.self_distill.dense": sd[0].reshape(1),
        "loss.self_distill.sparse": sd[1].reshape(1),
        "loss.self_distill.colbert": sd[2].reshape(1),
        "scores.dense": c["dense"][4].detach().clone(),
        "scores.sparse": c["sparse"][4].detach().clone(),
        "scores.colbert": c["colbert"][4].detach().clone(),
        "scores.ensemble": c["ensemble"][4].detach().clone(),
        "q.dense": c["dense"][1].detach().clone(),
        "p.dense": c["dense"][2].detach().clone(),
        "q.sparse": c["sparse"][1].detach().clone(),  # [B, V] vocabulary vectors (training path)
        "p.sparse": c["sparse"][2].detach().clone(),
        "q.colbert": c["colbert"][1].detach().clone(),
        "p.colbert": c["colbert"][2].detach().clone(),
        "q_mask": c["colbert"][3]["q_mask"].detach().clone(),
    }
    # the self-distillation teacher really is softmax(ensemble) and the students are the full [B, B*G] matrices
    t_sd = rec.distill[n_kd][1]
    assert torch.equal(t_sd, torch.softmax(c["ensemble"][4].detach(), dim=-1))
    for d, k in zip(rec.distill[n_kd:], ("dense", "sparse", "colbert")):
        assert d[2] is c[k][4] and tuple(d[2].shape) == (3, 12)
    if with_teacher:
        res["teacher_targets"] = rec.distill[0][1].detach().clone()
    res.update(named_grads(model))
    return res, model


# --------------------------------------------------------------------------------------------------------------
# Independent float64 re-derivation (plain torch, SPEC 3.1 / 4.4-4.6, retrom3 decision 10.6 masked ColBERT max)
# --------------------------------------------------------------------------------------------------------------

def independent(tok, batch, kd_loss_type, with_teacher, tau):
    model = build_model(tok, kd_loss_type, tau).double()
    bb, cl, sp = model.model, model.colbert_linear, model.sparse_linear
    q, p = batch["queries"], batch["passages"]
    special = {tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    V = bb.config.vocab_size

    def reps(f):
        H = bb(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).last_hidden_state
        ids, m = f["input_ids"], f["attention_mask"]
        dense = F.normalize(H[:, 0], dim=-1)
        w = torch.relu(sp(H))[..., 0]  # [N, L]
        vecs = []
        for n in range(H.shape[0]):
            cols = {}
            for l in range(H.shape[1]):
                t = int(ids[n, l])
                if m[n, l] == 0 or t in special:
                    continue
                cols[t] = w[n, l] if t not in cols else torch.maximum(cols[t], w[n, l])
            v = torch.zeros(V, dtype=H.dtype)
            if cols:
                idx = torch.tensor(sorted(cols))
                v = v.index_put((idx,), torch.stack([cols[t] for t in sorted(cols)]))
            vecs.append(v)
        sparse = torch.stack(vecs)
        colb = [F.normalize(cl(H[n, 1:int(m[n].sum())]), dim=-1) for n in range(H.shape[0])]
        return dense, sparse, colb

    qd, qs, qc = reps(q)
    pd, ps, pc = reps(p)
    Sd = qd @ pd.T / tau
    Ss = qs @ ps.T / tau
    Sc = torch.stack([torch.stack([(a @ b.T).max(dim=1).values.sum() / a.shape[0] for b in pc]) for a in qc]) / tau
    Se = Sd + 0.3 * Ss + Sc
    B = Sd.shape[0]
    tgt = torch.arange(B) * G

    def ce(S, t):
        return -(torch.log_softmax(S, dim=-1)[torch.arange(S.shape[0]), t]).mean()

    if with_teacher:
        T = torch.softmax(torch.tensor(batch["teacher_scores"], dtype=torch.float64).view(B, G), dim=-1)

    def mode_loss(S):
        if not with_teacher:
            return ce(S, tgt)
        if kd_loss_type == "kl_div":
            loc = torch.stack([S[b, b * G:(b + 1) * G] for b in range(B)])
            return -(T * torch.log_softmax(loc, dim=-1)).sum(-1).mean() + ce(S, tgt)
        tot = 0
        for g in range(G):
            Sm = S.clone()
            for b in range(B):
                Sm[b, b * G:b * G + g] = float("-inf")
            ls = -torch.log_softmax(Sm, dim=-1)[torch.arange(B), tgt + g]
            tot = tot + (T[:, g] * ls).mean()
        return tot

    Ld, Ls, Lc, Le = mode_loss(Sd), mode_loss(Ss), mode_loss(Sc), mode_loss(Se)
    L = (Ld + Le + 0.1 * Ls + Lc) / 4
    Pt = torch.softmax(Se.detach(), dim=-1)

    def sd(S):
        return -(Pt * torch.log_softmax(S, dim=-1)).sum(-1).mean()

    Lsd = (sd(Sd) + 0.1 * sd(Ss) + sd(Sc)) / 3
    loss = (L + Lsd) / 2
    loss.backward()
    res = {
        "loss": loss.detach().reshape(1), "loss.dense": Ld.detach().reshape(1), "loss.sparse": Ls.detach().reshape(1),
        "loss.colbert": Lc.detach().reshape(1), "loss.ensemble": Le.detach().reshape(1),
        "loss.self_distill.dense": sd(Sd).detach().reshape(1), "loss.self_distill.sparse": sd(Ss).detach().reshape(1),
        "loss.self_distill.colbert": sd(Sc).detach().reshape(1),
        "scores.dense": Sd.detach(), "scores.sparse": Ss.detach(), "scores.colbert": Sc.detach(),
        "scores.ensemble": Se.detach(),
    }
    res.update(named_grads(model))
    return res


def max_diff(a, b):
    """max |a-b| and that relative to max |b| over the whole tensor (None for tensors that are zero up to rounding,
    i.e. the attention key biases, whose gradient is mathematically 0)"""
    a, b = a.double(), b.double()
    d = (a - b).abs().max().item()
    m = b.abs().max().item()
    return d, (d / m if m > 1e-6 else None)


# --------------------------------------------------------------------------------------------------------------
# ColBERT pad quirk (SPEC 3.3 vs decision 10.6)
# --------------------------------------------------------------------------------------------------------------

def colbert_quirk(ref, tau):
    qv, pv, qm = ref["q.colbert"], ref["p.colbert"], ref["q_mask"]
    ts = torch.einsum("qin,pjn->qipj", qv, pv)  # exactly FlagEmbedding's token_scores
    padded = ts.max(-1).values.sum(1) / qm[:, 1:].sum(-1, keepdim=True) / tau
    pmask = (pv.abs().sum(-1) > 0)  # real passage rows (pad rows are exact zeros)
    masked_ts = ts.masked_fill(~pmask[None, None], float("-inf"))
    mx = masked_ts.max(-1).values  # [B, Lq-1, BG]
    qreal = (qv.abs().sum(-1) > 0)  # [B, Lq-1]
    mx = torch.where(qreal[:, :, None], mx, torch.zeros_like(mx))
    masked = mx.sum(1) / qm[:, 1:].sum(-1, keepdim=True) / tau
    min_real_max = mx.masked_fill(~qreal[:, :, None], float("inf")).min().item()
    return padded, masked, min_real_max


# --------------------------------------------------------------------------------------------------------------

def main():
    seed_all()
    report = {"flagembedding": importlib.metadata.version("FlagEmbedding"), "torch": torch.__version__,
              "transformers": importlib.metadata.version("transformers")}
    assert report["flagembedding"] == "1.4.2", report
    tok = AutoTokenizer.from_pretrained(str(XLMR_DIR))  # runner.py:111 (use_fast default True)
    assert (tok.cls_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(QUERIES) == 3 and len(PASSAGES) == 3 * G and len(TEACHER_SCORES) == 3 * G

    collator = AbsEmbedderCollator(tokenizer=tok, query_max_len=QUERY_MAX_LEN, passage_max_len=PASSAGE_MAX_LEN,
                                   sub_batch_size=None, pad_to_multiple_of=None, padding=True, return_tensors="pt")
    feats = [(QUERIES[b], PASSAGES[b * G:(b + 1) * G], TEACHER_SCORES[b * G:(b + 1) * G]) for b in range(3)]
    batch = collator(feats)
    assert batch["teacher_scores"] == TEACHER_SCORES and batch["no_in_batch_neg_flag"] is False
    assert set(batch["queries"].keys()) == {"input_ids", "attention_mask"}, batch["queries"].keys()
    qlen = batch["queries"]["attention_mask"].sum(1).tolist()
    plen = batch["passages"]["attention_mask"].sum(1).tolist()
    report["query_lengths"], report["passage_lengths"] = qlen, plen
    report["padded_shapes"] = [list(batch["queries"]["input_ids"].shape), list(batch["passages"]["input_ids"].shape)]
    assert max(qlen) == QUERY_MAX_LEN and max(plen) == PASSAGE_MAX_LEN  # truncation exercised on both sides

    # the runner really loaded the fixture's backbone and .pt heads
    m = build_model(tok, "m3_kd_loss", TEMPERATURE)
    sd = load_file(str(XLMR_DIR / "model.safetensors"))
    msd = m.model.state_dict()
    assert all(torch.equal(sd[k], msd[k]) for k in sd) and set(sd) <= set(msd)
    assert set(msd) - set(sd) == {"pooler.dense.weight", "pooler.dense.bias"}, set(msd) - set(sd)
    for head in ("colbert_linear", "sparse_linear"):
        hsd = torch.load(XLMR_DIR / f"{head}.pt", map_location="cpu", weights_only=True)
        assert all(torch.equal(hsd[k], getattr(m, head).state_dict()[k]) for k in ("weight", "bias"))

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    bj = {
        "queries": QUERIES, "passages": PASSAGES, "teacher_scores": TEACHER_SCORES,
        "B": 3, "G": G, "query_max_len": QUERY_MAX_LEN, "passage_max_len": PASSAGE_MAX_LEN,
        "temperature": TEMPERATURE,
        "q_input_ids": batch["queries"]["input_ids"].tolist(),
        "q_attention_mask": batch["queries"]["attention_mask"].tolist(),
        "p_input_ids": batch["passages"]["input_ids"].tolist(),
        "p_attention_mask": batch["passages"]["attention_mask"].tolist(),
    }
    with open(OUT_DIR / "batch.json", "w", encoding="utf-8") as f:
        f.write("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in bj.items())
                + "\n}\n")

    keep = ["loss", "loss.dense", "loss.sparse", "loss.colbert", "loss.ensemble", "loss.self_distill.dense",
            "loss.self_distill.sparse", "loss.self_distill.colbert", "scores.dense", "scores.sparse",
            "scores.colbert", "scores.ensemble", "q.dense", "p.dense", "q.colbert", "p.colbert"]
    for name, kd, with_t, tau in VARIANTS:
        ref, model = run_reference(tok, batch, kd, with_t, tau)
        r = {"kd_loss_type": kd if with_t else None, "temperature": tau}

        # composition as executed, re-added from the recorded parts (f32)
        Lu = (ref["loss.dense"] + ref["loss.ensemble"] + 0.1 * ref["loss.sparse"] + ref["loss.colbert"]) / 4
        Lsd = (ref["loss.self_distill.dense"] + 0.1 * ref["loss.self_distill.sparse"]
               + ref["loss.self_distill.colbert"]) / 3
        ref["loss.unified"] = Lu
        ref["loss.self_distill"] = Lsd
        r["recompose_abs_err"] = abs(((Lu + Lsd) / 2 - ref["loss"]).item())
        assert r["recompose_abs_err"] < 1e-5
        assert torch.equal(ref["scores.ensemble"],
                           ref["scores.dense"] + 0.3 * ref["scores.sparse"] + ref["scores.colbert"])

        # sparse vectors: specials zeroed, pads contribute nothing
        for k in ("q.sparse", "p.sparse"):
            assert ref[k][:, [0, 1, 2, 3]].abs().max().item() == 0.0

        # ColBERT pad quirk
        padded, masked, mrm = colbert_quirk(ref, tau)
        assert torch.equal(padded, ref["scores.colbert"]), "re-computed padded colbert != FlagEmbedding's"
        r["colbert_padded_vs_masked_max_abs"] = (padded - masked).abs().max().item()
        r["colbert_min_real_token_max_similarity"] = mrm
        assert torch.equal(padded, masked), "ColBERT pad quirk fires on this batch; choose other passages"
        assert mrm > 0

        # self-distillation really ran: with step 0 the same forward gives exactly the no-self-distill loss
        m0 = build_model(tok, kd, tau)
        m0.step = 0
        out0 = m0(queries=batch["queries"], passages=batch["passages"],
                  teacher_scores=batch["teacher_scores"] if with_t else None)
        r["loss_at_step0_(no_self_distill)"] = out0.loss.item()
        assert abs(out0.loss.item() - Lu.item()) < 1e-6

        # f64 run of the same reference code, the eager-attention run, and the independent f64 re-derivation
        ref64, _ = run_reference(tok, batch, kd, with_t, tau, dtype=torch.float64)
        eager, _ = run_reference(tok, batch, kd, with_t, tau, attn="eager")
        ind = independent(tok, batch, kd, with_t, tau)
        gnames = sorted(k for k in ref if k.startswith("grad."))
        assert sorted(k for k in ind if k.startswith("grad.")) == gnames and len(gnames) == 41, len(gnames)
        cmp_keys = [k for k in ind if not k.startswith("grad.")]

        def worst(a, b, keys):
            w = {"max_abs": 0.0, "max_rel_to_tensor_max": 0.0, "abs_at": None, "rel_at": None}
            for k in keys:
                d, rel = max_diff(a[k], b[k])
                if d > w["max_abs"]:
                    w["max_abs"], w["abs_at"] = d, k
                if rel is not None and rel > w["max_rel_to_tensor_max"]:
                    w["max_rel_to_tensor_max"], w["rel_at"] = rel, k
            return w

        r["ref64_vs_independent64.values"] = worst(ref64, ind, cmp_keys)
        r["ref64_vs_independent64.grads"] = worst(ref64, ind, gnames)
        assert r["ref64_vs_independent64.values"]["max_abs"] < 1e-9
        assert r["ref64_vs_independent64.grads"]["max_rel_to_tensor_max"] < 1e-9
        assert r["ref64_vs_independent64.grads"]["max_abs"] < 1e-9
        r["f32_vs_f64.values"] = worst(ref, ref64, cmp_keys)
        r["f32_vs_f64.grads"] = worst(ref, ref64, gnames)
        r["sdpa_vs_eager_f32.values"] = worst(ref, eager, cmp_keys)
        r["sdpa_vs_eager_f32.grads"] = worst(ref, eager, gnames)
        r["max_abs_grad"] = max(ref[k].abs().max().item() for k in gnames)
        r["loss"] = ref["loss"].item()
        r["loss_f64"] = ref64["loss"].item()
        for k in ["loss.dense", "loss.sparse", "loss.colbert", "loss.ensemble", "loss.unified",
                  "loss.self_distill.dense", "loss.self_distill.sparse", "loss.self_distill.colbert",
                  "loss.self_distill"]:
            r[k] = ref[k].item()
        if with_t:
            r["teacher_targets"] = [[round(x, 6) for x in row] for row in ref["teacher_targets"].tolist()]
        report[name] = r

        tensors = {k: ref[k] for k in keep + ["loss.unified", "loss.self_distill"] + gnames}
        tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
        save_file({k: tensors[k] for k in sorted(tensors)}, str(OUT_DIR / f"{name}.safetensors"),
                  # ONE metadata key: safetensors keeps metadata in a hash map, so several keys come out in a
                  # different order on every run and the file would not be byte-identical
                  metadata={"config": json.dumps({"kd_loss_type": kd if with_t else None, "teacher_scores": with_t,
                                                  "temperature": tau,
                                                  "source": "FlagEmbedding 1.4.2 EncoderOnlyEmbedderM3Model"},
                                                 sort_keys=True)})

    sizes = {p.name: p.stat().st_size for p in sorted(OUT_DIR.iterdir())}
    report["files"] = sizes
    report["total_bytes"] = sum(sizes.values())
    assert report["total_bytes"] < 1_500_000
    print(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
