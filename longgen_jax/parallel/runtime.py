"""Process-level JAX setup shared by the CLIs and the training loop: multi-process `initialize()` and
the persistent compilation cache."""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax

# Explicit launch (launch/local_multiprocess.sh sets these; any launcher can): wins over detection.
COORDINATOR, NUM_PROCESSES, PROCESS_ID, LOCAL_DEVICES = (
    "LONGGEN_JAX_COORDINATOR", "LONGGEN_JAX_NUM_PROCESSES", "LONGGEN_JAX_PROCESS_ID", "LONGGEN_JAX_LOCAL_DEVICES")


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process was started: `kind` single, explicit, slurm, tpu_pod or mpi. For explicit
  launches the coordinator, process count, id and (optional) local device ids; the cluster kinds
  leave them to JAX's own detection (jax.distributed.initialize() reads the same variables)."""

  kind: str
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None


def detect_launch(env: Mapping[str, str] | None = None, *, cluster: bool = True) -> Launch:
  """The launch this environment describes (pure: tests pass simulated environments).

  explicit  LONGGEN_JAX_COORDINATOR (host:port), LONGGEN_JAX_NUM_PROCESSES, LONGGEN_JAX_PROCESS_ID
            [, LONGGEN_JAX_LOCAL_DEVICES=0,1]
  slurm     srun with more than one task (SLURM_NTASKS > 1; JAX takes the coordinator from the
            node list, the process id from SLURM_PROCID and the GPU from SLURM_LOCALID)
  tpu_pod   a TPU VM of a multi-host slice (TPU_WORKER_HOSTNAMES lists more than one host)
  mpi       Open MPI with more than one rank (OMPI_COMM_WORLD_SIZE > 1)
  single    none of these (or `cluster=False` and no explicit variables)
  """
  env = os.environ if env is None else env

  def number(name: str, default: str | None = None) -> int:
    try:
      return int(env[name] if default is None else env.get(name, default))
    except ValueError:
      raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None

  if COORDINATOR in env:
    missing = [k for k in (NUM_PROCESSES, PROCESS_ID) if k not in env]
    if missing:
      raise ValueError(f"{COORDINATOR} is set but {missing} are not: an explicit launch needs all three")
    n, pid = number(NUM_PROCESSES), number(PROCESS_ID)
    if not 0 <= pid < n:
      raise ValueError(f"{PROCESS_ID}={pid} is not in [0, {NUM_PROCESSES}={n})")
    local = env.get(LOCAL_DEVICES)
    return Launch("explicit", env[COORDINATOR], n, pid,
                  tuple(int(d) for d in local.split(",")) if local else None)
  if not cluster:
    return Launch("single")
  if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")) and \
      number("SLURM_NTASKS", "1") > 1:
    return Launch("slurm", num_processes=number("SLURM_NTASKS"), process_id=number("SLURM_PROCID"))
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(hosts) > 1:
    return Launch("tpu_pod", num_processes=len(hosts), process_id=number("TPU_WORKER_ID", "0"))
  if number("OMPI_COMM_WORLD_SIZE", "1") > 1:
    return Launch("mpi", num_processes=number("OMPI_COMM_WORLD_SIZE"), process_id=number("OMPI_COMM_WORLD_RANK", "0"))
  return Launch("single")


def initialize(*, cluster: bool = True, env: Mapping[str, str] | None = None) -> Launch:
  """Joins this process to a multi-process run, before anything touches a device; a no-op for a
  single process. `cluster=False` ignores SLURM / TPU / MPI variables (only an explicit launch counts).
  `env` (default os.environ) is what the launch is detected from; for cluster launches JAX itself then
  reads the process environment.

  Every process then sees every device (jax.devices()); meshes span them all, each process feeds
  its own rows of the batch (training.loop) and writes its part of each checkpoint (Orbax).
  """
  launch = detect_launch(env, cluster=cluster)
  if launch.kind == "single":
    return launch
  if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
  if launch.kind == "explicit":
    jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id,
                               local_device_ids=list(launch.local_device_ids) if launch.local_device_ids else None)
  else:
    jax.distributed.initialize()  # JAX's detection for SLURM, Cloud TPU and Open MPI
  return launch

HOST_MEMORY_ENV = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"


def offload_host_memory_gib(env: Mapping[str, str] | None = None, host_bytes: int | None = None,
                            gpus: int | None = None) -> int | None:
  """The pinned host memory each GPU may use (GiB) when activations are offloaded, or None to leave
  XLA's own cap: a value the environment already sets wins. Why: XLA caps each GPU's pinned host pool
  at 64 GiB (`XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB`, read when the backend starts; the pool grows on
  demand), and Llama-2-7B at 1M tokens on 4 GPUs offloads 88 GiB per GPU. The default shares 90% of
  this machine's memory between its visible GPUs (CUDA_VISIBLE_DEVICES, else /dev/nvidiaN)."""
  env = os.environ if env is None else env
  if HOST_MEMORY_ENV in env:
    return None
  if host_bytes is None:
    host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  if gpus is None:
    visible = env.get("CUDA_VISIBLE_DEVICES")
    gpus = (len([d for d in visible.split(",") if d.strip()]) if visible is not None else
            len([d for d in (os.listdir("/dev") if os.path.isdir("/dev") else []) if d[6:].isdigit()
                 and d.startswith("nvidia")]))
  if gpus < 1:
    return None
  return max(1, int(0.9 * host_bytes / gpus / 2**30))


def allow_offload_host_memory(remat: str) -> int | None:
  """For model.remat='offload', raises XLA's per-GPU pinned host memory cap (`offload_host_memory_gib`)
  before the backend starts and returns it (GiB); otherwise, or where the environment sets it, None."""
  gib = offload_host_memory_gib() if remat == "offload" else None
  if gib is not None:
    os.environ[HOST_MEMORY_ENV] = str(gib)
  return gib


DEFAULT_COMPILE_CACHE = os.path.join("~", ".cache", "longgen_jax", "jax_compile")


def enable_compile_cache(directory: str = "auto") -> str | None:
  """Turns on JAX's persistent compilation cache, so a re-run (a resume, the next generate call) skips
  compiles that took over a second. "auto": $LONGGEN_JAX_COMPILE_CACHE or ~/.cache/longgen_jax/jax_compile;
  "" leaves it off. A directory the process already configured (e.g. by JAX_COMPILATION_CACHE_DIR) wins.
  Returns the directory in use."""
  current = jax.config.jax_compilation_cache_dir
  if current or not directory:
    return current or None
  if directory == "auto":
    directory = os.environ.get("LONGGEN_JAX_COMPILE_CACHE", DEFAULT_COMPILE_CACHE)
  directory = os.path.expanduser(directory)
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory
