"""Bar chart of the end-to-end speedups over diffusers' DDIMPipeline from bench_gpu_e2e.py's e2e.json.

    python benchmarks/plot_e2e.py out/e2e.json out/e2e_speedup.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def plot(json_path, png_path) -> Path:
    import matplotlib
    matplotlib.use("Agg")  # no display on the benchmark machines
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    # measured rows only: error / skipped rows (a "status" key) and compile-time rows have no speedup
    recs = [r for r in data["records"] if r.get("speedup") is not None and "status" not in r]
    configs = sorted({(r["batch"], r["resolution"]) for r in recs}, key=lambda c: (c[1], c[0]))
    loops = [name for name in dict.fromkeys(r["loop"] for r in recs)]
    speed = {(r["batch"], r["resolution"], r["loop"]): r["speedup"] for r in recs}
    width = 0.8 / max(1, len(loops))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(configs) + 2), 4.2))
    for j, loop in enumerate(loops):
        xs = [i + (j - (len(loops) - 1) / 2) * width for i in range(len(configs))]
        ys = [speed.get((b, r, loop), 0.0) for b, r in configs]
        bars = ax.bar(xs, ys, width, label=loop)
        for bar, y in zip(bars, ys):
            if y > 0:
                ax.annotate(f"{y:.1f}x", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom",
                            fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([f"batch {b}\n{r}x{r}" for b, r in configs])
    ax.set_ylabel("speedup over diffusers DDIMPipeline")
    prov = data["provenance"]
    ax.set_title(f"{data['title']}\n{prov['device']} · torch {prov['torch']} · {prov['date']} · {prov['commit']}",
                 fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: plot_e2e.py E2E_JSON OUT_PNG")
    print(plot(sys.argv[1], sys.argv[2]))
