"""The README's quick start runs as written, and its commands are the ones CI uses."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _block_after(marker: str, lang: str) -> str:
    text = README.read_text()
    i = text.index(marker)
    m = re.compile(r"```" + lang + r"\n(.*?)```", re.S).search(text, i)
    assert m, f"no ```{lang} block after {marker!r}"
    return m.group(1)


def test_quickstart_runs():
    code = _block_after("<!-- quickstart", "python")
    assert len(code.strip().splitlines()) <= 12, "the quick start should stay about ten lines"
    exec(compile(code, "README.md quickstart", "exec"), {"__name__": "readme"})


def test_two_setup_commands():
    text = README.read_text()
    setup = text[text.index("## Set up"):text.index("## Quick start")]
    commands = [ln for ln in re.findall(r"```bash\n(.*?)```", setup, re.S)]
    assert len(commands) == 2, "the README has exactly two set-up commands"
    assert all(c.strip().startswith("pip install torch==2.13.0") for c in commands)
    ci = (README.parent / ".ci" / "run").read_text()
    assert "test-command" in ci and "<!-- test-command" in setup


@pytest.mark.parametrize("line", ["pip install -e \".[test]\"", "python -m pytest"])
def test_test_command_installs_and_runs_tests(line):
    assert line in _block_after("<!-- test-command", "bash")
