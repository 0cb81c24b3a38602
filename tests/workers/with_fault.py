"""Run an entry point with a fault hook: this process SIGKILLs itself at a named point.

    python with_fault.py POINT [KEY=VALUE ...] -- (-m MODULE | SCRIPT) [ARGS...]

The process kills itself when it reaches POINT (see megatron_rgm.faults) with every
KEY equal to VALUE in the point's context (e.g. ``iteration=2``); torchrun takes this
file as its script, the same as the entry point it wraps.
"""

import os
import runpy
import signal
import sys

from megatron_rgm import faults


def main() -> None:
    split = sys.argv.index("--")
    point, conditions = sys.argv[1], dict(item.split("=", 1) for item in sys.argv[2:split])
    target = sys.argv[split + 1:]

    def die(**context) -> None:
        if all(str(context.get(key)) == value for key, value in conditions.items()):
            os.kill(os.getpid(), signal.SIGKILL)

    faults.install(point, die)
    if target[0] == "-m":
        sys.argv = [target[1], *target[2:]]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = target
        runpy.run_path(target[0], run_name="__main__")


if __name__ == "__main__":
    main()
