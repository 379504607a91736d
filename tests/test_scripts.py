"""The repo's shell scripts parse, and no file carries merge-conflict markers (a merge once left them in
benchmarks/gpu_check.sh, which then failed on the GPU machine before running a step)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*ROOT.glob("benchmarks/*.sh"), ROOT / ".ci" / "run"])
SOURCES = [path for pattern in ("turboquant_hf/**/*.py", "benchmarks/*", "tests/*.py", "examples/*.py", "*.md",
                                "*.toml", ".ci/*") for path in ROOT.glob(pattern) if path.is_file()]
CONFLICT = re.compile(r"^(<{7} |={7}$|>{7} )", re.MULTILINE)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_shell_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_no_merge_conflict_markers():
    marked = [str(path.relative_to(ROOT)) for path in SOURCES
              if CONFLICT.search(path.read_text(encoding="utf-8", errors="replace"))]
    assert not marked, f"merge-conflict markers in {marked}"
