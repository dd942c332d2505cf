"""Tiny LongGen run on CPU (~40 s on 2 idle CPU cores): 3 layers, 1 full + 2 sink_window(4,28), synthetic data.

python -m longgen_jax.train --config=configs/tiny.py --workdir=workdir/tiny
"""

from longgen_jax.training import default_config


def get_config():
  c = default_config()
  c.total_steps = 300
  c.seq_len = 256
  c.batch_size = 8
  c.model.preset = "tiny"           # 3 layers: sparse, full, sparse
  c.model.compute_dtype = "float32"  # CPUs have no fast bf16 matmuls
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 20
  c.optim.decay_steps = 300          # fixed (not total_steps) so a shorter run can be extended exactly
  c.optim.weight_decay = 0.0
  c.loss_chunk = 0
  c.data.synthetic.num_docs = 4000
  c.data.synthetic.max_chars = 2000
  c.data.eval_docs = 32
  c.eval_every = 100
  c.eval_batches = 2
  c.checkpoint_every = 100
  return c
