"""Process-level JAX setup shared by the CLIs and the training loop: multi-process `initialize()` and
the persistent compilation cache."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping

import jax

# Explicit launch (launch/local_multiprocess.sh sets these; any launcher can): wins over detection.
COORDINATOR, NUM_PROCESSES, PROCESS_ID, LOCAL_DEVICES = (
    "LONGGEN_JAX_COORDINATOR", "LONGGEN_JAX_NUM_PROCESSES", "LONGGEN_JAX_PROCESS_ID", "LONGGEN_JAX_LOCAL_DEVICES")
HEARTBEAT_ENV = "LONGGEN_JAX_HEARTBEAT_TIMEOUT_S"
JAX_HEARTBEAT_TIMEOUT_S = 100   # jax.distributed.initialize's default


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


def heartbeat_timeout_s(env: Mapping[str, str] | None = None, default: int = JAX_HEARTBEAT_TIMEOUT_S) -> int:
  """Seconds a process may go without a heartbeat before the others give up on it: LONGGEN_JAX_HEARTBEAT_TIMEOUT_S,
  else `default`. Why a knob: a process pinning tens of GiB of host memory (remat="offload") can miss heartbeats
  for minutes; JAX's 100 s ended a 4-process 1M-token run in its first step (2026-11-28, BENCHMARKS.md)."""
  env = os.environ if env is None else env
  text = env.get(HEARTBEAT_ENV)
  if text is None:
    return default
  try:
    seconds = int(text)
  except ValueError:
    seconds = 0
  if seconds < 1:
    raise ValueError(f"environment variable {HEARTBEAT_ENV}={text!r} must be a positive whole number of seconds")
  return seconds


OFFLOAD_HEARTBEAT_TIMEOUT_S = 900


def heartbeat_default_for(remat: str) -> int:
  """The heartbeat timeout a training run starts with (before LONGGEN_JAX_HEARTBEAT_TIMEOUT_S): JAX's 100 s,
  or 900 s with remat="offload", whose first step pins tens of GiB of host memory per GPU."""
  return OFFLOAD_HEARTBEAT_TIMEOUT_S if remat == "offload" else JAX_HEARTBEAT_TIMEOUT_S


def initialize(*, cluster: bool = True, env: Mapping[str, str] | None = None,
               heartbeat_default_s: int = JAX_HEARTBEAT_TIMEOUT_S) -> Launch:
  """Joins this process to a multi-process run, before anything touches a device; a no-op for a
  single process. `cluster=False` ignores SLURM / TPU / MPI variables (only an explicit launch counts).
  `env` (default os.environ) is what the launch is detected from; for cluster launches JAX itself then
  reads the process environment.

  Every process then sees every device (jax.devices()); meshes span them all, each process feeds
  its own rows of the batch (training.loop) and writes its part of each checkpoint (Orbax).
  `heartbeat_default_s`: the heartbeat timeout where LONGGEN_JAX_HEARTBEAT_TIMEOUT_S does not set one.
  """
  launch = detect_launch(env, cluster=cluster)
  if launch.kind == "single":
    return launch
  if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
  heartbeat = heartbeat_timeout_s(env, heartbeat_default_s)
  if launch.kind == "explicit":
    jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id,
                               local_device_ids=list(launch.local_device_ids) if launch.local_device_ids else None,
                               heartbeat_timeout_seconds=heartbeat)
  else:  # JAX's detection for SLURM, Cloud TPU and Open MPI
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
  return launch


# Sharded autotuning splits the autotuning among the processes and waits for their results: with mocked
# processes it waits forever (the compile hangs; seen on an H200, 2026-11-28).
NO_SHARDED_AUTOTUNING = "--xla_gpu_shard_autotuning=false"


def plan_for_devices(n: int) -> None:
  """Makes this process's JAX show `n` devices, for a dry run of a mesh this machine does not have: on a GPU
  machine JAX mocks n processes of one GPU each (XLA's mock NCCL: the step compiles for n GPUs with the
  real GPU's compiler and kernels, and nothing can run); on CPU, n host devices. Call it before JAX starts
  its backends (the first device query or computation); the CLI does for `config.dry_run_devices`."""
  from jax._src import xla_bridge
  if n < 1:
    raise ValueError(f"plan_for_devices needs n >= 1, got {n}")
  if xla_bridge.backends_are_initialized():
    raise RuntimeError(f"planning for {n} devices must come before JAX starts its backends: run it in a fresh "
                       "process (the training CLI does) or restart the notebook's kernel and call it first")
  jax.config.update("jax_num_cpu_devices", n)
  jax.config.update("mock_num_gpu_processes", n)
  if xla_bridge.CUDA_VISIBLE_DEVICES.value == "all":
    jax.config.update("jax_cuda_visible_devices", "0")  # one GPU per mocked process (the first visible one)
  flags = os.environ.get("XLA_FLAGS", "")
  if NO_SHARDED_AUTOTUNING not in flags.split():
    os.environ["XLA_FLAGS"] = f"{flags} {NO_SHARDED_AUTOTUNING}".strip()  # XLA reads them when a backend starts


MEMORY_FRACTION_ENV, TRAINING_MEMORY_FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95"


def claim_device_memory(env: dict | None = None) -> str:
  """Lets XLA's pool take 95% of each GPU instead of JAX's default 75% (a value the environment sets wins):
  the long-sequence recipes need the card (512K over 4 H100s compiles to 59.7 GiB, over 75% of 80 GB); the
  rest is left to cuBLAS/cuDNN workspaces and NCCL. Read when the backend starts; returns the fraction."""
  env = os.environ if env is None else env
  return env.setdefault(MEMORY_FRACTION_ENV, TRAINING_MEMORY_FRACTION)


HOST_MEMORY_ENV = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
HOST_SHARE = 0.75   # of the machine's memory, split between its GPUs, for XLA's pinned pools together


def gpus_sharing_the_host(env: Mapping[str, str], dev_entries: list[str] | None = None) -> int:
  """How many GPUs may pin this host's memory at once: the machine's GPUs (/dev/nvidiaN), or the visible
  ones (CUDA_VISIBLE_DEVICES) where more are visible than listed. Not the visible ones alone: with one
  process per GPU each process sees one, and four would each take the whole share."""
  if dev_entries is None:
    dev_entries = os.listdir("/dev") if os.path.isdir("/dev") else []
  on_host = len([d for d in dev_entries if d.startswith("nvidia") and d[6:].isdigit()])
  visible = env.get("CUDA_VISIBLE_DEVICES")
  return max(on_host, len([d for d in visible.split(",") if d.strip()]) if visible is not None else 0)


def offload_host_memory_gib(env: Mapping[str, str] | None = None, host_bytes: int | None = None,
                            gpus: int | None = None) -> int | None:
  """The pinned host memory each GPU may use (GiB) when activations are offloaded, or None to leave
  XLA's own cap: a value the environment already sets wins. Why: XLA caps each GPU's pinned host pool
  at 64 GiB (`XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB`, read when the backend starts), and Llama-2-7B at 1M
  tokens on 4 GPUs offloads 88 GiB per GPU. The pool grows on demand but overshoots the need up to the
  cap (XLA's GetGpuHostAllocator is a BFC allocator with allow_growth, whose new regions double in size;
  measured, 4x H200: a 113 GiB cap with 88.4 GiB needed filled the host's 503 GiB, pinned at
  ~2 GiB/s before the first step could start), so the default shares only HOST_SHARE of this machine's
  memory between its GPUs (`gpus_sharing_the_host`); `pinned_host_cap_gib` of a dry run's figure is the
  tighter cap."""
  env = os.environ if env is None else env
  if HOST_MEMORY_ENV in env:
    return None
  if host_bytes is None:
    host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  if gpus is None:
    gpus = gpus_sharing_the_host(env)
  if gpus < 1:
    return None
  return max(1, int(HOST_SHARE * host_bytes / gpus / 2**30))


def pinned_host_cap_gib(host_bytes_needed: int) -> int:
  """The XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB for a step whose compiled plan keeps `host_bytes_needed` per GPU
  in pinned host memory: the need + 5% + 1 GiB of headroom for the pool's fragmentation, whole GiB."""
  return math.ceil(host_bytes_needed * 1.05 / 2**30) + 1


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
