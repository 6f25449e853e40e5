"""Turns SIGTERM into SystemExit so that staging directories are cleaned up on `kill`."""

import signal
import sys


def exit_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
