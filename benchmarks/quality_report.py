"""What the analytic-test-bed quality scripts (quality_flow.py, quality_solvers.py) share: their
command line, the environment line they record with every table, and writing their section of
RESULTS.md."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import time

import numpy as np
import torch

import fastdiff

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def commit() -> str:
    """The short commit, marked when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+uncommitted changes" if dirty else "")
    except Exception:
        return "unknown"


def parse_args(doc: str, quick_help: str, argv=None) -> argparse.Namespace:
    """--quick, --threads (also applied to torch), --results."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the ops are small; see benchmarks/quality.py)")
    p.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"),
                   help="the RESULTS.md whose section this run replaces ('' to write nothing)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def environment(args: argparse.Namespace, settings: str) -> str:
    """Date, commit, machine and versions, then ``settings``, for the line above a table."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return (f"{now:%Y-%m-%d %H:%M} UTC, commit {commit()}, CPU ({platform.processor() or platform.machine()}, "
            f"{args.threads} thread(s)), python {platform.python_version()}, torch {torch.__version__}, "
            f"numpy {np.__version__}, fastdiff {fastdiff.__version__}, {settings}{', --quick' if args.quick else ''}")


def write_section(path: str, section: str, text: str) -> None:
    """Replace the section of RESULTS.md headed ``section`` (up to the next '## ') or append it."""
    with open(path) as f:
        doc = f.read()
    pattern = re.compile(re.escape(section) + r".*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: text.rstrip() + "\n\n", doc, count=1)
    else:
        doc = doc.rstrip() + "\n\n" + text.rstrip() + "\n"
    with open(path, "w") as f:
        f.write(doc.rstrip() + "\n")


def finish(args: argparse.Namespace, section: str, lines: list, png: str, plot_note: str, start: float) -> None:
    """Close a run: the plot line and the run time under the tables, then the section of
    ``args.results`` (unless '')."""
    total = time.perf_counter() - start
    lines += [f"Plot: benchmarks/{os.path.basename(png)}{plot_note}", "", f"Total run time {total:.0f} s."]
    if args.results:
        write_section(args.results, section, "\n".join(lines) + "\n")
        print(f"\nwrote the section of {args.results} and {png} ({total:.0f} s)")
    else:
        print(f"\nwrote {png} ({total:.0f} s)")


def steps_axes(ax, steps, title: str, fontsize: int) -> None:
    """A log-log panel over the step counts: ticks at ``steps`` only, a grid, a title."""
    import matplotlib.ticker
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # no 2x10^1-style labels
    ax.set_xticks(steps)
    ax.set_xticklabels([str(k) for k in steps])
    ax.set_xlabel("sampling steps K")
    ax.set_title(title, fontsize=fontsize)
    ax.grid(alpha=0.3, which="both")


def save_figure(fig, title: str, path: str, dpi: int) -> None:
    import matplotlib.pyplot as plt
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
