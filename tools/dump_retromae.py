#!/usr/bin/env python3
"""Golden loss + gradients of the REFERENCE RetroMAE pre-training model on the tiny XLM-R fixture.

The reference is FlagEmbedding 1.2.11 (PyPI sdist), FlagEmbedding/baai_general_embedding/retromae_pretrain/
{modeling,enhancedDecoder,arguments}.py ([RMAE-BGE] in SPEC section 0). Its model is run UNMODIFIED (eval mode,
float32, eager attention) on a batch whose masks are fixed here and fed explicitly, so nothing is random at loss
time. See docs/fixtures.md, section "retromae".

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 /work/refenv/bin/python tools/dump_retromae.py [--sdist PATH]

PATH is FlagEmbedding-1.2.11.tar.gz or the directory it unpacks to. Without --sdist the script looks in
/tmp/fe, and otherwise runs `pip download --no-deps flagembedding==1.2.11` (PyPI only) into a temporary
directory. The reference files are copied to a temporary package and patched in one place (SPEC 11.10):
enhancedDecoder.py imports apply_chunking_to_forward / find_pruneable_heads_and_indices / prune_linear_layer
from transformers.modeling_utils, which transformers 4.57 no longer re-exports; the import is redirected to
transformers.pytorch_utils. Nothing else is changed.

Writes tests/fixtures/retromae/{weights,batch,expected}.safetensors (byte-identical on every run) and prints a
JSON report of the checks it ran.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import argparse
import copy
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

torch.set_num_threads(1)

from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parent.parent
XLMR_DIR = ROOT / "tests" / "fixtures" / "tiny-xlmr"
OUT_DIR = ROOT / "tests" / "fixtures" / "retromae"

SEED = 20240601
TEXT_IDX = [0, 4, 11]  # expected.json "texts": 16, 13 and 15 tokens at max_length 16
MAX_LEN = 16
P_ENC = 0.3
P_DEC = 0.5
MASK_ID = 999
# rows (example, position) whose decoder row HIDES position 0 (reference semantics); every other row i != 0 sees it
SLOT0_HIDDEN_ROWS = [(0, 5), (2, 9)]

REF_SUBDIR = "FlagEmbedding/baai_general_embedding/retromae_pretrain"
REF_FILES = ["__init__.py", "arguments.py", "enhancedDecoder.py", "modeling.py"]
PATCH_OLD = "from transformers.modeling_utils import ("
PATCH_NEW = "from transformers.pytorch_utils import ("


# --------------------------------------------------------------------------------------------------------------
# Reference code
# --------------------------------------------------------------------------------------------------------------

def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def locate_sdist(arg, report):
    """Return the unpacked FlagEmbedding-1.2.11 directory."""
    cands = [Path(arg)] if arg else [Path("/tmp/fe/FlagEmbedding-1.2.11"), Path("/tmp/fe/FlagEmbedding-1.2.11.tar.gz")]
    for c in cands:
        if c.is_dir() and (c / REF_SUBDIR).is_dir():
            return c
        if c.is_file() and c.name.endswith(".tar.gz"):
            report["sdist sha256"] = sha256(c)
            dest = Path(tempfile.mkdtemp(prefix="fe-sdist-"))
            with tarfile.open(c) as tf:
                tf.extractall(dest, filter="data")
            return dest / "FlagEmbedding-1.2.11"
    if arg:
        raise SystemExit(f"--sdist {arg}: neither FlagEmbedding-1.2.11.tar.gz nor its unpacked directory")
    dl = Path(tempfile.mkdtemp(prefix="fe-dl-"))
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "flagembedding==1.2.11", "-d", str(dl)],
                   check=True)
    return locate_sdist(str(dl / "FlagEmbedding-1.2.11.tar.gz"), report)


def import_reference(sdist_dir, report):
    """Copy the four reference files into a temporary package `retromae_ref`, apply the one import fix, import."""
    src = sdist_dir / REF_SUBDIR
    pkg_root = Path(tempfile.mkdtemp(prefix="retromae-ref-"))
    pkg = pkg_root / "retromae_ref"
    pkg.mkdir()
    for f in REF_FILES:
        report[f"sha256 {REF_SUBDIR}/{f} (unpatched)"] = sha256(src / f)
        shutil.copy(src / f, pkg / f)
    dec = pkg / "enhancedDecoder.py"
    text = dec.read_text()
    assert text.count(PATCH_OLD) == 1, "unexpected enhancedDecoder.py"
    dec.write_text(text.replace(PATCH_OLD, PATCH_NEW))
    sys.path.insert(0, str(pkg_root))
    from retromae_ref.arguments import ModelArguments
    from retromae_ref.modeling import RetroMAEForPretraining
    return RetroMAEForPretraining, ModelArguments


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------

def build_model(RetroMAEForPretraining, ModelArguments, report):
    # exactly the reference's own constructor path (run.py: model_class.from_pretrained(model_args, path)),
    # plus attn_implementation="eager" (SPEC 1.3 formula; sdpa differs by ~1e-6)
    torch.manual_seed(SEED)
    model = RetroMAEForPretraining.from_pretrained(ModelArguments(), str(XLMR_DIR), attn_implementation="eager")
    lm = model.lm
    assert type(lm).__name__ == "XLMRobertaForMaskedLM", type(lm)
    assert model.decoder_embeddings is lm.roberta.embeddings
    assert lm.lm_head.decoder.weight is lm.roberta.embeddings.word_embeddings.weight, "decoder not tied"
    assert lm.lm_head.decoder.bias is lm.lm_head.bias
    assert lm.roberta.pooler is None
    # backbone = the fixture, bit for bit
    fixture = load_file(str(XLMR_DIR / "model.safetensors"))
    rsd = lm.roberta.state_dict()
    for k, v in fixture.items():
        assert torch.equal(rsd[k], v), k
    # lm_head and c_head: seeded random values for every tensor (incl. biases and LayerNorm affine params)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        h = lm.lm_head
        h.dense.weight.copy_(0.15 * torch.randn(h.dense.weight.shape, generator=gen))
        h.dense.bias.copy_(0.1 * torch.randn(h.dense.bias.shape, generator=gen))
        h.layer_norm.weight.copy_(0.6 + 0.8 * torch.rand(h.layer_norm.weight.shape, generator=gen))
        h.layer_norm.bias.copy_(0.1 * torch.randn(h.layer_norm.bias.shape, generator=gen))
        h.bias.copy_(0.2 * torch.randn(h.bias.shape, generator=gen))
        for n, p in model.c_head.named_parameters():
            if "LayerNorm.weight" in n:
                p.copy_(0.6 + 0.8 * torch.rand(p.shape, generator=gen))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    model.eval()
    report["c_head LayerNorm eps (from the XLM-R config)"] = model.c_head.output.LayerNorm.eps
    report["c_head class"] = type(model.c_head).__module__ + "." + type(model.c_head).__name__
    return model


def hf_name(n):
    """RetroMAEForPretraining parameter name -> name in weights.safetensors."""
    if n.startswith("lm.roberta."):
        return n[len("lm.roberta."):]
    if n.startswith("lm.lm_head."):
        return n[len("lm."):]
    if n.startswith("c_head."):
        return n
    raise AssertionError(n)


def weight_tensors(model):
    out = {}
    for n, p in model.named_parameters():  # tied parameters are listed once (decoder.weight = word embeddings)
        out[hf_name(n)] = p.detach().clone().contiguous()
    return out


# --------------------------------------------------------------------------------------------------------------
# Batch with fixed masks
# --------------------------------------------------------------------------------------------------------------

def build_batch(report):
    texts = json.loads((XLMR_DIR / "expected.json").read_text())["texts"]
    texts = [texts[i] for i in TEXT_IDX]
    assert all(t.strip() for t in texts)
    tok = AutoTokenizer.from_pretrained(str(XLMR_DIR))
    enc = tok(texts, truncation=True, max_length=MAX_LEN, padding="longest", return_tensors="pt")
    ids = enc["input_ids"].to(torch.int64)
    am = enc["attention_mask"].to(torch.int64)
    B, L = ids.shape
    lens = am.sum(1).tolist()
    assert len(set(lens)) == B and L == max(lens) and (ids[am == 0] == tok.pad_token_id).all()
    g = torch.Generator().manual_seed(SEED + 1)

    # encoder: ~30% of the non-special positions 1..n-2, then an explicit 80/10/10 outcome
    enc_mask = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(lens):
        cand = torch.arange(1, n - 1)
        k = max(1, round(P_ENC * len(cand)))
        pick = cand[torch.randperm(len(cand), generator=g)[:k]]
        enc_mask[b, pick] = True
    pos = enc_mask.nonzero().tolist()
    u = torch.rand(len(pos), generator=g)
    kind = ["mask" if x < 0.8 else ("random" if x < 0.9 else "keep") for x in u.tolist()]
    # make sure every outcome occurs at least once
    order = torch.randperm(len(pos), generator=g).tolist()
    if "random" not in kind:
        kind[order[0]] = "random"
    if "keep" not in kind:
        kind[order[1]] = "keep"
    enc_ids = ids.clone()
    enc_labels = torch.full_like(ids, -100)
    outcomes = []
    for (b, i), kd in zip(pos, kind):
        enc_labels[b, i] = ids[b, i]
        if kd == "mask":
            enc_ids[b, i] = MASK_ID
        elif kd == "random":
            # the reference draws from [0, len(tokenizer)); we stay off the specials 0..3 and <mask> so that no
            # random draw is the pad id (which would move RoBERTa position ids)
            while True:
                r = int(torch.randint(4, MASK_ID, (1,), generator=g))
                if r != int(ids[b, i]):
                    break
            enc_ids[b, i] = r
        outcomes.append((b, i, kd, int(ids[b, i]), int(enc_ids[b, i])))

    # decoder labels: original ids except position 0, the last real position and pads
    dec_labels = ids.clone()
    dec_labels[am == 0] = -100
    for b, n in enumerate(lens):
        dec_labels[b, 0] = -100
        dec_labels[b, n - 1] = -100

    # decoder visibility [B, L, L], 1 = visible
    vis = torch.zeros(B, L, L, dtype=torch.uint8)
    for b, n in enumerate(lens):
        k = round(P_DEC * n)
        for i in range(n):
            hidden = torch.zeros(n, dtype=torch.bool)
            hidden[torch.randperm(n, generator=g)[:k]] = True
            hidden[i] = True  # never sees itself
            if i != 0:
                hidden[0] = (b, i) in SLOT0_HIDDEN_ROWS
            vis[b, i, :n] = (~hidden).to(torch.uint8)
    # sanity
    for b, n in enumerate(lens):
        assert (vis[b, n:, :] == 0).all() and (vis[b, :, n:] == 0).all()
        for i in range(n):
            assert vis[b, i, i] == 0 and vis[b, i].sum() >= 1
            if i != 0:
                assert vis[b, i, 0] == (0 if (b, i) in SLOT0_HIDDEN_ROWS else 1)
    report["batch texts"] = texts
    report["batch lengths"] = lens
    report["encoder masked (b, i, outcome, original id, encoder id)"] = outcomes
    report["decoder visible fraction per real row (mean)"] = float(
        sum(vis[b, i, :n].float().mean() for b, n in enumerate(lens) for i in range(n)) / sum(lens))
    report["decoder rows hiding position 0 (i != 0)"] = SLOT0_HIDDEN_ROWS
    return {
        "enc_input_ids": enc_ids.contiguous(),
        "attention_mask": am.contiguous(),
        "enc_labels": enc_labels.contiguous(),
        "dec_input_ids": ids.clone().contiguous(),
        "dec_labels": dec_labels.contiguous(),
        "dec_visibility": vis.to(torch.int64).contiguous(),  # int64: what the Rust reader takes
    }


# --------------------------------------------------------------------------------------------------------------
# Reference forward/backward, instrumented with hooks only
# --------------------------------------------------------------------------------------------------------------

def run_reference(model, batch):
    cap = {"emb": []}
    hooks = [
        model.lm.register_forward_hook(lambda m, a, o: cap.__setitem__("lm", o)),
        model.c_head.register_forward_hook(lambda m, a, o: cap.__setitem__("c_head", o[0])),
        model.cross_entropy.register_forward_hook(lambda m, a, o: cap.__setitem__("dec_loss", o)),
        # the shared embedding module is called 3 times: encoder, content stream, query stream
        model.decoder_embeddings.register_forward_hook(lambda m, a, o: cap["emb"].append(o)),
    ]
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # get_extended_attention_mask's `device` deprecation
        (loss,) = model(
            encoder_input_ids=batch["enc_input_ids"],
            encoder_attention_mask=batch["attention_mask"],
            encoder_labels=batch["enc_labels"],
            decoder_input_ids=batch["dec_input_ids"],
            decoder_attention_mask=batch["dec_visibility"].to(torch.int64),  # the collator's dtype
            decoder_labels=batch["dec_labels"],
        )
    for h in hooks:
        h.remove()
    assert len(cap["emb"]) == 3
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        grads["grad." + hf_name(n)] = p.grad.detach().clone().contiguous()
    return {
        "loss": loss.detach().reshape(1),
        "loss.enc": cap["lm"].loss.detach().reshape(1),
        "loss.dec": cap["dec_loss"].detach().reshape(1),
        "hidden.enc": cap["lm"].hidden_states[-1].detach().contiguous(),
        "hidden.dec": cap["c_head"].detach().contiguous(),
        "stream.content_emb": cap["emb"][1].detach().contiguous(),
        "stream.query": cap["emb"][2].detach().contiguous(),
    }, grads


# --------------------------------------------------------------------------------------------------------------
# Independent re-derivation (f64, plain torch ops on the saved tensors; the documented formulas)
# --------------------------------------------------------------------------------------------------------------

def manual(W, batch, cfg):
    W = {k: v.double().clone().requires_grad_(True) for k, v in W.items()}
    eps, H, nh = cfg["layer_norm_eps"], cfg["hidden_size"], cfg["num_attention_heads"]
    dh = H // nh
    pad = cfg["pad_token_id"]

    def ln(x, p):
        return F.layer_norm(x, (H,), W[p + ".weight"], W[p + ".bias"], eps)

    def lin(x, p):
        return x @ W[p + ".weight"].T + W[p + ".bias"]

    def attn(q_in, kv_in, bias, p):
        B, L, _ = q_in.shape
        q = lin(q_in, p + "attention.self.query").view(B, L, nh, dh).transpose(1, 2)
        k = lin(kv_in, p + "attention.self.key").view(B, L, nh, dh).transpose(1, 2)
        v = lin(kv_in, p + "attention.self.value").view(B, L, nh, dh).transpose(1, 2)
        s = q @ k.transpose(-1, -2) / dh ** 0.5 + bias
        a = torch.softmax(s, -1) @ v
        a = a.transpose(1, 2).reshape(B, L, H)
        x = ln(lin(a, p + "attention.output.dense") + q_in, p + "attention.output.LayerNorm")
        f = F.gelu(lin(x, p + "intermediate.dense"))
        return ln(lin(f, p + "output.dense") + x, p + "output.LayerNorm")

    def emb(ids=None, x=None, pos=None):
        if x is None:
            x = W["embeddings.word_embeddings.weight"][ids]
        return ln(x + W["embeddings.token_type_embeddings.weight"][0] + W["embeddings.position_embeddings.weight"][pos],
                  "embeddings.LayerNorm")

    def head(x):
        y = ln(F.gelu(lin(x, "lm_head.dense")), "lm_head.layer_norm")
        return y @ W["embeddings.word_embeddings.weight"].T + W["lm_head.bias"]

    def ce(logits, labels):
        m = labels != -100
        return F.cross_entropy(logits[m], labels[m], reduction="sum") / m.sum()

    ids, am = batch["enc_input_ids"], batch["attention_mask"]
    B, L = ids.shape
    fmin = torch.finfo(torch.float64).min
    # encoder: RoBERTa position ids, padding mask
    npad = (ids != pad).long()
    pos = torch.cumsum(npad, 1) * npad + pad
    x = emb(ids=ids, pos=pos)
    kb = ((1.0 - am.double()) * fmin)[:, None, None, :]
    for l in range(cfg["num_hidden_layers"]):
        x = attn(x, x, kb, f"encoder.layer.{l}.")
    H_enc = x
    L_enc = ce(head(H_enc), batch["enc_labels"])
    h = H_enc[:, :1]
    dids = batch["dec_input_ids"]
    dn = (dids != pad).long()
    content = emb(ids=dids, pos=torch.cumsum(dn, 1) * dn + pad)
    kv = torch.cat([h, content[:, 1:]], 1)
    qpos = torch.arange(pad + 1, pad + 1 + L).expand(B, L)
    query = emb(x=h.expand(B, L, H), pos=qpos)
    mb = ((1.0 - batch["dec_visibility"].double()) * fmin)[:, None]
    H_dec = attn(query, kv, mb, "c_head.")
    L_dec = ce(head(H_dec), batch["dec_labels"])
    loss = L_enc + L_dec
    loss.backward()
    return ({"loss": loss.detach(), "loss.enc": L_enc.detach(), "loss.dec": L_dec.detach(), "hidden.enc": H_enc.detach(),
             "hidden.dec": H_dec.detach(), "stream.content_emb": content.detach(), "stream.query": query.detach()},
            {"grad." + k: v.grad for k, v in W.items()})


def rows_real(t, am):
    """Only the real (non-pad) rows of a [B, L, ...] tensor."""
    return t[am.bool()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", help="FlagEmbedding-1.2.11.tar.gz or its unpacked directory")
    args = ap.parse_args()
    report = {}
    sdist = locate_sdist(args.sdist, report)
    RetroMAEForPretraining, ModelArguments = import_reference(sdist, report)
    model = build_model(RetroMAEForPretraining, ModelArguments, report)
    W = weight_tensors(model)
    batch = build_batch(report)

    out32, g32 = run_reference(model, batch)
    assert torch.equal(out32["loss"], out32["loss.enc"] + out32["loss.dec"])
    assert set(g32) == {"grad." + k for k in W}

    # the same reference code in float64 (tolerance guidance for the Rust f32 comparison)
    m64 = copy.deepcopy(model).double()
    out64, g64 = run_reference(m64, batch)
    am = batch["attention_mask"]
    worst = max(((k, float((g32[k].double() - g64[k]).abs().max())) for k in g32), key=lambda kv: kv[1])
    report["loss / loss.enc / loss.dec (f32)"] = [float(out32[k]) for k in ("loss", "loss.enc", "loss.dec")]
    report["loss (f64 reference)"] = float(out64["loss"])
    report["max |g32 - g64| (tensor, value)"] = worst
    report["largest |grad| (f64)"] = max(float(g.abs().max()) for g in g64.values())
    report["max |hidden32 - hidden64| on real rows (enc, dec)"] = [
        float((rows_real(out32[k], am).double() - rows_real(out64[k], am)).abs().max()) for k in ("hidden.enc", "hidden.dec")]

    # independent f64 re-derivation of the documented formulas, on the f32 weights
    cfg = json.loads((XLMR_DIR / "config.json").read_text())
    outm, gm = manual(W, batch, cfg)
    d_out = {k: float((rows_real(outm[k], am) - rows_real(out64[k], am)).abs().max()) if out64[k].dim() == 3
             else float((outm[k] - out64[k]).abs().max()) for k in outm}
    d_grad = max(float((gm[k] - g64[k]).abs().max()) for k in g64)
    report["manual f64 vs reference f64: outputs (real rows)"] = d_out
    report["manual f64 vs reference f64: max grad diff"] = d_grad
    assert max(d_out.values()) < 1e-10 and d_grad < 1e-10, (d_out, d_grad)
    # pad rows of hidden.dec: the reference's all-invisible rows give a uniform softmax (finfo.min absorbs the score)
    report["padded example rows of hidden.dec are finite"] = bool(torch.isfinite(out32["hidden.dec"]).all())
    report["rows 1 (padding_idx) of word/position grads are zero"] = [
        bool((g32["grad.embeddings.word_embeddings.weight"][1] == 0).all()),
        bool((g32["grad.embeddings.position_embeddings.weight"][1] == 0).all())]
    report["position rows with non-zero grad"] = (
        g32["grad.embeddings.position_embeddings.weight"].abs().sum(1) != 0).nonzero().flatten().tolist()
    report["word rows with non-zero grad"] = int((g32["grad.embeddings.word_embeddings.weight"].abs().sum(1) != 0).sum())

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    save_file({k: W[k] for k in sorted(W)}, str(OUT_DIR / "weights.safetensors"))
    save_file({k: batch[k] for k in sorted(batch)}, str(OUT_DIR / "batch.safetensors"))
    expected = {k: v.float().contiguous() for k, v in out32.items()}
    for k in sorted(g32):
        expected[k] = g32[k].float()
    save_file({k: expected[k] for k in sorted(expected)}, str(OUT_DIR / "expected.safetensors"))
    report["files"] = {p.name: p.stat().st_size for p in sorted(OUT_DIR.iterdir())}
    report["sha256"] = {p.name: sha256(p) for p in sorted(OUT_DIR.iterdir())}
    print(json.dumps(report, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
