#!/usr/bin/env python3
"""Dump the small golden fixtures under tests/fixtures/ from the pinned Python reference stack.

Run from the repository root with the reference venv (see docs/fixtures.md, tools/requirements-ref.txt):

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 /work/refenv/bin/python tools/make_fixtures.py

It writes three model directories (each < 2 MB):

  tests/fixtures/tiny-xlmr/           tiny XLMRobertaModel + XLM-R style Unigram tokenizer + f32 .pt heads,
                                      expected.json (FlagEmbedding BGEM3FlagModel outputs) and
                                      grads.safetensors (llm.c-style gradient check)
  tests/fixtures/tiny-bge-m3-layout/  the same weights in the published bge-m3 layout (pytorch_model.bin with
                                      pooler + position_ids extras, fp16 .pt heads) + its own expected.json
  tests/fixtures/tiny-bert/           tiny BertModel + WordPiece tokenizer as a sentence-transformers directory
                                      (Transformer, mean Pooling, Normalize) + expected.json

Everything is seeded; re-running rewrites byte-identical files (the SentencePiece trainer is run single-threaded
on an inline corpus and is deterministic; the BERT vocabulary is explicit). Nothing is downloaded.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import collections
import io
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(1)

import sentencepiece as spm
from safetensors.torch import save_file
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaModel,
    XLMRobertaTokenizer,
    XLMRobertaTokenizerFast,
)
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _corpus  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
XLMR_DIR = FIX / "tiny-xlmr"
LAYOUT_DIR = FIX / "tiny-bge-m3-layout"
BERT_DIR = FIX / "tiny-bert"

SEED = 20240517
TOL = 1e-6

# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    # long: truncated at max_length 16 (xlmr) / 20 (bert)
    "In 1998 researchers in Berlin and Beijing compared many retrieval systems, measuring recall, precision and "
    "latency across languages and document lengths, and the results surprised everyone.",
    "Die Größe der Bäume überrascht Jürgen: schön!",
    "北京是中国的首都，人口很多。",
    "Москва — столица России, город большой.",
    "I love 🍕 and ☃✨ so much 🤖!",  # emoji / symbols not in either vocabulary
    "<s> hello </s> world <mask> and <pad> end",  # literal XLM-R special tokens
    "[CLS] hello [SEP] world [MASK] and [PAD] end",  # literal BERT special tokens
    "",
    "   \t  ",
    "Call 555-0199 now!!! (ok?) 3.14%",
    "Hello Welt 你好 мир 2024",
]

PAIRS = [
    ("What is BGE M3?", "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi vector "
     "interaction."),
    ("Wo liegt der Bahnhof?", "Der Bahnhof liegt im Zentrum der Stadt, neben dem großen Park."),
    ("中国的首都是哪里？", "北京是中国的首都。"),
    ("столица России", "Москва — столица России, город большой."),
    ("pizza 🍕", "I love 🍕 and pasta, coffee and cheese."),
    ("", "An empty query against a normal passage."),
    ("<mask> token", "The <mask> token is used in masked language model training."),
    ("short", "A long passage that certainly goes past the twenty token passage limit, because it keeps talking about "
     "retrieval, ranking, recall and precision for a while."),
]

XLMR_MAX_LEN = 16
MAX_Q, MAX_P = 12, 20
WEIGHTS = [0.4, 0.2, 0.4]
BERT_MAX_LEN = 20


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------

def f32list(x):
    """numpy/torch float tensor -> nested lists of Python floats holding the exact f32 values."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32).tolist()


def write_json(path, obj):
    """One top-level key per line; compact values. Floats are exact f32 values printed as doubles."""
    lines = []
    for k, v in obj.items():
        lines.append(json.dumps(k, ensure_ascii=False) + ": " + json.dumps(v, ensure_ascii=False, separators=(",", ":")))
    Path(path).write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")


def randomise_(module, gen, weight_std, emb_std=0.5):
    """Overwrite every parameter (incl. LayerNorm weight/bias and all biases) with seeded random values."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(0.6 + 0.8 * torch.rand(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embeddings" in name:
                p.copy_(emb_std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(weight_std * torch.randn(p.shape, generator=gen))


def max_abs(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def check(name, a, b, tol=TOL):
    """Agreement to `tol`, relative for values above 1 in magnitude: |a-b| <= tol * max(1, |b|)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (name, a.shape, b.shape)
    if a.size == 0:
        return 0.0
    d = float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))))
    assert d <= tol, f"{name}: max |diff|/max(1,|ref|) {d:.3g} > {tol}"
    return d


def clean_dir(d):
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)


# --------------------------------------------------------------------------------------------------------------
# XLM-R style tokenizer
# --------------------------------------------------------------------------------------------------------------

def train_spm():
    """Unigram SentencePiece model (998 pieces: <unk> <s> </s> + 995) trained on the inline corpus."""
    lines = _corpus.corpus_lines(random.Random(SEED))
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="unigram", vocab_size=998,
        character_coverage=1.0, num_threads=1, hard_vocab_limit=False, shuffle_input_sentence=False,
        input_sentence_size=0, normalization_rule_name="nmt_nfkc", seed_sentencepiece_size=1000000,
        minloglevel=2,
    )
    return buf.getvalue()


def build_xlmr_tokenizer(spm_bytes, tmp):
    """Assemble the XLM-R tokenizer.json with the `tokenizers` library, exactly in the layout of the published
    XLM-R / bge-m3 tokenizer.json: fairseq ids <s>=0 <pad>=1 </s>=2 <unk>=3, SentencePiece pieces shifted by +1,
    <mask> last; Precompiled(nmt_nfkc) + Replace(' {2,}', ' ') normalizer; Metaspace pre-tokenizer/decoder;
    TemplateProcessing <s> A </s> / <s> A </s></s> B </s>. Returns an XLMRobertaTokenizerFast."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_bytes)
    assert [p.piece for p in proto.pieces[:3]] == ["<unk>", "<s>", "</s>"]
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p.piece, p.score) for p in proto.pieces[3:]]
    vocab += [("<mask>", 0.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([
        normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tok.no_padding()
    tok.no_truncation()
    spm_path = tmp / "sentencepiece.bpe.model"
    spm_path.write_bytes(spm_bytes)
    fast = XLMRobertaTokenizerFast(vocab_file=str(spm_path), tokenizer_object=tok, model_max_length=40)
    return fast


def check_tokenizer_json(d):
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    assert tj["padding"] is None and tj["truncation"] is None, "padding/truncation baked into tokenizer.json"
    return tj


# --------------------------------------------------------------------------------------------------------------
# M3 heads, manual reference (SPEC 3.1 / 3.3)
# --------------------------------------------------------------------------------------------------------------

SPECIAL_SPARSE = {0, 1, 2, 3}  # cls, pad, eos, unk are dropped from lexical weights


def manual_heads(h, ids, colbert_sd, sparse_sd):
    """h: [n, D] last hidden state of one unpadded text (torch f32). Returns dense, sparse dict, colbert."""
    dense = F.normalize(h[0], dim=-1)
    w = torch.relu(h @ sparse_sd["weight"].float().T + sparse_sd["bias"].float()).squeeze(-1)
    sparse = {}
    for t, wt in zip(ids, w.tolist()):
        if t in SPECIAL_SPARSE or wt <= 0:
            continue
        k = str(t)
        sparse[k] = max(sparse.get(k, 0.0), wt)
    col = h[1:] @ colbert_sd["weight"].float().T + colbert_sd["bias"].float()
    col = F.normalize(col, dim=-1)
    return dense, sparse, col


def manual_scores(model, tok, colbert_sd, sparse_sd):
    """SPEC 3.3 compute_score, batched like FlagEmbedding (one batch, pad rows included in the colbert max)."""
    qs = [q for q, _ in PAIRS]
    ps = [p for _, p in PAIRS]

    def reps(texts, ml):
        enc = tok(texts, truncation=True, max_length=ml, padding=True, return_tensors="pt",
                  return_token_type_ids=False)
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        mask = enc["attention_mask"]
        dense = F.normalize(h[:, 0], dim=-1)
        tw = torch.relu(h @ sparse_sd["weight"].float().T + sparse_sd["bias"].float()).squeeze(-1)
        V = model.config.vocab_size
        sp = torch.zeros(len(texts), V).scatter_reduce(1, enc["input_ids"], tw, reduce="amax")
        sp[:, sorted(SPECIAL_SPARSE)] = 0
        col = (h[:, 1:] @ colbert_sd["weight"].float().T + colbert_sd["bias"].float()) * mask[:, 1:, None]
        col = F.normalize(col, dim=-1)
        return dense, sp, col, mask

    qd, qsp, qc, qm = reps(qs, MAX_Q)
    pd, psp, pc, _ = reps(ps, MAX_P)
    n = len(PAIRS)
    dense = (qd * pd).sum(-1)
    sparse = (qsp * psp).sum(-1)
    sims = torch.einsum("bid,bjd->bij", qc, pc)  # pad passage rows are zero vectors -> sim 0 in the max
    colbert = sims.max(-1).values.sum(-1) / qm[:, 1:].sum(-1)
    # the same without the pad zeros (true masked max): used to report whether the quirk changed anything
    enc_p = tok(ps, truncation=True, max_length=MAX_P, padding=True, return_tensors="pt")
    pmask = enc_p["attention_mask"][:, 1:].bool()
    sims_m = sims.masked_fill(~pmask[:, None, :], float("-inf"))
    qvalid = qm[:, 1:].bool()
    colbert_true = torch.where(qvalid, sims_m.max(-1).values, torch.zeros(())).sum(-1) / qm[:, 1:].sum(-1)
    w0, w1, w2 = WEIGHTS
    out = {
        "dense": dense, "sparse": sparse, "colbert": colbert,
        "sparse+dense": (w1 * sparse + w0 * dense) / (w0 + w1),
        "colbert+sparse+dense": (w2 * colbert + w1 * sparse + w0 * dense) / (w0 + w1 + w2),
    }
    assert all(v.shape == (n,) for v in out.values())
    return out, colbert_true


# --------------------------------------------------------------------------------------------------------------
# M3 expected.json (tiny-xlmr and tiny-bge-m3-layout)
# --------------------------------------------------------------------------------------------------------------

def load_heads(d):
    c = torch.load(d / "colbert_linear.pt", map_location="cpu", weights_only=True)
    s = torch.load(d / "sparse_linear.pt", map_location="cpu", weights_only=True)
    return c, s


def m3_expected(d, report, with_batch):
    from FlagEmbedding import BGEM3FlagModel

    tok = AutoTokenizer.from_pretrained(str(d))
    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    model = AutoModel.from_pretrained(str(d), attn_implementation="eager").eval()
    colbert_sd, sparse_sd = load_heads(d)

    input_ids = tok(TEXTS, truncation=True, max_length=XLMR_MAX_LEN)["input_ids"]
    # tokenizer.json alone (what the Rust side loads) must agree with transformers' tokenizer
    for t, ids in zip(TEXTS, input_ids):
        full = raw.encode(t).ids
        assert ids == (full if len(full) <= XLMR_MAX_LEN else full[:XLMR_MAX_LEN - 1] + [2]), (t, full, ids)
    for q, p in PAIRS:
        for t, ml in ((q, MAX_Q), (p, MAX_P)):
            full = raw.encode(t).ids
            exp = full if len(full) <= ml else full[:ml - 1] + [2]
            assert exp == tok(t, truncation=True, max_length=ml)["input_ids"], t

    lhs = []
    with torch.no_grad():
        for ids in input_ids:
            x = torch.tensor([ids])
            lhs.append(model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state[0])

    m3 = BGEM3FlagModel(str(d), use_fp16=False, devices="cpu", pooling_method="cls")
    out = m3.encode(TEXTS, max_length=XLMR_MAX_LEN, return_dense=True, return_sparse=True,
                    return_colbert_vecs=True)
    # FlagEmbedding really loaded the .pt heads (it silently makes fresh ones if a file is missing)
    check("flag colbert_linear.weight", m3.model.colbert_linear.weight.detach(), colbert_sd["weight"].float(), 0)
    check("flag sparse_linear.weight", m3.model.sparse_linear.weight.detach(), sparse_sd["weight"].float(), 0)

    # Manual SPEC 3.1 heads (f32, from the .pt files) on the hidden states of the same padded, length-sorted batch
    # that FlagEmbedding runs (default sdpa attention): must agree to 1e-6. The per-text eager hidden states
    # dumped as last_hidden_state give the same heads up to backbone rounding noise (reported, checked to 1e-5).
    sdpa_model = AutoModel.from_pretrained(str(d)).eval()
    order = np.argsort([-len(x) for x in input_ids])
    padded = tok.pad({"input_ids": [input_ids[i] for i in order],
                      "attention_mask": [[1] * len(input_ids[i]) for i in order]}, padding=True, return_tensors="pt")
    with torch.no_grad():
        hb = sdpa_model(**padded).last_hidden_state
    h_flag = [None] * len(TEXTS)
    for r, i in enumerate(order):
        h_flag[i] = hb[r, :len(input_ids[i])]

    diffs = collections.defaultdict(float)
    sparse_out = []
    for i, ids in enumerate(input_ids):
        fs = {k: float(v) for k, v in out["lexical_weights"][i].items()}
        for tag, h, tol in (("", h_flag[i], TOL), (" (eager single)", lhs[i], 1e-5)):
            dense, sparse, col = manual_heads(h, ids, colbert_sd, sparse_sd)
            diffs["dense" + tag] = max(diffs["dense" + tag], check(f"dense[{i}]{tag}", out["dense_vecs"][i], dense, tol))
            assert set(fs) == set(sparse), (i, tag, fs, sparse)
            for k in fs:
                diffs["sparse" + tag] = max(diffs["sparse" + tag], check(f"sparse[{i}][{k}]{tag}", fs[k], sparse[k], tol))
            diffs["colbert" + tag] = max(diffs["colbert" + tag],
                                         check(f"colbert[{i}]{tag}", out["colbert_vecs"][i], col, tol))
        sparse_out.append(fs)

    scores = m3.compute_score([list(p) for p in PAIRS], max_query_length=MAX_Q, max_passage_length=MAX_P,
                              weights_for_different_modes=WEIGHTS)
    man, colbert_true = manual_scores(sdpa_model, tok, colbert_sd, sparse_sd)
    for k in man:
        diffs["score " + k] = check("score " + k, scores[k], man[k])
    report["colbert pad-zero quirk |diff| vs true masked max"] = max_abs(man["colbert"], colbert_true)
    report["max |FlagEmbedding - manual SPEC 3.1/3.3|"] = dict(diffs)

    exp = {
        "texts": TEXTS,
        "max_length": XLMR_MAX_LEN,
        "pooling": "cls",
        "normalize": True,
        "input_ids": input_ids,
        "last_hidden_state": [f32list(h) for h in lhs],
        "dense": f32list(out["dense_vecs"]),
        "sparse": sparse_out,
        "colbert": [f32list(c) for c in out["colbert_vecs"]],
        "pairs": [{"query": q, "passage": p} for q, p in PAIRS],
        "max_query_length": MAX_Q,
        "max_passage_length": MAX_P,
        "weights": WEIGHTS,
        "scores": {k: f32list(scores[k]) for k in ["dense", "sparse", "colbert", "sparse+dense",
                                                      "colbert+sparse+dense"]},
    }
    if with_batch:
        enc = tok(TEXTS, truncation=True, max_length=XLMR_MAX_LEN, padding=True, return_tensors="pt")
        with torch.no_grad():
            bh = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        for i, ids in enumerate(input_ids):
            diffs["batch vs single"] = max(diffs["batch vs single"],
                                           check(f"batch[{i}]", bh[i, :len(ids)], lhs[i], 2e-6))
        exp["batch_input_ids"] = enc["input_ids"].tolist()
        exp["batch_attention_mask"] = enc["attention_mask"].tolist()
        exp["batch_last_hidden_state"] = f32list(bh)
    write_json(d / "expected.json", exp)
    report["input_ids"] = {t: ids for t, ids in zip(TEXTS, input_ids)}
    report["tokens"] = {t: tok.convert_ids_to_tokens(ids) for t, ids in zip(TEXTS, input_ids)}
    report["pair_input_ids"] = [
        (tok(q, truncation=True, max_length=MAX_Q)["input_ids"], tok(p, truncation=True, max_length=MAX_P)["input_ids"])
        for q, p in PAIRS]
    return model, tok, colbert_sd, sparse_sd


# --------------------------------------------------------------------------------------------------------------
# Gradient fixture (tiny-xlmr)
# --------------------------------------------------------------------------------------------------------------

def make_grads(d, model, tok, colbert_sd, sparse_sd, report):
    enc = tok(TEXTS, truncation=True, max_length=XLMR_MAX_LEN, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    B, L = ids.shape
    D = model.config.hidden_size
    gen = torch.Generator().manual_seed(SEED + 7)
    R = torch.randn(B, L, D, generator=gen)
    Rd = torch.randn(B, D, generator=gen)
    Rs = torch.randn(B, L, generator=gen)
    Rc = torch.randn(B, L - 1, D, generator=gen)

    def run(dtype):
        m = AutoModel.from_pretrained(str(d), attn_implementation="eager").to(dtype).eval()
        col = torch.nn.Linear(D, D).to(dtype)
        spl = torch.nn.Linear(D, 1).to(dtype)
        col.load_state_dict(colbert_sd)
        spl.load_state_dict(sparse_sd)
        m.zero_grad()
        h = m(input_ids=ids, attention_mask=mask).last_hidden_state
        fm = mask.to(dtype)
        sw = torch.relu(spl(h)).squeeze(-1)
        cv = F.normalize(col(h[:, 1:]) * fm[:, 1:, None], dim=-1)
        loss = ((h * R.to(dtype) * fm[..., None]).sum() + (h[:, 0] * Rd.to(dtype)).sum()
                + (sw * Rs.to(dtype) * fm).sum() + (cv * Rc.to(dtype)).sum())
        loss.backward()
        grads = {}
        for n, p in m.named_parameters():
            if n.startswith("pooler."):
                continue
            grads["grad." + n] = p.grad.detach().clone()
        for n, p in col.named_parameters():
            grads["grad.colbert_linear." + n] = p.grad.detach().clone()
        for n, p in spl.named_parameters():
            grads["grad.sparse_linear." + n] = p.grad.detach().clone()
        return loss.detach().reshape(1), grads

    loss32, g32 = run(torch.float32)
    loss64, g64 = run(torch.float64)
    # every backbone tensor of model.safetensors gets a gradient
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"grad." + n for n in names} | {"grad.colbert_linear.weight", "grad.colbert_linear.bias",
                                           "grad.sparse_linear.weight", "grad.sparse_linear.bias"} == set(g32)
    gscale = max(float(g.abs().max()) for g in g64.values())
    absdiff = {k: float((g32[k].double() - g64[k]).abs().max()) for k in g32}
    worst = max(absdiff.items(), key=lambda kv: kv[1])
    report["grads: loss f32 / f64"] = (float(loss32), float(loss64))
    report["grads: largest |grad| (f64)"] = gscale
    report["grads: worst max|g32-g64| (tensor, value)"] = worst
    # softmax is shift invariant, so d loss / d key.bias is exactly 0: the stored f32 values are pure rounding noise
    report["grads: max |key.bias grad| f32 / f64"] = (
        max(float(v.abs().max()) for k, v in g32.items() if k.endswith("attention.self.key.bias")),
        max(float(v.abs().max()) for k, v in g64.items() if k.endswith("attention.self.key.bias")))
    report["grads: word_embeddings rows 1 (pad) grad zero"] = bool(
        (g32["grad.embeddings.word_embeddings.weight"][1] == 0).all())
    tensors = {"input_ids": ids.to(torch.int64).contiguous(), "attention_mask": mask.to(torch.int64).contiguous(),
               "R": R, "Rd": Rd, "Rs": Rs, "Rc": Rc, "loss": loss32.float()}
    for k in sorted(g32):
        tensors[k] = g32[k].float().contiguous()
    save_file(tensors, str(d / "grads.safetensors"))


# --------------------------------------------------------------------------------------------------------------
# Fixture builders
# --------------------------------------------------------------------------------------------------------------

def build_tiny_xlmr(report):
    clean_dir(XLMR_DIR)
    tmp = FIX / ".tmp-spm"
    clean_dir(tmp)
    fast = build_xlmr_tokenizer(train_spm(), tmp)
    V = len(fast)
    cfg = XLMRobertaConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=42,
        type_vocab_size=1, initializer_range=0.02, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, position_embedding_type="absolute", architectures=["XLMRobertaModel"],
    )
    torch.manual_seed(SEED)
    model = XLMRobertaModel(cfg, add_pooling_layer=False)
    gen = torch.Generator().manual_seed(SEED)
    randomise_(model, gen, weight_std=0.15)
    model.save_pretrained(str(XLMR_DIR), safe_serialization=True)
    fast.save_pretrained(str(XLMR_DIR))
    shutil.rmtree(tmp)
    check_tokenizer_json(XLMR_DIR)

    colbert = torch.nn.Linear(32, 32)
    sparse = torch.nn.Linear(32, 1)
    with torch.no_grad():
        colbert.weight.copy_(0.2 * torch.randn(32, 32, generator=gen))
        colbert.bias.copy_(0.1 * torch.randn(32, generator=gen))
        sparse.weight.copy_(0.3 * torch.randn(1, 32, generator=gen))
        sparse.bias.copy_(torch.tensor([0.05]))
    torch.save(collections.OrderedDict((k, v.clone()) for k, v in colbert.state_dict().items()),
               XLMR_DIR / "colbert_linear.pt")
    torch.save(collections.OrderedDict((k, v.clone()) for k, v in sparse.state_dict().items()),
               XLMR_DIR / "sparse_linear.pt")

    # slow (sentencepiece) tokenizer must agree with the fast one built from tokenizer.json
    slow = XLMRobertaTokenizer(vocab_file=str(XLMR_DIR / "sentencepiece.bpe.model"))
    fast_l = AutoTokenizer.from_pretrained(str(XLMR_DIR))
    mism = []
    for t in TEXTS + [x for p in PAIRS for x in p]:
        a, b = slow(t)["input_ids"], fast_l(t)["input_ids"]
        if a != b:
            mism.append((t, a, b))
    report["slow sentencepiece vs fast tokenizer mismatches"] = mism

    sub = {}
    model, tok, colbert_sd, sparse_sd = m3_expected(XLMR_DIR, sub, with_batch=True)
    report["tiny-xlmr"] = sub
    make_grads(XLMR_DIR, model, tok, colbert_sd, sparse_sd, sub)
    return model


def build_layout(report):
    clean_dir(LAYOUT_DIR)
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "sentencepiece.bpe.model"]:
        shutil.copy(XLMR_DIR / f, LAYOUT_DIR / f)
    from safetensors.torch import load_file
    sd = load_file(str(XLMR_DIR / "model.safetensors"))
    gen = torch.Generator().manual_seed(SEED + 1)
    out = collections.OrderedDict()
    out["embeddings.position_ids"] = torch.arange(42, dtype=torch.int64).unsqueeze(0)
    for k, v in sd.items():
        out[k] = v.clone()
    out["pooler.dense.weight"] = 0.15 * torch.randn(32, 32, generator=gen)
    out["pooler.dense.bias"] = 0.1 * torch.randn(32, generator=gen)
    torch.save(out, LAYOUT_DIR / "pytorch_model.bin")
    for name in ["colbert_linear.pt", "sparse_linear.pt"]:
        sdh = torch.load(XLMR_DIR / name, map_location="cpu", weights_only=True)
        torch.save(collections.OrderedDict((k, v.half().clone()) for k, v in sdh.items()), LAYOUT_DIR / name)
    sub = {}
    m3_expected(LAYOUT_DIR, sub, with_batch=False)
    report["tiny-bge-m3-layout"] = {k: v for k, v in sub.items() if k not in ("input_ids", "tokens", "pair_input_ids")}


# --- tiny BERT ------------------------------------------------------------------------------------------------

BERT_WORDS = """
the a an of and to in is was for on that with as by at from it this be are or have has not but what which
who when where how all some more one two three new old good great small large long quick brown fox jumps
over lazy dog cat bird tree city house street school book word language model search retrieval embedding
vector dense sparse token passage query document system measure recall precision latency length research
result method data train test score rank match english german chinese russian berlin beijing moscow
hello world love pizza coffee tea water bread time year day people work call now ok end much so
die der das und ist nicht ein eine grosse baume uberrascht jurgen schon stadt bahnhof welt liegt
москва столица россии город большой мир привет язык
""".split()
BERT_SUBWORDS = "##s ##es ##ed ##ing ##er ##ers ##ly ##ion ##tion ##al ##ic ##ment ##ness ##able ##e ##en ##n ##t".split()
BERT_ZH = "北京是中国的首都人口很多你好"  # 很/多 etc.; other CJK chars map to [UNK]


def bert_vocab():
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(".,;:!?()[]{}\"'-_/\\@#$%&*+=<>|~^`—，。？！")
    chars += list("0123456789") + list("abcdefghijklmnopqrstuvwxyz") + list("ß")
    chars += list("абвгдежзийклмнопрстуфхцчшщъыьэюяё") + list(BERT_ZH)
    cont = ["##" + c for c in "0123456789abcdefghijklmnopqrstuvwxyzß"]
    cont += ["##" + c for c in "абвгдежзийклмнопрстуфхцчшщъыьэюяё"]
    vocab = []
    for w in specials + chars + cont + BERT_SUBWORDS + BERT_WORDS:
        if w not in vocab:
            vocab.append(w)
    return vocab


def build_tiny_bert(report):
    from sentence_transformers import SentenceTransformer

    clean_dir(BERT_DIR)
    hf_tmp = FIX / ".tmp-bert"
    clean_dir(hf_tmp)
    vocab = bert_vocab()
    (hf_tmp / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab_file=str(hf_tmp / "vocab.txt"), do_lower_case=True, model_max_length=32)
    tok.backend_tokenizer.no_padding()
    tok.backend_tokenizer.no_truncation()
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=32,
        type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0,
        position_embedding_type="absolute", architectures=["BertModel"],
    )
    torch.manual_seed(SEED + 2)
    model = BertModel(cfg, add_pooling_layer=False)
    randomise_(model, torch.Generator().manual_seed(SEED + 2), weight_std=0.2)
    model.save_pretrained(str(BERT_DIR), safe_serialization=True)
    tok.save_pretrained(str(BERT_DIR))
    shutil.rmtree(hf_tmp)
    check_tokenizer_json(BERT_DIR)
    # The classic sentence-transformers layout, as published models on the hub have it (sentence-transformers 5.x
    # writes a newer variant when saving, but still reads this one). 2_Normalize has no files (git cannot keep an
    # empty folder; hub repos of normalized models lack it too).
    (BERT_DIR / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ], indent=2) + "\n")
    (BERT_DIR / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": BERT_MAX_LEN, "do_lower_case": False}, indent=2) + "\n")
    (BERT_DIR / "1_Pooling").mkdir()
    (BERT_DIR / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 24,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }, indent=2) + "\n")
    (BERT_DIR / "config_sentence_transformers.json").write_text(json.dumps({
        "__version__": {"sentence_transformers": "5.7.0", "transformers": "4.57.6", "pytorch": "2.15.0"},
        "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine",
    }, indent=2) + "\n")

    st = SentenceTransformer(str(BERT_DIR), device="cpu")
    assert st.max_seq_length == BERT_MAX_LEN
    mods = [type(m).__name__ for m in st]
    assert mods == ["Transformer", "Pooling", "Normalize"], mods
    assert st[1].get_config_dict().get("pooling_mode", "mean") == "mean", st[1].get_config_dict()
    dense = st.encode(TEXTS, normalize_embeddings=False, convert_to_numpy=True)

    tokb = AutoTokenizer.from_pretrained(str(BERT_DIR))
    raw = Tokenizer.from_file(str(BERT_DIR / "tokenizer.json"))
    input_ids = tokb(TEXTS, truncation=True, max_length=BERT_MAX_LEN)["input_ids"]
    st_ids = st.tokenize(TEXTS)["input_ids"]
    for i, ids in enumerate(input_ids):
        assert st_ids[i][: len(ids)].tolist() == ids and (st_ids[i][len(ids):] == 0).all(), i
        full = raw.encode(TEXTS[i]).ids
        assert ids == (full if len(full) <= BERT_MAX_LEN else full[:BERT_MAX_LEN - 1] + [full[-1]]), i
    bm = AutoModel.from_pretrained(str(BERT_DIR), attn_implementation="eager").eval()
    lhs = []
    d = 0.0
    with torch.no_grad():
        for i, ids in enumerate(input_ids):
            x = torch.tensor([ids])
            h = bm(input_ids=x, attention_mask=torch.ones_like(x), token_type_ids=torch.zeros_like(x)).last_hidden_state[0]
            lhs.append(h)
            d = max(d, check(f"bert dense[{i}]", dense[i], F.normalize(h.mean(0), dim=-1)))
    report["tiny-bert"] = {
        "max |ST - manual mean+normalize|": d,
        "input_ids": {t: ids for t, ids in zip(TEXTS, input_ids)},
        "tokens": {t: tokb.convert_ids_to_tokens(ids) for t, ids in zip(TEXTS, input_ids)},
        "vocab_size": len(vocab),
    }
    write_json(BERT_DIR / "expected.json", {
        "texts": TEXTS,
        "max_length": BERT_MAX_LEN,
        "pooling": "mean",
        "normalize": True,
        "input_ids": input_ids,
        "last_hidden_state": [f32list(h) for h in lhs],
        "dense": f32list(dense),
    })


def main():
    FIX.mkdir(parents=True, exist_ok=True)
    report = {}
    build_tiny_xlmr(report)
    build_layout(report)
    build_tiny_bert(report)
    print(json.dumps(report, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
