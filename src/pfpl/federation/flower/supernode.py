"""``python -m pfpl.federation.flower.supernode ARGS``: Flower's ``flower-supernode ARGS`` with its fixed
waits shortened — for pfpl's loopback federation only (``pfpl flower run``, ``pfpl bench --flower``,
the tests).

flwr 1.41's SuperNode (``flwr.supernode.start_client_internal``) sleeps 3 s after every pull of the
SuperLink that brought no message, and polls every 0.5 s for its ClientApp's reply and for the
reply's objects. On loopback those waits are most of a round trip. This wrapper runs the unchanged
SuperNode with every ``time.sleep`` of that module capped at ``PFPL_SUPERNODE_POLL_S`` seconds
(default 0.02), so an idle SuperNode pulls the SuperLink about 50 times a second: cheap on
loopback, not what a SuperLink serving many SuperNodes over a network should be asked to bear; and
Flower's object-pull back-off starts at that instead of 1 s (:func:`short_pull_backoff`). It
also starts :mod:`pfpl.federation.flower.superexec` as the SuperNode's SuperExec, which forks each
message's ClientApp process from a process that has Flower's ClientApp runtime imported instead of
starting it afresh (``PFPL_SUPEREXEC_FORK=0``: Flower's own). A real deployment runs plain
``flower-supernode`` (README, "Beyond one machine", says what a message costs there).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time as _time

DEFAULT_POLL_S = 0.02
FAST_ENV = "PFPL_LOOPBACK_FAST"  # set by pfpl's loopback federation (LocalFederation(fast=True))


def short_pull_backoff(initial: float = DEFAULT_POLL_S, cap: float = DEFAULT_POLL_S) -> None:
    """Flower pulls a message's objects (from the SuperNode into its ClientApp, from the SuperLink into
    the ServerApp) with a retry back-off that starts at 1 s and doubles to 10 s when an object is not
    there yet — which on loopback it usually is not, by a few milliseconds: most of a round trip went
    to that first 1 s wait, and a doubling back-off still overshoots an object that arrives after a
    few tries. Poll every ``initial`` seconds, at most ``cap``, in this process; the tries per object
    are then unbounded (Flower's overall time limit per pull stays)."""
    from flwr.supercore.inflatable import inflatable_utils as inflatable

    for fn in (inflatable.pull_objects, inflatable.pull_and_inflate_object_from_tree):
        if fn.__kwdefaults__ and "initial_backoff" in fn.__kwdefaults__:
            fn.__kwdefaults__["initial_backoff"] = initial
            fn.__kwdefaults__["backoff_cap"] = cap
            fn.__kwdefaults__["max_tries_per_object"] = None


class _ShortSleeps:
    """The ``time`` module as ``start_client_internal`` sees it: every sleep at most ``cap`` seconds."""

    def __init__(self, cap: float):
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str):
        return getattr(_time, name)


class _ForkingSuperExec:
    """The ``subprocess`` module as ``start_client_internal`` sees it: the SuperExec it starts is
    :mod:`pfpl.federation.flower.superexec` (ClientApps forked, not started)."""

    def Popen(self, args, *rest, **kwargs):
        if args and args[0] == "flower-superexec":
            args = [sys.executable, "-m", "pfpl.federation.flower.superexec", *args[1:]]
        return subprocess.Popen(args, *rest, **kwargs)

    def __getattr__(self, name: str):
        return getattr(subprocess, name)


def patch(cap: float | None = None, fork: bool | None = None) -> None:
    from flwr.supernode import start_client_internal

    if cap is None:
        cap = float(os.environ.get("PFPL_SUPERNODE_POLL_S", DEFAULT_POLL_S))
    if fork is None:
        fork = os.environ.get("PFPL_SUPEREXEC_FORK", "1") != "0"
    start_client_internal.time = _ShortSleeps(max(0.001, cap))
    short_pull_backoff(max(0.001, cap))
    if fork:
        start_client_internal.subprocess = _ForkingSuperExec()


def main() -> None:
    patch()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
