"""What the bed needs installed: the Debian packages (``PACKAGES``) and the venv its users run."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from hpcbed.core import BASE_PATH, BedError, PathLike, _log, _require_root, _sh

PACKAGES = (
    "openssh-server", "openssh-client", "slurmctld", "slurmd", "slurm-client", "munge", "slurm-wlm-torque",
    "iproute2", "procps", "psmisc", "python3-venv", "python3-yaml", "curl", "util-linux", "nginx-light",
    "environment-modules",  # a real `module` command for the session_modules tests
    "chromium",  # the browser of the desktop and gateway tests (tests/integration/browser.py); the VNC desktop itself
    # is provisioned by the vnc role's install entry point (tests/integration/desktop_common.py)
    # runtime libraries of the unpacked gridengine binaries (see sge.SGE_PREFIX; install() checks them with ldd)
    "libjemalloc2", "libhwloc15", "libmunge2", "libtirpc3", "libdb5.3", "libssl3",
)
# never among them: gridengine-client/-master/-exec (they conflict with slurm-wlm-torque; see sge.SGE_PREFIX)


class InstallMixin:
    """``install``: the packages apt lacks, the SGE binaries (``SgeMixin.install_sge``) and the venv."""

    def missing_packages(self) -> List[str]:
        cp = _sh(["dpkg-query", "-W", "-f=${Package}\t${Status}\n", *PACKAGES], check=False)
        installed = set()
        for line in cp.stdout.splitlines():
            name, _ignored, status = line.partition("\t")
            if status.endswith("install ok installed"):
                installed.add(name.split(":")[0])
        return [pkg for pkg in PACKAGES if pkg not in installed]

    def install(self) -> List[str]:
        """Install what the bed needs (apt-get update only when something is missing), unpack SGE; fix venv perms.

        Returns what was installed: apt packages, and ``gridengine-*=VERSION`` when the SGE .debs were
        (re)unpacked into SGE_PREFIX.
        """
        _require_root()
        missing = self.missing_packages()
        if missing:
            _log(f"installing {' '.join(missing)}")
            _apt(["update"], timeout=600)
            _apt_install(missing)
        unpacked = self.install_sge()
        self._ensure_venv()
        return missing + unpacked

    def _ensure_venv(self) -> None:
        if not (self.venv / "bin" / "python").exists():
            _log(f"creating {self.venv}")
            _sh(["/usr/bin/python3", "-m", "venv", str(self.venv)], timeout=300)
            _sh([str(self.venv / "bin" / "pip"), "install", "-q", *_pyproject_requirements(self.repo)], timeout=1200)
        probe = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                 str(self.venv / "bin" / "python"), "-c", "import ansible, pytest"]
        if _sh(probe, check=False, env={"PATH": BASE_PATH, "HOME": "/"}).returncode != 0:
            _log(f"making {self.venv} world-readable")
            for parent in reversed(self.venv.parents):
                if parent != Path("/"):
                    os.chmod(parent, os.stat(parent).st_mode | 0o555)  # noqa: S103 - users run the venv
            self._world_readable_x(self.venv)

    @staticmethod
    def _world_readable_x(top: Path) -> None:
        for dirpath, _dirs, filenames in os.walk(top):
            os.chmod(dirpath, os.stat(dirpath).st_mode | 0o555)  # noqa: S103 - users run the venv
            for name in filenames:
                p = os.path.join(dirpath, name)
                if not os.path.islink(p):
                    mode = os.stat(p).st_mode
                    os.chmod(p, mode | 0o444 | (0o111 if mode & 0o100 else 0))


def _apt(args: Sequence[str], timeout: float = 600, cwd: Optional[PathLike] = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return _sh(["apt-get", *args], timeout=timeout, env=env, cwd=cwd)


def _apt_install(packages: Sequence[str]) -> None:
    """apt-get install ``packages``, refused when apt would remove anything (e.g. slurm-wlm-torque)."""
    args = ["install", "-y", "--no-install-recommends", *packages]
    plan = _apt(["-s", *args], timeout=300).stdout
    removals = [line.split()[1] for line in plan.splitlines() if line.startswith("Remv ")]
    if removals:
        raise BedError(f"apt-get install {' '.join(packages)} would remove {' '.join(removals)}: refused")
    _apt(args, timeout=1200)


def _apt_candidates(packages: Sequence[str]) -> Dict[str, str]:
    """``{package: candidate version}`` from the local apt lists ('' when apt knows none)."""
    out = dict.fromkeys(packages, "")
    cp = _sh(["apt-cache", "policy", *packages], check=False)
    pkg = None
    for line in cp.stdout.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            pkg = line[:-1]
        elif pkg in out and line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            out[pkg] = "" if version == "(none)" else version
    return out


def _pyproject_requirements(repo: Path) -> List[str]:
    import tomllib  # noqa: PLC0415 - Python 3.11+, needed only when the venv has to be created

    data = tomllib.loads((repo / "pyproject.toml").read_text())
    project = data.get("project", {})
    return list(project.get("dependencies", [])) + list(project.get("optional-dependencies", {}).get("test", []))
