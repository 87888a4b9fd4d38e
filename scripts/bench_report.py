#!/usr/bin/env python3
"""BENCHMARKS.md from the results `scripts/bench_all.sh` leaves in a folder.

    /tmp/ref/bin/python scripts/bench_report.py bench-results --previous BENCHMARKS.md \\
        > new-BENCHMARKS.md

Reads `<bench>-<model or mode>-<impl>.json` (impl `candle-zoo` or `pytorch`), `machine.json` and
`commands.txt` from RESULTS_DIR, prints the Markdown report and draws `docs/benchmarks.png`
(`--plot` elsewhere). The hand-written text between `<!-- analysis -->` and `<!-- /analysis -->`
in the `--previous` report is carried over, so a rerun refreshes the numbers and keeps the
analysis. A benchmark without results shows as "not run".
"""

import argparse
import json
import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OURS, THEIRS = "candle-zoo", "pytorch"
ATTENTION_BACKENDS = ["naive", "fused", "torch-sdpa", "torch-math"]
TARGET_N = 4096
ANALYSIS = re.compile(r"<!-- analysis -->\n?(.*?)<!-- /analysis -->", re.DOTALL)
ANALYSIS_PLACEHOLDER = "_To be written after a run: what limits each result, and why._\n"


def read_json(folder, name):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def result(folder, key, impl):
    return read_json(folder, f"{key}-{impl}.json")


def greedy_tokens_per_s(report, impl):
    """Tokens/s of plain greedy decoding: ours reports it as the `greedy` row of `results`."""
    if report is None:
        return None
    if impl == THEIRS:
        return report["tokens_per_s"]
    rows = [r for r in report["results"] if r["method"] == "greedy"]
    return rows[0]["tokens_per_s"] if rows else None


def fmt(x, unit=""):
    if x is None:
        return "—"
    digits = 0 if abs(x) >= 100 else 1 if abs(x) >= 10 else 2
    return f"{x:,.{digits}f}{' ' + unit if unit else ''}"


def ratio_text(r):
    return "—" if r is None else f"{r:.2f}×"


class Row:
    """One line of the summary: a metric of ours and of PyTorch, and the speed ratio."""

    def __init__(self, label, short, ours, theirs, unit, lower_is_better, target=None):
        self.label, self.short, self.unit = label, short, unit
        self.ours, self.theirs = ours, theirs
        self.target = target  # the least ours/theirs speed ratio the issue asks for
        if ours is None or theirs is None or ours <= 0 or theirs <= 0:
            self.ratio = None
        else:
            self.ratio = theirs / ours if lower_is_better else ours / theirs

    def met(self):
        if self.target is None:
            return ""
        if self.ratio is None:
            return "not run"
        return "met" if self.ratio >= self.target else "not met"

    def cells(self):
        target = "" if self.target is None else f"≥ {self.target:.1f}×"
        return [
            self.label,
            fmt(self.ours, self.unit),
            fmt(self.theirs, self.unit),
            ratio_text(self.ratio),
            target,
            self.met(),
        ]


MODELS = {
    "clip-vit-b-32": ("CLIP ViT-B/32", "CLIP"),
    "siglip-base-patch16-224": ("SigLIP B/16-224", "SigLIP"),
}
TARGETS = {
    ("embed-image", "clip-vit-b-32"): 1.2,
    ("train-step", "clip-vit-b-32"): 1.0,
    ("caption", "blip-small"): 1.5,
}


def throughput_rows(folder):
    rows = []
    for model, (name, short) in MODELS.items():
        ours, theirs = result(folder, f"embed-{model}", OURS), result(
            folder, f"embed-{model}", THEIRS
        )
        batch = (ours or theirs or {}).get("batch")
        for kind, key, unit in [
            ("image", "images_per_s", "img/s"),
            ("text", "texts_per_s", "text/s"),
        ]:
            rows.append(
                Row(
                    f"{name} {kind} embedding (batch {batch})",
                    f"{short} {kind}",
                    (ours or {}).get(key),
                    (theirs or {}).get(key),
                    unit,
                    lower_is_better=False,
                    target=TARGETS.get((f"embed-{kind}", model)),
                )
            )
    for model, (name, short) in MODELS.items():
        ours, theirs = result(folder, f"train-step-{model}", OURS), result(
            folder, f"train-step-{model}", THEIRS
        )
        batch = (ours or theirs or {}).get("batch")
        rows.append(
            Row(
                f"{name} training step (batch {batch}, AdamW)",
                f"{short} train",
                (ours or {}).get("ms_per_step"),
                (theirs or {}).get("ms_per_step"),
                "ms",
                lower_is_better=True,
                target=TARGETS.get(("train-step", model)),
            )
        )
    ours, theirs = result(folder, "caption-blip-small", OURS), result(
        folder, "caption-blip-small", THEIRS
    )
    tokens = (ours or theirs or {}).get("new_tokens")
    rows.append(
        Row(
            f"BLIP greedy caption ({tokens} tokens, 224 px)",
            "BLIP caption",
            (ours or {}).get("ms_per_caption"),
            (theirs or {}).get("ms_per_caption"),
            "ms",
            lower_is_better=True,
            target=TARGETS.get(("caption", "blip-small")),
        )
    )
    ours, theirs = result(folder, "generate-llama-small", OURS), result(
        folder, "generate-llama-small", THEIRS
    )
    rows.append(
        Row(
            "Llama-small greedy generation (batch 1)",
            "Llama greedy",
            greedy_tokens_per_s(ours, OURS),
            greedy_tokens_per_s(theirs, THEIRS),
            "tok/s",
            lower_is_better=False,
        )
    )
    return rows


def attention_rows(folder):
    """{mode: {backend: {seq_len: row}}} over both sides' attention results, and the settings."""
    table, settings = {}, {}
    for mode in ("forward", "train"):
        for impl in (OURS, THEIRS):
            report = result(folder, f"attention-{mode}", impl)
            if report is None:
                continue
            settings[mode] = report
            for row in report["rows"]:
                table.setdefault(mode, {}).setdefault(row["backend"], {})[row["seq_len"]] = row
    return table, settings


def fused_target(table, mode):
    """The summary row for attention at N = 4096: fused against torch-sdpa for speed, and the
    fused kernel's own targets, at most 1/8 of naive's peak memory and no slower than naive."""
    at_n = {b: rows.get(TARGET_N, {}) for b, rows in table.get(mode, {}).items()}
    fused, naive, sdpa = (at_n.get(b, {}) for b in ("fused", "naive", "torch-sdpa"))
    f_ms, f_mib = fused.get("ms"), fused.get("peak_mib")
    n_ms, n_mib = naive.get("ms"), naive.get("peak_mib")
    s_ms = sdpa.get("ms")
    ratio = s_ms / f_ms if f_ms and s_ms else None
    if None in (f_ms, f_mib, n_ms, n_mib):
        verdict = "not run"
    else:
        met = f_mib <= n_mib / 8 and f_ms <= n_ms
        verdict = (
            f"{'met' if met else 'not met'}: fused {fmt(f_mib, 'MiB')}, naive {fmt(n_mib, 'MiB')}; "
            f"fused {fmt(f_ms, 'ms')}, naive {fmt(n_ms, 'ms')}"
        )
    return [
        f"Causal attention {mode}, N={TARGET_N}: fused vs torch-sdpa",
        fmt(f_ms, "ms"),
        fmt(s_ms, "ms"),
        ratio_text(ratio),
        "fused ≤ 1/8 of naive's peak memory and no slower than naive",
        verdict,
    ]


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_section(machine):
    if machine is None:
        return "Not recorded (no `machine.json`)."
    items = [
        ("CPU", machine.get("cpu")),
        ("Cores", machine.get("cores")),
        ("`nproc`", machine.get("nproc")),
        ("Threads used", machine.get("torch_threads")),
        ("Memory", machine.get("memory_gib") and f"{machine['memory_gib']} GiB"),
        ("OS", f"{machine.get('os')} (Linux {machine.get('kernel')})"),
        ("Rust", machine.get("rustc")),
        (
            "PyTorch",
            f"torch {machine.get('torch')}, transformers {machine.get('transformers')}, "
            f"Python {machine.get('python')}",
        ),
        ("Date", machine.get("date")),
    ]
    return "\n".join(f"- **{k}:** {v}" for k, v in items if v is not None)


def gemm_section(folder):
    rows = []
    for model, (name, _) in MODELS.items():
        for impl, label in ((OURS, "candle-zoo"), (THEIRS, "PyTorch")):
            report = result(folder, f"embed-{model}", impl)
            if report is None:
                continue
            mfu = report.get("mfu")
            rows.append(
                [
                    name,
                    label,
                    fmt(report.get("gemm_gflops")),
                    fmt(report.get("vision_gflop_per_image")),
                    fmt(report.get("images_per_s")),
                    "—" if mfu is None else f"{mfu * 100:.0f}%",
                ]
            )
    if not rows:
        return "Not run."
    header = [
        "Model",
        "Implementation",
        "f32 GEMM peak (GFLOP/s)",
        "Vision GFLOP/image",
        "Images/s",
        "MFU",
    ]
    return (
        markdown_table(header, rows)
        + "\n\nThe GEMM peak is each framework's best f32 square matmul (n = 1024, 2048) on the "
        "same threads; MFU is the vision tower's analytic FLOPs (2·m·n·k per matmul, elementwise "
        "work not counted) times images/s, over that peak."
    )


def attention_section(table, settings):
    if not table:
        return "Not run."
    parts = []
    for mode, by_backend in table.items():
        s = settings[mode]
        backends = [b for b in ATTENTION_BACKENDS if b in by_backend]
        backends += sorted(b for b in by_backend if b not in ATTENTION_BACKENDS)
        lengths = sorted({n for rows in by_backend.values() for n in rows})
        rows = []
        for n in lengths:
            cells = [n]
            for key, unit in (("ms", ""), ("peak_mib", "")):
                for b in backends:
                    row = by_backend[b].get(n)
                    if row is None:
                        cells.append("—")
                    elif row.get(key) is None:
                        cells.append("failed")
                    else:
                        cells.append(fmt(row[key], unit))
            rows.append(cells)
        header = ["N"] + [f"{b} ms" for b in backends] + [f"{b} MiB" for b in backends]
        causal = "causal" if s.get("causal") else "non-causal"
        parts.append(
            f"**{mode.capitalize()}** ({causal}, batch {s.get('batch')}, {s.get('heads')} heads, "
            f"head dim {s.get('head_dim')}, f32"
            + (", forward and backward of `out.sum()`" if mode == "train" else "")
            + ")\n\n"
            + markdown_table(header, rows)
        )
    parts.append(
        "naive and fused are ours; torch-sdpa is `F.scaled_dot_product_attention`, torch-math "
        "the explicit softmax(QKᵀ/√d + mask)V in torch ops. The two sides measure peak memory "
        "differently. Ours counts, at its global allocator, the most heap bytes a run held above "
        "what was live when it began (`zoo bench attention`, src/memory.rs). PyTorch's is "
        "RSS-based: each (length, backend) runs in a fresh process, which runs once at a short "
        "length (paging in code, starting threads), allocates its inputs, and reports how far "
        "the timed runs raise `ru_maxrss`; that counts only pages touched, plus whatever the "
        "allocator keeps cached. The fused-against-naive target compares ours with ours. "
        '"failed" marks a size whose process died (out of memory, say).'
    )
    return "\n\n".join(parts)


def plot(rows, table, path):
    fig = plt.figure(figsize=(13, 5.5))
    grid = fig.add_gridspec(2, 2, width_ratios=[1, 1.1])
    bars = fig.add_subplot(grid[:, 0])
    measured = [r for r in rows if r.ratio is not None]
    labels = [r.short for r in measured]
    ratios = [r.ratio for r in measured]
    colours = ["tab:green" if x >= 1 else "tab:red" for x in ratios]
    bars.barh(labels[::-1], ratios[::-1], color=colours[::-1])
    for i, r in enumerate(measured[::-1]):
        if r.target is not None:
            bars.plot([r.target], [i], marker="|", color="black", markersize=18)
    for i, x in enumerate(ratios[::-1]):
        bars.text(x, i, f" {x:.2f}×", va="center", fontsize=8)
    bars.axvline(1.0, color="black", linewidth=1)
    bars.set_xlim(0, max(ratios + [1.5]) * 1.15)
    bars.set_xlabel("speed of candle-zoo / speed of PyTorch  (| = target)")
    bars.set_title("Throughput, ours over PyTorch")

    time_ax = fig.add_subplot(grid[0, 1])
    mem_ax = fig.add_subplot(grid[1, 1], sharex=time_ax)
    colour = {
        "naive": "tab:red",
        "fused": "tab:green",
        "torch-sdpa": "tab:blue",
        "torch-math": "tab:orange",
    }
    style = {"forward": "-", "train": "--"}
    for mode, by_backend in table.items():
        for backend, by_n in by_backend.items():
            ns = sorted(n for n, row in by_n.items() if row.get("ms") is not None)
            if not ns:
                continue
            kwargs = dict(
                color=colour.get(backend),
                linestyle=style[mode],
                marker="o",
                markersize=3,
                label=f"{backend} {mode}",
            )
            time_ax.plot(ns, [by_n[n]["ms"] for n in ns], **kwargs)
            # RSS rises below a page or two can be 0; draw them at 0.1 MiB on the log axis.
            mem_ax.plot(ns, [max(by_n[n]["peak_mib"], 0.1) for n in ns], **kwargs)
    lengths = sorted(
        {n for by_backend in table.values() for rows in by_backend.values() for n in rows}
    )
    for ax, ylabel in ((time_ax, "ms"), (mem_ax, "peak MiB (RSS)")):
        ax.set_xscale("log", base=2)
        if lengths:
            ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    time_ax.set_title("Causal attention (solid: forward, dashed: train)")
    mem_ax.set_xlabel("sequence length N")
    if table:
        time_ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def previous_analysis(path):
    if path is None or not os.path.exists(path):
        return None
    with open(path) as f:
        match = ANALYSIS.search(f.read())
    if match is None or not match.group(1).strip():
        return None
    return match.group(1).rstrip("\n") + "\n"


def reproduce_section(folder, machine):
    threads = machine.get("torch_threads") if machine else None
    lines = [
        "```sh",
        "bash scripts/bench_all.sh",
        "# the defaults, spelled out:",
        "PY=/tmp/ref/bin/python THREADS=$(nproc) MODELS=/tmp/zoo-bench-models \\",
        "  OUT=bench-results ZOO=target/release/zoo bash scripts/bench_all.sh",
        "```",
        "",
        "`PY` must have torch 2.15.0 and transformers 4.57.1 (and matplotlib). The script builds "
        "`zoo` (`cargo build --release --bin zoo`), writes the random-weight models "
        "(`bench_torch.py make-models`), runs each benchmark with ours first and PyTorch second, "
        f"both on {threads if threads else '`THREADS`'} threads, and regenerates this file. "
        "The commands it ran:",
    ]
    path = os.path.join(folder, "commands.txt")
    if os.path.exists(path):
        with open(path) as f:
            commands = f.read().strip()
        lines += ["", "```sh", commands, "```"]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir")
    parser.add_argument("--previous", help="the BENCHMARKS.md whose analysis to keep")
    parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "benchmarks.png"))
    args = parser.parse_args()

    folder = args.results_dir
    machine = read_json(folder, "machine.json")
    rows = throughput_rows(folder)
    table, settings = attention_rows(folder)
    summary = [r.cells() for r in rows]
    summary += [fused_target(table, mode) for mode in ("forward", "train")]
    plot(rows, table, args.plot)
    image = os.path.relpath(os.path.abspath(args.plot), os.path.abspath(ROOT))
    analysis = previous_analysis(args.previous) or ANALYSIS_PLACEHOLDER

    sections = [
        "# Benchmarks: candle-zoo against PyTorch\n\n"
        "Generated by `scripts/bench_all.sh` (`scripts/bench_report.py`); edit only the "
        "analysis section, which a rerun keeps. Both sides run the same random-weight HF "
        "checkpoints (`scripts/bench_torch.py make-models`) in f32 on the CPU, with random "
        "inputs of the models' shapes, so image decoding and tokenisation are not timed. Times "
        "are medians of the timed runs after warmup.",
        "## Machine\n\n" + machine_section(machine),
        "## Summary\n\n"
        + markdown_table(
            ["Benchmark", "candle-zoo", "PyTorch", "Ours / theirs (speed)", "Target", "Met"],
            summary,
        )
        + "\n\nThe ratio is always the speed of ours over the speed of PyTorch (time ratios are "
        "inverted), so above 1 means candle-zoo is faster.",
        "## GEMM peak and model FLOP utilisation\n\n" + gemm_section(folder),
        "## Attention\n\n" + attention_section(table, settings),
        f"## Plot\n\n![candle-zoo against PyTorch]({image})",
        "## What bounds the results\n\n<!-- analysis -->\n" + analysis + "<!-- /analysis -->",
        "## Reproduce\n\n" + reproduce_section(folder, machine),
    ]
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()
