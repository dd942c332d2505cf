"""Multi-process runs: launch detection on simulated SLURM / TPU pod / Open MPI / explicit environments,
and the training CLI as 2 processes x 2 CPU devices (launch/local_multiprocess.sh) against one process."""

import os

import pytest

from conftest import ROOT, close, train_cli
from longgen_jax.parallel import runtime
from longgen_jax.parallel.runtime import Launch, detect_launch


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-004]", "SLURM_NTASKS": "32", "SLURM_PROCID": "9",
         "SLURM_LOCALID": "1"}


@pytest.mark.parametrize("env, want", [
    ({}, Launch("single")),
    ({"LONGGEN_JAX_COORDINATOR": "host0:1234", "LONGGEN_JAX_NUM_PROCESSES": "4", "LONGGEN_JAX_PROCESS_ID": "3",
      "LONGGEN_JAX_LOCAL_DEVICES": "6,7"}, Launch("explicit", "host0:1234", 4, 3, (6, 7))),
    ({**SLURM, "LONGGEN_JAX_COORDINATOR": "h:1", "LONGGEN_JAX_NUM_PROCESSES": "2", "LONGGEN_JAX_PROCESS_ID": "0"},
     Launch("explicit", "h:1", 2, 0)),  # explicit wins over detection
    (SLURM, Launch("slurm", num_processes=32, process_id=9)),
    ({**SLURM, "SLURM_NTASKS": "1"}, Launch("single")),  # one task (e.g. python in an salloc shell)
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3", "TPU_WORKER_ID": "2"}, Launch("tpu_pod", num_processes=4, process_id=2)),
    ({"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}, Launch("single")),  # one-host TPU VM
    ({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5"}, Launch("mpi", num_processes=8, process_id=5)),
])
def test_detect_launch_reads_the_environment(env, want):
  assert detect_launch(env) == want


def test_detect_launch_errors_and_cluster_off():
  assert detect_launch(SLURM, cluster=False) == Launch("single")
  with pytest.raises(ValueError, match="needs all three"):
    detect_launch({"LONGGEN_JAX_COORDINATOR": "h:1"})
  with pytest.raises(ValueError, match="is not in"):
    detect_launch({"LONGGEN_JAX_COORDINATOR": "h:1", "LONGGEN_JAX_NUM_PROCESSES": "2", "LONGGEN_JAX_PROCESS_ID": "2"})


def test_initialize_calls_jax_distributed_as_the_launch_says(monkeypatch):
  calls = []
  monkeypatch.setattr(runtime.jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  monkeypatch.setattr(runtime.jax.config, "update", lambda *a: None)
  assert runtime.initialize(env={}).kind == "single" and calls == []
  runtime.initialize(env=SLURM)
  # JAX's own SLURM detection (coordinator from the node list, GPU from SLURM_LOCALID), JAX's heartbeat timeout
  assert calls[-1] == ((), {"heartbeat_timeout_seconds": 100})
  runtime.initialize(env=SLURM, cluster=False)
  assert len(calls) == 1
  explicit = {"LONGGEN_JAX_COORDINATOR": "h:9", "LONGGEN_JAX_NUM_PROCESSES": "2", "LONGGEN_JAX_PROCESS_ID": "1",
              "LONGGEN_JAX_LOCAL_DEVICES": "2,3"}
  runtime.initialize(env=explicit, heartbeat_default_s=900)   # the training CLI's choice for remat="offload"
  assert calls[-1] == (("h:9", 2, 1), {"local_device_ids": [2, 3], "heartbeat_timeout_seconds": 900})
  runtime.initialize(env={**explicit, runtime.HEARTBEAT_ENV: "1200"}, heartbeat_default_s=900)  # the user's wins
  assert calls[-1][1]["heartbeat_timeout_seconds"] == 1200


def test_heartbeat_timeout_must_be_whole_positive_seconds():
  assert runtime.heartbeat_timeout_s({}) == 100 and runtime.heartbeat_timeout_s({runtime.HEARTBEAT_ENV: "30"}) == 30
  for text in ("0", "-5", "ten", "1.5"):
    with pytest.raises(ValueError, match="LONGGEN_JAX_HEARTBEAT_TIMEOUT_S"):
      runtime.heartbeat_timeout_s({runtime.HEARTBEAT_ENV: text})


@pytest.mark.parametrize("remat, seconds", [("offload", 900), ("full", 100)])
def test_training_cli_starts_offload_runs_with_the_long_heartbeat(tmp_path, remat, seconds):
  """The CLI hands initialize() 900 s for remat="offload" (its first step pins host memory for minutes), JAX's
  100 s otherwise: the CLI run in a child process whose initialize() reports what it was given and stops."""
  import subprocess
  import sys
  script = ("import sys; from longgen_jax.parallel import runtime\n"
            "def fake(**kw):\n  print('heartbeat', kw['heartbeat_default_s']); raise SystemExit(0)\n"
            "runtime.initialize = fake\n"
            "from longgen_jax import train; train.run()")
  env = {k: v for k, v in os.environ.items() if k != runtime.HOST_MEMORY_ENV}
  p = subprocess.run([sys.executable, "-c", script, f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
                      f"--workdir={tmp_path}", f"--config.model.remat={remat}"], capture_output=True, text=True,
                     cwd=ROOT, env=env, timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  assert f"heartbeat {seconds}" in p.stdout


def _train(workdir, *overrides, processes=1, devices=4, steps=4):
  return train_cli(workdir, *overrides, devices=devices, processes=processes, steps=steps)


def test_offload_host_memory_cap_shares_the_host_between_gpus(monkeypatch):
  gib = 2**30
  f = runtime.offload_host_memory_gib
  listdir = os.listdir   # a host without /dev/nvidiaN (as on CI), also where these tests run on GPUs
  monkeypatch.setattr(runtime.os, "listdir", lambda path: [] if path == "/dev" else listdir(path))
  assert f({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, host_bytes=512 * gib) == 96      # 0.75 x 512 / 4
  assert f({"CUDA_VISIBLE_DEVICES": "2"}, host_bytes=512 * gib) == 384
  assert f({"CUDA_VISIBLE_DEVICES": "0", runtime.HOST_MEMORY_ENV: "80"}, host_bytes=512 * gib) is None  # user's
  assert f({}, host_bytes=512 * gib, gpus=0) is None                               # no GPU: XLA's default
  # one process per GPU sees one GPU, but shares the host with the machine's other three
  four = ["nvidia0", "nvidia1", "nvidia2", "nvidia3", "nvidiactl", "nvidia-uvm", "null"]
  assert runtime.gpus_sharing_the_host({"CUDA_VISIBLE_DEVICES": "2"}, four) == 4
  assert runtime.gpus_sharing_the_host({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5"}, four[:2]) == 6  # /dev lists fewer
  assert runtime.gpus_sharing_the_host({}, ["null", "nvidiactl"]) == 0                          # no GPU
  monkeypatch.delenv(runtime.HOST_MEMORY_ENV, raising=False)
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
  runtime.allow_offload_host_memory("full")                                        # only for offload
  assert runtime.HOST_MEMORY_ENV not in os.environ
  runtime.allow_offload_host_memory("offload")
  assert int(os.environ[runtime.HOST_MEMORY_ENV]) == runtime.offload_host_memory_gib(
      {"CUDA_VISIBLE_DEVICES": "0,1"})
  monkeypatch.delenv(runtime.HOST_MEMORY_ENV)


def test_pinned_host_cap_is_the_compiled_need_with_headroom():
  gib = 2**30
  # Llama-2-7B at 1M over 4 H200s: the compiled plan keeps 88.4 GiB per GPU in host memory
  assert runtime.pinned_host_cap_gib(int(88.4 * gib)) == 94          # ceil(92.82) + 1
  assert runtime.pinned_host_cap_gib(gib) == 3 and runtime.pinned_host_cap_gib(1) == 2


def test_the_training_cli_claims_the_gpu_memory_unless_told_otherwise():
  env = {}
  assert runtime.claim_device_memory(env) == "0.95" and env == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}
  env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}
  assert runtime.claim_device_memory(env) == "0.5" and env == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}


def test_plan_for_devices_sets_up_a_fresh_process():
  """The settings a planned (mocked) client needs, read in a fresh process: N devices, the first GPU only,
  and sharded autotuning off (it waits forever for mocked processes), kept alongside flags already set."""
  import subprocess
  import sys
  code = ("import os, jax; from jax._src import xla_bridge as xb\n"
          "from longgen_jax.parallel.runtime import plan_for_devices; plan_for_devices(4)\n"
          "print(xb.MOCK_NUM_GPU_PROCESSES.value, xb.CUDA_VISIBLE_DEVICES.value, os.environ['XLA_FLAGS'], "
          "jax.device_count())")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS="--xla_dump_to=/tmp/x"))
  assert p.returncode == 0, p.stderr[-2000:]
  assert p.stdout.split() == ["4", "0", "--xla_dump_to=/tmp/x", "--xla_gpu_shard_autotuning=false", "4"]


def test_two_processes_train_like_one_save_and_resume(tmp_path):
  """2 processes x 2 CPU devices (gloo collectives) log the losses of one process with 4 devices, also when
  the context axis splits each sequence across the two processes; their multi-process checkpoints (Orbax
  state, each process's data iterator) resume exactly."""
  mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=2"]
  one = _train(tmp_path / "one", *mesh)
  two = _train(tmp_path / "two", *mesh, processes=2)
  across = _train(tmp_path / "across", "--config.mesh.data=1", "--config.mesh.context=4", processes=2)
  assert sorted(one) == sorted(two) == sorted(across) == [1, 2, 3, 4]
  for step in one:
    assert close(two[step], one[step]) and close(across[step], one[step]), (step, one[step], two[step], across[step])

  _train(tmp_path / "resumed", *mesh, processes=2, steps=2)
  assert _train(tmp_path / "resumed", *mesh, processes=2) == two


def test_one_sequence_over_processes_trains_like_one_process(tmp_path):
  """Batch 1 (one long sequence per step, the 1M-token recipe) split over a context axis spanning 2
  processes: every process packs the same row (data.host_split='rows') and the losses are one process's."""
  cp = ["--config.batch_size=1", "--config.mesh.data=1", "--config.mesh.context=4"]
  one = _train(tmp_path / "one", *cp, steps=3)
  two = _train(tmp_path / "two", *cp, processes=2, steps=3)
  assert sorted(one) == sorted(two) == [1, 2, 3]
  assert all(close(two[step], one[step]) for step in one), (one, two)


def test_documents_split_feeds_each_process_its_own_rows(tmp_path):
  """data.host_split='documents': each process reads its own documents (different batches than one process,
  so only a sane run is asserted) and a mesh whose context axis spans processes is refused in one line."""
  docs = "--config.data.host_split=documents"
  losses = _train(tmp_path / "docs", docs, "--config.mesh.data=2", "--config.mesh.fsdp=2", processes=2)
  assert sorted(losses) == [1, 2, 3, 4] and all(3.0 < loss < 7.0 for loss, _, _ in losses.values())
  with pytest.raises(AssertionError, match="host_split='rows' for this mesh"):
    _train(tmp_path / "across", docs, "--config.mesh.data=1", "--config.mesh.context=4", processes=2)
