"""Service roles (jupyterlab, notebook, code_server) on the bed, with real servers.

For each service: the role's ``main`` entry point is run through ansible-playbook as wsuser and its
``session_service_spec`` is read back; the agent fragment is then run standalone, as a cluster or workspace
user inside a bed host, with the ISESSION_* environment the session agent gives it. The tests probe the
server under its base path until it answers, load the app's own page WITH the secret and get a login
page / 401 / 403 WITHOUT it, check the secret is in no argv and in no file but 0600 ones, stop the process
group with TERM (as the agent does) and check that no process of the session and no listener is left.
"""
from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from sessions_common import install_service

pytestmark = pytest.mark.bed

APPS = "/opt/hpc-interactive/apps"
# where each service's fragment runs, as whom (one host of each kind across the three services)
WHERE = {
    "jupyterlab": ("compute1", "cluser"),
    "notebook": ("workspace", "wsuser"),
    "code_server": ("controller", "cluser"),
}
EXECUTABLE_VAR = {
    "jupyterlab": "jupyterlab_executable",
    "notebook": "notebook_executable",
    "code_server": "code_server_executable",
}
SPEC_PLAY = """- name: Describe {service}
  hosts: localhost
  gather_facts: false
  vars:
    ansible_python_interpreter: /usr/bin/python3
  roles:
    - role: hpc.interactive.{service}
  tasks:
    - name: Save the service spec
      ansible.builtin.copy:
        content: "{{{{ session_service_spec | to_json }}}}"
        dest: "{dest}"
        mode: "0600"
"""
_installed: Dict[str, bool] = {}


def ensure_installed(bed, service: str) -> None:
    """Run the role's install entry point once per test run (idempotent; fast when already installed)."""
    if service in _installed:
        return
    res = install_service(bed, service)
    assert res.rc == 0, f"install of {service} failed:\n{res.stdout[-4000:]}\n{res.stderr[-2000:]}"
    _installed[service] = True


def service_spec(bed, service: str, extra_vars: Optional[dict] = None) -> dict:
    """Run the role's main entry point as wsuser and return the session_service_spec it set."""
    out = bed.user_tmpdir("wsuser") / "spec.json"
    res = bed.ansible_playbook(SPEC_PLAY.format(service=service, dest=out), user="wsuser", extra_vars=extra_vars,
                               timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    return json.loads(out.read_text())


def _processes_with_env(marker: str) -> List[str]:
    """``pid args`` of every process whose environment holds ``marker`` (e.g. ``ISESSION_ID=...``)."""
    found = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
            if needle in env.split(b"\0"):
                args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry.name} {args}")
        except OSError:
            continue
    return found


def _listening(bed, host: str, port: int) -> bool:
    out = bed.run(host, ["ss", "-Hltn", f"sport = :{port}"]).stdout
    return bool(out.strip())


def _free_port(bed, host: str) -> int:
    for _attempt in range(50):
        port = random.randint(20000, 29999)
        if not _listening(bed, host, port):
            return port
    raise AssertionError("no free port found")


class Fragment:
    """One standalone run of a service's agent fragment in a bed host."""

    def __init__(self, bed, service: str, spec: dict, host: str, user: str) -> None:
        self.bed, self.service, self.spec, self.host, self.user = bed, service, spec, host, user
        self.dir = bed.user_tmpdir(user)
        self.id = f"{service}-test-{uuid.uuid4().hex[:10]}"
        self.secret = secrets.token_urlsafe(24)
        self.secret_file = bed.write_user_file(user, self.dir / "secret", self.secret, 0o600)
        self.script = bed.write_user_file(user, self.dir / "fragment.sh", spec["agent_script"], 0o700)
        self.port = _free_port(bed, host)
        self.wsport = random.randint(30000, 39999)
        self.base = f"/me/{self.wsport}/"
        self.url = f"http://127.0.0.1:{self.port}{self.base}"
        self.log = self.dir / "server.log"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def env(self) -> Dict[str, str]:
        return {"ISESSION_ID": self.id, "ISESSION_DIR": str(self.dir), "ISESSION_PORT": str(self.port),
                "ISESSION_BASE": self.base, "ISESSION_SECRET_FILE": str(self.secret_file)}

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.proc = self.bed.popen(self.host, ["bash", str(self.script)], user=self.user, env=self.env,
                                       cwd=self.dir, stdout=log, stderr=subprocess.STDOUT)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def curl(self, path: str, *args: str) -> subprocess.CompletedProcess:
        """curl as the session's user inside the host; prints ``<code> <redirect>`` last on stdout."""
        argv = ["curl", "-sS", "--max-time", "20", *args, "-w", "\n%{http_code} %{redirect_url}", self.url + path]
        return self.bed.run(self.host, argv, user=self.user, cwd=self.dir, timeout=30)

    @staticmethod
    def status(cp: subprocess.CompletedProcess) -> int:
        return int(cp.stdout.rsplit("\n", 1)[-1].split(" ")[0])

    @staticmethod
    def body(cp: subprocess.CompletedProcess) -> str:
        return cp.stdout.rsplit("\n", 1)[0]

    def wait_ready(self, timeout: float = 120) -> int:
        """Poll the probe as the session's readiness check does: ready on a status below 500 (not 000)."""
        deadline = time.monotonic() + timeout
        code = 0
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"{self.service} exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            code = self.status(self.curl(self.spec["probe"], "-o", "/dev/null"))
            if 0 < code < 500:
                return code
            time.sleep(0.3)
        pytest.fail(f"{self.service} did not answer on {self.url}{self.spec['probe']} (last {code}):\n"
                    f"{self.log_text()[-4000:]}")

    def stop_and_check_gone(self, timeout: float = 30) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        left = _processes_with_env(f"ISESSION_ID={self.id}")
        while time.monotonic() < deadline and (left or _listening(self.bed, self.host, self.port)):
            time.sleep(0.3)
            left = _processes_with_env(f"ISESSION_ID={self.id}")
        assert not left, f"processes left after TERM to the process group: {left}"
        assert not _listening(self.bed, self.host, self.port), f"port {self.port} still listening"
        self.proc.wait(timeout=5)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for line in _processes_with_env(f"ISESSION_ID={self.id}"):
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def assert_secret_kept(self) -> None:
        """The secret is in no process's argv on the host, and only in 0600 files of the session dir."""
        ps = self.bed.run(self.host, ["ps", "-eww", "-o", "args="]).stdout
        assert self.secret not in ps, "the secret is visible in ps"
        for path in self.dir.rglob("*"):
            if path.is_file() and not path.is_symlink():
                if self.secret.encode() in path.read_bytes():
                    mode = path.stat().st_mode & 0o777
                    assert mode == 0o600, f"{path} holds the secret with mode {oct(mode)}"
        assert self.secret not in self.log_text(), "the secret is in the server log"


@pytest.fixture
def fragment_factory(bed):
    made: List[Fragment] = []

    def make(service: str, spec: dict) -> Fragment:
        host, user = WHERE[service]
        frag = Fragment(bed, service, spec, host, user)
        made.append(frag)
        return frag

    yield make
    for frag in made:
        frag.cleanup()


@pytest.mark.parametrize("service,slug,title", [("jupyterlab", "lab", "<title>JupyterLab"),
                                                ("notebook", "tree", "<title>Home")])
def test_jupyter_fragment_serves_with_token_only(bed, fragment_factory, service, slug, title):
    ensure_installed(bed, service)
    spec = service_spec(bed, service)
    assert spec["name"] == service and spec["slug"] == slug and spec["probe"] == "api/status"
    assert spec["binaries"] == [f"{APPS}/{service}/bin/jupyter-{'lab' if service == 'jupyterlab' else 'notebook'}"]
    assert spec["auth"] == {"type": "header", "header": "Authorization", "format": "token {secret}"}
    frag = fragment_factory(service, spec)
    header = bed.write_user_file(frag.user, frag.dir / "auth-header",
                                 spec["auth"]["header"] + ": " + spec["auth"]["format"].format(secret=frag.secret))
    frag.start()
    assert frag.wait_ready() == 403, "the probe answers 403 without the token"
    with_token = frag.curl(spec["probe"], "-H", f"@{header}")
    assert frag.status(with_token) == 200 and "started" in json.loads(frag.body(with_token))
    page = frag.curl(spec["slug"], "-H", f"@{header}")
    assert frag.status(page) == 200 and title in frag.body(page), frag.body(page)[:500]
    assert f'"baseUrl": "{frag.base}"' in frag.body(page)
    anon = frag.curl(spec["slug"])
    assert frag.status(anon) == 302 and f"{frag.base}login" in anon.stdout.rsplit("\n", 1)[-1]
    wrong = frag.curl("api/status", "-H", "Authorization: token not-the-secret")
    assert frag.status(wrong) == 403
    # a kernel: a child of the server that must go away with the session too
    kernel = frag.curl("api/kernels", "-X", "POST", "-H", f"@{header}", "-H", "Content-Type: application/json",
                       "-d", "{}")
    assert frag.status(kernel) == 201, kernel.stdout
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any("ipykernel" in p for p in
                                                  _processes_with_env(f"ISESSION_ID={frag.id}")):
        time.sleep(0.3)
    assert any("ipykernel" in p for p in _processes_with_env(f"ISESSION_ID={frag.id}"))
    cfg = frag.dir / "jupyter_server_config.py"
    assert cfg.stat().st_mode & 0o777 == 0o600 and frag.secret not in cfg.read_text()
    assert "token=..." in frag.log_text(), "Jupyter shows the token as '...'"
    frag.assert_secret_kept()
    frag.stop_and_check_gone()


def test_code_server_fragment_serves_after_login_only(bed, fragment_factory):
    ensure_installed(bed, "code_server")
    spec = service_spec(bed, "code_server")
    assert spec["name"] == "code_server" and spec["slug"] == "" and spec["probe"] == "healthz"
    assert spec["binaries"] == [f"{APPS}/code-server/bin/code-server", "/usr/sbin/nginx"]
    assert spec["auth"] == {"type": "form", "path": "login", "field": "password"}
    frag = fragment_factory("code_server", spec)
    frag.start()
    assert frag.wait_ready() == 200
    assert "alive" in frag.body(frag.curl("healthz")) or "status" in frag.body(frag.curl("healthz"))
    # without the password: a redirect to the login page, which is code-server's own
    anon = frag.curl(spec["slug"])
    assert frag.status(anon) == 302 and "login" in anon.stdout.rsplit("\n", 1)[-1]
    login_page = frag.curl(spec["auth"]["path"])
    assert frag.status(login_page) == 200 and 'name="password"' in frag.body(login_page)
    # a wrong password gives no session cookie
    bad_jar = frag.dir / "bad.jar"
    bad = frag.curl(spec["auth"]["path"], "-c", str(bad_jar), "-X", "POST", "--data-urlencode",
                    "password=not-the-secret")
    bad_cookies = bad_jar.read_text(errors="replace") if bad_jar.exists() else ""
    assert "code-server-session" not in bad_cookies, bad.stdout[-500:]
    # the right password (read by curl from the 0600 file, not argv) opens the editor
    jar = frag.dir / "cookies.jar"
    good = frag.curl(spec["auth"]["path"], "-c", str(jar), "-X", "POST", "--data-urlencode",
                     f"{spec['auth']['field']}@{frag.secret_file}")
    assert frag.status(good) == 302, good.stdout
    assert "code-server-session" in jar.read_text()
    page = frag.curl(spec["slug"], "-b", str(jar))
    assert frag.status(page) == 200 and "vscode-workbench-web-configuration" in frag.body(page), \
        frag.body(page)[:500]
    out_of_base = frag.bed.run(frag.host, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                           f"http://127.0.0.1:{frag.port}/healthz"], user=frag.user).stdout
    assert out_of_base == "404"
    cfg = frag.dir / "code-server" / "config.yaml"
    assert cfg.stat().st_mode & 0o777 == 0o600
    assert "PASSWORD=" not in frag.bed.run(frag.host, ["ps", "eww", "-u", frag.user, "-o", "args="]).stdout
    frag.assert_secret_kept()
    frag.stop_and_check_gone()


@pytest.mark.parametrize("service", sorted(WHERE))
def test_missing_binary_is_reported_with_host(bed, fragment_factory, service):
    spec = service_spec(bed, service, extra_vars={EXECUTABLE_VAR[service]: "/nonexistent/bin/server"})
    assert spec["binaries"][0] == "/nonexistent/bin/server"
    frag = fragment_factory(service, spec)
    frag.start()
    assert frag.proc is not None
    assert frag.proc.wait(timeout=30) == 127
    assert f"/nonexistent/bin/server not found on {frag.host}" in frag.log_text()


def test_code_server_folder_slug_is_url_encoded(bed):
    spec = service_spec(bed, "code_server", extra_vars={"code_server_folder": "/home/cluser/my project"})
    assert spec["slug"] == "?folder=/home/cluser/my%20project"
