"""session_ready pins an https backend's certificate (a real TLS server on loopback, made with openssl)."""
from __future__ import annotations

import hashlib
import http.server
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server API
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def https_server(tmp_path):
    """A loopback https server with a fresh self-signed certificate -> (port, the certificate's DER bytes)."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=session-backend", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], ssl.PEM_cert_to_DER_cert(cert.read_text())
    server.shutdown()
    server.server_close()


def test_the_certificate_the_backend_presented_is_pinned_0600(run_module, tmp_path, https_server):
    port, der = https_server
    pin = tmp_path / "pinned-cert.pem"
    res = run_module("session_ready", {"port": port, "url": "/sme", "timeout": 10, "pin_certificate": str(pin)})
    assert res["_rc"] == 0 and res["ready"] and res["changed"], res
    assert ssl.PEM_cert_to_DER_cert(pin.read_text()) == der
    assert pin.stat().st_mode & 0o777 == 0o600
    assert res["certificate_sha256"] == hashlib.sha256(der).hexdigest()
    again = run_module("session_ready", {"port": port, "url": "/sme", "timeout": 10, "pin_certificate": str(pin)})
    assert again["_rc"] == 0 and not again["changed"], again


def test_check_mode_pins_nothing(run_module, tmp_path, https_server):
    port, _der = https_server
    pin = tmp_path / "pinned-cert.pem"
    res = run_module("session_ready", {"port": port, "url": "/sme", "pin_certificate": str(pin)}, check=True)
    assert res["_rc"] == 0 and res["ready"] and not pin.exists(), res


def test_pinning_needs_an_https_session(run_module, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = run_module("session_ready", {"port": port, "url": "/me", "pin_certificate": str(tmp_path / "p.pem")})
    assert res["_rc"] != 0 and res["field"] == "pin_certificate" and "url /sme" in res["msg"], res
    assert not (tmp_path / "p.pem").exists()


def test_a_backend_that_never_answers_pins_nothing(run_module, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pin = tmp_path / "pinned-cert.pem"
    res = run_module("session_ready", {"port": port, "url": "/sme", "timeout": 0.5, "pin_certificate": str(pin)})
    assert res["_rc"] != 0 and not res["ready"] and not Path(pin).exists(), res
