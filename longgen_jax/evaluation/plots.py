"""The evaluation's pictures: a pass-key heatmap and a loss-by-position curve, as PNG files.

matplotlib draws off-screen (Agg), so this works on headless machines and in CI; nothing here
computes results, it only draws the dicts passkey_grid and loss_by_position return.
"""

from __future__ import annotations

import numpy as np

from longgen_jax.evaluation.common import format_length


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def passkey_heatmap(res: dict, path: str, title: str | None = None) -> str:
  """Depth (rows) x length (columns) accuracy, the number in each cell; a dashed line marks the
  training length when the result records one."""
  plt = _pyplot()
  acc = np.asarray(res["accuracy"]).T  # [depths, lengths]
  lengths, depths = res["lengths"], res["depths"]
  fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 2.2, 0.6 * len(depths) + 1.8))
  im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
  for j in range(acc.shape[0]):
    for i in range(acc.shape[1]):
      ax.text(i, j, f"{acc[j, i]:.2f}", ha="center", va="center", fontsize=9)
  ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
  ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("needle depth")
  train_len = res.get("checkpoint_max_seq_len")
  if train_len and any(n > train_len for n in lengths):
    ax.axvline(sum(n <= train_len for n in lengths) - 0.5, color="k", ls="--", lw=1)
  what = f"pass-key accuracy, {res['samples']} samples per cell"
  ax.set_title(f"{title}\n{what}" if title else what, fontsize=10)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def loss_by_position_plot(res: dict, path: str, title: str | None = None) -> str:
  """Mean loss (left axis) and perplexity (right axis) per position bucket, bucket centres on x."""
  plt = _pyplot()
  b = res["buckets"]
  x = [(r["start"] + r["end"]) / 2 for r in b]
  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  ax.plot(x, [r["loss"] for r in b], "o-", color="C0")
  ax.set_xlabel("position (bucket centre)")
  ax.set_ylabel("mean token loss (nats)", color="C0")
  twin = ax.twinx()
  twin.plot(x, [r["ppl"] for r in b], alpha=0)  # same curve, so the right axis reads as perplexity
  lo, hi = ax.get_ylim()
  twin.set_ylim(np.exp(lo), np.exp(hi))
  twin.set_yscale("log")
  twin.set_ylabel("perplexity")
  train_len = res.get("checkpoint_max_seq_len")
  if train_len and train_len < res["seq_len"]:
    ax.axvline(train_len, color="k", ls="--", lw=1, label="training length")
    ax.legend(loc="upper left", fontsize=8)
  what = f"loss by position, {res['docs']} documents"
  ax.set_title(f"{title}\n{what}" if title else what, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
