"""LongGen on Llama-2-7B at 128K: 12 full layers in the middle, 20 sink_window(64,1984) layers.

Continual pretraining from converted Hugging Face weights (see docs/training.md):
  python -m longgen_jax.convert hf-to-jax --hf-dir /data/Llama-2-7b-hf --out checkpoints/llama2-7b
  python -m longgen_jax.train --config=configs/llama2_7b_longgen_128k.py --workdir=workdir/7b_longgen \
      --config.init_from=checkpoints/llama2-7b --config.data.paths='data/long/*.jsonl' \
      --config.data.tokenizer=/path/to/Llama-2-7b-hf
~5B tokens: 8 sequences x 128K tokens x 5000 steps (the paper's budget).
"""

from longgen_jax.training import default_config


def get_config():
  c = default_config()
  c.init_from = "checkpoints/llama2-7b"
  c.seq_len = 131072
  c.batch_size = 8                    # 1M tokens per step
  c.grad_accum = 1
  c.total_steps = 5000
  c.model.preset = "llama2_7b"        # used only without init_from
  c.model.num_full_layers = 12        # LongGen: 12 of 32 layers keep full attention ...
  c.model.placement = "middle"        # ... stacked in the middle
  c.model.sparse_spec = "sink_window(64,1984)"   # AttnSink; "block_sparse(64,16,64)" scores about the same
  c.model.rope_theta = 5_000_000.0    # larger RoPE base for 128K (Llama-2 was trained with 10K at 4K)
  c.model.compute_dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"              # activations of 128K tokens do not fit otherwise
  c.loss_chunk = 4096
  c.optim.lr = 2e-5
  c.optim.min_lr_ratio = 1.0          # constant after warmup, the usual context-extension recipe
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.0
  c.data.source = "jsonl"
  c.data.paths = "data/long/*.jsonl"
  c.data.tokenizer = "checkpoints/llama2-7b-hf"   # HF tokenizer dir (tokenizer.json) or tokenizer.model
  c.data.upsample_factor = 3          # LongGen's data recipe: long documents seen more often
  c.data.upsample_min_tokens = 32768
  c.data.eval_docs = 256
  c.mesh.data = 1
  c.mesh.fsdp = -1                    # shard params + AdamW state over all devices (one whole 128K sequence
                                      # per device; docs/scaling.md gives meshes that fit: e.g. fsdp 4 x
                                      # context 2 on 8 GPUs, context 4 on 4 as measured)
  c.eval_every = 250
  c.eval_batches = 8
  c.log_every = 10
  c.checkpoint_every = 250
  c.keep_checkpoints = 2
  return c
