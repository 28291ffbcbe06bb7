"""Assembles $OUT/results.md for run_gpu_suite.sh: the run's header, one line per phase, the
GPU tests' outcome, and every benchmark table so far (from step.json, loop.json, e2e.json).

It is rewritten after every phase, in the suite's exit trap, and by the benchmarks after every
row (bench_gpu_common.Table.save), so whatever moment the call is cut off at, results.md holds
what had been measured. Standard library only: it must work when torch does not import.

    python benchmarks/suite_report.py --out OUT [--work WORK]

WORK is the suite's scratch folder (not brought back from the GPU machine): setup.md (the
environment lines written by the shell), phases.tsv (name, status, seconds, note; the last
line of a phase wins) and tests.log (pytest's output).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Dict, List, Optional

BENCHMARKS = ("step", "loop", "e2e")  # the order of the phases and of their tables
_OUTCOME = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_SUMMARY = re.compile(r"^=+ (.*\d+ (passed|failed|skipped|error|errors|deselected).*) =+$")
_SHORT = re.compile(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$")
_SKIP = re.compile(r"^SKIPPED \[(\d+)\] (\S+?):(?:\d+:)? (.*)$")  # -rs: "SKIPPED [3] tests/x.py:12: reason"


def _phases(work: Optional[Path]) -> List[List[str]]:
    if work is None or not (work / "phases.tsv").is_file():
        return []
    last: Dict[str, List[str]] = {}
    for line in (work / "phases.tsv").read_text().splitlines():
        cols = line.split("\t")
        if len(cols) >= 3:
            last[cols[0]] = (cols + [""])[:4]
    return list(last.values())


def tests_section(log: str) -> List[str]:
    """The outcome of the pytest phase from its -v output: the summary line when pytest got to
    print it, else counts from the per-test lines (pytest was cut off)."""
    outcomes: Dict[str, str] = {}
    reasons: Dict[str, str] = {}
    summary = None
    skip_reasons: Dict[str, int] = {}
    for line in log.splitlines():
        m = _SKIP.match(line)
        if m:
            skip_reasons[m.group(3)] = skip_reasons.get(m.group(3), 0) + int(m.group(1))
        m = _OUTCOME.match(line)
        if m:
            outcomes[m.group(1)] = m.group(2)
        m = _SHORT.match(line)
        if m:
            reasons[m.group(2)] = (m.group(3) or "").strip()
        m = _SUMMARY.match(line.strip())
        if m:
            summary = m.group(1)
    counts: Dict[str, int] = {}
    for v in outcomes.values():
        counts[v] = counts.get(v, 0) + 1
    out = ["## GPU tests (`pytest -m gpu`)", ""]
    if summary:
        out.append(f"pytest: **{summary}**")
    else:
        out.append("pytest printed no summary line (cut off or not run); per-test lines so far: "
                   + (", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items())) or "none"))
    bad = [k for k, v in outcomes.items() if v in ("FAILED", "ERROR")] + [k for k in reasons if k not in outcomes]
    if bad:
        out += ["", "| test | outcome | reason |", "|---|---|---|"]
        for k in dict.fromkeys(bad):
            reason = (reasons.get(k, "") or "see suite.log").replace("|", "\\|")
            out.append(f"| `{k}` | {outcomes.get(k, 'FAILED')} | {reason} |")
    if skip_reasons:
        by_count = sorted(skip_reasons.items(), key=lambda kv: -kv[1])
        out += ["", "skipped: " + "; ".join(f"{n} × {r}" for r, n in by_count)]
    return out + [""]


def assemble(out_dir, work_dir=None) -> Path:
    out = Path(out_dir)
    work = Path(work_dir) if work_dir else None
    lines = ["# fastdiff GPU suite: results", ""]
    if work is not None and (work / "setup.md").is_file():
        lines += [(work / "setup.md").read_text().rstrip(), ""]
    phases = _phases(work)
    if phases:
        lines += ["## Phases", "", "| phase | status | seconds | note |", "|---|---|---|---|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in p) + " |" for p in phases]
        running = [p[0] for p in phases if p[1] == "running"]
        if running:
            lines += ["", f"**Incomplete**: phase {', '.join(running)} was still running when this file was "
                          "last written (cut off, or assembled mid-phase): its table below is partial."]
        lines.append("")
    if work is not None and (work / "tests.log").is_file():
        lines += tests_section((work / "tests.log").read_text(errors="replace"))
    for name in BENCHMARKS:
        path = out / f"{name}.json"
        if not path.is_file():
            continue
        try:
            lines += [json.loads(path.read_text())["markdown"].rstrip(), ""]
        except Exception as exc:  # a half-written file from an older version: say so, keep the rest
            lines += [f"### {name}: {path.name} unreadable ({type(exc).__name__}: {exc})", ""]
    target = out / "results.md"
    tmp = out / ".results.md.tmp"
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    tmp.replace(target)
    return target


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--work", default=None)
    a = p.parse_args()
    print(assemble(a.out, a.work))
