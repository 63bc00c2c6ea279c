"""tutorial.ipynb: stored without outputs and small, and runs top to bottom in quick mode (tiny models,
a slice of Fashion-MNIST, CPU) drawing every figure, with the repository root as working directory."""
import os

import nbformat
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOK = os.path.join(ROOT, 'tutorial.ipynb')
# MAE reconstructions, teacher maps by layer x head, teacher maps by image, baselines, copy, distilled
# maps, all four curves, ensemble bars
FIGURES = 8


def test_stored_without_outputs_and_small():
    assert os.path.getsize(NOTEBOOK) < 1_000_000
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_runs_in_quick_mode(monkeypatch, tmp_path):
    monkeypatch.setenv('TUTORIAL_MODE', 'quick')            # the notebook's first cells read it
    monkeypatch.setenv('TMPDIR', str(tmp_path))             # its runs (tempfile.mkdtemp) land in pytest's tmp
    monkeypatch.delenv('TUTORIAL_DATA', raising=False)
    monkeypatch.delenv('MPLBACKEND', raising=False)         # the kernel's inline backend draws the figures
    for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS'):     # a small, shared machine
        monkeypatch.setenv(var, os.environ.get(var, '1'))
    for var in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):        # its scripts run as single processes
        monkeypatch.delenv(var, raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # any failing cell raises CellExecutionError with the cell's traceback
    NotebookClient(nb, timeout=900, kernel_name='python3', resources={'metadata': {'path': ROOT}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
    assert not [o for o in outputs if o.output_type == 'error']
    text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
    assert "MODE 'quick'" in text and 'max |difference|' in text
    figures = [o for o in outputs if 'image/png' in o.get('data', {})]
    assert len(figures) >= FIGURES, f'{len(figures)} figures drawn, expected {FIGURES}'
