#!/usr/bin/env python3
"""Side-by-side CPU encode throughput: retrom3 vs PyTorch (FlagEmbedding BGEM3FlagModel on
transformers), same model directory, same texts, same thread count, in one run.

Usage (reference env of docs/fixtures.md; build retrom3 first with `cargo build --release`):
    /work/refenv/bin/python tools/compare_torch_encode.py [--threads 2] [--texts 128] [--max-length 128]

It writes a random XLM-R model (6 layers, hidden 384, 6 heads, FFN 1536, the tiny fixture's
1000-token tokenizer, M3 heads) to a temporary directory, runs `retrom3 bench encode` on it, then
times BGEM3FlagModel.encode (use_fp16=False, CPU) on the identical synthetic texts, best of
--repeat runs each, and prints tokens/s and the ratio.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = ["retrieval", "model", "dense", "sparse", "vector", "Berlin", "größe", "北京", "столица", "query",
         "passage", "index", "score", "lexical", "token", "embedding"]


def synthetic_texts(n, words):
    # Mirror of src/cli/bench.rs::synthetic_texts.
    return [" ".join(VOCAB[(i * 7 + j * 13 + j // 3) % len(VOCAB)] for j in range(words)) for i in range(n)]


def make_model(out, layers, hidden, heads, ffn):
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel
    torch.manual_seed(0)
    cfg = XLMRobertaConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=514,
                           type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                           layer_norm_eps=1e-5, hidden_act="gelu")
    XLMRobertaModel(cfg, add_pooling_layer=False).eval().save_pretrained(out)
    torch.save(torch.nn.Linear(hidden, hidden).state_dict(), os.path.join(out, "colbert_linear.pt"))
    torch.save(torch.nn.Linear(hidden, 1).state_dict(), os.path.join(out, "sparse_linear.pt"))
    src = os.path.join(ROOT, "tests/fixtures/tiny-xlmr")
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model"]:
        shutil.copy(os.path.join(src, f), out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--texts", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/retrom3"))
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    tmp = tempfile.mkdtemp(prefix="r3bench-")
    try:
        make_model(tmp, a.layers, a.hidden, a.heads, a.ffn)
        env = dict(os.environ, MATMUL_NUM_THREADS=str(a.threads), RAYON_NUM_THREADS=str(a.threads))
        cmd = [a.binary, "bench", "encode", "--model", tmp, "--texts", str(a.texts), "--max-length",
               str(a.max_length), "--batch-size", str(a.batch_size), "--repeat", str(a.repeat)]
        ours = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)

        from FlagEmbedding import BGEM3FlagModel
        m = BGEM3FlagModel(tmp, use_fp16=False, devices="cpu")
        texts = synthetic_texts(a.texts, a.max_length * 2)
        kw = dict(batch_size=a.batch_size, max_length=a.max_length, return_dense=True, return_sparse=True,
                  return_colbert_vecs=True)
        m.encode(texts[: a.batch_size], **kw)
        best = float("inf")
        for _ in range(a.repeat):
            t = time.perf_counter()
            m.encode(texts, **kw)
            best = min(best, time.perf_counter() - t)
        tok = m.tokenizer(texts, truncation=True, max_length=a.max_length)["input_ids"]
        tokens = sum(len(x) for x in tok)
        assert tokens == ours["tokens"], f"token counts differ: torch {tokens}, retrom3 {ours['tokens']}"
        torch_tps = tokens / best
        print(f"model: XLM-R {a.layers} layers, hidden {a.hidden}, {a.heads} heads, FFN {a.ffn}; "
              f"{a.texts} texts x {a.max_length} tokens, batch {a.batch_size}, {a.threads} threads, all 3 heads")
        print(f"retrom3 (CPU f32)            : {ours['tokens_per_s']:10.1f} tokens/s  ({ours['seconds']:.3f} s)")
        print(f"PyTorch {torch.__version__} FlagEmbedding: {torch_tps:10.1f} tokens/s  ({best:.3f} s)")
        print(f"ratio retrom3 / PyTorch      : {ours['tokens_per_s'] / torch_tps:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
