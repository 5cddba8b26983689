"""Integration fixtures: ``bed`` boots the test bed once per run; ``apps`` installs every service's software.

Tests that take ``bed`` are marked ``bed`` automatically. A test that runs a service's software takes ``apps``:
it installs every service once per run through the roles' own install entry points, as root on the machine
itself (the only place that reaches the package registries; the bed's hosts share its filesystem), whatever
order the test files run in. On a machine where everything is installed that is a quick no-op per service.

Tests marked ``bed_last`` (and everything in ``test_zz_*.py``) run after all others; the bed round-trip test
there takes the bed down and up again. The bed is left up after a run (``tests/bed/bed down`` removes it;
``scripts/test-all`` does); set ``HPCBED_DOWN_AFTER=1`` to take it down at the end of the session.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

BED_DIR = Path(__file__).resolve().parents[1] / "bed"
# bedlib, and the helper modules the tests here share (pytest runs with --import-mode=importlib,
# which does not put a test's directory on sys.path)
for _path in (BED_DIR, Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bedlib import Bed, BedError  # noqa: E402
from sessions_common import APPS, install_service  # noqa: E402

HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bed_last: runs after every other test (it may take the bed down)")


def _under_here(item: pytest.Item) -> bool:
    try:
        Path(str(item.fspath)).resolve().relative_to(HERE)
    except ValueError:
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    last = []
    for item in items:
        if not _under_here(item):
            continue
        if "bed" in getattr(item, "fixturenames", ()) and item.get_closest_marker("bed") is None:
            item.add_marker(pytest.mark.bed)
        if item.get_closest_marker("bed_last") or Path(str(item.fspath)).name.startswith("test_zz_"):
            last.append(item)
    if last:
        ids = {id(i) for i in last}
        items[:] = [i for i in items if id(i) not in ids] + last


class SessionBed(Bed):
    """A Bed that knows the collection copy must be reinstalled after a down/up round trip."""

    def ensure_ready(self) -> None:
        """Boot (no-op when healthy) and make sure the collection copy is installed."""
        self.up()
        if not self.collection_installed():
            self.install_collection()


@pytest.fixture(scope="session")
def bed() -> SessionBed:
    if os.geteuid() != 0:
        pytest.fail("the integration test bed needs root (network namespaces, sshd, Slurm): run pytest as root",
                    pytrace=False)
    b = SessionBed()
    try:
        b.up()
        b.install_collection()
    except BedError as exc:
        pytest.fail(f"test bed failed to come up: {exc}", pytrace=False)
    except Exception as exc:  # noqa: BLE001 - any failure to boot is a bed failure with its message
        pytest.fail(f"test bed failed to come up: {type(exc).__name__}: {exc}", pytrace=False)
    yield b
    if os.environ.get("HPCBED_DOWN_AFTER") == "1":
        b.down()


@pytest.fixture(scope="session")
def apps(bed: SessionBed) -> dict:
    """``{service: command}`` of every service, installed (once per run) through its install entry point."""
    for service in APPS:
        res = install_service(bed, service)
        if res.rc != 0:
            pytest.fail(f"the install entry point of {service} failed (rc {res.rc}):\n{res.stdout[-4000:]}\n"
                        f"{res.stderr[-2000:]}", pytrace=False)
        if not os.access(APPS[service], os.X_OK):
            pytest.fail(f"{service}'s install entry point ran but {APPS[service]} is not there", pytrace=False)
    return dict(APPS)
