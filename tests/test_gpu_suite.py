"""The GPU suite's own machinery, on the CPU (its dry mode): a failing variant becomes an error
row and the table goes on, a passed deadline turns the rest into skipped rows, results.md is
assembled from what was measured, and the pytest outcome is read from a cut-off log.

The suite runs on a GPU machine lent rarely and briefly, so these are the parts that must work
the first time there; the benchmarks' figures themselves are not tested (benchmarks are not tests).
"""
import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

import fastdiff

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu_common as common  # noqa: E402
import bench_gpu_step as step  # noqa: E402
import suite_report  # noqa: E402

TINY = [("tiny 1x3x5x7", (1, 3, 5, 7))]


def _args(**kw):
    base = dict(dtypes=["fp32"], min_time=0.002, compile_mode="none", no_compile_reason="dry run (test)",
                compile_guess=30.0)
    base.update(kw)
    return argparse.Namespace(**base)


def _bench(tmp_path, families, deadline=None, name="step"):
    tab = common.Table("test table", ["size", "dtype", "family", "op", "time", "GB/s", "% copy", "time / fused",
                                      "first call"], {"device": "cpu"})
    tab.autosave(str(tmp_path), name)
    bench = step.StepBench(_args(), families, torch.device("cpu"), tab, common.Deadline(deadline),
                           diffusers=None, diffusers_missing="diffusers not importable (test)")
    return bench, tab


def _broken_fused(ctx, b):
    raise RuntimeError("kernel launch failed: grid too large (test)")


def test_families_cover_the_vp_variants_that_exist():
    names = " | ".join(f.name for f in step.FAMILIES)
    for word in ("ddim eta=0", "ddpm, noise in-kernel", "ocm"):
        assert word in names
    for fam in step.FAMILIES:  # each family has a diffusers step or says why not
        assert fam.diffusers is not None or fam.no_diffusers


def test_a_failing_variant_is_an_error_row_and_the_table_goes_on(tmp_path):
    ddim = step.FAMILIES[0]
    broken = step.Family("broken", ddim.sampler, fused=_broken_fused, eager=ddim.eager, no_diffusers="test family")
    bench, tab = _bench(tmp_path, [broken, ddim])
    counts = bench.run([(TINY, False), (TINY, True)])
    rows = {(r[2], r[3]): r[4] for r in tab.rows}
    assert rows[("broken", "fastdiff fused")] == "error: RuntimeError: kernel launch failed: grid too large (test)"
    # the rest of the broken family, and the next family, were still measured
    assert rows[("broken", "eager torch ops")].endswith("µs")
    assert rows[("ddim eta=0", "fastdiff fused")].endswith("µs")
    assert rows[("ddim eta=0", "diffusers")].startswith("skipped: diffusers not importable")
    assert rows[("ddim eta=0", "torch.compile")] == "skipped: dry run (test)"
    assert counts["error"] == 1 and counts["ok"] == 4  # copy, broken eager, ddim fused and eager
    # every row reached the files: the json's records and results.md
    data = json.loads((tmp_path / "step.json").read_text())
    assert [r["status"] for r in data["records"] if "status" in r].count("error") == 1
    assert "kernel launch failed" in (tmp_path / "results.md").read_text()


def test_injected_failure_through_the_script(tmp_path, monkeypatch):
    """The dry mode of the real script with FASTDIFF_SUITE_INJECT: the ddpm fused row fails, the
    script says so in its exit status, and every other row is there."""
    monkeypatch.setenv("FASTDIFF_SUITE_INJECT", "error:step/*/ddpm*/fastdiff fused")
    # importing diffusers costs ~5 s here; its rows are not what this test is about
    monkeypatch.setattr(step, "import_diffusers", lambda: (None, "diffusers not imported (test)"))
    rc = step.main(["--dry", "--dtypes", "fp32", "--sizes", "dry 1x3x5x7", "--out", str(tmp_path)])
    assert rc == 1
    recs = json.loads((tmp_path / "step.json").read_text())["records"]
    failed = [r for r in recs if r.get("status") == "error"]
    assert len(failed) == 1 and failed[0]["family"].startswith("ddpm") and "injected failure" in failed[0]["reason"]
    measured = {(r["family"], r["op"]) for r in recs if "seconds" in r}
    assert ("ddpm, noise in-kernel", "eager torch ops") in measured
    assert any(f.startswith("ocm") and op == "fastdiff fused" for f, op in measured)
    with pytest.raises(ValueError, match="must be 'error:PATTERN' or 'hang:PATTERN'"):
        monkeypatch.setenv("FASTDIFF_SUITE_INJECT", "boom:*")
        common._inject("x")


def test_past_deadline_skips_rows_with_the_reason(tmp_path):
    bench, tab = _bench(tmp_path, step.FAMILIES[:1], deadline=0.0)
    counts = bench.run([(TINY, False)])
    assert counts["ok"] == 0 and counts["error"] == 0
    assert all(r[4].startswith("skipped: phase deadline") or r[4].startswith("skipped: diffusers") for r in tab.rows)


def test_compile_that_would_pass_the_deadline_is_skipped(tmp_path):
    import time
    bench, tab = _bench(tmp_path, step.FAMILIES[:1], deadline=time.time() + 20)
    bench.args.compile_mode = "max-autotune-no-cudagraphs"
    bench.run([(TINY, True)])  # the guessed 30 s compile does not fit in 20 s: nothing is compiled
    (cell,) = [r[4] for r in tab.rows]
    assert cell.startswith("skipped: phase deadline") and "a compile is guessed at 30 s" in cell


def test_compile_estimate_follows_the_last_compile():
    assert common.compile_estimate([], 30.0) == 30.0
    assert common.compile_estimate([17.0, 1.0], 30.0) == 1.5


def test_results_md_from_a_cut_off_run(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "setup.md").write_text("started now; commit abc1234\n")
    (work / "phases.tsv").write_text("setup\tok\t20\t\ntests\trunning\t0\tcap 100s\ntests\tFAILED\t80\tpytest exit 1\n"
                                     "step\trunning\t0\tcap 110s\n")
    (work / "tests.log").write_text(
        "tests/test_graphs.py::test_a PASSED [ 10%]\n"
        "tests/test_graphs.py::test_b FAILED [ 20%]\n"
        "tests/test_vp_step.py::test_big SKIPPED (needs a CUDA device) [ 30%]\n"
        "FAILED tests/test_graphs.py::test_b - Failed: Timeout >60.0s\n"
        "SKIPPED [1] tests/test_vp_step.py:357: needs a CUDA device\n")
    tab = common.Table("Step kernel", ["size", "op", "time"], {"device": "cpu"})
    tab.autosave(str(tmp_path), "step")
    tab.add(["16M", "copy", "1.0 ms"])
    tab.add_status(["16M", "fastdiff fused"], "error: RuntimeError: boom")
    text = suite_report.assemble(tmp_path, work).read_text()
    assert "| tests | FAILED | 80 | pytest exit 1 |" in text
    assert "**Incomplete**: phase step was still running" in text
    assert "pytest printed no summary line" in text and "1 failed, 1 passed, 1 skipped" in text
    assert "| `tests/test_graphs.py::test_b` | FAILED | Failed: Timeout >60.0s |" in text
    assert "1 × needs a CUDA device" in text
    assert "| 16M | fastdiff fused | error: RuntimeError: boom |" in text
    # a table cell never breaks the markdown table
    assert common._cell("a|b\nc") == "a\\|b c"


@pytest.mark.parametrize("fam", step.FAMILIES, ids=lambda f: f.name)
def test_eager_rows_compute_the_fused_update(fam, monkeypatch):
    """The 'eager torch ops' (and torch.compile) rows time the same update as the fused row: with
    the noise set to zero both give the step's mean (fp32, random inputs, an odd shape)."""
    ctx = step.make_context(fam, torch.device("cpu"), "torch", None)
    b = step.make_buffers(fam, (2, 3, 5, 7), torch.float32, torch.device("cpu"), 1)[0]
    kw = {"var_mode": "ocm", "aux": b["h"]} if "h" in fam.inputs else {}
    if "h0" in fam.inputs:  # a multistep family: history tensors h0, h1, ... on the flow path
        kw.update(history=tuple(b[k] for k in fam.inputs if k[0] == "h"), prediction_type="flow_prediction")
    if "cond" in fam.inputs:  # the guided DDIM families draw no noise: their own fused call is the mean
        mean = fam.fused(ctx, b).clone()
    else:
        mean = fastdiff.step(b["x"], b["eps"], ctx.table, ctx.step, backend="torch", **kw)
    monkeypatch.setattr(torch, "randn_like", lambda t, **k: torch.zeros_like(t, **k))
    eager = fam.eager(ctx.coef, *step.tensors_of(fam, b))
    torch.testing.assert_close(eager, mean, rtol=1e-5, atol=1e-5)
