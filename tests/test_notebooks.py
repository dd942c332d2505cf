"""Every code cell of the notebooks runs, in order, in one namespace (so they stay true)."""

import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  cells = json.loads(path.read_text())["cells"]
  namespace = {}
  for i, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
    exec(compile("".join(cell["source"]), f"{path.name}[code cell {i}]", "exec"), namespace)
  if path.name == "quickstart.ipynb":
    losses = [r["loss"] for r in namespace["records"] if "loss" in r]
    assert losses[-1] < losses[0] - 1.0  # the short training run learns
    assert len(namespace["new"]) == 24 and namespace["prompt"][0] == 1
