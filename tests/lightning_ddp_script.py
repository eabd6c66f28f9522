"""The Lightning checks under strategy="ddp" on two CPU processes (gloo).

Run by tests/test_integration_lightning.py as ``python tests/lightning_ddp_script.py
RESULT_JSON CKPT_DIR`` in two processes with torchrun's environment (LOCAL_RANK, RANK,
WORLD_SIZE, MASTER_ADDR/PORT); run once without it, Lightning starts the second itself.
The test waits with a timeout of 300 s and kills the process group when it expires, so a
hung collective fails the test rather than hanging CI.
Every rank runs every check, and the ranks' weights and averages must agree (the data
differ per rank, so they agree only if DDP still reduces the gradients of the flattened
parameters). Rank 0 writes what it measured to RESULT_JSON."""

import os
import sys

os.environ["BELAY_TEST_DEVICES"] = "2"
import lightning_cases as cases  # noqa: E402  (after the environment it reads)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402


def same_on_every_rank(tensors: dict) -> bool:
    # A sharded shadow's values are DTensors: each rank compares the whole of them.
    whole = [t.full_tensor() if isinstance(t, DTensor) else t for t in tensors.values()]
    mine = torch.cat([t.flatten() for t in whole])
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def main(result_path, ckpt_dir):
    results = {
        "matches_lightning": cases.check_matches_lightning_ema(accumulate=1),
        "matches_lightning_accumulate_4": cases.check_matches_lightning_ema(accumulate=4),
        "validation_and_resume": cases.check_validation_and_resume(ckpt_dir),
        # Each rank keeps a slice of the shadow; the checkpoint, written by rank 0 alone,
        # must still hold all of it.
        "sharded_shadow_validation_and_resume": cases.check_validation_and_resume(
            os.path.join(ckpt_dir, "sharded"), shard_shadow=True
        ),
    }
    for result in results.values():
        for kind in ("shadow", "live"):
            if kind in result:
                assert same_on_every_rank(result.pop(kind)), f"the ranks' {kind} differ"
    cases.report_and_leave(result_path, results)


if __name__ == "__main__":
    main(*sys.argv[1:3])
