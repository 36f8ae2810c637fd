#!/usr/bin/env python3
"""retrom3 from Python through the C ABI, with ctypes only (no compiler, no third-party packages).

    cargo build --release
    python3 docs/examples/python_ctypes.py [--lib target/release/libretrom3.so] \
        [--model tests/fixtures/tiny-xlmr]

Encodes two texts (dense, sparse and ColBERT outputs) and scores two (query, passage) pairs. The
declarations below mirror include/retrom3.h; see docs/c-api.md for the contract of each call.
"""

import argparse
import ctypes as C
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

R3_OK = 0
R3_SCORE_NAMES = ["dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"]


class EncodeOptions(C.Structure):
    """r3_encode_options"""

    _fields_ = [
        ("dense", C.c_int32),
        ("sparse", C.c_int32),
        ("colbert", C.c_int32),
        ("pooling", C.c_int32),
        ("normalize", C.c_int32),
        ("max_length", C.c_size_t),
        ("batch_size", C.c_size_t),
    ]


class ScoreOptions(C.Structure):
    """r3_score_options"""

    _fields_ = [
        ("weights", C.c_float * 3),
        ("max_query_length", C.c_size_t),
        ("max_passage_length", C.c_size_t),
        ("batch_size", C.c_size_t),
    ]


class Retrom3Error(RuntimeError):
    pass


def load_library(path):
    lib = C.CDLL(str(path))
    P = C.POINTER
    sigs = {
        "r3_version": (C.c_char_p, []),
        "r3_last_error": (C.c_char_p, []),
        "r3_status_name": (C.c_char_p, [C.c_int32]),
        "r3_encode_options_init": (C.c_int32, [P(EncodeOptions)]),
        "r3_score_options_init": (C.c_int32, [P(ScoreOptions)]),
        "r3_model_load": (C.c_int32, [C.c_char_p, C.c_char_p, P(C.c_void_p)]),
        "r3_model_free": (None, [C.c_void_p]),
        "r3_encode": (
            C.c_int32,
            [C.c_void_p, P(C.c_char_p), C.c_size_t, P(EncodeOptions), P(C.c_void_p)],
        ),
        "r3_output_count": (C.c_int32, [C.c_void_p, P(C.c_size_t)]),
        "r3_output_dense": (
            C.c_int32,
            [C.c_void_p, P(P(C.c_float)), P(C.c_size_t), P(C.c_size_t)],
        ),
        "r3_output_sparse": (
            C.c_int32,
            [C.c_void_p, C.c_size_t, P(P(C.c_uint32)), P(P(C.c_float)), P(C.c_size_t)],
        ),
        "r3_output_colbert": (
            C.c_int32,
            [C.c_void_p, C.c_size_t, P(P(C.c_float)), P(C.c_size_t), P(C.c_size_t)],
        ),
        "r3_output_free": (None, [C.c_void_p]),
        "r3_score": (
            C.c_int32,
            [C.c_void_p, P(C.c_char_p), P(C.c_char_p), C.c_size_t, P(ScoreOptions),
             P(C.c_float)],
        ),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


def check(lib, status):
    """Raise with the library's message when a call fails (call right after the failing call:
    the message is per thread and replaced by the next r3_* call)."""
    if status != R3_OK:
        name = lib.r3_status_name(status).decode()
        raise Retrom3Error(f"{name}: {lib.r3_last_error().decode()}")


def c_strings(texts):
    arr = (C.c_char_p * len(texts))()
    arr[:] = [t.encode("utf-8") for t in texts]
    return arr


class Model:
    def __init__(self, lib, model_dir, device="cpu"):
        self.lib = lib
        self.handle = C.c_void_p()
        check(lib, lib.r3_model_load(str(model_dir).encode(), device.encode(),
                                     C.byref(self.handle)))

    def close(self):
        if self.handle:
            self.lib.r3_model_free(self.handle)
            self.handle = C.c_void_p()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def encode(self, texts, dense=True, sparse=False, colbert=False):
        """Returns {"dense": [[float]], "sparse": [{id: weight}], "colbert": [[[float]]]} with
        the requested keys. Everything is copied out before r3_output_free."""
        lib = self.lib
        opts = EncodeOptions()
        check(lib, lib.r3_encode_options_init(C.byref(opts)))
        opts.dense, opts.sparse, opts.colbert = int(dense), int(sparse), int(colbert)
        out = C.c_void_p()
        check(lib, lib.r3_encode(self.handle, c_strings(texts), len(texts), C.byref(opts),
                                 C.byref(out)))
        try:
            result = {}
            n = C.c_size_t()
            check(lib, lib.r3_output_count(out, C.byref(n)))
            if dense:
                data, rows, dim = C.POINTER(C.c_float)(), C.c_size_t(), C.c_size_t()
                check(lib, lib.r3_output_dense(out, C.byref(data), C.byref(rows), C.byref(dim)))
                d = dim.value
                result["dense"] = [data[i * d:(i + 1) * d] for i in range(rows.value)]
            if sparse:
                result["sparse"] = []
                for i in range(n.value):
                    ids, w = C.POINTER(C.c_uint32)(), C.POINTER(C.c_float)()
                    length = C.c_size_t()
                    check(lib, lib.r3_output_sparse(out, i, C.byref(ids), C.byref(w),
                                                    C.byref(length)))
                    result["sparse"].append({ids[k]: w[k] for k in range(length.value)})
            if colbert:
                result["colbert"] = []
                for i in range(n.value):
                    data, count, dim = C.POINTER(C.c_float)(), C.c_size_t(), C.c_size_t()
                    check(lib, lib.r3_output_colbert(out, i, C.byref(data), C.byref(count),
                                                     C.byref(dim)))
                    d = dim.value
                    result["colbert"].append(
                        [data[r * d:(r + 1) * d] for r in range(count.value)])
            return result
        finally:
            lib.r3_output_free(out)

    def score(self, pairs, weights=(0.4, 0.2, 0.4)):
        """The five scores of each (query, passage) pair, as dicts."""
        lib = self.lib
        opts = ScoreOptions()
        check(lib, lib.r3_score_options_init(C.byref(opts)))
        opts.weights[:] = list(weights)
        n = len(pairs)
        out5 = (C.c_float * (5 * n))()
        check(lib, lib.r3_score(self.handle, c_strings([q for q, _ in pairs]),
                                c_strings([p for _, p in pairs]), n, C.byref(opts), out5))
        return [dict(zip(R3_SCORE_NAMES, out5[5 * i:5 * i + 5])) for i in range(n)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default=ROOT / "target/release/libretrom3.so")
    ap.add_argument("--model", default=ROOT / "tests/fixtures/tiny-xlmr")
    args = ap.parse_args()

    lib = load_library(args.lib)
    print("retrom3", lib.r3_version().decode())
    with Model(lib, args.model) as model:
        out = model.encode(["What is BGE M3?", "BM25 is a bag-of-words retrieval function"],
                           dense=True, sparse=True, colbert=True)
        for i, v in enumerate(out["dense"]):
            print(f"text {i}: dense dim {len(v)}, {len(out['sparse'][i])} sparse terms, "
                  f"{len(out['colbert'][i])} colbert vectors")
        pairs = [("What is BGE M3?", "BGE M3 is an embedding model"),
                 ("What is BM25?", "BM25 is a bag-of-words retrieval function")]
        for (q, p), s in zip(pairs, model.score(pairs)):
            print(f"{q!r} / {p!r}: " + ", ".join(f"{k} {v:.4f}" for k, v in s.items()))

        # Errors come back as a status and a message, never a crash.
        try:
            model.encode(["ok"], dense=False)
        except Retrom3Error as e:
            print("expected error:", e)
    try:
        Model(lib, "/nonexistent/model")
    except Retrom3Error as e:
        print("expected error:", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
