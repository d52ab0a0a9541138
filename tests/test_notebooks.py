"""Every notebook runs top to bottom in its fast setting, and its .ipynb matches its .py source.

The jupytext percent-format `notebooks/NAME.py` is the source; `notebooks/NAME.ipynb` is
generated from it (`jupytext --to ipynb notebooks/NAME.py`) and committed so that Colab opens it.
"""
import glob
import os
import subprocess
import sys

import jupytext
import pytest

NOTEBOOKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "notebooks")
SOURCES = sorted(glob.glob(os.path.join(NOTEBOOKS_DIR, "*.py")))
IDS = [os.path.basename(path)[:-3] for path in SOURCES]


def _cells(notebook) -> list[tuple[str, str]]:
  return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_notebook_ipynb_is_generated_from_its_py_source(source):
  ipynb = source[:-3] + ".ipynb"
  assert os.path.exists(ipynb), f"{ipynb} missing: run jupytext --to ipynb {source}"
  assert _cells(jupytext.read(ipynb)) == _cells(jupytext.read(source)), (
      f"{ipynb} is out of sync with {source}: run jupytext --to ipynb {source}")


@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_notebook_runs_top_to_bottom_in_its_fast_setting(source, tmp_path):
  env = {**os.environ, "SPARSEJAX_FAST": "1", "MPLBACKEND": "Agg",
         "PYTHONPATH": os.pathsep.join([os.path.dirname(NOTEBOOKS_DIR),
                                        os.environ.get("PYTHONPATH", "")])}
  env.pop("XLA_FLAGS", None)  # one CPU device, as in Colab
  result = subprocess.run([sys.executable, source], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
