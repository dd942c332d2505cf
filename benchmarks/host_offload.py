"""What pinned host memory costs the first time: the suspect of the long first step of `remat="offload"`.

The 7B step at 512K over 4 H100s took 233 s for its first step and 63 s for its second (44 GiB of pinned host
memory per GPU); at 1M on 4 H200s (88 GiB per GPU) the first step outlived a 10-minute call. XLA's pinned
host pool grows on demand, so the first step may pay for allocating and registering it. This measures that
alone, without the model: a jitted copy of N GiB per GPU from device memory into pinned host memory (as an
offloaded activation is written), on 1 GPU and on all the visible GPUs of one process at once, repeated:

  call 1 allocates the pinned pool (XLA's host allocator grows), calls 2.. reuse it (the output is freed
  between calls). Reported per size and device count: each call's seconds, the copy bandwidth of the later
  calls, and the first call's excess over them, per GiB: the one-time cost the 1M step would pay
  ~88 GiB x 4 GPUs of, serialised or not within one process. Each (size, device count) runs in a fresh
  process: the pool lives as long as the process and never shrinks, so in one process only the first probe
  would see it cold.

  python benchmarks/host_offload.py --gib 8,44,88 --json r.json   # an H200 machine (the source array of
                                                                   # 88 GiB does not fit an 80 GB H100)
  python benchmarks/host_offload.py --gib 0.01 --repeats 2        # a CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def probe(gib: float, devices: list, repeats: int) -> dict:
  """`repeats` timed copies of `gib` GiB per device into pinned host memory (one program over `devices`)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  mesh = Mesh(np.array(devices), ("d",))
  rows = max(1, int(gib * 2**30) // (4 * 1024))   # float32 rows of 1024
  on_device = NamedSharding(mesh, P("d"), memory_kind="device")
  on_host = NamedSharding(mesh, P("d"), memory_kind="pinned_host")
  x = jax.jit(lambda: jnp.ones((rows * len(devices), 1024), jnp.float32), out_shardings=on_device)()
  to_host = jax.jit(lambda a: a, out_shardings=on_host)
  to_host.lower(x).compile()   # compile outside the timed calls
  seconds = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    y = to_host(x)
    y.block_until_ready()
    seconds.append(time.perf_counter() - t0)
    if y.sharding.memory_kind != "pinned_host":
      raise RuntimeError(f"the copy landed in {y.sharding.memory_kind!r}, not pinned_host")
    del y   # back to the pool: the next call reuses it
  per_device_gib = rows * 1024 * 4 / 2**30
  later = statistics.median(seconds[1:]) if len(seconds) > 1 else None
  return {"gib_per_device": per_device_gib, "devices": len(devices), "seconds": seconds,
          "copy_GBps_per_device": per_device_gib * 2**30 / later / 1e9 if later else None,
          "first_call_excess_s": seconds[0] - later if later is not None else None,
          "excess_s_per_gib": (seconds[0] - later) / (per_device_gib * len(devices)) if later is not None else None}


def probe_in_fresh_process(gib: float, devices: int, repeats: int) -> dict:
  """`probe` in a child process (a cold pinned pool), its row from the child's last stdout line."""
  code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import host_offload, jax; "
          "print(json.dumps(host_offload.probe(float(sys.argv[2]), jax.devices()[:int(sys.argv[3])], "
          "int(sys.argv[4]))))")
  p = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)), str(gib), str(devices),
                      str(repeats)], capture_output=True, text=True)
  if p.returncode:
    lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
    return {"devices": devices, "error": (lines[-1] if lines else f"exit {p.returncode}")[:300]}
  return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--gib", default="1,8,32", help="comma-separated GiB per device")
  p.add_argument("--devices", default="1,all", help="comma-separated device counts ('all' = every visible one)")
  p.add_argument("--repeats", type=int, default=3, help="calls per size (>= 2 to separate the first)")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  if args.repeats < 2:
    p.error("--repeats must be >= 2: the first call is compared with the later ones")
  from longgen_jax.parallel.runtime import HOST_MEMORY_ENV, allow_offload_host_memory
  allow_offload_host_memory("offload")   # the training CLI's cap for remat="offload"; the children inherit it
  from multi_gpu_train import visible_devices   # benchmarks/, this script's directory
  visible, kind, version = visible_devices()
  try:
    counts = sorted({visible if c.strip() == "all" else int(c) for c in args.devices.split(",")})
  except ValueError:
    p.error(f"--devices takes counts or 'all', got {args.devices!r}")
  if counts[0] < 1 or counts[-1] > visible:
    p.error(f"--devices {args.devices}: each count must be 1..{visible} (the visible devices)")
  meta = {"device": kind, "visible": visible, "jax": version, "date": str(datetime.date.today()),
          "host_memory_cap_gib": os.environ.get(HOST_MEMORY_ENV)}
  print("# " + json.dumps(meta), flush=True)
  rows = []
  for gib in (float(g) for g in args.gib.split(",")):
    for n in counts:
      row = {"requested_gib": gib, **probe_in_fresh_process(gib, n, args.repeats)}
      rows.append(row)
      print(json.dumps(row), flush=True)
      if args.json:
        with open(args.json, "w") as f:
          json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print("\n| GiB per device | devices | calls (s) | copy GB/s per device | first-call excess s | per GiB |\n"
        "|---|---|---|---|---|---|")
  for r in rows:
    if "error" in r:
      print(f"| {r['requested_gib']:g} | {r['devices']} | {r['error'][:60]} | | | |")
      continue
    print(f"| {r['gib_per_device']:.3g} | {r['devices']} | {', '.join(f'{s:.2f}' for s in r['seconds'])} | "
          f"{r['copy_GBps_per_device']:.1f} | {r['first_call_excess_s']:.2f} | {r['excess_s_per_gib']:.3f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
