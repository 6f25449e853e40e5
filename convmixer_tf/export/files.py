"""All-or-nothing output directories: build in a staging directory, move into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


class OutputExistsError(ValueError):
    """The output exists and replacing it was not asked for (bad input)."""


def check_output(output, force: bool) -> str:
    output = os.path.abspath(os.fspath(output))
    if os.path.exists(output) and not force:
        raise OutputExistsError(f"output {output} exists; pass --force to replace it")
    parent = os.path.dirname(output)
    if os.path.exists(parent) and not os.access(parent, os.W_OK):
        raise OutputExistsError(f"cannot write into {parent}: permission denied")
    return output


@contextlib.contextmanager
def staged_output(output, force: bool = False):
    """Yields a staging directory beside `output`; on success it becomes `output`.

    On any exception the staging directory is removed and an existing `output` is
    left untouched.
    """
    output = check_output(output, force)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.partial-", dir=parent)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(staging, 0o777 & ~mask)  # mkdtemp makes it private; the result should not be
        yield staging
        if os.path.exists(output):
            old = staging + ".old"
            os.replace(output, old)
            os.replace(staging, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
