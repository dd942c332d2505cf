"""LongGen on Llama-2-70B at 128K: 30 full layers in the middle, 50 sink_window(64,1984) layers.

Needs many accelerators (e.g. 64 H100s or a TPU v5p-128): parameters and AdamW state are sharded
over the fsdp axis; run one process per host (`python -m longgen_jax.train --distributed ...`).
One 128K-token sequence of 70B activations does not fit one device even with remat, so each
sequence is also split over the context axis (context parallelism: mesh.context > 1). Not run here:
a plan until the scale-out issue measures it. The mesh is the one docs/scaling.md checked ahead of
time on 64 TPU v5p chips: fsdp 8 x context 8 with 8 sequences per micro-batch, 66.4 GiB per chip
(fsdp 16 x context 4 needed 112.5 GiB).
"""

import os

from longgen_jax.training import load_config_file

_LONGGEN_7B = os.path.join(os.path.dirname(__file__), "llama2_7b_longgen_128k.py")


def get_config():
  c = load_config_file(_LONGGEN_7B)
  c.init_from = "checkpoints/llama2-70b"
  c.data.tokenizer = "checkpoints/llama2-70b-hf"
  c.model.preset = "llama2_70b"
  c.model.num_full_layers = 30
  c.batch_size = 16                   # 2M tokens per step; batch_size / grad_accum divides over data x fsdp
  c.grad_accum = 2                    # 8 sequences per micro-batch: one per fsdp shard
  c.mesh.fsdp = 8
  c.mesh.context = -1                 # the rest of the devices split each sequence
  c.optim.lr = 1e-5
  return c
