"""Train "forever" with PostHocEMA writing a snapshot every step, until killed.

    python posthoc_crash_script.py FOLDER NUMEL OFFSET

The weights at step t (1-based) are all ``OFFSET + t``, so the test knows what every
complete snapshot must hold. The writer thread is always busy, so a kill lands in a write.
"""

import sys

import torch

import belay_kernels as bk

folder, numel, offset = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
torch.set_num_threads(1)
p = torch.nn.Parameter(torch.zeros(numel))
phema = bk.PostHocEMA(
    [p],
    sigma_rels=(0.05, 0.10),
    snapshot_every=1,
    snapshot_dir=folder,
    snapshot_dtype=torch.float32,
)
t = 0
while True:
    t += 1
    p.data.fill_(offset + t)
    phema.step()
