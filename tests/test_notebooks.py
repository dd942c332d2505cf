"""Every code cell of the notebooks runs, in order, in one namespace (so they stay true)."""

import json
import pathlib

import numpy as np
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("MPLBACKEND", "Agg")  # plt.show() must not open windows
  monkeypatch.setenv("REPRO_NOTEBOOK_STEPS", "2")  # reproduction.ipynb re-runs the CPU set at this size
  cells = json.loads(path.read_text())["cells"]
  namespace = {}
  for i, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
    exec(compile("".join(cell["source"]), f"{path.name}[code cell {i}]", "exec"), namespace)
  if path.name == "quickstart.ipynb":
    losses = [r["loss"] for r in namespace["records"] if "loss" in r]
    assert losses[-1] < losses[0] - 1.0  # the short training run learns
    assert len(namespace["new"]) == 24 and namespace["prompt"][0] == 1
  if path.name == "reproduction.ipynb":
    try:
      _check_reproduction_notebook(namespace)
    finally:
      namespace["plt"].close("all")
  if path.name == "patterns.ipynb":
    try:
      _check_patterns_notebook(namespace)
    finally:
      namespace["plt"].close("all")


def _reference_mask(spec, T, head, num_kv_heads):
  """bool[T, T] written from the rules in DESIGN.md, independently of the package's predicate."""
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  if spec.kind == "full":
    rule = np.ones((T, T), bool)
  elif spec.kind == "sink_window":
    rule = (j < spec.sink) | (i - j < spec.window)
  else:
    b, V = spec.block_size, spec.vert_stride
    s = 0 if spec.homo_head else max(1, V // num_kv_heads)
    rule = (i // b - j // b < spec.local_blocks) | ((j // b + head * s) % V == 0)
  return (j <= i) & rule


def _drawn(ax):
  return np.asarray(ax.images[0].get_array())


def _check_patterns_notebook(ns):
  T, K, tile = ns["T"], ns["KV_HEADS"], ns["TILE"]
  panels, masks, tiles = ns["panels"], ns["masks"], ns["tiles"]
  assert {spec.kind for spec, _ in panels} == {"full", "sink_window", "block_sparse"}
  # (1) each mask picture is the pattern rule; the two block_sparse kv heads differ (stride phases).
  for (spec, head), mask, ax in zip(panels, masks, ns["mask_fig"].axes):
    np.testing.assert_array_equal(mask, _reference_mask(spec, T, head, K), err_msg=f"{spec} head {head}")
    np.testing.assert_array_equal(_drawn(ax), mask)
  assert not np.array_equal(masks[2], masks[3])
  # (2) a tile is skipped iff it has no allowed pair and full iff every pair is allowed.
  skipped, partial, full = ns["SKIPPED"], ns["PARTIAL"], ns["FULL"]
  for (spec, head), mask, states, ax in zip(panels, masks, tiles, ns["tile_fig"].axes):
    blocks = mask.reshape(T // tile, tile, T // tile, tile)
    expected = np.where(blocks.all((1, 3)), full, np.where(blocks.any((1, 3)), partial, skipped))
    np.testing.assert_array_equal(states, expected, err_msg=f"{spec} head {head}")
    np.testing.assert_array_equal(_drawn(ax), states)
    if not spec.is_full:
      assert {skipped, partial} <= set(np.unique(states).tolist())
  # (3) Llama-2-7B: 12 of 32 layers full, in the middle (layers 10..21) for the preset.
  rows = ns["full_rows"]
  assert list(ns["placements"]) == ["middle", "top", "bottom", "interleaved"]
  assert rows.shape == (4, 32) and (rows.sum(1) == 12).all()
  assert np.flatnonzero(rows[0]).tolist() == list(range(10, 22))
  assert np.flatnonzero(rows[1]).tolist() == list(range(20, 32))
  assert np.flatnonzero(rows[2]).tolist() == list(range(12))
  np.testing.assert_array_equal(_drawn(ns["layer_fig"].axes[0]), rows)
  # (4) KV bytes at 128K: full layers keep 131072 positions, sink_window(64,1984) layers 2048;
  # k and v, kv heads x 128 dims, bfloat16. The saving is the paper's ~62% (69.2 GB -> 26.5 GB).
  for name, kv_heads, layers, n_full in [("llama2_7b", 32, 32, 12), ("llama2_70b", 8, 80, 30)]:
    per_position = 2 * kv_heads * 128 * 2
    r = ns["kv_128k"][name]
    assert r["all_full"] == layers * 131072 * per_position
    assert r["total"] == (n_full * 131072 + (layers - n_full) * 2048) * per_position
    assert 0.61 < r["saving"] < 0.62 and abs(r["saving"] - ns["paper_saving"]) < 0.005
    curve = {line.get_label(): line for line in ns["kv_fig"].axes[0].lines}[f"{name}, LongGen"]
    x, y = curve.get_data()
    assert y[list(x).index(131072)] == r["total"] / 1e9


def _check_reproduction_notebook(ns):
  """The recorded curves are the committed per-seed pass-key results (recounted from each seed's
  passkey.json, averaged over seeds; the per-seed plot has one dot per seed), and the re-run produced the
  two variants' jobs at the notebook's size."""
  for recorded, summary, fig in ((ns["RECORDED"], ns["summary"], ns["accuracy_fig"]),
                                 (ns["CONVERTED"], ns["converted_summary"], ns["converted_fig"]),
                                 (ns["CONVERTED_3000"], ns["converted_3000_summary"], ns["converted_3000_fig"]),
                                 (ns["GPU_TINY"], ns["gpu_tiny_summary"], ns["gpu_tiny_fig"])):
    lines = fig.axes[0].lines
    for row in summary["variants"]:
      per_seed = []
      for seed in row["seeds"]:
        cells = json.loads((recorded / row["variant"] / f"seed{seed}" / "passkey.json").read_text())["cells"]
        by_length = {}
        for c in cells:
          by_length.setdefault(c["length"], []).append(c["hits"] / c["samples"])
        per_seed.append([np.mean(by_length[n]) for n in summary["lengths"]])
      recount = np.mean(per_seed, axis=0)
      np.testing.assert_allclose(row["accuracy_by_length"], recount)
      assert any(np.allclose(line.get_ydata(), recount) for line in lines), row["variant"]
  gpu_rows = ns["gpu_tiny_summary"]["variants"]
  assert all(row["seeds"] == [0, 1, 2] for row in gpu_rows)
  dots = [line.get_ydata() for line in ns["gpu_tiny_seeds_fig"].axes[0].lines]
  assert len(dots) == len(gpu_rows) and all(len(d) == 3 for d in dots)
  for row, d in zip(gpu_rows, dots):   # each seed's mean over all cells, from its own result.json
    means = [json.loads((ns["GPU_TINY"] / row["variant"] / f"seed{s}" / "result.json").read_text())["passkey"]
             ["mean_accuracy"] for s in row["seeds"]]
    np.testing.assert_allclose(d, means)
  assert len(ns["heatmap_fig"].axes) == len(ns["results"]) == len(ns["summary"]["variants"]) >= 2
  assert set(ns["converted"]) == {"all_full", "hybrid_third_middle", "all_sparse_sink"}
  assert all(runs[0]["pretrain"]["steps"] == 1500 for runs in ns["converted"].values())
  assert {"all_full", "hybrid_third_middle", "hybrid_third_bottom", "hybrid_third_top", "hybrid_third_interleaved",
          "hybrid_sixth_middle"} <= set(ns["converted_3000"])
  assert all(runs[0]["steps"] == 3000 for runs in ns["converted_3000"].values())
  assert len(ns["gpu_tiny"]) == 10 and all(runs[0]["steps"] == 3000 for runs in ns["gpu_tiny"].values())
  assert len(ns["gpu_tiny_heatmaps"].axes) == 10
  assert set(ns["new_results"]) == {"all_full", "all_sparse_sink"}
  for runs in ns["new_results"].values():
    assert runs[0]["steps"] == 2 and runs[0]["passkey"]["lengths"] == [128, 256]
