"""The part of the build pyproject.toml cannot say: the collection's files, installed as a package.

The wheel holds ``isession`` (from ``src/``) and ``ansible_collections/hpc/interactive`` (from the repository root,
which is the collection root): the collection's Python packages under ``plugins/`` and, as package data, the files
its galaxy artifact ships. ``tests/integration/test_packaging.py`` checks the two lists are equal.
"""
import os
import shutil

from setuptools import find_namespace_packages, find_packages, setup
from setuptools.command.build_py import build_py

COLLECTION = "ansible_collections.hpc.interactive"
# the collection's non-Python files (the same as galaxy.yml's build, see build_ignore there)
COLLECTION_DATA = [
    "galaxy.yml", "README.md", "LICENSE", "CHANGELOG.rst", "meta/*.yml",
    "changelogs/changelog.yaml", "changelogs/config.yaml",
    "playbooks/*.yml", "roles/**/*", "examples/**/*",
    # plugins' files that are not Python (a filter's or test's documentation, for instance)
    "plugins/**/*.yml", "plugins/**/*.yaml", "plugins/**/*.json", "plugins/**/*.md", "plugins/**/*.txt",
]


class BuildPy(build_py):
    """The collection root's own ``*.py`` files are build scripts (setup.py, noxfile.py), not collection modules.

    It also starts from an empty build directory: setuptools keeps ``build/lib`` between builds in a checkout, and
    a file removed from the collection would otherwise still ship in the next wheel.
    """

    def run(self):
        for top in ("ansible_collections", "isession"):
            shutil.rmtree(os.path.join(self.build_lib, top), ignore_errors=True)
        super().run()

    def find_package_modules(self, package, package_dir):
        return [] if package == COLLECTION else super().find_package_modules(package, package_dir)


setup(
    cmdclass={"build_py": BuildPy},
    package_dir={"": "src", COLLECTION: "."},
    packages=find_packages("src") + [COLLECTION] + [
        f"{COLLECTION}.{name}" for name in find_namespace_packages(".", include=["plugins", "plugins.*"],
                                                                   exclude=["*.__pycache__"])
    ],
    # all package data here: a [tool.setuptools.package-data] table in pyproject.toml would replace this mapping
    package_data={COLLECTION: COLLECTION_DATA, "isession.gateway": ["static/*"]},
    exclude_package_data={COLLECTION: ["**/__pycache__/*", "**/*.pyc"]},
)
