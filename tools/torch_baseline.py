#!/usr/bin/env python3
"""PyTorch attention baseline for tools/gpu-check.sh: scaled_dot_product_attention timings at the
shapes of issue 3's targets, on the same GPU in the same call as retrom3's numbers.

Shapes: bf16, non-causal, head dim 64, 16 heads (bge-m3: hidden 1024), S in 512..4096 with
B*S = 16384 tokens. For each SDPA backend that runs (flash, cudnn, efficient), forward and
forward+backward are timed with CUDA events (median of --iters after --warmup) and reported as
TFLOP/s with FlashAttention's FLOP count: forward 4*B*H*S*S*D, backward 2.5x forward.

With --encode (default on): Hugging Face XLMRobertaModel of bge-m3's size (24 layers, hidden 1024,
16 heads, vocab 250002, random weights) in bf16 with SDPA attention, inference forward on
--encode-batch texts of --encode-seq tokens, reported as tokens/s: the baseline of
`retrom3 bench model --device cuda` (same sizes, same card, same call of tools/gpu-check.sh).

Usage: python3 tools/torch_baseline.py [--json out.jsonl] [--seqs 512,1024,2048,4096]
Prints a table; with --json also one JSON object per line. Exit 0 when at least one backend ran,
1 otherwise (no GPU, no torch, every backend refused).
"""
import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="write one JSON line per measurement here")
    ap.add_argument("--seqs", default="512,1024,2048,4096")
    ap.add_argument("--tokens", type=int, default=16384, help="B*S")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-encode", action="store_true", help="skip the XLM-R encode baseline")
    ap.add_argument("--encode-batch", type=int, default=32)
    ap.add_argument("--encode-seq", type=int, default=512)
    args = ap.parse_args()

    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception as e:  # noqa: BLE001 - report any import failure in one line
        print(f"torch_baseline: cannot import torch ({e})", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        print("torch_baseline: torch sees no CUDA device", file=sys.stderr)
        return 1

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
          f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs)")
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    h, d = args.heads, args.head_dim
    out = open(args.json, "w") if args.json else None
    rows, ran = [], 0

    def timed(fn):
        for _ in range(args.warmup):
            fn()
        times = []
        for _ in range(args.iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        times.sort()
        return times[len(times) // 2]

    for s in [int(x) for x in args.seqs.split(",")]:
        b = max(1, args.tokens // s)
        q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16)
        flops_fwd = 4.0 * b * h * s * s * d
        for name, backend in backends:
            rec = {"engine": "torch", "op": "sdpa", "backend": name, "batch": b, "heads": h, "seq": s,
                   "head_dim": d, "dtype": "bf16", "causal": False}
            try:
                with sdpa_kernel([backend]):
                    fwd = timed(lambda: F.scaled_dot_product_attention(q, k, v))

                    def fwd_bwd():
                        o = F.scaled_dot_product_attention(q, k, v)
                        o.backward(dout)
                    both = timed(fwd_bwd)
                rec.update(fwd_s=fwd, fwd_tflops=flops_fwd / fwd / 1e12,
                           fwd_bwd_s=both, fwd_bwd_tflops=3.5 * flops_fwd / both / 1e12)
                ran += 1
            except Exception as e:  # noqa: BLE001 - a backend that refuses is reported, not fatal
                rec["error"] = str(e).splitlines()[0][:160]
            q.grad = k.grad = v.grad = None
            rows.append(rec)
            if out:
                out.write(json.dumps(rec) + "\n")
        del q, k, v, dout
        torch.cuda.empty_cache()

    print(f"{'backend':10} {'B':>4} {'S':>5}  {'fwd ms':>8} {'fwd TF/s':>9}  {'f+b ms':>8} {'f+b TF/s':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:10} {r['batch']:>4} {r['seq']:>5}  unavailable: {r['error']}")
        else:
            print(f"{r['backend']:10} {r['batch']:>4} {r['seq']:>5}  {r['fwd_s']*1e3:8.3f} {r['fwd_tflops']:9.1f}"
                  f"  {r['fwd_bwd_s']*1e3:8.3f} {r['fwd_bwd_tflops']:9.1f}")
    if not args.no_encode:
        rec = {"engine": "torch", "op": "xlmr_encode", "layers": 24, "hidden": 1024, "heads": 16,
               "vocab": 250002, "batch": args.encode_batch, "seq": args.encode_seq, "dtype": "bf16",
               "attn_implementation": "sdpa"}
        try:
            from transformers import XLMRobertaConfig, XLMRobertaModel
            cfg = XLMRobertaConfig(vocab_size=250002, hidden_size=1024, num_hidden_layers=24,
                                   num_attention_heads=16, intermediate_size=4096,
                                   max_position_embeddings=args.encode_seq + 2, type_vocab_size=1,
                                   pad_token_id=1, attn_implementation="sdpa")
            model = XLMRobertaModel(cfg, add_pooling_layer=False).to(dev, torch.bfloat16).eval()
            ids = torch.randint(5, 250002, (args.encode_batch, args.encode_seq), device=dev)
            mask = torch.ones_like(ids)
            with torch.inference_mode():
                t = timed(lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state)
            rec.update(seconds=t, tokens_per_s=args.encode_batch * args.encode_seq / t)
            print(f"xlmr_encode bf16 sdpa b{args.encode_batch} s{args.encode_seq}: {t*1e3:.1f} ms, "
                  f"{rec['tokens_per_s']:.0f} tokens/s")
            del model
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            rec["error"] = str(e).splitlines()[0][:160]
            print(f"xlmr_encode unavailable: {rec['error']}")
        if out:
            out.write(json.dumps(rec) + "\n")
    if out:
        out.close()
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
