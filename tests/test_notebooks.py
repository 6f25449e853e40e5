"""The notebooks run end to end (small settings) and are committed without outputs."""

import glob
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))


def test_there_are_notebooks_and_their_outputs_are_stripped():
    import nbformat

    assert len(NOTEBOOKS) == 4
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path} holds outputs"


def run_notebook(path, folder, monkeypatch) -> None:
    """Runs the notebook at `path` in `folder` with the small settings CI uses."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("CONVMIXER_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    ).execute()
    assert os.path.isdir(os.path.join(folder, "notebook_outputs"))


# The paper-table notebook runs in tests/test_paper_table.py, which checks the table it makes.
@pytest.mark.slow
@pytest.mark.parametrize(
    "path", [p for p in NOTEBOOKS if "04_the_paper" not in p], ids=os.path.basename
)
def test_notebook_runs(path, tmp_path, monkeypatch):
    run_notebook(path, tmp_path, monkeypatch)
