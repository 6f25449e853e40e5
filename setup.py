"""setup.cfg says what the package is. This adds what a build needs besides: the copy of
MediaPipe Tasks for Web that `convmixer-web` serves (convmixer_tf/web/bundle.py says which
files), taken from node_modules/ (`npm ci`) into every wheel and source archive. A wheel
built from a source archive takes the copy the archive carries. An editable install
takes none: it serves node_modules/ of the repository.
"""

import os
import runpy

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = os.path.dirname(os.path.abspath(__file__))
bundle = runpy.run_path(os.path.join(HERE, "convmixer_tf", "web", "bundle.py"))
TARGET = os.path.join("convmixer_tf", "web", "tasks-vision")


def mediapipe_source() -> str:
    """node_modules/ after `npm ci`, or the copy an unpacked source archive carries; a
    failed build otherwise (a wheel without it could not serve the page)."""
    installed = os.path.join(HERE, "node_modules", *bundle["MEDIAPIPE_PACKAGE"].split("/"))
    for folder in (installed, bundle["PACKAGED"]):
        if not bundle["missing"](folder):
            return folder
    raise SystemExit(
        f"error: {bundle['MEDIAPIPE_PACKAGE']} not found in {installed}: run `npm ci` in the "
        "repository first. The wheel carries the web page's copy of it: without it, "
        "`convmixer-web` could not serve the page."
    )


class BuildPy(build_py):
    def run(self):
        source = None if self.editable_mode else mediapipe_source()
        super().run()
        if source:
            bundle["copy"](source, os.path.join(self.build_lib, TARGET))


class Sdist(sdist):
    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        bundle["copy"](mediapipe_source(), os.path.join(base_dir, TARGET))


setup(cmdclass={"build_py": BuildPy, "sdist": Sdist})
