"""Every notebook runs top to bottom without a cell error, in this interpreter's environment.

The kernel is pinned to the Python running the tests: a kernel spec written on the fly with
ipykernel's `write_kernel_spec` (argv = [sys.executable, -m, ipykernel_launcher, ...]) and
found first through JUPYTER_PATH, so a user-wide 'python3' spec pointing elsewhere cannot
take over. It works from a clean `pip install -e '.[test]'` (nbclient, nbformat, ipykernel).
"""
import pathlib
import sys

import nbclient
import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / 'notebooks').glob('*.ipynb'))
KERNEL = 'distill-test-python'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  write_kernel_spec(tmp_path / 'kernels' / KERNEL)
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path))
  notebook = nbformat.read(path, as_version=4)
  notebook.cells.append(nbformat.v4.new_code_cell('import sys; print(sys.prefix)'))
  client = nbclient.NotebookClient(notebook, kernel_name=KERNEL, timeout=300,
                                   resources={'metadata': {'path': str(REPO)}})
  client.execute()   # raises CellExecutionError on the first failing cell
  # Same environment (a venv's prefix differs from its base interpreter's).
  assert notebook.cells[-1].outputs[0]['text'].strip() == sys.prefix
