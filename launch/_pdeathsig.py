"""Exec shim that ties a worker's life to its launcher, then becomes the worker.

Usage (run by ``launch.workers``, never by hand)::

    python -I -S _pdeathsig.py LAUNCHER_PID [--default-signals] CMD [ARGS...]

It asks Linux to SIGKILL this process when the launcher dies (``PR_SET_PDEATHSIG``) and
then ``exec``s the real command, which keeps the pid and the setting. This is what makes
"no orphans" hold even when the launcher itself is SIGKILLed. It runs as a separate tiny
process instead of a ``preexec_fn`` because the launcher has threads (the TCPStore
server), and running Python between ``fork`` and ``exec`` in a threaded process can
deadlock. Stdlib only, so ``-I -S`` startup stays around 10 ms.
"""

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def main() -> None:
    """Arm the parent-death signal, check the launcher is still there, exec the worker."""
    launcher_pid = int(sys.argv[1])
    argv = sys.argv[2:]
    if argv and argv[0] == "--default-signals":
        # A Ray actor's threads block (and may ignore) SIGINT, and both survive exec:
        # give the worker the mask and dispositions it would have under a shell.
        argv = argv[1:]
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            sys.stderr.write("odyssey: prctl(PR_SET_PDEATHSIG) failed; "
                             "this worker may outlive its launcher\n")
    # The launcher may have died between fork and prctl; then nobody would kill us.
    if os.getppid() != launcher_pid:
        os._exit(1)
    try:
        os.execvp(argv[0], argv)
    except OSError as err:
        sys.stderr.write(f"odyssey: cannot execute {argv[0]!r}: {err}\n")
        os._exit(127)


if __name__ == "__main__":
    main()
