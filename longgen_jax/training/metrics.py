"""metrics.jsonl + TensorBoard, written by the first host."""

from __future__ import annotations

import json
import os

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
      with open(self.path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
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
