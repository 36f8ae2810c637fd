#!/usr/bin/env python3
"""The PyTorch side of tools/bench_m3_cpu.sh: M3 unified fine-tuning steps with FlagEmbedding's OWN model and loss code
on CPU, timed, plus the two helpers the benchmark needs (a random model directory, a training file whose every text is
truncated, so that every batch has exactly the same shape on both sides).

The reference code is the pinned reference env's FlagEmbedding (1.4.2, SPEC section 12), as in tools/dump_m3_loss.py:
  FlagEmbedding/finetune/embedder/encoder_only/m3/runner.py    EncoderOnlyEmbedderM3Runner.get_model (backbone + heads)
  FlagEmbedding/finetune/embedder/encoder_only/m3/modeling.py  EncoderOnlyEmbedderM3Model (unified loss + self-distill)
  FlagEmbedding/abc/finetune/embedder/AbsDataset.py            AbsEmbedderCollator (tokenize, truncate, pad)
One step = sample B rows and their groups (AbsEmbedderTrainDataset's rule: a random positive, G-1 random negatives),
collate, forward in train mode (dropout on), backward, clip the gradient norm to 1.0, AdamW step (HF Trainer's
parameter groups: no weight decay on biases and LayerNorm weights) - the same work as one `retrom3 finetune` step.

    python tools/m3_torch_step.py make-model --out DIR [--layers 2 --hidden 32 --heads 4 --ffn 64 --max-pos 42]
    python tools/m3_torch_step.py make-data --model DIR --out train.jsonl --query-max-len 16 --passage-max-len 32
    python tools/m3_torch_step.py bench --model DIR --train train.jsonl --steps 20 --warmup 2 --threads 2 ...

`bench` prints one JSON object: steps, seconds (timed steps only), examples_per_s, tokens_per_s, tokens_per_step.
Nothing is downloaded; run it with /work/refenv/bin/python (see docs/perf.md).
"""

import argparse
import json
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-xlmr"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model"]


def make_model(a):
    """A random XLM-R with M3 heads and the tiny fixture's 1000-token tokenizer (or the fixture itself)."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.fixture:
        for f in ["config.json", "model.safetensors", "colbert_linear.pt", "sparse_linear.pt"] + TOKENIZER_FILES:
            shutil.copy(FIXTURE / f, out)
        return
    torch.manual_seed(0)
    cfg = XLMRobertaConfig(vocab_size=1000, hidden_size=a.hidden, num_hidden_layers=a.layers,
                           num_attention_heads=a.heads, intermediate_size=a.ffn, max_position_embeddings=a.max_pos,
                           type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5,
                           hidden_act="gelu")
    XLMRobertaModel(cfg, add_pooling_layer=False).eval().save_pretrained(out)
    torch.save(torch.nn.Linear(a.hidden, a.hidden).state_dict(), out / "colbert_linear.pt")
    torch.save(torch.nn.Linear(a.hidden, 1).state_dict(), out / "sparse_linear.pt")
    for f in TOKENIZER_FILES:
        shutil.copy(FIXTURE / f, out)


def make_data(a):
    """Rows of data/demo/train.jsonl with every text lengthened (by appending corpus text) until it is longer than
    its max length: both trainers then truncate every text, and every batch is [B, Lq] + [B*G, Lp] real tokens."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "sequence longer than the model" is the point here
    tok = AutoTokenizer.from_pretrained(a.model)
    corpus = [json.loads(l)["text"] for l in open(ROOT / "data/demo/corpus.jsonl", encoding="utf-8")]
    rng = random.Random(0)

    def longer(text, n):
        while len(tok(text)["input_ids"]) <= n:
            text = text + " " + corpus[rng.randrange(len(corpus))]
        return text

    rows = []
    with open(ROOT / "data/demo/train.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows.append({
                "query": longer(r["query"], a.query_max_len),
                "pos": [longer(p, a.passage_max_len) for p in r["pos"]],
                "neg": [longer(p, a.passage_max_len) for p in r["neg"]],
            })
            if len(rows) >= a.rows:
                break
    with open(a.out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def bench(a):
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    import importlib.metadata

    hf_logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    from FlagEmbedding.abc.finetune.embedder import AbsEmbedderCollator
    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import EncoderOnlyEmbedderM3Model
    from FlagEmbedding.finetune.embedder.encoder_only.m3.runner import EncoderOnlyEmbedderM3Runner

    tok = AutoTokenizer.from_pretrained(a.model)
    base = EncoderOnlyEmbedderM3Runner.get_model(a.model, False, -1)
    model = EncoderOnlyEmbedderM3Model(
        base, tokenizer=tok, negatives_cross_device=False, temperature=a.temperature, sub_batch_size=None,
        kd_loss_type="m3_kd_loss", use_mrl=False, mrl_dims=[], sentence_pooling_method="cls",
        normalize_embeddings=True, unified_finetuning=True, use_self_distill=True, self_distill_start_step=0)
    model.train()  # dropout on, as in training (and in `retrom3 finetune`)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if ("bias" in n or "LayerNorm" in n) else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.999), eps=1e-8)
    collator = AbsEmbedderCollator(tokenizer=tok, query_max_len=a.query_max_len, passage_max_len=a.passage_max_len,
                                   sub_batch_size=None, pad_to_multiple_of=None, padding=True, return_tensors="pt")
    rows = [json.loads(l) for l in open(a.train, encoding="utf-8")]
    G = a.group_size

    def features():
        feats = []
        for r in random.sample(rows, a.batch_size):
            # AbsEmbedderTrainDataset.__getitem__: one random positive, G-1 negatives without replacement
            # (from the list repeated when it is short)
            pos = random.choice(r["pos"])
            idx = list(range(len(r["neg"])))
            if len(idx) < G - 1:
                idx = idx * -(-(G - 1) // len(idx))
            feats.append((r["query"], [pos] + [r["neg"][i] for i in random.sample(idx, G - 1)], None))
        return feats

    times, tokens = [], []
    for step in range(a.warmup + a.steps):
        t = time.perf_counter()
        batch = collator(features())
        out = model(queries=batch["queries"], passages=batch["passages"], teacher_scores=None,
                    no_in_batch_neg_flag=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        if not torch.isfinite(out.loss):
            sys.exit(f"non-finite loss at step {step}")
        if step >= a.warmup:
            times.append(dt)
            tokens.append(int(batch["queries"]["attention_mask"].sum() + batch["passages"]["attention_mask"].sum()))
    secs = sum(times)
    print(json.dumps({
        "flagembedding": importlib.metadata.version("FlagEmbedding"), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "steps": len(times), "seconds": secs,
        "examples_per_s": a.batch_size * len(times) / secs, "tokens_per_s": sum(tokens) / secs,
        "tokens_per_step": sorted(set(tokens)), "last_loss": float(out.loss.detach()),
    }))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("--out", required=True)
    m.add_argument("--fixture", action="store_true", help="copy tests/fixtures/tiny-xlmr instead of a random model")
    m.add_argument("--layers", type=int, default=6)
    m.add_argument("--hidden", type=int, default=384)
    m.add_argument("--heads", type=int, default=6)
    m.add_argument("--ffn", type=int, default=1536)
    m.add_argument("--max-pos", type=int, default=514)
    d = sub.add_parser("make-data")
    d.add_argument("--model", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--rows", type=int, default=256)
    for p in (d,):
        p.add_argument("--query-max-len", type=int, required=True)
        p.add_argument("--passage-max-len", type=int, required=True)
    b = sub.add_parser("bench")
    b.add_argument("--model", required=True)
    b.add_argument("--train", required=True)
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--threads", type=int, default=os.cpu_count())
    b.add_argument("--batch-size", type=int, default=4)
    b.add_argument("--group-size", type=int, default=8)
    b.add_argument("--query-max-len", type=int, required=True)
    b.add_argument("--passage-max-len", type=int, required=True)
    b.add_argument("--temperature", type=float, default=0.02)
    b.add_argument("--lr", type=float, default=1e-5)
    b.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    {"make-model": make_model, "make-data": make_data, "bench": bench}[a.cmd](a)


if __name__ == "__main__":
    main()
