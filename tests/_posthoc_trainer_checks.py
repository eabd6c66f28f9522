"""What the Lightning and Hugging Face tests check of a PostHocEMA run by a trainer: a
run driven by hand over the weights the trainer's optimizer steps produced, and the
snapshots and profiles compared bit for bit."""

from __future__ import annotations

import torch

import belay_kernels as bk
from belay_kernels import posthoc

POSTHOC = dict(sigma_rels=(0.05, 0.10), snapshot_every=3, snapshot_dtype=torch.float32)


def posthoc_by_hand(model, trajectory, snapshot_dir):
    """``PostHocEMA`` on ``model`` stepped once per state in ``trajectory[1:]``."""
    model.load_state_dict(trajectory[0])
    averager = bk.PostHocEMA(model, snapshot_dir=snapshot_dir, **POSTHOC)
    for weights in trajectory[1:]:
        model.load_state_dict(weights)  # in place: the averager's views stay bound
        averager.step()
    averager.wait()
    return averager


def snapshot_steps(folder):
    return [posthoc.read_snapshot(path)["step"] for path in posthoc.snapshot_files(folder)]


def assert_same_snapshots(folder, expected_folder):
    files = posthoc.snapshot_files(folder)
    assert [f.name for f in files] == [f.name for f in posthoc.snapshot_files(expected_folder)]
    for path in files:
        got, expected = (posthoc.read_snapshot(d / path.name) for d in (folder, expected_folder))
        assert (got["index"], got["step"]) == (expected["index"], expected["step"]), path.name
        for got_profile, expected_profile in zip(got["profiles"], expected["profiles"]):
            for a, b in zip(got_profile, expected_profile):
                assert torch.equal(a, b), path.name


def assert_same_profiles(averager, expected):
    got, want = averager.state_dict(), expected.state_dict()
    for key in ("num_steps", "num_updates", "num_snapshots", "hparams"):
        assert got[key] == want[key], key
    for k in range(len(expected.gammas)):
        profile, expected_profile = got[f"profile_{k}"], want[f"profile_{k}"]
        assert profile.keys() == expected_profile.keys()
        for name, value in profile.items():
            assert torch.equal(value, expected_profile[name]), (k, name)


class RecordingPostHocEMA(bk.PostHocEMA):
    """Logs each wait() and state_dict() the callback makes, with the step it came at."""

    def __init__(self, module, *, events, **kwargs):
        self.events = events
        self._in_state_dict = False
        super().__init__(module, **kwargs)

    def wait(self):
        # state_dict() may wait by itself; only the callback's own calls are logged.
        if not self._in_state_dict:
            self.events.append(("wait", self.num_steps))
        super().wait()

    def state_dict(self):
        self.events.append(("state_dict", self.num_steps))
        self._in_state_dict = True
        try:
            return super().state_dict()
        finally:
            self._in_state_dict = False
