"""Every notebook runs top to bottom without a cell error, in this interpreter's environment.

The kernel is pinned to the Python running the tests: a kernel spec written on the fly with
ipykernel's `write_kernel_spec` (argv = [sys.executable, -m, ipykernel_launcher, ...]) and
found first through JUPYTER_PATH, so a user-wide 'python3' spec pointing elsewhere cannot
take over. It works from a clean `pip install -e '.[test]'` (nbclient, nbformat, ipykernel).
Tiny data: sweep_report.ipynb reads a made-up sweep (tests/test_report.py's, 2 methods x
2 sizes x 3 seeds) and distill_step_by_step.ipynb trains for 2 steps.
"""
import pathlib
import sys

import nbclient
import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec

from tests.test_report import write_sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / 'notebooks').glob('*.ipynb'))
KERNEL = 'distill-test-python'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  write_kernel_spec(tmp_path / 'kernels' / KERNEL)
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path))
  write_sweep(str(tmp_path / 'sweep'))
  monkeypatch.setenv('DISTILL_SWEEP_DIR', str(tmp_path / 'sweep'))
  monkeypatch.setenv('DISTILL_NOTEBOOK_STEPS', '2')
  monkeypatch.setenv('WANDB_MODE', 'disabled')
  notebook = nbformat.read(path, as_version=4)
  notebook.cells.append(nbformat.v4.new_code_cell('import sys; print(sys.prefix)'))
  client = nbclient.NotebookClient(notebook, kernel_name=KERNEL, timeout=300,
                                   resources={'metadata': {'path': str(REPO)}})
  client.execute()   # raises CellExecutionError on the first failing cell
  # Same environment (a venv's prefix differs from its base interpreter's).
  assert notebook.cells[-1].outputs[0]['text'].strip() == sys.prefix
