"""The ``belay-kernels`` command: ``demo``, ``bench``, ``reproduce``, ``posthoc`` and ``backends``."""

from __future__ import annotations

import argparse
import importlib
import sys

from ._toolkit import quiet_torch_cuda_home_warning

# subcommand -> (module with a main(argv) function, one-line help)
COMMANDS = {
    "demo": ("belay_kernels.demo", "train a small model with each averager and print a table"),
    "bench": ("belay_kernels.benchmark", "measure the kernels and the peers on this machine"),
    "reproduce": ("belay_kernels.experiments", "reproduce the seed documents' experiments"),
    "posthoc": (
        "belay_kernels.reconstruction",
        "reconstruct an EMA of any length from PostHocEMA's snapshots",
    ),
    "backends": ("belay_kernels.cli", "say which backends run here and why the others do not"),
}


def _usage() -> str:
    lines = ["usage: belay-kernels {" + ",".join(COMMANDS) + "} [options]", ""]
    lines += [f"  {name:10s} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`belay-kernels COMMAND --help` describes each command's options."]
    return "\n".join(lines)


def _print_backends(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="belay-kernels backends",
        description="Print each backend (torch, reference, inductor, cpp, cuda, triton) and "
        "whether it runs on this machine; for one that does not, the reason; then which one "
        "backend='auto' takes on each device type, and why. Where the compiled kernels were "
        "not built, the reason recorded at install time and the command that rebuilds them.",
    )
    parser.parse_args(argv)
    from . import backends
    from .auto_choice import DESCRIBED_DEVICE_TYPES, explain_auto

    for name, status in backends().items():
        print(f"{name:9s} {status}")
    print("\nbackend='auto', per device type:")
    for device_type in DESCRIBED_DEVICE_TYPES:
        print(f"  {device_type:5s} {explain_auto(device_type)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_torch_cuda_home_warning()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in COMMANDS:
        print(
            f"belay-kernels: unknown command {argv[0]!r}; the commands are "
            f"{', '.join(COMMANDS)}.\n",
            file=sys.stderr,
        )
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] == "backends":
        return _print_backends(argv[1:])
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
