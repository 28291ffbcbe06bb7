"""Shared parts of the bench_gpu_*.py scripts: a timer, the run's provenance, tables that keep
going when a variant fails, deadlines, and the output files.

Timing: on CUDA, events around a batch of back-to-back calls (so a call that is bound by the
host's launch rate is charged for it), the median over several batches after warm-up; on CPU,
perf_counter the same way. Every table records the device, library versions, date and commit.

Robustness, because a GPU call is short and rare (one run of ``run_gpu_suite.sh`` must bring
back everything it measured):

* every variant runs through ``attempt``: an exception becomes an error row naming it, and the
  table goes on (``FASTDIFF_SUITE_INJECT`` makes chosen variants fail or hang, to check that);
* a ``Deadline`` (``--deadline`` epoch seconds, or ``--budget`` seconds from the start) turns the
  variants that no longer fit into "skipped" rows, so a script ends before its phase is killed;
* every row rewrites ``NAME.json`` and ``results.md`` in ``--out``, so a run that is killed
  anyway keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


# -- the one place that reaches below fastdiff's top-level names --------------------------------
# fastdiff's modules are being reorganised (samplers into a package, the kernel launcher
# renamed). The benchmarks use the public top-level names (fastdiff.step, fastdiff.COLUMNS,
# fastdiff.DDIMSampler, ...) everywhere else, so a move is a fix on the lines below only.
def _graph_fallback_warning():
    try:
        from fastdiff.graphs import GraphFallbackWarning
    except ImportError:  # moved: the fallback warning is printed, nothing else changes
        return None
    return GraphFallbackWarning


GraphFallbackWarning = _graph_fallback_warning()


def quiet_graph_fallback() -> None:
    """On a CPU (the dry run) GraphedSampler runs eagerly and warns once per runner: not news."""
    import warnings
    if GraphFallbackWarning is not None:
        warnings.simplefilter("ignore", GraphFallbackWarning)


def import_diffusers():
    """(diffusers module, None) or (None, why not): the GPU machine has no diffusers unless its
    wheels travel in .whl/ (notes/graphs.md)."""
    try:
        import diffusers
        return diffusers, None
    except Exception as exc:  # ImportError, or a broken dependency of a carried wheel
        return None, (f"diffusers not importable ({type(exc).__name__}: {first_line(exc)}); "
                      "carry its wheels in .whl/ (notes/graphs.md)")


# -- timing ------------------------------------------------------------------------------------
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


class Deadline:
    """An absolute time (epoch seconds) a script must be done by, or none."""

    def __init__(self, at: Optional[float] = None):
        self.at = at

    @classmethod
    def from_args(cls, args) -> "Deadline":
        at = getattr(args, "deadline", None)
        budget = getattr(args, "budget", None)
        if budget is not None:
            at = min(at, time.time() + budget) if at is not None else time.time() + budget
        return cls(at)

    def left(self) -> float:
        return float("inf") if self.at is None else self.at - time.time()

    def refuses(self, needs: float) -> Optional[str]:
        """None when ``needs`` seconds still fit, else the reason for a "skipped" row."""
        left = self.left()
        if left >= needs:
            return None
        return f"skipped: phase deadline ({max(left, 0.0):.1f} s left, this needs about {needs:.1f} s)"


def compile_estimate(seen: List[float], guess: float) -> float:
    """Seconds the next compile is expected to take: 1.5x the last one, or the guess before any.
    The last, not the slowest: the first compile of a process also warms inductor up (on a 2-core
    CPU the dry run's first compile took 17 s, the next one, another family, 1.0 s)."""
    return 1.5 * seen[-1] if seen else guess


# -- running one variant -------------------------------------------------------------------------
def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


def error_text(exc: BaseException, limit: int = 200) -> str:
    """'error: Type: first line of the message', short enough for a table cell."""
    msg = f"error: {type(exc).__name__}: {first_line(exc)}"
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


class InjectedFailure(RuntimeError):
    pass


def _inject(label: str) -> None:
    """FASTDIFF_SUITE_INJECT="error:PATTERN;hang:PATTERN": make the variants whose label matches
    the shell-style PATTERN raise, or sleep until killed (a stand-in for a hung kernel), so the
    dry run can show that one failure costs one row and one hang costs only its phase."""
    spec = os.environ.get("FASTDIFF_SUITE_INJECT", "")
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        kind, _, pattern = item.partition(":")
        if kind not in ("error", "hang") or not pattern:
            raise ValueError(f"FASTDIFF_SUITE_INJECT entries must be 'error:PATTERN' or 'hang:PATTERN', got {item!r}")
        if fnmatch.fnmatchcase(label, pattern):
            if kind == "hang":
                print(f"[injected hang] {label}", file=sys.stderr, flush=True)
                while True:
                    time.sleep(3600)
            raise InjectedFailure(f"injected failure for {label!r} (FASTDIFF_SUITE_INJECT={spec!r})")


def attempt(label: str, fn: Callable[[], T]) -> Tuple[Optional[T], Optional[str]]:
    """Run one variant: (result, None), or (None, "error: ...") with the traceback on stderr
    (suite.log keeps it). Only Exception is caught: an interrupt still stops the script."""
    try:
        _inject(label)
        return fn(), None
    except Exception as exc:
        print(f"\n[variant failed] {label}", file=sys.stderr)
        traceback.print_exc()
        return None, error_text(exc)


# -- provenance ------------------------------------------------------------------------------------
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
        given = os.environ.get("FASTDIFF_COMMIT")
        return f"{given} (given)" if given else "unknown (not a git checkout; set FASTDIFF_COMMIT)"


def source_hash(root: Path = ROOT) -> str:
    """sha256 (12 hex) of the sources a figure depends on: fastdiff/**/*.py, csrc/*, benchmarks/*.py.
    The same on any copy of the same tree, .git or not: compare it with
    ``python benchmarks/bench_gpu_common.py --source-hash`` in a checkout to know what ran."""
    h = hashlib.sha256()
    files = sorted(list(root.glob("fastdiff/**/*.py")) + list(root.glob("csrc/*.cpp")) + list(root.glob("csrc/*.h"))
                   + list(root.glob("benchmarks/*.py")))
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def _version(module: str) -> str:
    """The imported module's version, else the installed distribution's: importing diffusers only
    for its version costs ~5 s on the CPU machine, and a benchmark that uses it has imported it."""
    if module in sys.modules:
        return getattr(sys.modules[module], "__version__", "?")
    try:
        from importlib.metadata import version
        return version(module) + " (installed, not imported)"
    except Exception:
        return "absent"


def provenance(device: torch.device, dry: bool = False) -> Dict[str, str]:
    """Where and with what a figure was measured."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev = f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
        cuda = torch.version.cuda or "?"
    else:
        dev = f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"
        cuda = "-"
    prov = {
        "device": dev, "cuda": cuda, "torch": torch.__version__, "triton": _version("triton"),
        "diffusers": _version("diffusers"), "fastdiff": _version("fastdiff"), "python": platform.python_version(),
        "commit": _git_commit(), "source": source_hash(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if dry:
        prov["mode"] = "DRY RUN (tiny sizes; checks the script, measures nothing worth keeping)"
    return prov


def provenance_line(prov: Dict[str, str]) -> str:
    return " | ".join(f"{k} {v}" for k, v in prov.items())


# -- tables and files ----------------------------------------------------------------------------
def _cell(value) -> str:
    return str(value).replace("\n", " ").replace("|", "\\|")


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
        if len(cells) != len(self.columns):
            raise ValueError(f"a row of {self.title!r} needs {len(self.columns)} cells, got {len(cells)}")
        self.rows.append([_cell(c) for c in cells])
        if record is not None:
            self.records.append(record)
        print("| " + " | ".join(self.rows[-1]) + " |", flush=True)
        if self._autosave is not None:
            self.save(*self._autosave)

    def add_status(self, key_cells: List[str], status: str, record: Optional[dict] = None) -> None:
        """A row for a variant that did not produce a figure: its key cells, then the reason
        ("error: ...", "skipped: ...") in the next column and "-" in the rest."""
        rest = len(self.columns) - len(key_cells) - 1
        if rest < 0:
            raise ValueError(f"{len(key_cells)} key cells leave no column for the status in {self.title!r}")
        rec = dict(record or {})
        rec.update(status=status.split(":", 1)[0], reason=status, key=[str(c) for c in key_cells])
        self.add(list(key_cells) + [status] + ["-"] * rest, rec)

    def autosave(self, out_dir: Optional[str], name: str) -> None:
        """Rewrite the output files after every row, so a run stopped at its time limit keeps
        what it measured."""
        self._autosave = (out_dir, name) if out_dir else None
        if self._autosave:
            self.save(*self._autosave)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", provenance_line(self.prov), ""] + self.notes + ([""] if self.notes else [])
        lines += ["| " + " | ".join(self.columns) + " |", "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def save(self, out_dir: Optional[str], name: str) -> None:
        """Write ``name``.json (provenance, raw records and the table as markdown), then
        reassemble ``results.md`` in the same folder (one markdown file, not one per table: the
        GPU call brings back at most 8 files)."""
        if not out_dir:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{name}.json.tmp"
        tmp.write_text(json.dumps({"title": self.title, "provenance": self.prov, "notes": self.notes,
                                   "columns": self.columns, "records": self.records,
                                   "markdown": self.markdown()}, indent=1))
        tmp.replace(out / f"{name}.json")  # a kill mid-write leaves the previous complete file
        try:
            import suite_report
            suite_report.assemble(out, os.environ.get("FASTDIFF_SUITE_WORK"))
        except Exception as exc:  # the report must never cost a measurement
            print(f"[results.md not reassembled: {error_text(exc)}]", file=sys.stderr)


def fmt_time(sec: Optional[float]) -> str:
    if sec is None:
        return "-"
    if sec < 1e-3:
        return f"{sec * 1e6:.1f} µs"
    if sec < 1.0:
        return f"{sec * 1e3:.2f} ms"
    return f"{sec:.2f} s"


def pick_device(name: Optional[str], dry: bool = False) -> torch.device:
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dry and device.type == "cpu":
        # The dry run's tensors are tiny: a second intra-op thread only waits, and on a shared
        # 2-core machine a descheduled one stalls every op (tests/conftest.py does the same).
        torch.set_num_threads(1)
    return device


def add_suite_args(p: argparse.ArgumentParser, name: str) -> None:
    """The options every bench_gpu_*.py script takes from run_gpu_suite.sh."""
    p.add_argument("--device", default=None)
    p.add_argument("--dry", action="store_true",
                   help="tiny sizes, short timings, no torch.compile unless --compile-mode is given: checks "
                        "the script (on a CPU: every variant's code path, no figure worth keeping)")
    p.add_argument("--deadline", type=float, default=None,
                   help="epoch seconds by which to be done: what no longer fits becomes a 'skipped' row")
    p.add_argument("--budget", type=float, default=None, help="seconds from now (an alternative to --deadline)")
    p.add_argument("--out", default=None, help=f"directory for {name}.json and results.md")


if __name__ == "__main__":
    if sys.argv[1:] == ["--source-hash"]:
        print(source_hash())
    else:
        sys.exit("usage: bench_gpu_common.py --source-hash")
