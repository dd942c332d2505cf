"""The benchmark scripts' own logic (not timings): the trace reader's overlap arithmetic, and a real trace."""

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import profile_overlap  # noqa: E402
from conftest import ROOT, process_gone  # noqa: E402


def test_overlap_counts_communication_under_compute_as_hidden():
  kernels = [("fusion_1", 0, 100), ("gemm", 80, 150),                # compute busy [0, 150) and [300, 400)
             ("ncclDevKernel_SendRecv", 50, 120),                    # fully under compute: hidden
             ("ncclKernel_AllGather", 140, 200),                     # 10 under compute, 50 exposed
             ("triton_attention", 300, 400), ("nccl_p2p", 390, 420)]  # 10 hidden, 20 exposed
  r = profile_overlap.overlap_summary([(n, s * 10**6, e * 10**6) for n, s, e in kernels])
  assert r["compute_ms"] == 250 and r["comm_ms"] == 70 + 60 + 30 - 0
  assert r["hidden_ms"] == 70 + 10 + 10 and r["exposed_ms"] == 50 + 20
  assert abs(r["hidden_fraction"] - 90 / 160) < 1e-12 and r["span_ms"] == 420


def test_union_and_intersection():
  assert profile_overlap.union([(5, 7), (0, 2), (1, 3), (7, 9)]) == [(0, 3), (5, 9)]
  assert profile_overlap.intersection([(0, 3), (5, 9)], [(2, 6), (8, 20)]) == [(2, 3), (5, 6), (8, 9)]
  assert profile_overlap.overlap_summary([("gemm", 0, 10)])["hidden_fraction"] is None  # no communication


def test_reader_on_a_real_trace(tmp_path):
  """A CPU trace has no GPU planes: the reader finds the file and returns nothing, without error."""
  with jax.profiler.trace(str(tmp_path)):
    jax.block_until_ready(jnp.ones(8) * 2)
  assert profile_overlap.gpu_kernels(str(tmp_path)) == {}


def test_train_step_packs_equal_documents():
  import train_step
  seg, pos = train_step.packed_rows(10, 3)   # documents of 4, 4, 2 tokens
  assert seg.tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3] and pos.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
  seg, pos = train_step.packed_rows(6, 1)
  assert seg.tolist() == [1] * 6 and pos.tolist() == list(range(6))


def test_multi_gpu_train_runs_the_cli_as_several_processes():
  import multi_gpu_train as mgt
  cli = [sys.executable, "-m", "longgen_jax.train", "--workdir=w", "--config=c.py"]
  assert mgt.cli_command(["--config=c.py"], "w") == cli
  assert mgt.cli_command(["--config=c.py"], "w", processes=2, gpus=4) == [
      "bash", os.path.join(mgt.ROOT, "launch", "local_multiprocess.sh"), "2", "2", "--", *cli]
  try:
    mgt.cli_command([], "w", processes=3, gpus=4)
  except ValueError as e:
    assert "must divide" in str(e)
  else:
    raise AssertionError("3 processes over 4 GPUs accepted")


def test_multi_gpu_train_stops_every_process_of_a_run_past_its_limit(tmp_path):
  """A run past --limit is killed as a process group (a multi-process run's children too), and what it
  logged so far stays in workdir/cli.log."""
  import time
  import multi_gpu_train as mgt
  t0 = time.perf_counter()
  log, error = mgt.run_cli(["bash", "-c", "sleep 60 & echo child $!; wait"], str(tmp_path), limit=2)
  assert time.perf_counter() - t0 < 30 and error == "> 2 s"
  child = int(log.splitlines()[1].split()[1])   # line 0 is the command
  assert process_gone(child), "the run's child process survived its limit"
  assert (tmp_path / "cli.log").read_text().startswith("bash -c")
  log, error = mgt.run_cli(["bash", "-c", "echo fine"], str(tmp_path), limit=20)
  assert error is None and "fine" in log
  log, error = mgt.run_cli(["bash", "-c", "echo 'RuntimeError: boom'; exit 3"], str(tmp_path), limit=20)
  assert error == "RuntimeError: boom"
  os.environ["MGT_TEST_OUTER"] = "kept"
  try:
    log, error = mgt.run_cli(["bash", "-c", "echo cap=$XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB outer=$MGT_TEST_OUTER"],
                             str(tmp_path), limit=20, env={"XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB": "94"})
  finally:
    del os.environ["MGT_TEST_OUTER"]
  assert error is None and "cap=94 outer=kept" in log   # the run's own variables on top of this environment


def test_multi_gpu_train_runs_the_longest_fitting_length_with_its_pinned_cap():
  """--run-longest takes the longest length whose dry run fits, with the host cap that dry run named,
  unless the caller's environment sets one."""
  import multi_gpu_train as mgt
  ladder = [{"seq_len": 524288, "fits": True, "pinned_host_cap_gib": 48},
            {"seq_len": 1048576, "fits": True, "pinned_host_cap_gib": 94},
            {"seq_len": 2097152, "fits": False, "pinned_host_cap_gib": 190},
            {"seq_len": 4194304, "fits": False, "error": "> 900 s"}]
  assert mgt.longest_fitting(ladder, {}) == (1048576, {"XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB": "94"})
  assert mgt.longest_fitting(ladder, {"XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB": "100"}) == (1048576, {})
  assert mgt.longest_fitting([{"seq_len": 8, "fits": True, "pinned_host_cap_gib": None}], {}) == (8, {})
  assert mgt.longest_fitting(ladder[2:], {}) == (None, {})


def test_multi_gpu_train_ladder_hands_its_cap_to_the_timed_run(monkeypatch, tmp_path):
  """main(): --ladder with --run-longest times the longest fitting length in the environment its dry run named."""
  import signal
  import multi_gpu_train as mgt
  ladder = {524288: {"fits": True, "pinned_host_cap_gib": 48}, 1048576: {"fits": True, "pinned_host_cap_gib": 94}}
  timed = []
  monkeypatch.setattr(mgt, "dry_run", lambda name, T, *a, **k: {"run": name, "seq_len": T, **ladder[T]})
  monkeypatch.setattr(mgt, "timed_run", lambda name, T, steps, *a, env=None, **k: timed.append((T, steps, env))
                      or {"run": name, "seq_len": T, "layers": 32, "error": "stub"})
  monkeypatch.delenv("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", raising=False)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  monkeypatch.setattr(sys, "argv", ["multi_gpu_train.py", "--ladder", "524288,1048576", "--run-longest", "2",
                                    "--json", str(tmp_path / "r.json")])
  handler = signal.getsignal(signal.SIGTERM)
  try:
    mgt.main()
  finally:
    signal.signal(signal.SIGTERM, handler)
  assert timed == [(1048576, 2, {"XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB": "94"})]


def test_multi_gpu_train_kills_its_run_whatever_interrupts_the_wait(tmp_path, monkeypatch):
  """An exception while the run starts (Ctrl-C there) still kills its process group before it propagates,
  and a progress line on a dead stderr (a `| tee` killed with the shell) raises nothing."""
  import io
  import time
  import pytest
  import multi_gpu_train as mgt

  def say(message):
    if message.startswith("started"):
      time.sleep(1.5)   # the run is up and has written its child's pid
      raise KeyboardInterrupt
  monkeypatch.setattr(mgt, "say", say)
  with pytest.raises(KeyboardInterrupt):
    mgt.run_cli(["bash", "-c", f"sleep 60 & echo $! > {tmp_path}/child.txt; wait"], str(tmp_path), limit=60)
  monkeypatch.undo()
  assert process_gone(int((tmp_path / "child.txt").read_text())), "the run's child survived the interrupt"

  class Broken(io.StringIO):
    def write(self, text):
      raise BrokenPipeError
  monkeypatch.setattr(sys, "stderr", Broken())
  mgt.say("still here")


def test_multi_gpu_train_stopped_from_outside_stops_its_run(tmp_path):
  """SIGTERM to the benchmark (an outer `timeout`) ends it with 143 and kills the run it waits for, which
  runs in its own session and would otherwise keep the GPUs."""
  import signal
  import subprocess
  import time
  script = (f"import signal, sys; sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r}); import multi_gpu_train as m; "
            "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)); "   # as m.main() installs it
            f"m.run_cli(['bash', '-c', 'sleep 60 & echo child $!; wait'], {str(tmp_path)!r}, limit=120)")
  p = subprocess.Popen([sys.executable, "-c", script])
  log = tmp_path / "cli.log"
  for _ in range(200):
    if log.exists() and "child " in log.read_text().split("\n", 1)[-1]:
      break
    time.sleep(0.05)
  child = int(log.read_text().splitlines()[1].split()[1])
  p.send_signal(signal.SIGTERM)
  assert p.wait(timeout=30) == 143
  assert process_gone(child), "the run outlived the benchmark"


def test_inference_prefill_profile_runs_and_reads_its_trace():
  """On a CPU the trace has no GPU kernels: the profile still runs a real prefill, traces it and reports
  the wall time with an empty kernel table (on a GPU the table holds the kernels)."""
  import inference
  models = inference.build_models("tiny", 2, "auto")
  r = inference.profile_prefill(models["longgen"], 64, 32, "auto", top=5)
  assert r["wall_ms"] > 0 and r["kernels_ms"] == 0 and r["top_ms"] == {} and r["kernel_count"] == 0


def test_inference_builds_the_repro_model_and_prefills_a_batch():
  """--repro-variant: configs/repro's model (base.MODEL) with the variant's pattern, its all-full twin on the
  same weights; --prefill-batch prefills that many prompts (the pass-key evaluation's 25)."""
  import jax
  import inference
  from flax import nnx

  from longgen_jax.training.config import load_config_module
  base = load_config_module(os.path.join(ROOT, "configs", "repro", "base.py"))
  models = inference.build_models("tiny", None, "auto", "hybrid_third_middle")
  cfg = models["longgen"].config
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim) == (12, 512, 4, 128) == tuple(
      base.MODEL[k] for k in ("num_layers", "hidden_size", "num_heads", "head_dim"))
  assert [str(s) for s in cfg.layer_specs] == ["sink_window(64,256)"] * 4 + ["full"] * 4 + ["sink_window(64,256)"] * 4
  assert models["all_full"].config.num_full_layers == 12
  assert all(a is b for a, b in zip(jax.tree.leaves(nnx.state(models["longgen"])),
                                    jax.tree.leaves(nnx.state(models["all_full"]))))
  r = inference.time_prefill(models["longgen"], 128, 64, "auto", repeats=1, batch=2)
  assert r["s"] > 0 and r["first_s"] > 0


def test_monitor_samples_until_killed(tmp_path):
  """benchmarks/monitor.sh writes a timestamped line per interval (host memory; 'gpu none' without
  nvidia-smi) and stops when killed."""
  import subprocess
  import time
  out = tmp_path / "mon.txt"
  p = subprocess.Popen(["bash", os.path.join(ROOT, "benchmarks", "monitor.sh"), str(out), "0.2"])
  time.sleep(1.5)
  p.kill()
  p.wait(timeout=10)
  lines = out.read_text().splitlines()
  assert len(lines) >= 3, lines
  for line in lines:
    stamp, rest = line.split(" ", 1)
    assert len(stamp.split(":")) == 3 and rest.startswith("gpu ") and " host_used_gib " in rest
    assert int(rest.rsplit(" ", 1)[1]) >= 0


def test_host_offload_probe_copies_into_pinned_host_memory(capsys):
  """benchmarks/host_offload.py on the CPU's pinned_host memory kind: every repeat timed, the first call's
  excess derived from the later ones, and a bad --repeats refused."""
  import pytest
  import host_offload
  r = host_offload.probe(0.001, jax.devices()[:1], repeats=3)
  assert len(r["seconds"]) == 3 and all(s > 0 for s in r["seconds"]) and r["devices"] == 1
  later = sum(r["seconds"][1:]) / 2   # the median of the two later calls
  assert abs(r["first_call_excess_s"] - (r["seconds"][0] - later)) < 1e-12
  assert abs(r["gib_per_device"] - 0.001) < 1e-5
  with pytest.raises(SystemExit):
    host_offload.main(["--repeats", "1"])
  assert "--repeats must be >= 2" in capsys.readouterr().err


def test_host_offload_runs_each_probe_in_a_fresh_process(tmp_path, capsys):
  """main: one child process per (size, device count) writes its row to the JSON (a cold pinned pool each);
  a device count outside 1..visible is refused before anything runs."""
  import json
  import pytest
  import host_offload
  out = tmp_path / "r.json"
  assert host_offload.main(["--gib", "0.001,0.002", "--devices", "1", "--repeats", "2", "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert [r["requested_gib"] for r in rows] == [0.001, 0.002] and all(len(r["seconds"]) == 2 for r in rows)
  assert "| GiB per device |" in capsys.readouterr().out
  for bad in ("0", "99"):
    with pytest.raises(SystemExit):
      host_offload.main(["--devices", bad])
    assert "each count must be 1.." in capsys.readouterr().err


def test_scaling_compiles_each_gpu_case_in_a_child_that_mocks_its_gpus(tmp_path, monkeypatch):
  """A gpu:N case runs in a child told to plan for N GPUs (runtime.plan_for_devices: the mock is fixed when
  JAX's client starts); the child's rows are the parent's."""
  import json
  import subprocess
  import types

  import scaling
  gpu = [k for k, c in scaling.CASES.items() if c.topology.startswith("gpu:")]
  assert gpu and scaling.case_names("gpu,7b_128k_v5p16") == gpu + ["7b_128k_v5p16"]
  seen = {}

  def child(cmd, env, timeout):
    seen.update(env=env, cmd=cmd)
    out = cmd[cmd.index("--out") + 1]
    with open(out, "w") as f:
      json.dump({"results": [{"name": cmd[cmd.index("--cases") + 1], "per_chip_gib": {"total": 1.0}}]}, f)
    return types.SimpleNamespace(returncode=0)

  monkeypatch.setattr(subprocess, "run", child)
  args = types.SimpleNamespace(scan="on", remat="full", full_strategy="ring_loop", case_timeout=0)
  rows = scaling.in_mocked_child("70b_128k_gpu64", args)
  assert rows == [{"name": "70b_128k_gpu64", "per_chip_gib": {"total": 1.0}}]
  assert seen["env"][scaling.MOCK_ENV] == "64" and seen["cmd"][seen["cmd"].index("--full-strategy") + 1] == "ring_loop"

  def timed_out(cmd, env, timeout):   # --scan both: the first compile wrote its row, the second ran out of time
    child(cmd, env, timeout)
    raise subprocess.TimeoutExpired(cmd, timeout)

  monkeypatch.setattr(subprocess, "run", timed_out)
  first, failure = scaling.in_mocked_child("70b_128k_gpu64", types.SimpleNamespace(**{**vars(args), "case_timeout": 9}))
  assert first["per_chip_gib"] == {"total": 1.0}
  assert failure["error"] == "the child was still compiling after --case-timeout 9 s after the rows above"


def test_scaling_gpu_case_without_a_gpu_is_an_error_row(tmp_path):
  """On this CPU the child refuses (its devices are host devices, not mocked GPUs) with a row that says so,
  instead of a compile for the wrong devices."""
  import json
  import subprocess
  out = tmp_path / "r.json"
  p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "scaling.py"), "--cases", "7b_128k_gpu8",
                      "--out", str(out)], capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT))
  assert p.returncode == 0, p.stderr[-2000:]
  (row,) = json.loads(out.read_text())["results"]
  assert row["name"] == "7b_128k_gpu8" and "needs a GPU client mocking 8 processes" in row["error"]
  assert "this one has 8 cpu devices" in row["error"]   # planned for 8, but on the CPU backend
