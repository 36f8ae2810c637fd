#!/usr/bin/env python3
"""RetroMAE CPU training throughput: the PyTorch reference trainer step, and the side-by-side report.

Driven by tools/bench_retromae_cpu.sh (read that first); three sub-commands:

  prepare  write DIR/config.json (a random-init XLM-R config) and DIR/texts.txt (paragraphs of
           data/demo/pretrain.txt joined until each is at least --max-len tokens long, so that every
           example is truncated to exactly --max-len tokens on both sides)
  torch    time the reference training step on those texts and write DIR/torch.json
  report   read DIR/ours*/metrics.jsonl and DIR/torch.json, print the table and the ratio

The reference is FlagEmbedding 1.2.11 (PyPI sdist), FlagEmbedding/baai_general_embedding/retromae_pretrain/:
RetroMAEForPretraining (modeling.py, enhanced decoder from enhancedDecoder.py) built by its own
from_pretrained, and RetroMAECollator (data.py) for the masks, loaded exactly as tools/dump_retromae.py
loads it (same sdist lookup, same single import fix, SPEC 11.10). The step is what transformers' Trainer does
per optimizer step with the run.py defaults (train mode, dropout on, default attention implementation):
collate -> forward -> backward -> clip_grad_norm_(1.0) -> AdamW.step -> LR scheduler step -> zero_grad.
Each phase is timed separately (wall clock, torch CPU ops are synchronous).

Tokens counted like retrom3's metrics.jsonl `tokens`: the real (non-pad) positions of the batch,
specials included.
"""
import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def cmd_prepare(a):
    from transformers import XLMRobertaConfig
    out = Path(a.dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(a.tokenizer)
    cfg = XLMRobertaConfig(vocab_size=len(tok), hidden_size=a.hidden, num_hidden_layers=a.layers,
                           num_attention_heads=a.heads, intermediate_size=a.ffn,
                           max_position_embeddings=a.max_len + 2, type_vocab_size=1, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, hidden_act="gelu")
    cfg.to_json_file(str(out / "config.json"))
    lines = [l.strip() for l in Path(a.data).read_text(encoding="utf-8").split("\n") if l.strip()]
    need = a.texts
    texts, cur, i = [], [], 0
    while len(texts) < need:
        if i >= len(lines):
            raise SystemExit(f"{a.data}: not enough text for {need} texts of {a.max_len} tokens")
        cur.append(lines[i])
        i += 1
        t = " ".join(cur)
        if len(tok(t, add_special_tokens=False)["input_ids"]) >= a.max_len:
            texts.append(t)
            cur = []
    (out / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    print(json.dumps({"texts": len(texts), "paragraphs used": i, "vocab": len(tok)}))


def import_reference():
    """The reference package (modeling, enhancedDecoder, arguments, data, utils) from the 1.2.11 sdist."""
    import dump_retromae as d  # sdist lookup + patch constants (sets torch threads to 1: reset by the caller)
    report = {}
    sdist = d.locate_sdist(None, report)
    src = sdist / d.REF_SUBDIR
    pkg_root = Path(tempfile.mkdtemp(prefix="retromae-ref-"))
    atexit.register(shutil.rmtree, pkg_root, ignore_errors=True)
    pkg = pkg_root / "retromae_ref"
    pkg.mkdir()
    for f in d.REF_FILES + ["data.py", "utils.py"]:
        shutil.copy(src / f, pkg / f)
    dec = pkg / "enhancedDecoder.py"
    text = dec.read_text()
    assert text.count(d.PATCH_OLD) == 1, "unexpected enhancedDecoder.py"
    dec.write_text(text.replace(d.PATCH_OLD, d.PATCH_NEW))
    sys.path.insert(0, str(pkg_root))
    from retromae_ref.arguments import ModelArguments
    from retromae_ref.data import RetroMAECollator
    from retromae_ref.modeling import RetroMAEForPretraining
    return RetroMAEForPretraining, ModelArguments, RetroMAECollator, str(sdist)


def cmd_torch(a):
    import random
    import warnings

    import torch
    RetroMAEForPretraining, ModelArguments, RetroMAECollator, sdist = import_reference()
    torch.set_num_threads(a.threads)
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM, get_linear_schedule_with_warmup
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    warnings.simplefilter("ignore")

    work = Path(a.dir)
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    mdir = work / "torch_model"
    cfg = XLMRobertaConfig.from_json_file(str(work / "config.json"))
    XLMRobertaForMaskedLM(cfg).save_pretrained(str(mdir))
    tok = tokenizer(a.tokenizer)
    tok.save_pretrained(str(mdir))
    # run.py: model_class.from_pretrained(model_args, model_args.model_name_or_path)
    model = RetroMAEForPretraining.from_pretrained(ModelArguments(), str(mdir))
    model.train()
    collator = RetroMAECollator(tok, encoder_mlm_probability=0.3, decoder_mlm_probability=0.5,
                                max_seq_length=a.max_len)
    texts = [t for t in (work / "texts.txt").read_text(encoding="utf-8").split("\n") if t]
    total = a.steps + a.warmup_steps
    assert len(texts) >= a.batch_size
    # Trainer's AdamW grouping (no decay on bias / LayerNorm), linear warm-up/decay, clip 1.0
    decay = [p for n, p in model.named_parameters() if not ("bias" in n or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.999), eps=1e-8)
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * total), total)
    order = list(range(len(texts)))
    random.shuffle(order)
    steps = []
    for s in range(total):
        idx = [order[(s * a.batch_size + j) % len(order)] for j in range(a.batch_size)]
        t0 = time.perf_counter()
        batch = collator([texts[i] for i in idx])
        t1 = time.perf_counter()
        (loss,) = model(**batch)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        tokens = int(batch["encoder_attention_mask"].sum())
        steps.append({"step": s + 1, "tokens": tokens, "collate": t1 - t0, "forward": t2 - t1,
                      "backward": t3 - t2, "optimizer": t4 - t3, "loss": float(loss)})
        print(f"torch step {s + 1}/{total}: loss {float(loss):.4f}, {tokens} tokens, {t4 - t0:.3f} s",
              file=sys.stderr)
    n_params = sum(p.numel() for p in model.parameters())
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "sdist": sdist, "params": n_params,
           "attn_implementation": getattr(model.lm.config, "_attn_implementation", None),
           "warmup_steps": a.warmup_steps, "steps": steps}
    (work / "torch.json").write_text(json.dumps(res, indent=1))


def rate(rows, warmup, secs):
    """(tokens/s over all timed steps, total tokens, steps, tokens/s of the median step)."""
    rows = rows[warmup:]
    tok = sum(r["tokens"] for r in rows)
    med = statistics.median(r["tokens"] / secs(r) for r in rows)
    return tok / sum(secs(r) for r in rows), tok, len(rows), med


def cmd_report(a):
    work = Path(a.dir)
    t = json.loads((work / "torch.json").read_text())
    w = t["warmup_steps"]
    cfg = json.loads((work / "config.json").read_text())
    ts = t["steps"]
    t_full, tok_t, n_t, t_full_med = rate(ts, w, lambda r: r["collate"] + r["forward"] + r["backward"] + r["optimizer"])
    t_model, _, _, t_model_med = rate(ts, w, lambda r: r["forward"] + r["backward"] + r["optimizer"])
    print(f"model: XLM-R {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
          f"{cfg['num_attention_heads']} heads, FFN {cfg['intermediate_size']}, vocab {cfg['vocab_size']} "
          f"+ LM head + 1-layer enhanced decoder ({t['params']:,} parameters); batch {a.batch_size} x "
          f"{a.max_len} tokens, mask 0.3/0.5, dropout on, AdamW + clip 1.0; {a.threads} threads; "
          f"{n_t} timed steps after {w} warm-up steps")
    rows = []
    for name in sorted(os.listdir(work)):
        if not name.startswith("ours") or not (work / name / "metrics.jsonl").is_file():
            continue
        m = [json.loads(l) for l in (work / name / "metrics.jsonl").read_text().split("\n") if l.strip()]
        r, tok, n, med = rate(m, w, lambda r: r["tokens"] / r["tokens_per_s"])
        assert tok == tok_t and n == n_t, f"{name}: {tok} tokens in {n} steps vs torch {tok_t} in {n_t}"
        rows.append((name, r, med))
    ph = {k: statistics.median(r[k] for r in ts[w:]) for k in ("collate", "forward", "backward", "optimizer")}
    print("tokens/s: all timed steps (median step); ratio = retrom3 / PyTorch incl. collator, model only")
    print(f"PyTorch {t['torch']} reference step, incl. collator : {t_full:8.1f} ({t_full_med:8.1f})")
    print(f"PyTorch {t['torch']} reference step, model only     : {t_model:8.1f} ({t_model_med:8.1f})  "
          f"median s/step: collate {ph['collate']:.3f}, forward {ph['forward']:.3f}, "
          f"backward {ph['backward']:.3f}, optimizer {ph['optimizer']:.3f}")
    out = {"torch_tokens_per_s": t_full, "torch_model_only_tokens_per_s": t_model, "torch_phases_median_s": ph,
           "torch_median_step_tokens_per_s": t_full_med, "torch_model_only_median_step_tokens_per_s": t_model_med}
    for name, r, med in rows:
        label = {"ours": "retrom3 pretrain (CPU f32)", "ours-compat": "retrom3 pretrain --reference-compat"}.get(
            name, name)
        print(f"{label:<42}: {r:8.1f} ({med:8.1f})  ratio {r / t_full:.2f}, {r / t_model:.2f} "
              f"(median step {med / t_full_med:.2f}, {med / t_model_med:.2f})")
        out[name + "_tokens_per_s"] = r
        out[name + "_median_step_tokens_per_s"] = med
    (work / "report.json").write_text(json.dumps(out, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["prepare", "torch", "report"])
    ap.add_argument("--dir", required=True, help="work directory")
    ap.add_argument("--tokenizer", default=str(ROOT / "tests/fixtures/tiny-xlmr"))
    ap.add_argument("--data", default=str(ROOT / "data/demo/pretrain.txt"))
    ap.add_argument("--texts", type=int, default=400)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    {"prepare": cmd_prepare, "torch": cmd_torch, "report": cmd_report}[a.command](a)


if __name__ == "__main__":
    main()
