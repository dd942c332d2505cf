"""AdamW with global-norm clipping and a warmup + decay learning-rate schedule."""

from __future__ import annotations

import jax
import optax


def make_schedule(optim, total_steps: int) -> optax.Schedule:
  decay = (optim.decay_steps or total_steps)
  warm = min(optim.warmup_steps, decay)
  peak, end = optim.lr, optim.lr * optim.min_lr_ratio
  if optim.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif optim.schedule == "linear":
    after = optax.linear_schedule(peak, end, max(decay - warm, 1))
  else:
    after = optax.cosine_decay_schedule(peak, max(decay - warm, 1), alpha=optim.min_lr_ratio)
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping then AdamW; weight decay only on matrices (not norms)."""
  schedule = make_schedule(optim, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm > 0 else optax.identity(),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                  mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
  return tx, schedule
