#!/usr/bin/env python3
"""Check that a model directory written by retrom3 loads in the Python reference stack, unchanged.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 /work/refenv/bin/python tools/check_roundtrip.py \
        --src tests/fixtures/tiny-bge-m3-layout --out target/tmp/io_export

--src is the directory the weights came from (model.safetensors or pytorch_model.bin, colbert_linear.pt,
sparse_linear.pt), --out the directory retrom3 wrote (see `cargo test --test io_roundtrip export`).
Checks, each printed as PASS/FAIL:

  1. out/model.safetensors opens with safetensors and carries metadata {"format": "pt"};
  2. transformers AutoModel.from_pretrained(out) reports the same missing / unexpected / mismatched
     weights as AutoModel.from_pretrained(src) (e.g. a source without pooler.* gets a fresh pooler in
     both), and every loaded parameter equals the source tensor of the same name (a `roberta.` /
     `bert.` / `model.` prefix in the source is stripped, as retrom3 does);
  3. torch.load(out/<head>.pt, weights_only=True) gives an OrderedDict {weight, bias} equal to the
     source head upcast to float32 (retrom3 writes heads in f32).

Exits 1 if any check fails. Needs torch, transformers, safetensors; never downloads anything.
"""

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import collections  # noqa: E402

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

PREFIXES = ("roberta.", "bert.", "model.")
HEADS = ("colbert_linear.pt", "sparse_linear.pt")

failures = []


def check(ok, what):
    print(("PASS " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def load_source_backbone(src):
    st = os.path.join(src, "model.safetensors")
    if os.path.exists(st):
        sd = load_file(st)
    else:
        sd = torch.load(os.path.join(src, "pytorch_model.bin"), weights_only=True, map_location="cpu")
    for p in PREFIXES:
        if any(k.startswith(p + "embeddings.") or k.startswith(p + "encoder.") for k in sd):
            sd = {(k[len(p):] if k.startswith(p) else k): v for k, v in sd.items()}
            break
    return sd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="source model directory")
    ap.add_argument("--out", required=True, help="directory written by retrom3")
    args = ap.parse_args()

    # 1. safetensors metadata.
    out_st = os.path.join(args.out, "model.safetensors")
    with safe_open(out_st, framework="pt") as f:
        meta = f.metadata()
    check(meta is not None and meta.get("format") == "pt", f"{out_st}: metadata {meta}")

    # 2. transformers loads it and the weights are the source's.
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(args.out, output_loading_info=True)
    _, src_info = AutoModel.from_pretrained(args.src, output_loading_info=True)
    same_info = all(sorted(info[k]) == sorted(src_info[k]) for k in info)
    check(same_info, f"AutoModel.from_pretrained(out) loading info {dict(info)} == that of src")
    fresh = set(info["missing_keys"])  # newly initialised (random) in both: nothing to compare
    src = load_source_backbone(args.src)
    ours = {k: v for k, v in model.state_dict().items() if k not in fresh}
    n_same = 0
    for k, t in ours.items():
        if k not in src:
            check(False, f"parameter {k} has no source tensor")
            continue
        same = t.shape == src[k].shape and torch.equal(t, src[k].to(t.dtype))
        n_same += same
        if not same:
            check(False, f"parameter {k} differs from the source")
    check(n_same == len(ours), f"{n_same}/{len(ours)} backbone tensors identical to the source")

    # 3. heads with torch.load(weights_only=True).
    for head in HEADS:
        s, o = os.path.join(args.src, head), os.path.join(args.out, head)
        if not os.path.exists(s):
            check(not os.path.exists(o), f"{head}: absent in source and out")
            continue
        a = torch.load(s, weights_only=True, map_location="cpu")
        b = torch.load(o, weights_only=True, map_location="cpu")
        ok = isinstance(b, collections.OrderedDict) and sorted(b) == sorted(a) == ["bias", "weight"]
        ok = ok and all(b[k].dtype == torch.float32 and torch.equal(b[k], a[k].float()) for k in a)
        check(ok, f"{head}: torch.load(weights_only=True) -> {{{', '.join(f'{k}: {tuple(v.shape)} {v.dtype}' for k, v in b.items())}}}")

    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
