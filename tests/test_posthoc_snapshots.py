"""PostHocEMA's snapshots in one process: the checksum, the writer thread (a write in
flight does not block the next step; a failed one surfaces, once, before anything
changes), leftovers of killed writes (removed by the next write, named by reconstruct),
damaged data named, and the command with several sigma_rels."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from test_posthoc import _walk

import belay_kernels as bk
from belay_kernels import posthoc, reconstruction, snapshots
from belay_kernels._checks import BelayInputError
from belay_kernels.snapshots import IncompleteSnapshotWarning, SnapshotWriteError

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _slow_checksum(t: torch.Tensor) -> int:
    """The checksum's definition, in Python integers."""
    width = {2: np.uint16, 4: np.uint32, 8: np.uint64}[t.element_size()]
    bits = t.contiguous().reshape(-1).view(torch.uint8).numpy().view(width)
    return sum(int(b) * (2 * i + 1) for i, b in enumerate(bits)) % (1 << 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_checksum_is_its_definition_and_sums_over_any_pieces(dtype):
    g = torch.Generator().manual_seed(3)
    t = (torch.randn(37, 11, generator=g) * 1e3).to(dtype)
    whole = snapshots.checksum(t, t.shape)
    assert whole == _slow_checksum(t)
    # rows (FSDP2's and the reconstruction's chunks), columns, and blocks of both
    for cuts in ([(0, 19), (19, 37)], [(0, 0), (0, 37)]):
        parts = [snapshots.checksum(t[a:b], t.shape, (a, 0)) for a, b in cuts]
        assert snapshots.combine(parts) == whole
    parts = [snapshots.checksum(t[:, a:b], t.shape, (0, a)) for a, b in [(0, 4), (4, 11)]]
    assert snapshots.combine(parts) == whole
    blocks = [
        snapshots.checksum(t[r0:r1, c0:c1], t.shape, (r0, c0))
        for r0, r1 in [(0, 5), (5, 37)]
        for c0, c1 in [(0, 7), (7, 11)]
    ]
    assert snapshots.combine(blocks) == whole
    big = torch.randn(200_003, generator=g).to(dtype)  # several of the writer's chunks
    assert snapshots.checksum(big, big.shape) == (
        snapshots.checksum(big[:70_001], big.shape)
        + snapshots.checksum(big[70_001:], big.shape, (70_001,))
    ) % (1 << 64)
    scalar = torch.tensor(2.5, dtype=dtype)
    assert snapshots.checksum(scalar, scalar.shape) == _slow_checksum(scalar)


@pytest.mark.parametrize("dtype", DTYPES)
def test_checksum_changes_with_every_single_bit_flip(dtype):
    t = torch.randn(3, 300, generator=torch.Generator().manual_seed(5)).to(dtype)
    whole = snapshots.checksum(t, t.shape)
    raw = t.reshape(-1).view(torch.uint8)
    rng = np.random.default_rng(0)
    for byte in rng.choice(raw.numel(), 64, replace=False):
        for bit in range(8):
            flipped = raw.clone()
            flipped[byte] ^= 1 << bit
            assert snapshots.checksum(flipped.view(dtype).reshape(t.shape), t.shape) != whole


# ---- the writer thread ---------------------------------------------------------------
def _phema(folder, **options):
    p = torch.nn.Parameter(torch.zeros(1001))
    return p, bk.PostHocEMA([p], snapshot_every=3, snapshot_dir=folder, **options)


def test_a_write_in_flight_does_not_block_the_next_steps(tmp_path, monkeypatch):
    release, started = threading.Event(), threading.Event()
    real = snapshots.write_file

    def gated(*args):
        started.set()
        assert release.wait(60), "the test never released the write"
        real(*args)

    monkeypatch.setattr(snapshots, "write_file", gated)
    p, phema = _phema(tmp_path)
    for t in range(3):
        p.data.fill_(t)
        phema.step()  # the third step hands snapshot 1 to the writer thread
    assert started.wait(60)
    for t in range(3, 5):  # the write is held: these steps must not wait for it
        p.data.fill_(t)
        phema.step()
        assert phema._writer.busy
    assert not (tmp_path / "snapshot-000001.pt").exists()
    release.set()
    phema.wait()
    assert posthoc.read_snapshot(tmp_path / "snapshot-000001.pt")["step"] == 3
    assert phema.num_steps == 5 and phema.write_in_background


def test_the_staged_copy_is_what_is_written(tmp_path, monkeypatch):
    """Steps made while the write is in flight change the profiles, not the snapshot."""
    release = threading.Event()
    real = snapshots.write_file

    def held(folder, *args):  # only the background writer's folder is held
        if folder == tmp_path:
            release.wait(60)
        real(folder, *args)

    monkeypatch.setattr(snapshots, "write_file", held)
    p, phema = _phema(tmp_path, snapshot_dtype=torch.float32)
    q, inline = _phema(tmp_path / "inline", snapshot_dtype=torch.float32, write_in_background=False)
    for w in _walk(1001, 5, seed=2):
        p.data.copy_(w)
        q.data.copy_(w)
        phema.step()
        inline.step()
    assert phema._writer.busy  # steps 4 and 5 ran while snapshot 1 was held
    release.set()
    phema.wait()
    ours = posthoc.read_snapshot(tmp_path / "snapshot-000001.pt")["profiles"]
    theirs = posthoc.read_snapshot(tmp_path / "inline" / "snapshot-000001.pt")["profiles"]
    for a, b in zip(ours, theirs):
        assert torch.equal(a[0], b[0])


def test_a_failed_write_surfaces_once_before_anything_changes(tmp_path, monkeypatch):
    def broken(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshots, "write_file", broken)
    p, phema = _phema(tmp_path)
    for t in range(3):
        p.data.fill_(t)
        phema.step()
    phema._writer._pending.exception()  # let the thread finish failing
    before = [v.clone() for v in phema._saved_tensors()["profile_0"]]
    p.data.fill_(100.0)
    with pytest.raises(SnapshotWriteError, match=r"snapshot-000001.pt.*No space left"):
        phema.step()
    assert phema.num_steps == 3
    assert torch.equal(phema._saved_tensors()["profile_0"][0], before[0])
    monkeypatch.undo()
    for _ in range(3):  # reported once; training goes on and numbering continues
        phema.step()
    phema.wait()
    assert [f.name for f in posthoc.snapshot_files(tmp_path)] == ["snapshot-000002.pt"]


def test_a_real_failing_write_surfaces_at_wait(tmp_path):
    folder = tmp_path / "later"
    p, phema = _phema(folder)
    folder.write_bytes(b"a file where the folder should be")
    for _ in range(3):
        phema.step()
    with pytest.raises(SnapshotWriteError, match="snapshot-000001.pt"):
        phema.wait()
    phema.wait()  # once


def test_inline_writes_raise_in_step(tmp_path):
    folder = tmp_path / "later"
    p, phema = _phema(folder, write_in_background=False)
    folder.write_bytes(b"x")
    phema.step()
    phema.step()
    with pytest.raises(SnapshotWriteError):
        phema.step()
    with pytest.raises(BelayInputError, match="write_in_background must be True or False"):
        _phema(tmp_path / "d", write_in_background=1)


def test_state_dict_waits_for_the_write(tmp_path, monkeypatch):
    release = threading.Event()
    real = snapshots.write_file
    monkeypatch.setattr(snapshots, "write_file", lambda *a: (release.wait(60), real(*a)))
    p, phema = _phema(tmp_path)
    for _ in range(3):
        phema.step()
    threading.Timer(0.2, release.set).start()
    state = phema.state_dict()
    assert state["num_snapshots"] == 1 and (tmp_path / "snapshot-000001.pt").exists()


# ---- leftovers and damage ----------------------------------------------------------------
def _run(folder, steps=60, every=20, dtype=torch.float16):
    p = torch.nn.Parameter(torch.zeros(4099))
    phema = bk.PostHocEMA([p], snapshot_every=every, snapshot_dir=folder, snapshot_dtype=dtype)
    for w in _walk(4099, steps, seed=7):
        p.data.copy_(w)
        phema.step()
    phema.wait()
    return phema


def test_leftovers_are_named_by_reconstruct_and_removed_by_the_next_write(tmp_path):
    _run(tmp_path, steps=40)
    clean = posthoc.reconstruct(tmp_path, sigma_rel=0.07)
    (tmp_path / ".snapshot-000003.pt.4242.tmp").write_bytes(b"half a snapshot")
    (tmp_path / ".snapshot-000004.partial").mkdir()
    (tmp_path / "snapshot-000005").mkdir()  # a folder without its header and metadata
    with pytest.warns(IncompleteSnapshotWarning, match=r"3 incomplete.*000003.pt.4242.tmp"):
        got = posthoc.reconstruct(tmp_path, sigma_rel=0.07)
    assert torch.equal(got["0"], clean["0"])
    _run(tmp_path, steps=20)  # the next write cleans up (and rewrites snapshot 1)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["snapshot-000001.pt", "snapshot-000002.pt", "snapshot-000005"]


def _flip_a_data_bit(path, tensor):
    """Flip one bit inside ``tensor``'s bytes where they sit in the file."""
    data = bytearray(path.read_bytes())
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    at = data.find(raw[1000:1064])
    assert at > 0 and data.find(raw[1000:1064], at + 1) < 0
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_flipped_bit_is_named(tmp_path, dtype):
    _run(tmp_path, dtype=dtype)
    target = tmp_path / "snapshot-000002.pt"
    _flip_a_data_bit(target, posthoc.read_snapshot(target)["profiles"][1][0])
    with pytest.raises(BelayInputError, match=r"snapshot-000002.pt' is damaged.*'0' in profile 1"):
        posthoc.reconstruct(tmp_path, sigma_rel=0.07)


def test_format_1_snapshots_still_reconstruct(tmp_path):
    _run(tmp_path)
    expected = posthoc.reconstruct(tmp_path, sigma_rel=0.07)
    for path in posthoc.snapshot_files(tmp_path):
        snap = posthoc.read_snapshot(path)
        del snap["checksums"], snap["dtype"]
        snapshots.atomic_save({**snap, "format": 1}, path)
    assert torch.equal(posthoc.reconstruct(tmp_path, sigma_rel=0.07)["0"], expected["0"])


def test_command_with_several_sigma_rels(tmp_path):
    pytest.importorskip("matplotlib")
    _run(tmp_path / "run")
    out, plot = tmp_path / "out", tmp_path / "moves.png"
    assert (
        reconstruction.main(
            [
                str(tmp_path / "run"),
                "--sigma-rel",
                "0.05",
                "0.07",
                "0.12",
                "--out",
                str(out),
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    for s in (0.05, 0.07, 0.12):
        saved = torch.load(out / reconstruction.output_name(s))
        assert torch.equal(saved["0"], posthoc.reconstruct(tmp_path / "run", sigma_rel=s)["0"])
    assert plot.stat().st_size > 10_000
