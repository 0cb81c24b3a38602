"""Named points where a test injects a failure: a rank killed inside a save, a writer killed mid-batch.

Library code calls :func:`reach` at each point; nothing happens unless a hook was
installed for it in this process with :func:`install`, which no entry point of the
project does. The reliability tests install hooks in the processes they launch
(``tests/workers/with_fault.py`` wraps an entry point) and check that what the
killed process leaves behind is still readable and resumable.

Points (and the context each passes):

* ``checkpoint.before_publish`` (``iteration``, ``rank``): every rank has written its
  part of the checkpoint into ``iter_XXXXXXX.tmp``; it is not yet renamed, and the
  ``latest`` file still names the previous one;
* ``store.before_commit`` (``rank``): a rollout store's arrays hold a batch that this
  rank's commit file does not yet count.
"""

from __future__ import annotations

from typing import Callable

POINTS = ("checkpoint.before_publish", "store.before_commit")

_hooks: dict[str, Callable[..., None]] = {}


def install(point: str, hook: Callable[..., None]) -> None:
    """Call ``hook(**context)`` whenever this process reaches ``point``."""
    if point not in POINTS:
        raise ValueError(f"no fault point {point!r}: the points are {', '.join(POINTS)}")
    _hooks[point] = hook


def clear() -> None:
    _hooks.clear()


def reach(point: str, **context) -> None:
    """Mark that this process is at ``point`` (a no-op without an installed hook)."""
    hook = _hooks.get(point)
    if hook is not None:
        hook(**context)
