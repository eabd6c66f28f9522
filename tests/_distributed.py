"""Run a function on N real gloo ranks (CPU processes), for the distributed tests.

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes with
``torch.multiprocessing``, initialises a gloo process group in each, calls
``fn(rank, world_size, *args)`` (``fn`` must be a module-level function), and returns
every rank's result. A rank that raises fails the call with that rank's traceback; ranks
that have not all finished within ``timeout`` seconds (a hung collective) are killed and
the call fails. Each rank runs torch on one thread: the CI machine has two cores.
"""

from __future__ import annotations

import io
import os
import queue
import shutil
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.multiprocessing as mp


def _entry(fn, rank, world_size, store_path, results, args):
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world_size)  # a file: no port to race for
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
        )
        value = fn(rank, world_size, *args)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # report everything, including assertion failures
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# Ranks start from a fork server that has imported these once, so each run costs a fork
# instead of a fresh interpreter importing torch (seconds per rank on a 2-core machine).
# The server itself never ran torch code, so no thread pool is forked.
PRELOAD = ["torch", "torch.distributed.fsdp", "torch.distributed.checkpoint", "belay_kernels"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    ctx = _context()
    results = ctx.Queue()
    store_dir = tempfile.mkdtemp(prefix="belay-ranks-")
    store_path = os.path.join(store_dir, "store")
    procs = [
        ctx.Process(
            target=_entry, args=(fn, rank, world_size, store_path, results, args), daemon=True
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    values: dict[int, object] = {}
    try:
        while len(values) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(values))
                raise AssertionError(
                    f"ranks {missing} of {world_size} did not finish {fn.__name__} within "
                    f"{timeout:.0f} s (a hung collective?)"
                )
            try:
                rank, ok, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [
                    i
                    for i, p in enumerate(procs)
                    if p.exitcode not in (None, 0) and i not in values
                ]
                if dead:
                    raise AssertionError(
                        f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}"
                    ) from None
                continue
            if not ok:
                raise AssertionError(
                    f"rank {rank} of {world_size} failed in {fn.__name__}:\n{payload}"
                )
            values[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            if p.is_alive():
                p.join(timeout=5 if len(values) == world_size else 0)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(store_dir, ignore_errors=True)
    return [values[r] for r in range(world_size)]
