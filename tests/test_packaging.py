"""Packaging: the compiled module's absence is explained; no PyTorch headers in the extension."""
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_missing_extension_says_how_to_build(monkeypatch):
    import fastdiff
    import fastdiff._ext as ext
    monkeypatch.delattr(fastdiff, "_C")
    monkeypatch.setitem(sys.modules, "fastdiff._C", None)  # makes `from . import _C` fail
    with pytest.raises(ImportError, match=r"pip install -e \.") as err:
        importlib.reload(ext)
    assert "no-build-isolation" in str(err.value) and "C++17" in str(err.value)
    monkeypatch.delitem(sys.modules, "fastdiff._C")
    importlib.reload(ext)


def test_extension_does_not_use_torch_headers():
    src = (ROOT / "csrc" / "schedules.cpp").read_text()
    assert "torch/" not in src and "ATen" not in src
    setup = (ROOT / "setup.py").read_text()
    assert "torch" not in setup.split('"""', 2)[-1]  # setup.py code (not its docstring) never imports torch


def test_info_reports_backends():
    from fastdiff.info import report
    text = report()
    assert "fastdiff._C" in text and "triton" in text and "backend" in text
