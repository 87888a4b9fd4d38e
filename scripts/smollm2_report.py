#!/usr/bin/env python3
"""Markdown tables from the JSON that scripts/bench_smollm2.sh writes (standard library only).

    python3 scripts/smollm2_report.py bench-results/smollm2

Greedy tokens/s (zoo bench generate against llama-bench tg64, min-max and the ratio of the
medians), the verify curves (cost of k tokens over one, after 256), and the speculative runs
(tau, tokens/s, speedup over greedy and identical output per method, against llama-bench tg128).
"""
import glob
import json
import os
import statistics
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


def spread(values):
    return f"{min(values):.1f}–{max(values):.1f}"


def llama_ts(path):
    return load(path)[0]["avg_ts"]


def main(out):
    print("| weights | zoo greedy tokens/s | llama.cpp tg64 tokens/s | ratio (medians) |")
    print("|---|---|---|---|")
    for q in ("F32", "Q8_0", "Q4_1"):
        ours = [r["tokens_per_s"] for f in sorted(glob.glob(f"{out}/zoo-generate-{q}-*.json"))
                for r in load(f)["results"] if r["method"] == "greedy"]
        theirs = [llama_ts(f) for f in sorted(glob.glob(f"{out}/llama-tg64-{q}-*.json"))]
        if ours and theirs:
            ratio = statistics.median(ours) / statistics.median(theirs)
            print(f"| {q} | {spread(ours)} | {spread(theirs)} | {ratio:.2f}× |")
    print()
    print("| weights | | 1 (ms) | 2 | 4 | 8 | 16 | 32 | 64 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for q in ("F32", "Q8_0", "Q4_1"):
        zoo, lcpp = f"{out}/zoo-verify-{q}.json", f"{out}/llama-verify-{q}.json"
        if not (os.path.exists(zoo) and os.path.exists(lcpp)):
            continue
        rows = load(zoo)["forwards"]
        one = rows[0]["ms"]
        print(f"| {q} | zoo | {one:.1f} | "
              + " | ".join(f"{r['ms'] / one:.2f}" for r in rows[1:]) + " |")
        ms = {r["n_prompt"]: r["avg_ns"] / 1e6 for r in load(lcpp)}
        print(f"| {q} | llama.cpp | {ms[1]:.1f} | "
              + " | ".join(f"{ms[k] / ms[1]:.2f}" for k in (2, 4, 8, 16, 32, 64)) + " |")
    print()
    print("| weights | method | τ | tokens/s | speedup over greedy | identical to greedy "
          "| llama.cpp tg128 tokens/s | vs llama.cpp (medians) |")
    print("|---|---|---|---|---|---|---|---|")
    for q in ("F32", "Q8_0", "Q4_1"):
        runs = [load(f)["results"] for f in sorted(glob.glob(f"{out}/zoo-speculative-{q}-*.json"))]
        if not runs:
            continue
        theirs = [llama_ts(f) for f in sorted(glob.glob(f"{out}/llama-tg128-{q}-*.json"))]
        for method in [r["method"] for r in runs[0]]:
            rows = [r for run in runs for r in run if r["method"] == method]
            tps = [r["tokens_per_s"] for r in rows]
            speed = [r["speedup"] for r in rows]
            same = all(r["identical_to_greedy"] for r in rows)
            tau = statistics.median(r["mean_accepted"] for r in rows)
            vs = statistics.median(tps) / statistics.median(theirs) if theirs else float("nan")
            print(f"| {q} | {method} | {tau:.2f} | {spread(tps)} | "
                  f"{min(speed):.2f}–{max(speed):.2f}× | {'yes' if same else 'NO'} | "
                  f"{spread(theirs) if theirs else '–'} | {vs:.2f}× |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench-results/smollm2")
