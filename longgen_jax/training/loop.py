"""The training loop: `train(cfg, workdir)` trains (or resumes) a run.

One jit-compiled step (gradient accumulation as a scan over micro-batches, chunked cross-entropy,
AdamW with fp32 master weights and bf16 compute), explicit shardings over a mesh, donated train
state; grain data; Orbax checkpoints that resume exactly. WORKDIR holds checkpoints/, metrics.jsonl,
TensorBoard events (tb/), config.json (the resolved config) and, at the end, model/ (the final
weights in the format generate/evaluate/convert read).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from longgen_jax.model.config import ModelConfig
from longgen_jax.parallel import mesh as sharding
from longgen_jax.parallel.runtime import HOST_MEMORY_ENV, enable_compile_cache, pinned_host_cap_gib
from longgen_jax.parallel.layout import padded_length, to_context_layout
from longgen_jax.training.config import build_model_config, changed_settings, context_strategy, validate_config
from longgen_jax.training.flops import peak_tflops, train_flops_per_token
from longgen_jax.training.optimizer import make_optimizer
from longgen_jax.training.state import init_state
from longgen_jax.training.step import compiled_memory, sharded_step
from longgen_jax.weights.format import is_checkpoint


class TrainingDiverged(RuntimeError):
  """Loss or gradient norm became NaN/inf; the last complete checkpoint is left as it was."""


@dataclasses.dataclass
class Run:
  """Everything a training run holds between steps (built by `prepare`)."""

  cfg: Any
  workdir: str
  model_config: ModelConfig
  mesh: Any                    # jax.sharding.Mesh: the step runs under jax.set_mesh(mesh)
  graphdef: Any
  state: dict
  start: int                   # last step already done (0 for a fresh run)
  step_fn: Callable            # compiled (state, batch) -> (state, metrics)
  eval_fn: Callable            # compiled (params, batch) -> (loss sum, tokens)
  to_device: Callable          # host batch -> global sharded batch
  train_iter: Any
  eval_ds: Any
  ckpt: Any
  writer: Any
  resolved: dict               # the config as saved with every checkpoint
  tokens_per_step: int
  flops_per_step: float
  peak_flops: float            # all devices, 0 when unknown


def train(cfg, workdir: str) -> list[dict]:
  """Trains (or resumes) in `workdir`; returns the records written to metrics.jsonl by this call
  (none for config.dry_run, which compiles the step, reports its memory and FLOPs, and stops)."""
  from tqdm import tqdm
  run = prepare(cfg, workdir)
  if run is None:
    return []
  records, times = [], []
  profiler = _Profiler(cfg.profile_steps, os.path.join(workdir, "profile"))
  stop = _StopRequest()
  # A live bar on a terminal; in a log file or CI one plain line every ~5% of the run instead.
  live = cfg.progress_bar and sys.stderr.isatty() and jax.process_index() == 0
  bar = tqdm(total=cfg.total_steps, initial=run.start, unit="step", dynamic_ncols=True, disable=not live)
  line_every = max(1, cfg.total_steps // 20)
  try:
    for step in range(run.start + 1, cfg.total_steps + 1):
      t0 = time.perf_counter()
      profiler.before(step)
      with out_of_memory_hint(cfg):
        run.state, m = run.step_fn(run.state, run.to_device(next(run.train_iter)))
        loss, gnorm = _finite_or_raise(run, step, m)
      profiler.after(step)
      times.append(time.perf_counter() - t0)
      tokens_per_s = f"{run.tokens_per_step / times[-1]:,.0f}"
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.3f}", tok_s=tokens_per_s)
      if not live and cfg.progress_bar and (step % line_every == 0 or step == cfg.total_steps):
        _log(f"step {step}/{cfg.total_steps}: loss {loss:.4f}, {tokens_per_s} tokens/s")
      evaluating = bool(run.eval_ds is not None and cfg.eval_every
                        and (step % cfg.eval_every == 0 or step == cfg.total_steps))
      if step % cfg.log_every == 0 or step == cfg.total_steps or evaluating:
        records.append(_record(run, step, m, loss, gnorm, float(np.mean(times)), evaluating, bar))
        times = []
      stopping = stop.requested()
      scheduled = cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.total_steps)
      if scheduled or stopping:
        run.ckpt.save(step, run.state, run.train_iter, run.resolved)
      if stopping:
        _log(f"SIGTERM: saved step {step}; run the same command again to resume")
        break
    run.ckpt.wait()
    model_dir, final_step = os.path.join(workdir, "model"), int(run.state["step"])
    if cfg.export_model and not stop.requested() and exported_step(model_dir) != final_step:
      export_model(run.graphdef, run.state["params"], model_dir, final_step)  # also redoes one a crash cut off
  finally:
    profiler.stop()
    stop.restore()
    bar.close()
    run.writer.close()
    run.ckpt.close()
  return records


def prepare(cfg, workdir: str) -> Run | None:
  """Validates the config, builds data, model and mesh, compiles the step, and builds the state
  (restored if a checkpoint exists). None for config.dry_run, after reporting memory and FLOPs."""
  from longgen_jax.data.pipeline import make_datasets
  from longgen_jax.data.tokenizer import load_tokenizer
  from longgen_jax.training.checkpoint import Checkpointer
  from longgen_jax.training.metrics import MetricsWriter

  validate_config(cfg)
  enable_compile_cache("" if cfg.dry_run_devices else cfg.compile_cache_dir)  # a mocked mesh's program runs nowhere
  os.makedirs(workdir, exist_ok=True)
  tokenizer = load_tokenizer(cfg.data.tokenizer)
  mc = build_model_config(cfg, tokenizer.vocab_size)
  planned = cfg.dry_run_devices  # devices this machine does not have (runtime.plan_for_devices): one process
  if planned and jax.device_count() != planned:
    raise ValueError(f"config.dry_run_devices={planned}, but this process has {jax.device_count()} devices: the "
                     "training CLI sets them up before JAX starts; in a notebook restart the kernel and call "
                     f"longgen_jax.parallel.runtime.plan_for_devices({planned}) first")
  mesh = sharding.make_mesh(**cfg.mesh)
  batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if (cfg.batch_size // cfg.grad_accum) % batch_ways:
    raise ValueError(f"config.batch_size / grad_accum = {cfg.batch_size // cfg.grad_accum} sequences per "
                     f"micro-batch cannot be split over mesh data x fsdp = {batch_ways} devices")
  context = mesh.shape["context"]
  rows = cfg.data.host_split == "rows" or bool(planned)  # every process packs the global batch, feeds its rows
  host_batch = cfg.batch_size if rows else cfg.batch_size // jax.process_count()
  train_ds, eval_ds = make_datasets(cfg.data, tokenizer, seq_len=cfg.seq_len, batch_size=host_batch,
                                    seed=cfg.seed, **(dict(shard_index=0, shard_count=1) if rows else {}))
  if context > 1:  # the load-balanced layout, once, on the host (stateless: iterator checkpoints unchanged)
    train_ds, eval_ds = (None if ds is None else ds.map(lambda b: to_context_layout(b, context))
                         for ds in (train_ds, eval_ds))
  train_iter = iter(train_ds)

  optimizer, schedule = make_optimizer(cfg.optim, cfg.total_steps)
  A, T = cfg.grad_accum, padded_length(cfg.seq_len, context)
  batch_shape = (A, cfg.batch_size // A, T)  # [micro-batches, sequences, tokens]
  steps = sharded_step(mc, cfg.model, optimizer, schedule, mesh, batch_shape=batch_shape,
                       loss_chunk=cfg.loss_chunk, segment_attention=cfg.model.segment_attention,
                       context=context_strategy(cfg))
  resolved = {"train": cfg.to_dict(), "model": mc.to_dict()}
  if not rows and jax.process_count() > 1:
    _check_process_rows(steps.batch_sharding, batch_shape)

  def to_device(batch):
    local = {k: v.reshape(A, host_batch // A, T) for k, v in batch.items()}
    return (sharding.whole_to_global if rows else sharding.host_to_global)(local, steps.batch_sharding)

  tokens_per_step = cfg.batch_size * cfg.seq_len  # real tokens (the layout may pad)
  flops_per_step = train_flops_per_token(mc, cfg.seq_len) * tokens_per_step
  _log(f"model: {mc.num_layers} layers ({mc.num_full_layers} full), {_count(steps.state['params']) / 1e6:.1f}M "
       f"params, pattern {[str(s) for s in mc.layer_specs]}; {tokens_per_step} tokens/step on "
       f"{jax.device_count()} {jax.devices()[0].device_kind} device(s)")
  t0 = time.perf_counter()
  with out_of_memory_hint(cfg):  # attention runs per shard of the mesh
    step_fn = steps.compile_train()
    eval_fn = steps.compile_eval() if eval_ds is not None and not cfg.dry_run else steps.eval
  compile_s = time.perf_counter() - t0
  _log(f"compiled train step in {compile_s:.1f}s")
  if cfg.dry_run:  # before any weight is loaded or checkpoint touched
    _report_dry_run(cfg, workdir, step_fn, flops_per_step, mesh, compile_s)
    return None

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints,
                      async_save=cfg.async_checkpoint)
  start, state, saved = ckpt.restore_newest(steps.state, train_iter, _log)
  if start is not None:
    changed = changed_settings(saved, resolved)
    if changed:
      _log(f"WARNING: resuming with changed settings {changed}; the run will not match an uninterrupted one")
    _log(f"resumed from step {start} in {ckpt.directory}")
  else:
    start = 0
    with jax.set_mesh(mesh):
      state = init_state(cfg, mc, optimizer, steps.state_shardings)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(resolved, f, indent=2)
  return Run(cfg, workdir, mc, mesh, steps.graphdef, state, start, step_fn, eval_fn, to_device, train_iter, eval_ds,
             ckpt, MetricsWriter(workdir, start), resolved, tokens_per_step, flops_per_step,
             (cfg.peak_tflops or peak_tflops() or 0.0) * 1e12 * jax.device_count())


def _check_process_rows(batch_sh, shape):
  """data.host_split='documents' feeds each process's own rows: its devices must hold whole sequences
  of a block of rows that no other process holds."""
  index = batch_sh.addressable_devices_indices_map(shape).values()
  rows = {idx[1].indices(shape[1])[:2] for idx in index}
  whole_sequences = all(idx[2].indices(shape[2])[:2] == (0, shape[2]) for idx in index)
  if not whole_sequences or sum(stop - start for start, stop in rows) * jax.process_count() != shape[1]:
    raise ValueError("config.data.host_split='documents' needs each process's devices to hold whole sequences of "
                     "their own rows (the context axis within a process, data x fsdp across processes); use "
                     "data.host_split='rows' for this mesh")


def _report_dry_run(cfg, workdir: str, compiled, flops_per_step: float, mesh, compile_s: float) -> None:
  """--dry_run: the per-device memory and FLOPs as one log line and as WORKDIR/dry_run.json (for ladders of
  lengths or meshes: benchmarks/multi_gpu_train.py), with the device's limit and whether the step fits."""
  memory = compiled_memory(compiled)
  _log(describe_compiled(memory, flops_per_step, mesh))
  if cfg.dry_run_devices:
    _log(f"planned for {cfg.dry_run_devices} devices on this machine's {jax.devices()[0].device_kind}"
         + (" (mocked GPUs: XLA's plan for the real GPUs, nothing ran)" if jax.default_backend() == "gpu" else
            " (host devices: the CPU compiler's plan, not a GPU's)"))
  host_cap = pinned_host_cap_gib(memory["host_temporaries"]) if memory.get("host_temporaries") else None
  if host_cap:
    _log(f"for the real run set {HOST_MEMORY_ENV}={host_cap} (GiB per GPU: the host memory above + 5% + 1 GiB): "
         f"XLA's pinned pool grows toward its cap (now {os.environ.get(HOST_MEMORY_ENV, '64')} GiB) before the "
         "first step")
  limit = _device_memory_limit()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "dry_run.json"), "w") as f:
      json.dump({"mesh": dict(mesh.shape), "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
                 "device_kind": jax.devices()[0].device_kind, "compile_s": compile_s,
                 "per_device_bytes": memory, "device_bytes_limit": limit,
                 "fits": None if limit is None else memory["total"] <= limit, "pinned_host_cap_gib": host_cap,
                 "planned_devices": cfg.dry_run_devices or None,
                 "model_flops_per_step": flops_per_step}, f, indent=1)


def describe_compiled(memory: dict, flops_per_step: float, mesh) -> str:
  """One line for --dry_run: the per-device memory of `compiled_memory` and the step's model FLOPs."""
  gb = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
  return (f"dry run on mesh {dict(mesh.shape)}: per device {gb(memory['arguments'])} arguments (weights, optimizer "
          f"state, batch) + {gb(memory['temporaries'])} temporaries + {gb(memory['new_outputs'])} new outputs = "
          f"{gb(memory['total'])}" + (f" (+ {gb(memory['host_temporaries'])} in host memory)"
                                       if memory.get("host_temporaries") else "")
          + f"; {flops_per_step / 1e12:.4g} model TFLOP per step")


def _device_memory_limit() -> int | None:
  """Bytes the allocator may use on one device (None where the backend does not say, e.g. CPU)."""
  return (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")


class OutOfDeviceMemory(ValueError):
  """A compile or step needed more device memory than there is; the message names the knobs."""


class out_of_memory_hint:  # noqa: N801  (a context manager used as `with out_of_memory_hint(cfg):`)
  """Turns XLA's RESOURCE_EXHAUSTED into one line that names what to change."""

  def __init__(self, cfg):
    self.cfg = cfg

  def __enter__(self):
    return self

  def __exit__(self, kind, error, tb):
    if error is not None and "RESOURCE_EXHAUSTED" in str(error):
      first = next((line for line in str(error).splitlines() if "RESOURCE_EXHAUSTED" in line), "")[:200]
      c = self.cfg
      if "Out of host memory" in first:
        raise OutOfDeviceMemory(
            f"out of pinned host memory for the offloaded activations ({first.strip()}); raise "
            f"{HOST_MEMORY_ENV} (now {os.environ.get(HOST_MEMORY_ENV, '64 (XLA default)')} GiB per GPU) if the "
            f"host has the memory, else use config.model.remat='full' with more devices in "
            f"config.mesh.context (now {c.mesh.context}) or a shorter config.seq_len={c.seq_len}") from None
      if "Failed to get configs" in first:   # XLA's autotuner: candidate kernels timed on the GPU ran out
        raise OutOfDeviceMemory(
            f"the GPU ran out of memory while XLA autotuned this step's kernels ({first.strip()}): the candidates "
            "run on the GPU at the step's per-device shapes, so another process holding its memory (a dry run "
            "beside a training, 2026-11-28) fails them; run on a GPU of its own, or, for a dry run, add "
            "--xla_gpu_autotune_level=0 to XLA_FLAGS (default kernel configs, no candidate timed on the GPU)") from None
      raise OutOfDeviceMemory(
          f"out of device memory ({first.strip()}); lower config.batch_size={c.batch_size} or "
          f"config.seq_len={c.seq_len}, set config.model.remat='full' or, to keep the saved activations in host "
          f"memory, 'offload' (now {c.model.remat!r}), shard weights over "
          f"more devices with config.mesh.fsdp (now {c.mesh.fsdp}) or split each sequence over more with "
          f"config.mesh.context (now {c.mesh.context}); `--config.dry_run=True` shows the per-device memory "
          "without running") from None
    return False



def _finite_or_raise(run: Run, step: int, metrics) -> tuple[float, float]:
  loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
  if not (math.isfinite(loss) and math.isfinite(gnorm)):
    run.ckpt.wait()
    raise TrainingDiverged(
        f"loss {loss} / grad norm {gnorm} at step {step} is not finite; stopped without saving. "
        f"Last complete checkpoint: step {run.ckpt.latest_step()} in {run.ckpt.directory} (resume from it "
        f"with a lower config.optim.lr or more warmup).")
  return loss, gnorm


def _record(run: Run, step: int, m, loss: float, gnorm: float, step_time: float, evaluating: bool, bar) -> dict:
  """One metrics.jsonl line (with the eval loss on eval steps), written and returned."""
  rec = {"step": step, "loss": loss, "grad_norm": gnorm, "lr": float(m["lr"]), "tokens": int(m["tokens"]),
         "step_time_s": step_time, "tokens_per_s": run.tokens_per_step / step_time,
         "mfu": run.flops_per_step / step_time / run.peak_flops if run.peak_flops else None,
         "peak_memory_gb": _peak_memory_gb()}
  if evaluating:
    rec["eval_loss"] = evaluate(run.eval_fn, run.state["params"], run.eval_ds, run.cfg.eval_batches,
                                run.to_device)
    (_log if bar.disable else bar.write)(f"step {step}: loss {loss:.4f}, eval loss {rec['eval_loss']:.4f}")
  run.writer.write(rec)
  return rec


class _StopRequest:
  """SIGTERM (preemption, scancel, Ctrl-C of a launcher) -> save a checkpoint at the next step, then stop.

  With several hosts the flag is agreed on every step, so all hosts save the same step.
  """

  def __init__(self):
    import signal
    import threading
    self._flag, self._old = False, None
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self._flag = True

  def requested(self) -> bool:
    if jax.process_count() == 1:
      return self._flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self._flag))))

  def restore(self):
    if self._old is not None:
      import signal
      signal.signal(signal.SIGTERM, self._old)
      self._old = None


def evaluate(eval_fn, params, eval_ds, num_batches: int, to_device) -> float:
  """Mean token loss over the first `num_batches` held-out batches (the same ones every time)."""
  it = iter(eval_ds)
  total = count = 0.0
  for _ in range(num_batches):
    try:
      batch = next(it)
    except StopIteration:
      break
    l, n = eval_fn(params, to_device(batch))
    total, count = total + float(l), count + float(n)
  return total / max(count, 1.0)


EXPORT_RECORD = "export.json"


def export_model(graphdef, params, out_dir: str, step: int):
  """Final weights as config.json + params/ (what generate, evaluate and convert load), written
  atomically, then a record of the step they come from (written last: a crash before it means the
  next run of the same command exports again)."""
  from flax import nnx

  from longgen_jax.weights import save_model
  save_model(nnx.merge(graphdef, params), out_dir, overwrite=True)
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, EXPORT_RECORD), "w") as f:
      json.dump({"step": step}, f)
  _log(f"exported model to {out_dir}")


def exported_step(model_dir: str) -> int | None:
  """The train step of the complete export in `model_dir`, or None (none, partial, or unrecorded)."""
  try:
    with open(os.path.join(model_dir, EXPORT_RECORD)) as f:
      step = json.load(f)["step"]
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return step if is_checkpoint(model_dir) else None


def _peak_memory_gb() -> float | None:
  """Highest device-memory high-water mark over this host's devices (None where the backend has no stats)."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) / 2**30 if peaks else None


class _Profiler:
  """config.profile_steps "FIRST,LAST": a jax.profiler trace of those steps in WORKDIR/profile (TensorBoard's
  profile tab or Perfetto)."""

  def __init__(self, steps: str, directory: str):
    self.first = self.last = None
    if steps:
      self.first, self.last = (int(x) for x in (steps.split(",") * 2)[:2])
    self.directory, self.active = directory, False

  def before(self, step: int):
    if step == self.first:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int):
    if self.active and step == self.last:
      self.stop()

  def stop(self):
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      _log(f"profile of steps {self.first}-{self.last} written to {self.directory}")


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _log(msg: str):
  if jax.process_index() == 0:
    print(f"[train] {msg}", file=sys.stderr, flush=True)
