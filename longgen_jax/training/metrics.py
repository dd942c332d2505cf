"""metrics.jsonl + TensorBoard, written by the first host."""

from __future__ import annotations

import json
import os
import sys

import jax


class MetricsWriter:
  """metrics.jsonl (one JSON object per logged step) + TensorBoard, on the first host only."""

  def __init__(self, workdir: str, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not self.enabled:
      return
    if os.path.exists(self.path):  # drop steps the resumed run will redo (logged after the checkpoint)
      keep = []
      with open(self.path) as f:
        for n, line in enumerate(f, 1):
          try:
            record = json.loads(line) if line.strip() else None
          except json.JSONDecodeError:  # a line torn by a crash mid-write
            print(f"[train] WARNING: dropped unreadable line {n} of {self.path}: {line[:80]!r}", file=sys.stderr)
            continue
          if record is not None and record.get("step", 0) <= resume_step:
            keep.append(json.dumps(record) + "\n")
      with open(self.path, "w") as f:
        f.writelines(keep)
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, record: dict):
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)) and v is not None:
        self.tb.add_scalar(k, v, record["step"])
    self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()
