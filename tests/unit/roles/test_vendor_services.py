"""rstudio, matlab and nicedcv: the specs their roles set, and the command lines and config files their fragments make.

Their software (RStudio Server, MATLAB, NICE DCV) cannot be installed here, so each role's ``main`` entry point runs
through ansible-playbook on a local connection (no bed), and its agent fragment then runs with the ISESSION_*
environment the agent gives it and stand-ins for the vendor's commands that record their argv and environment.
Everything else is real: bash, openssl, nginx (nicedcv's TLS front, probed over loopback with its pinned certificate).
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Dict, Optional

import pytest

REPO = Path(__file__).resolve().parents[3]
COLLECTIONS = REPO / ".cache" / "collections"  # made by tests/conftest.py
# ansible-playbook beside this Python (a venv), else the same CLI by module (ansible-test's units venv has no scripts)
_BESIDE = Path(sys.executable).parent / "ansible-playbook"
PLAYBOOK = [str(_BESIDE)] if _BESIDE.exists() else [sys.executable, "-m", "ansible.cli.playbook"]
SECRET = "unit-secret-Zq3"
HOST = socket.gethostname()
SPEC_PLAY = """- name: Describe {role}
  hosts: localhost
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: {python}
  tasks:
    - name: Run the role's main entry point
      ansible.builtin.import_role:
        name: hpc.interactive.{role}
    - name: Save the service spec
      ansible.builtin.copy:
        content: "{{{{ session_service_spec | to_json }}}}"
        dest: "{dest}"
        mode: "0600"
"""
RECORDER = """#!/bin/sh
# a stand-in for a vendor command: records its name, argv and the environment it was given
{{ printf '%s\\n' "$0"; for a in "$@"; do printf '%s\\n' "$a"; done; }} > "{out}/$(basename "$0").argv"
env > "{out}/$(basename "$0").env"
{tail}
"""


def spec(tmp_path: Path, role: str, **extra) -> dict:
    dest = tmp_path / f"{role}-spec.json"
    play = tmp_path / f"{role}-play.yml"
    play.write_text(SPEC_PLAY.format(role=role, dest=dest, python=sys.executable))
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS), ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOCALHOST_WARNING="0", ANSIBLE_INVENTORY_UNPARSED_WARNING="0")
    cp = subprocess.run([*PLAYBOOK, "-i", "localhost,", str(play), "-e", f"@{tmp_path / 'extra.json'}"],
                        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path, check=False)
    assert cp.returncode == 0, cp.stdout[-3000:] + cp.stderr[-2000:]
    return json.loads(dest.read_text())


class Fragment:
    """A session directory, fake vendor commands, and the fragment run in it."""

    def __init__(self, tmp_path: Path, script: str, port: int = 0, base: Optional[str] = None) -> None:
        self.dir = tmp_path / "session"
        self.dir.mkdir(mode=0o700)
        self.calls = tmp_path / "calls"
        self.calls.mkdir()
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        secret = self.dir / "secret"
        secret.write_text(SECRET + "\n")
        secret.chmod(0o600)
        (self.dir / "service.sh").write_text(script)
        self.port = port or free_port()
        self.env = {"PATH": f"{self.bin}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path), "LC_ALL": "C",
                    "ISESSION_ID": "unit-1", "ISESSION_DIR": str(self.dir), "ISESSION_PORT": str(self.port),
                    "ISESSION_BASE": base or f"/me/{self.port}/", "ISESSION_SECRET_FILE": str(secret)}

    def fake(self, name: str, tail: str = "exit 0") -> None:
        path = self.bin / name
        path.write_text(RECORDER.format(out=self.calls, tail=tail))
        path.chmod(0o755)

    def run(self, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(self.dir / "service.sh")], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.dir, check=False)

    def popen(self) -> subprocess.Popen:
        return subprocess.Popen(["setsid", "bash", str(self.dir / "service.sh")], env=self.env, cwd=self.dir,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def argv(self, name: str) -> list:
        return (self.calls / f"{name}.argv").read_text().splitlines()[1:]

    def environ(self, name: str) -> Dict[str, str]:
        lines = (self.calls / f"{name}.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def error(self) -> str:
        return (self.dir / "service.error").read_text().strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def whoami() -> str:
    return subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()


def assert_no_secret_in(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text


# ---------------------------------------------------------------- rstudio


def test_rstudio_spec(tmp_path):
    s = spec(tmp_path, "rstudio")
    assert s["name"] == "rstudio" and s["slug"] == "" and s["input_errors"] == []
    assert s["binaries"] == ["/usr/lib/rstudio-server/bin/rserver", "/usr/bin/R"]
    assert s["auth"]["type"] == "form" and s["auth"]["field"] == "password"
    bad = spec(tmp_path, "rstudio", rstudio_extra_args=["--x=$(id)"])
    assert bad["input_errors"] == ["rstudio_extra_args must be a list of words without newline, NUL, ;, $ or backtick"]
    assert bad["agent_script"] == ""


def test_rstudio_command_line_config_files_and_sign_in(tmp_path):
    s = spec(tmp_path, "rstudio", rstudio_rserver_executable="rserver", rstudio_r_executable="R",
             rstudio_extra_args=["--rsession-ld-library-path=/opt/lib"])
    frag = Fragment(tmp_path, s["agent_script"])
    frag.fake("rserver")
    frag.fake("R")
    cp = frag.run()
    assert cp.returncode == 0, cp.stdout + cp.stderr
    d = frag.dir / "rstudio"
    user = whoami()
    assert frag.argv("rserver") == [
        f"--server-user={user}", "--server-daemonize=0", f"--server-data-dir={d}/data",
        f"--server-pid-file={d}/rserver.pid", f"--database-config-file={d}/database.conf",
        f"--secure-cookie-key-file={d}/secure-cookie-key", "--www-address=127.0.0.1", f"--www-port={frag.port}",
        f"--www-root-path=/me/{frag.port}/", "--www-frame-origin=same", "--auth-none=0",
        f"--auth-pam-helper-path={d}/auth", "--auth-encrypt-password=0", "--auth-timeout-minutes=0",
        f"--rsession-which-r={frag.bin}/R", "--rsession-ld-library-path=/opt/lib"]
    assert (d / "database.conf").read_text() == f"provider=sqlite\ndirectory={d}/db\n"
    for name in ("database.conf", "secure-cookie-key"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600
    assert len((d / "secure-cookie-key").read_text()) == 64
    assert_no_secret_in(*(p.read_text() for p in d.iterdir() if p.is_file()), "\n".join(frag.argv("rserver")))
    # the sign-in helper: the user's own name and the secret on stdin, nothing else

    def sign_in(name: str, password: str) -> int:
        return subprocess.run([str(d / "auth"), name], input=password + "\n", text=True, check=False).returncode

    assert sign_in(user, SECRET) == 0
    assert sign_in(user, SECRET + "x") != 0 and sign_in(user, "") != 0 and sign_in("someone-else", SECRET) != 0


def test_rstudio_without_r_names_the_host(tmp_path):
    s = spec(tmp_path, "rstudio", rstudio_rserver_executable="rserver", rstudio_r_executable="R-missing")
    frag = Fragment(tmp_path, s["agent_script"])
    frag.fake("rserver")
    assert frag.run().returncode == 2
    assert frag.error() == f"R-missing not found on {HOST} (rstudio_r_executable)"
    assert not (frag.calls / "rserver.argv").exists()


# ---------------------------------------------------------------- matlab


def test_matlab_proxy_command_and_environment(tmp_path):
    s = spec(tmp_path, "matlab")
    assert s["name"] == "matlab" and s["binaries"] == ["matlab"] and s["ends_on_exit"] is True
    assert s["auth"]["proxy"] == {"header": "mwi-auth-token", "format": "{secret}"}
    frag = Fragment(tmp_path, s["agent_script"])
    frag.fake("matlab")
    frag.fake("matlab-proxy-app")
    cp = frag.run()
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert (frag.dir / "matlab" / "mode").read_text() == "proxy\n"
    assert frag.argv("matlab-proxy-app") == []
    env = frag.environ("matlab-proxy-app")
    assert env["MWI_APP_HOST"] == "127.0.0.1" and env["MWI_APP_PORT"] == str(frag.port)
    assert env["MWI_BASE_URL"] == f"/me/{frag.port}" and env["MWI_ENABLE_TOKEN_AUTH"] == "true"
    assert env["MWI_AUTH_TOKEN"] == SECRET and env["MWI_CUSTOM_MATLAB_ROOT"] == str(frag.bin.parent)
    assert_no_secret_in(cp.stdout, cp.stderr)


def test_matlab_falls_back_to_the_desktop_and_checks_its_binaries(tmp_path):
    s = spec(tmp_path, "matlab", matlab_extra_args=["-nosplash"], vnc_xvnc_executable="/nonexistent/Xvnc")
    frag = Fragment(tmp_path, s["agent_script"])
    frag.fake("matlab")
    assert frag.run().returncode == 2
    assert (frag.dir / "matlab" / "mode").read_text() == "desktop\n"
    desktop = (frag.dir / "matlab" / "desktop.sh").read_text()
    assert "reap -- matlab -desktop -nosplash" in desktop
    assert frag.error() == f"/nonexistent/Xvnc not found on {HOST}"


def test_matlab_missing_names_the_host_and_proxy_mode_needs_the_proxy(tmp_path):
    s = spec(tmp_path, "matlab", matlab_executable="matlab-missing")
    frag = Fragment(tmp_path, s["agent_script"])
    assert frag.run().returncode == 2
    assert frag.error() == f"matlab-missing not found on {HOST} (matlab_executable)"
    p = spec(tmp_path, "matlab", matlab_mode="proxy")
    assert p["binaries"] == ["matlab", "matlab-proxy-app"]
    (tmp_path / "p").mkdir()
    frag2 = Fragment(tmp_path / "p", p["agent_script"])
    frag2.fake("matlab")
    assert frag2.run().returncode == 2
    assert frag2.error() == f"matlab-proxy-app not found on {HOST} (matlab_mode proxy)"


# ---------------------------------------------------------------- nicedcv


class _Backend(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the handler's API
        body = json.dumps({"path": self.path, "auth": self.headers.get("Authorization"),
                           "token": self.headers.get("X-Isession-Token")}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _https_backend(tmp_path: Path):
    key, cert = tmp_path / "dcv-key.pem", tmp_path / "dcv-cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=fake-dcv", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _get(port: int, path: str, pin: str, headers: Optional[dict] = None):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # pinned below instead
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        assert hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest() == pin, "not the pinned certificate"
    req = urllib.request.Request(f"https://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:  # noqa: S310 - loopback https only
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


@pytest.mark.skipif(not Path("/usr/sbin/nginx").exists() or not Path("/usr/bin/openssl").exists(),
                    reason="nginx and openssl are test dependencies (tests/bed PACKAGES)")
def test_nicedcv_pinned_certificate_secret_check_dcv_session_and_end(tmp_path):
    s = spec(tmp_path, "nicedcv", session_url="/sme", nicedcv_dcv_executable="dcv")
    assert s["binaries"] == ["dcv", "/usr/sbin/nginx", "/usr/bin/openssl"] and s["input_errors"] == []
    assert s["auth"]["tls"] == {"certificate": "nicedcv/cert.pem", "sha256": "nicedcv/cert.sha256"}
    backend = _https_backend(tmp_path)
    s = spec(tmp_path, "nicedcv", session_url="/sme", nicedcv_dcv_executable="dcv",
             nicedcv_server_url=f"https://127.0.0.1:{backend.server_address[1]}")
    port = free_port()
    frag = Fragment(tmp_path, s["agent_script"], port=port, base=f"/sme/{port}/")
    frag.fake("dcv")
    proc = frag.popen()
    try:
        d = frag.dir / "nicedcv"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (d / "nginx" / "nginx.pid").exists():
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        time.sleep(0.3)
        assert stat.S_IMODE((d / "key.pem").stat().st_mode) == 0o600
        pin = (d / "cert.sha256").read_text().strip()
        der = ssl.PEM_cert_to_DER_cert((d / "cert.pem").read_text())
        assert pin == hashlib.sha256(der).hexdigest()
        assert frag.argv("dcv") == ["create-session", "--type=virtual", f"--owner={whoami()}", "--name=unit-1",
                                    "unit-1"]
        base = f"/sme/{port}/"
        assert _get(port, base, pin)[0] == 401
        assert _get(port, base, pin, {"Authorization": "Bearer wrong"})[0] == 401
        code, body = _get(port, base + "x/y?z=1", pin, {"Authorization": f"Bearer {SECRET}"})
        assert code == 200 and json.loads(body) == {"path": "/x/y?z=1", "auth": None, "token": None}
        assert _get(port, base + "x", pin, {"X-Isession-Token": SECRET})[0] == 200
        assert _get(port, "/elsewhere/", pin, {"Authorization": f"Bearer {SECRET}"})[0] == 404
        assert_no_secret_in((d / "nginx.conf").read_text(), "\n".join(frag.argv("dcv")))
        assert stat.S_IMODE((d / "auth.conf").stat().st_mode) == 0o600
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        backend.shutdown()
    # the end: the DCV session closed, nginx gone
    assert frag.argv("dcv") == ["close-session", "unit-1"]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_nicedcv_refuses_an_http_url_and_a_bad_server_url(tmp_path):
    s = spec(tmp_path, "nicedcv", session_url="/me", nicedcv_server_url="http://x:1")
    assert s["input_errors"] == ["session_url must be /sme: NICE DCV is an https backend",
                                 "nicedcv_server_url must be https://HOST:PORT"]
    assert s["agent_script"] == ""
