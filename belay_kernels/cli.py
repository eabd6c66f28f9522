"""The ``belay-kernels`` command: ``demo``, ``bench`` and ``reproduce``."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with a main(argv) function, one-line help)
COMMANDS = {
    "demo": ("belay_kernels.demo", "train a small model with each averager and print a table"),
    "bench": ("belay_kernels.benchmark", "measure the kernels and the peers on this machine"),
    "reproduce": ("belay_kernels.experiments", "reproduce the seed documents' experiments"),
    "backends": ("belay_kernels.cli", "say which backends run here and why the others do not"),
}


def _print_backends(argv: list[str]) -> int:
    from . import backends

    for name, status in backends().items():
        print(f"{name:8s} {status}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: belay-kernels {" + ",".join(COMMANDS) + "} [options]\n")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:10s} {text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    if argv[0] == "backends":
        return _print_backends(argv[1:])
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
