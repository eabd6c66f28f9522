"""The `belay-kernels` command as a new user meets it: an unknown command says so, every
subcommand's --help is complete, and quick runs inside the checkout leave it clean."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from belay_kernels import cli

ROOT = Path(__file__).resolve().parents[1]


def test_an_unknown_command_says_so(capsys):
    assert cli.main(["benchmark"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "belay-kernels: unknown command 'benchmark'; the commands are "
        "demo, bench, reproduce, posthoc, backends."
    )
    assert "usage: belay-kernels" in err


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def _sections(text: str) -> tuple[str, dict[str, str]]:
    """(the description, {option: its help text}) of argparse's --help output."""
    paragraphs = text.split("\n\n")
    description = " ".join(paragraphs[1].split())
    options, current = {}, None
    for line in text[text.index("\noptions:\n") :].splitlines()[2:]:
        match = re.match(r"  (-\S+(?:,? [^ ]+)*?)(?:  +(.*))?$", line)
        if match and not line.startswith("   "):
            current = match.group(1)
            options[current] = match.group(2) or ""
        elif current and line.startswith("   "):
            options[current] += " " + line.strip()
        elif not line.strip():
            current = None
    return description, options


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_subcommand_help_is_complete(command, capsys):
    text = _help(command, capsys)
    description, options = _sections(text)
    # whole sentences: starts with a capital, ends with a full stop (not cut mid-sentence)
    assert description[0].isupper() and description.endswith("."), description
    assert "-h, --help" in options and len(options) >= 1
    for option, help_text in options.items():
        assert help_text.strip(), f"{command} {option} has no help"
    for internal in ("run(quick", "-> Result", "out_dir"):
        assert internal not in text, f"{command} --help speaks of {internal!r}"


def test_the_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in cli.COMMANDS)


def _git_status() -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


@pytest.fixture
def in_checkout(monkeypatch):
    """cwd = the repository root; what the test leaves under belay-results/ is removed."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    pytest.importorskip("matplotlib")
    existed = (ROOT / "belay-results").exists()
    before = _git_status()
    monkeypatch.chdir(ROOT)
    yield before
    if not existed:
        shutil.rmtree(ROOT / "belay-results", ignore_errors=True)


def test_quick_runs_inside_the_checkout_leave_git_status_clean(in_checkout, capsys):
    pytest.importorskip("sklearn")
    assert cli.main(["reproduce", "sandler-table1", "--quick"]) == 0
    assert (
        cli.main(
            [
                "bench",
                "--quick",
                "--sizes",
                "3000",
                "--methods",
                "ema",
                "--dtypes",
                "fp32/fp32",
                "--peers",
                "torch._foreach_lerp_",
                "--min-run-time",
                "0.005",
                "--stream-size",
                "2e5",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "to belay-results/reproduce/quick/" in err and "to belay-results/bench/quick/" in err
    assert (ROOT / "belay-results" / "reproduce" / "quick" / "sandler-table1.md").is_file()
    assert (ROOT / "belay-results" / "bench" / "quick" / "results.json").is_file()
    assert _git_status() == in_checkout


def test_update_docs_refuses_a_quick_run(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["reproduce", "sandler-table1", "--quick", "--update-docs"])
    assert stop.value.code == 2
    assert "drop --quick" in capsys.readouterr().err


def test_demo_prints_our_time_beside_foreach_lerp(capsys):
    pytest.importorskip("sklearn")
    assert cli.main(["demo", "--epochs", "1", "--seeds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(line for line in lines if line.startswith("method"))
    assert head.split()[-2:] == ["update", "_foreach_lerp_"]
    rows = {line.split()[0]: line for line in lines[lines.index(head) + 1 :]}
    assert set(rows) == {"none", "EMA", "SWA", "BELAY"}
    assert rows["none"].split()[-2:] == ["-", "-"]
    for method in ("EMA", "SWA", "BELAY"):
        ours, _, lerp, unit = rows[method].split()[-4:]
        assert unit == "us" and float(ours) > 0 and float(lerp) > 0
