"""Shared parts of the bench_gpu_*.py scripts: a timer, the run's provenance, tables and output.

Timing: on CUDA, events around a batch of back-to-back calls (so a call that is bound by the
host's launch rate is charged for it), the median over several batches after warm-up; on CPU,
perf_counter the same way. Every table records the device, library versions, date and commit.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, *, min_time: float = 0.2, batches: int = 7,
              warmup: int = 3, max_calls: int = 10_000) -> float:
    """Median seconds per call of ``fn``.

    A batch repeats ``fn`` enough times to last about ``min_time / batches`` seconds (estimated
    from the warm-up), so short calls are not dominated by the timer's own cost."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    once = max(time.perf_counter() - t0, 1e-7)
    per_batch = max(1, min(max_calls, int(min_time / batches / once)))
    samples = []
    for _ in range(batches):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_batch):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / per_batch)
        else:
            t0 = time.perf_counter()
            for _ in range(per_batch):
                fn()
            samples.append((time.perf_counter() - t0) / per_batch)
    return statistics.median(samples)


def _git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ":(top)fastdiff", ":(top)csrc"], cwd=here,
                               stderr=subprocess.DEVNULL).returncode != 0
        return sha + ("+local changes" if dirty else "")
    except Exception:
        # The GPU machine gets a copy of the working tree without .git: the caller passes the commit.
        return os.environ.get("FASTDIFF_COMMIT", "unknown (not a git checkout; set FASTDIFF_COMMIT)")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "absent"


def provenance(device: torch.device) -> Dict[str, str]:
    """Where and with what a figure was measured."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev = f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
        cuda = torch.version.cuda or "?"
    else:
        dev = f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"
        cuda = "-"
    return {
        "device": dev, "cuda": cuda, "torch": torch.__version__, "triton": _version("triton"),
        "diffusers": _version("diffusers"), "fastdiff": _version("fastdiff"), "python": platform.python_version(),
        "commit": _git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def provenance_line(prov: Dict[str, str]) -> str:
    return " | ".join(f"{k} {v}" for k, v in prov.items())


class Table:
    """A markdown table printed row by row as it is measured, kept for the output files."""

    def __init__(self, title: str, columns: List[str], prov: Dict[str, str], notes: Optional[List[str]] = None):
        self.title, self.columns, self.prov, self.notes = title, columns, prov, list(notes or [])
        self.rows: List[List[str]] = []
        self.records: List[dict] = []
        self._autosave: Optional[tuple] = None
        print(f"\n### {title}\n\n{provenance_line(prov)}\n", flush=True)
        for n in self.notes:
            print(n, flush=True)
        print("| " + " | ".join(columns) + " |\n|" + "|".join("---" for _ in columns) + "|", flush=True)

    def add(self, cells: List[str], record: Optional[dict] = None) -> None:
        self.rows.append([str(c) for c in cells])
        if record is not None:
            self.records.append(record)
        print("| " + " | ".join(self.rows[-1]) + " |", flush=True)
        if self._autosave is not None:
            self.save(*self._autosave)

    def autosave(self, out_dir: Optional[str], name: str) -> None:
        """Rewrite the output files after every row, so a run stopped at its time limit keeps
        what it measured."""
        self._autosave = (out_dir, name) if out_dir else None

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", provenance_line(self.prov), ""] + self.notes + ([""] if self.notes else [])
        lines += ["| " + " | ".join(self.columns) + " |", "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def save(self, out_dir: Optional[str], name: str) -> None:
        """Write ``name``.md (the table) and ``name``.json (provenance and raw records)."""
        if not out_dir:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.md").write_text(self.markdown())
        (out / f"{name}.json").write_text(json.dumps({"title": self.title, "provenance": self.prov,
                                                      "notes": self.notes, "records": self.records}, indent=1))


def fmt_time(sec: Optional[float]) -> str:
    if sec is None:
        return "-"
    if sec < 1e-3:
        return f"{sec * 1e6:.1f} µs"
    if sec < 1.0:
        return f"{sec * 1e3:.2f} ms"
    return f"{sec:.2f} s"


def pick_device(name: Optional[str]) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
