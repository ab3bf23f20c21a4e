"""``python -m pfpl.federation.flower.superexec ARGS``: Flower's ``flower-superexec ARGS`` that forks its
ClientApp processes instead of starting them — for pfpl's loopback SuperNodes only
(:mod:`.supernode` starts it in place of ``flower-superexec``).

Flower's SuperExec starts a fresh ``flwr-clientapp`` process for every message; importing flwr's
ClientApp runtime alone takes 2–3 s of CPU on this machine (``python -X importtime``), which, even
with pfpl's warm worker, would be most of a loopback round trip. This SuperExec imports the runtime
and pfpl's thin ClientApp (:mod:`pfpl.federation.flower.apps`, which imports no numerical stack) once,
and for each ClientApp task forks a child that runs Flower's own ``flwr-clientapp`` entry point with
the arguments Flower would have passed (the task's token, the Runtime API address, ``--parent-pid``)
— the same code, the same Runtime API exchange with the SuperNode, the same exit status; only the
process start and the imports are skipped. The child resets the signal handlers and exit handlers
it inherits, exits with ``os._exit`` (never running the parent's cleanup), and is reaped by the
parent's loop. Other task types (none on a SuperNode) start as Flower starts them.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback


def _fork_clientapp(spec, command: str, address_arg: str):
    from flwr.supercore.exit import exit_handler
    from flwr.supercore.superexec.executor.types import LaunchResult
    from flwr.supernode.cli import flwr_clientapp

    args = [command, address_arg, spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        args += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return LaunchResult.accepted()
    code = 1
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGQUIT", signal.SIGTERM)):
            signal.signal(sig, signal.SIG_DFL)
        exit_handler.registered_exit_handlers.clear()  # the SuperExec's own: not this child's to run
        if spec.suppress_output:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
        sys.argv = args
        try:
            flwr_clientapp()
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def patch() -> None:
    """Make Flower's subprocess executor fork ClientApp tasks (and reap them)."""
    import flwr.supernode.runtime.run_clientapp  # noqa: F401 - imported once, here
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    import pfpl.federation.flower.apps  # noqa: F401 - the thin ClientApp Flower loads: found in sys.modules
    from pfpl.federation.flower.supernode import short_pull_backoff

    short_pull_backoff()  # the forked ClientApps pull their message without Flower's 1 s first back-off

    launch, reconcile = SubprocessExecutor.launch, SubprocessExecutor.reconcile

    def forking_launch(self, spec):
        if spec.task_type != TaskType.CLIENT_APP:
            return launch(self, spec)
        return _fork_clientapp(
            spec, TASK_TYPE_TO_COMMAND[spec.task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type]
        )

    def reaping_reconcile(self):
        _reap()
        return reconcile(self)

    SubprocessExecutor.launch = forking_launch
    SubprocessExecutor.reconcile = reaping_reconcile


def main() -> None:
    patch()
    from flwr.supercore.cli import flower_superexec

    sys.argv[0] = "flower-superexec"
    flower_superexec()


if __name__ == "__main__":
    main()
