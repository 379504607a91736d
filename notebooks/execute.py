"""Execute notebooks in place in a fresh kernel, offline on CPU, and save them with their outputs.

    python notebooks/execute.py                                # every notebook of this folder
    python notebooks/execute.py notebooks/02_how_turboquant_works.ipynb

Edit a notebook in Jupyter (or any editor), then run this and commit the .ipynb: the five take about
five minutes on 2 CPU cores. Cells run with notebooks/ as the working directory, as tests/test_notebooks.py
runs them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
CELL_TIMEOUT_S = 900  # notebook 03 runs one to three minutes of CPU in one cell


def execute(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Run every cell of ``notebook`` in a fresh python3 kernel; raises CellExecutionError on a failing cell."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # record_timing=False: no per-cell timestamps, so re-running changes only what the cells print.
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(HERE)}})
    return client.execute()


if __name__ == "__main__":
    for path in [Path(arg) for arg in sys.argv[1:]] or sorted(HERE.glob("*.ipynb")):
        nbformat.write(execute(nbformat.read(path, as_version=4)), path)
        print(f"{path.name}: {path.stat().st_size / 1024:.0f} KiB")
