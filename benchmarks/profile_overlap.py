"""Does communication run under compute? Per GPU of a jax.profiler trace: kernel time, NCCL time, and how much
of the NCCL time had a compute kernel running beside it on the same GPU.

  python benchmarks/profile_overlap.py TRACE_DIR [--json out.json]

TRACE_DIR is what `jax.profiler.trace` wrote (any *.xplane.pb below it; e.g. from
`benchmarks/context_parallel.py --profile` or the training CLI's `profile_steps`). On each GPU plane, the
events of the stream lines are kernels: those whose name contains "nccl" are communication, the rest compute.
Reported per GPU: compute busy time, communication busy time (each the union of its kernels' intervals),
hidden = the part of communication time during which some compute kernel also ran, exposed = the rest.
Exposed communication is what a ring step waits for; "hidden" near 100% means the rotations overlap.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

Interval = tuple[int, int]  # [start, end) in ns


def union(intervals: list[Interval]) -> list[Interval]:
  """Sorted, disjoint intervals covering the same time."""
  merged: list[Interval] = []
  for start, end in sorted(intervals):
    if merged and start <= merged[-1][1]:
      merged[-1] = (merged[-1][0], max(merged[-1][1], end))
    else:
      merged.append((start, end))
  return merged


def total(intervals: list[Interval]) -> int:
  return sum(end - start for start, end in intervals)


def intersection(a: list[Interval], b: list[Interval]) -> list[Interval]:
  """Overlap of two disjoint sorted interval lists."""
  out, i, j = [], 0, 0
  while i < len(a) and j < len(b):
    start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
    if start < end:
      out.append((start, end))
    if a[i][1] < b[j][1]:
      i += 1
    else:
      j += 1
  return out


def overlap_summary(kernels: list[tuple[str, int, int]]) -> dict:
  """kernels: (name, start_ns, end_ns) of one GPU -> busy times in ms and the hidden share of communication."""
  comm = union([(s, e) for name, s, e in kernels if "nccl" in name.lower()])
  compute = union([(s, e) for name, s, e in kernels if "nccl" not in name.lower()])
  hidden = total(intersection(comm, compute))
  return {"compute_ms": total(compute) / 1e6, "comm_ms": total(comm) / 1e6, "hidden_ms": hidden / 1e6,
          "exposed_ms": (total(comm) - hidden) / 1e6,
          "hidden_fraction": hidden / total(comm) if comm else None,
          "span_ms": (max(e for _, _, e in kernels) - min(s for _, s, _ in kernels)) / 1e6 if kernels else 0.0}


def gpu_kernels(trace_dir: str) -> dict[str, list[tuple[str, int, int]]]:
  """{GPU plane name: [(kernel name, start_ns, end_ns)]} from every *.xplane.pb below trace_dir."""
  from jax.profiler import ProfileData
  found: dict[str, list[tuple[str, int, int]]] = {}
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise SystemExit(f"no *.xplane.pb below {trace_dir}")
  for path in paths:
    for plane in ProfileData.from_file(path).planes:
      if not plane.name.startswith("/device:GPU:"):
        continue
      for line in plane.lines:
        if line.name.startswith("Stream"):
          found.setdefault(plane.name, []).extend(
              (e.name, int(e.start_ns), int(e.start_ns + e.duration_ns)) for e in line.events)
  return found


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("trace_dir")
  p.add_argument("--json", default="")
  args = p.parse_args()
  per_gpu = {gpu: overlap_summary(kernels) for gpu, kernels in sorted(gpu_kernels(args.trace_dir).items())}
  if not per_gpu:
    raise SystemExit(f"no GPU stream events in {args.trace_dir} (a CPU trace has none)")
  print("| GPU | compute ms | NCCL ms | hidden ms | exposed ms | hidden | span ms |\n|---|---|---|---|---|---|---|")
  for gpu, r in per_gpu.items():
    hidden = f"{100 * r['hidden_fraction']:.0f}%" if r["hidden_fraction"] is not None else "-"
    print(f"| {gpu} | {r['compute_ms']:.1f} | {r['comm_ms']:.1f} | {r['hidden_ms']:.1f} | {r['exposed_ms']:.1f} | "
          f"{hidden} | {r['span_ms']:.1f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(per_gpu, f, indent=1)


if __name__ == "__main__":
  main()
