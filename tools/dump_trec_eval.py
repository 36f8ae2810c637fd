#!/usr/bin/env python3
"""Dump pytrec_eval (trec_eval 9.x) results on a small synthetic qrels + run, for the Rust metric
parity test (tests/retrieval_metrics.rs).

The case mix: graded relevance (0..3), score ties (trec_eval breaks them by docno, descending),
queries whose judged documents are all non-relevant, a query in the run but not in the qrels,
a query in the qrels but not in the run, retrieved documents that are not judged, runs longer
than 100 and shorter than 10.

Measures: ndcg_cut_10, recall_100, map, and recip_rank (on the full run, and on the run cut at 10
after trec_eval's own sort: that is MRR@10).

Usage: /work/refenv/bin/python tools/dump_trec_eval.py [out_dir]   (default tests/fixtures/trec)
Needs pytrec-eval-terrier==0.5.11.
"""
import json
import os
import random
import sys

import pytrec_eval

MEASURES = {"ndcg_cut_10", "recall_100", "map", "recip_rank"}


def trec_sorted(docs):
    """trec_eval's ranking: score descending, then docno descending (strcmp)."""
    return sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)


def build(seed=20240611):
    rng = random.Random(seed)
    qrels, run = {}, {}
    for qi in range(14):
        qid = f"q{qi}"
        ndocs = rng.choice([5, 12, 40, 150])
        pool = [f"d{rng.randrange(400):03d}" for _ in range(ndocs * 2)]
        pool = list(dict.fromkeys(pool))[:ndocs]
        judged = rng.sample(pool, k=max(1, len(pool) // 3))
        extra = [f"x{qi}_{j}" for j in range(rng.randrange(0, 4))]  # judged, never retrieved
        if qi in (3, 9):
            qrels[qid] = {d: 0 for d in judged}  # judged, but nothing relevant
        else:
            qrels[qid] = {d: rng.choice([0, 1, 1, 2, 3]) for d in judged + extra}
        # Coarse scores so that ties are frequent.
        run[qid] = {d: float(rng.randrange(0, 8)) / 4.0 + (0.5 if qi % 5 == 0 else 0.0) for d in pool}
    run["q_unjudged"] = {"d001": 1.0, "d002": 0.5}  # in the run only
    qrels["q_noresults"] = {"d005": 1, "d006": 2}  # in the qrels only
    # One query where every score ties.
    qrels["q_ties"] = {"d010": 1, "d020": 2, "d030": 0}
    run["q_ties"] = {f"d{j:03d}": 1.0 for j in range(0, 60, 5)}
    return qrels, run


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/trec"
    os.makedirs(out_dir, exist_ok=True)
    qrels, run = build()
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut", "recall", "map", "recip_rank"})
    full = ev.evaluate(run)
    run10 = {q: dict(trec_sorted(d)[:10]) for q, d in run.items()}
    cut = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run10)
    per_query = {}
    for q, m in sorted(full.items()):
        per_query[q] = {
            "ndcg_cut_10": m["ndcg_cut_10"],
            "recall_100": m["recall_100"],
            "map": m["map"],
            "recip_rank": m["recip_rank"],
            "mrr_10": cut[q]["recip_rank"],
        }
    keys = ["ndcg_cut_10", "recall_100", "map", "recip_rank", "mrr_10"]
    mean = {k: sum(v[k] for v in per_query.values()) / len(per_query) for k in keys}
    out = {
        "generator": "tools/dump_trec_eval.py",
        "pytrec_eval": getattr(pytrec_eval, "__version__", "pytrec-eval-terrier 0.5.11"),
        "qrels": qrels,
        "run": run,
        "per_query": per_query,
        "mean": mean,
        "evaluated_queries": sorted(per_query),
    }
    path = os.path.join(out_dir, "pytrec_eval.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    print(f"wrote {path}: {len(per_query)} evaluated queries; mean {mean}")


if __name__ == "__main__":
    main()
