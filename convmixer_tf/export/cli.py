"""What the command-line tools share: progress messages and clean-up on SIGTERM."""

import signal
import sys


def start(quiet: bool):
    """Makes SIGTERM clean up like a failure (staging directories are removed) and
    returns the progress logger (stderr, silent with --quiet)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    def log(message):
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    return log
