"""The barrier protocol of the Mosaic GPU kernels' persistent programs, simulated on the CPU.

Mosaic GPU kernels do not run on a CPU, so this checks the protocol the persistent forward
(`pallas_mgpu.mgpu_forward` with `MgpuTiles(persistent=True)`) and dQ (`pallas_mgpu_backward`,
`MgpuBwdTiles(persistent_dq=True)`) rely on: one program walks several
query tiles' key-tile lists while its K/V SMEM ring runs on from one list into the next. Three
warpgroups (two compute, one memory) are coroutines that issue what the kernel issues, in its order;
mbarriers are modelled as the hardware has them (an arrival count per phase, waits by phase parity,
TMA copies landing at a random later time), and a scheduler interleaves the warpgroups at random. It
asserts no deadlock, that every K/V tile a compute warpgroup reads is the one its list names, and that
no copy is issued into a slot whose previous tile a warpgroup has not finished with. The lists are
the real `kv_table` of each pattern, walked in `plgpu.nd_loop`'s order. A model of the protocol, not
of the kernel's arithmetic (the GPU tests check that against the reference).
"""

import random

import numpy as np
import pytest

from longgen_jax.attention.pallas_mgpu import BLOCK_Q, kv_table
from longgen_jax.attention.spec import AttentionSpec


class Barrier:
  """An mbarrier: a phase completes when `arrivals` arrivals have come; a waiter passes once the phase
  of its local parity bit has completed (two completed phases ahead look like none: the hardware's ABA)."""

  def __init__(self, arrivals: int):
    self.arrivals, self.pending, self.completed = arrivals, 0, 0

  def arrive(self):
    self.pending += 1
    assert self.pending <= self.arrivals
    if self.pending == self.arrivals:
      self.pending, self.completed = 0, self.completed + 1


def program_lists(table: np.ndarray, B: int, Hq: int, G: int, programs: int, program: int):
  """The key-tile lists `program` walks, in `query_tile_programs`' nd_loop order over (query head, query
  tile from the last, batch row): flat items program, program + P, ..."""
  nq = table.shape[1]
  lists = []
  for flat in range(program, B * nq * Hq, programs):
    h, rank, b = flat // (nq * B), flat // B % nq, flat % B
    row = table[(h // G) % table.shape[0], nq - 1 - rank]
    lists.append([(b, h, int(t)) for t in row[2:2 + row[0]]])
  return lists


def simulate(lists, stages: int, seed: int, ring_runs_on: bool = True, kernel: str = "forward"):
  """Runs the three warpgroups of one persistent program over `lists`; ring_runs_on=False is the naive
  per-list ring (slot j % stages, the first `stages` copies of every list unguarded): must fail.
  kernel: "forward" (pallas_mgpu) or "dq" (pallas_mgpu_backward's dQ: the same ring, no ping-pong)."""
  rng = random.Random(seed)
  k_bar, v_bar = [Barrier(1) for _ in range(stages)], [Barrier(1) for _ in range(stages)]
  k_free, v_free = [Barrier(2) for _ in range(stages)], [Barrier(2) for _ in range(stages)]
  sched, q_bar = Barrier(2), [Barrier(1), Barrier(1)]
  k_slot, v_slot = [None] * stages, [None] * stages   # the tile each slot holds
  k_busy, v_busy = [set() for _ in range(stages)], [set() for _ in range(stages)]   # warpgroups reading it
  in_flight = []   # (slot array, slot, tile, barrier) of TMA copies not landed yet

  def wait(bar, parity):   # yields until the phase `parity` of `bar` has completed
    while bar.completed % 2 == parity[id(bar)]:
      yield
    parity[id(bar)] ^= 1

  def copy(slots, busy, slot, tile, bar):
    assert not busy[slot], f"copy of {tile} into slot {slot} while warpgroups {busy[slot]} read {slots[slot]}"
    in_flight.append((slots, slot, tile, bar))

  def memory():
    base, parity = 0, {id(b): 0 for b in k_free + v_free}
    for tiles in lists:
      for j, tile in enumerate(tiles):
        g = base + j if ring_runs_on else j
        slot = g % stages
        if g >= stages:
          yield from wait(k_free[slot], parity)
        copy(k_slot, k_busy, slot, tile, k_bar[slot])
        if g >= stages:
          yield from wait(v_free[slot], parity)
        copy(v_slot, v_busy, slot, tile, v_bar[slot])
        yield
      base += len(tiles)

  def compute_dq(wg):
    base, parity = 0, {id(b): 0 for b in k_bar + v_bar + q_bar}
    for tiles in lists:
      in_flight.append((None, None, None, q_bar[wg]))   # Q, dO, lse, delta of this query tile
      yield from wait(q_bar[wg], parity)
      for j, tile in enumerate(tiles):
        slot = (base + j if ring_runs_on else j) % stages
        yield from wait(k_bar[slot], parity)
        k_busy[slot].add(wg)
        assert k_slot[slot] == tile, f"warpgroup {wg} read K {k_slot[slot]} for {tile}"
        yield                                             # S = Q K^T
        yield from wait(v_bar[slot], parity)
        v_busy[slot].add(wg)
        assert v_slot[slot] == tile, f"warpgroup {wg} read V {v_slot[slot]} for {tile}"
        yield                                             # dP = dO V^T
        v_busy[slot].discard(wg)
        v_free[slot].arrive()
        yield                                             # dQ += dS K (K still read)
        assert k_slot[slot] == tile
        k_busy[slot].discard(wg)
        k_free[slot].arrive()
      base += len(tiles)

  def compute(wg):
    base, parity = 0, {id(b): 0 for b in k_bar + v_bar + [sched] + q_bar}

    def schedule():
      sched.arrive()
      yield from wait(sched, parity)

    for tiles in lists:
      ring = (lambda j: base + j) if ring_runs_on else (lambda j: j)
      in_flight.append((None, None, None, q_bar[wg]))   # this query tile's Q
      yield from wait(q_bar[wg], parity)
      if tiles:
        yield from wait(k_bar[ring(0) % stages], parity)
      if wg == 1:
        yield from schedule()
      for j, tile in enumerate(tiles):
        slot = ring(j) % stages
        k_busy[slot].add(wg)
        assert k_slot[slot] == tile, f"warpgroup {wg} read K {k_slot[slot]} for {tile}"
        yield                                             # QK^T in flight
        yield from schedule()
        k_busy[slot].discard(wg)
        k_free[slot].arrive()
        sched.arrive()                                    # softmax done
        yield from wait(v_bar[slot], parity)
        yield from wait(sched, parity)                    # tensor cores free
        v_busy[slot].add(wg)
        assert v_slot[slot] == tile, f"warpgroup {wg} read V {v_slot[slot]} for {tile}"
        if j + 1 < len(tiles):
          yield from wait(k_bar[ring(j + 1) % stages], parity)
        yield                                             # PV in flight
        v_busy[slot].discard(wg)
        v_free[slot].arrive()
      if wg == 0:
        yield from schedule()
      base += len(tiles)

  threads = [memory(), *(compute(wg) if kernel == "forward" else compute_dq(wg) for wg in (0, 1))]
  for _ in range(10**6):
    if not threads and not in_flight:
      return
    if in_flight and (not threads or rng.random() < 0.3):   # a copy lands
      slots, slot, tile, bar = in_flight.pop(rng.randrange(len(in_flight)))
      if slots is not None:
        slots[slot] = tile
      bar.arrive()
      continue
    t = rng.choice(threads)
    try:
      next(t)
    except StopIteration:
      threads.remove(t)
  raise AssertionError("deadlock: no warpgroup finished")


CASES = [  # spec, T, S, Hkv, block_k, stages
    (AttentionSpec.full(), 1000, 1000, 1, 128, 2),
    (AttentionSpec.sink_window(64, 200), 777, 777, 2, 128, 2),
    (AttentionSpec.block_sparse(64, 4, 8), 1100, 1100, 2, 64, 2),
    (AttentionSpec.full(), 640, 640, 1, 64, 3),
    (AttentionSpec.sink_window(0, 100), 640, 300, 1, 128, 2),   # queries past S + 100: empty lists
]


@pytest.mark.parametrize("kernel", ["forward", "dq"])
@pytest.mark.parametrize("spec,T,S,Hkv,bk,stages", CASES)
@pytest.mark.parametrize("programs", [1, 3, 7])
def test_persistent_ring_runs_on_across_query_tiles(spec, T, S, Hkv, bk, stages, programs, kernel):
  B, Hq = 2, 4
  table = kv_table(spec, -(-T // BLOCK_Q) * BLOCK_Q, S, Hkv, bk)
  if S < T:
    assert (table[..., 0] == 0).any() and (table[..., 0] > 0).any()   # empty lists between others
  for program in range(programs):
    lists = program_lists(table, B, Hq, Hq // Hkv, programs, program)
    assert sum(map(len, lists)) > stages
    for seed in range(3):
      simulate(lists, stages, seed=seed * 31 + program, kernel=kernel)


@pytest.mark.parametrize("kernel", ["forward", "dq"])
def test_the_model_catches_a_ring_that_restarts_per_query_tile(kernel):
  """The naive persistent ring (each list from slot 0, its first copies unguarded) overwrites tiles a
  warpgroup still reads, or deadlocks: the simulation must say so."""
  table = kv_table(AttentionSpec.full(), 512, 512, 1, 128)
  lists = program_lists(table, 1, 2, 2, 1, 0)
  failures = 0
  for seed in range(20):
    try:
      simulate(lists, 2, seed=seed, ring_runs_on=False, kernel=kernel)
    except AssertionError:
      failures += 1
  assert failures > 0
