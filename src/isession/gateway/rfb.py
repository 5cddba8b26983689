"""The VNC password, answered by the gateway inside the RFB handshake, so the browser never needs it.

noVNC speaks RFB (RFC 6143) over the WebSocket that websockify bridges to the VNC server. For a desktop session the
gateway watches the first bytes of that stream in both directions:

1. the server's and the browser's ProtocolVersion pass through (3.7 and 3.8; anything else: no interception);
2. the server offers its security types; when VNC Authentication (2) is among them the gateway picks it, answers the
   16-byte challenge with the session's password (DES, the key's bits mirrored as VNC does) and reads the result;
3. the browser is then offered the single type None (1); its choice is answered with an OK result (3.8) and from
   there on every byte passes unchanged.

A server that offers None itself, or an unexpected version, makes the relay transparent from that point. A
refused password is told to the browser as a failure with a reason, in RFB's own terms.
"""
from __future__ import annotations

import struct
from typing import Tuple

NONE, VNC_AUTH = 1, 2
VERSIONS = (b"RFB 003.007\n", b"RFB 003.008\n")


def vnc_response(password: str, challenge: bytes) -> bytes:
    """DES-encrypt the 16-byte ``challenge`` with the password as VNC does (8 bytes, each byte's bits mirrored)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, modes  # noqa: PLC0415

    try:  # cryptography >= 43 keeps DES (TripleDES with one 8-byte key) among its "decrepit" ciphers
        from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES  # noqa: PLC0415
    except ImportError:  # pragma: no cover - older cryptography
        from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES  # noqa: PLC0415

    key = bytes(int(f"{b:08b}"[::-1], 2) for b in password.encode("latin-1")[:8].ljust(8, b"\0"))
    # DES as three-key TripleDES with K1 = K2 = K3 (encrypt-decrypt-encrypt collapses to one DES encryption)
    enc = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()  # noqa: S305 - RFB's VNC authentication is DES-ECB
    return enc.update(challenge) + enc.finalize()


class Handshake:
    """Feed it the bytes of each direction; it says what to send on to each side.

    :meth:`from_server` and :meth:`from_client` return ``(to_client, to_server)``. Once :attr:`done`, the caller
    relays frames unchanged.
    """

    def __init__(self, password: str) -> None:
        self.password = password
        self.state = "server_version"
        self.version = b""
        self.sbuf = b""
        self.cbuf = b""
        self.done = False
        self.failed = ""

    def _pass_through(self, to_client: bytes = b"", to_server: bytes = b"") -> Tuple[bytes, bytes]:
        self.done = True
        out = (to_client + self.sbuf, to_server + self.cbuf)
        self.sbuf = self.cbuf = b""
        return out

    def from_server(self, data: bytes) -> Tuple[bytes, bytes]:
        state = self.state
        a, b = self._from_server(data)
        if not self.done and self.state != state and self.cbuf:  # the browser's bytes that waited for this state
            c, d = self._from_client(b"")
            a, b = a + c, b + d
        return a, b

    def from_client(self, data: bytes) -> Tuple[bytes, bytes]:
        state = self.state
        a, b = self._from_client(data)
        if not self.done and self.state != state and self.sbuf:  # the server's bytes that waited for this state
            c, d = self._from_server(b"")
            a, b = a + c, b + d
        return a, b

    def _from_server(self, data: bytes) -> Tuple[bytes, bytes]:
        if self.done:
            return data, b""
        self.sbuf += data
        to_client, to_server = b"", b""
        while True:
            if self.state == "server_version" and len(self.sbuf) >= 12:
                self.version, self.sbuf = self.sbuf[:12], self.sbuf[12:]
                to_client += self.version
                if self.version not in VERSIONS:
                    a, b = self._pass_through(to_client)
                    return a, b
                self.state = "client_version"
            elif self.state == "security_types" and len(self.sbuf) >= 1:
                count = self.sbuf[0]
                if count == 0 or len(self.sbuf) < 1 + count:  # a failure (reason follows) or more to come
                    if count == 0:
                        a, b = self._pass_through(to_client, to_server)
                        return a, b
                    break
                types, self.sbuf = self.sbuf[1:1 + count], self.sbuf[1 + count:]
                if VNC_AUTH not in types:
                    a, b = self._pass_through(to_client + bytes([count]) + types, to_server)
                    return a, b
                to_server += bytes([VNC_AUTH])
                self.state = "challenge"
            elif self.state == "challenge" and len(self.sbuf) >= 16:
                challenge, self.sbuf = self.sbuf[:16], self.sbuf[16:]
                to_server += vnc_response(self.password, challenge)
                self.state = "result"
            elif self.state == "result" and len(self.sbuf) >= 4:
                (result,), self.sbuf = struct.unpack(">I", self.sbuf[:4]), self.sbuf[4:]
                if result != 0:
                    self.failed = "the VNC server refused the session's password"
                    reason = self.failed.encode()
                    self.done = True
                    return to_client + b"\0" + struct.pack(">I", len(reason)) + reason, to_server
                to_client += bytes([1, NONE])  # the browser is offered "None": the gateway has authenticated
                self.state = "client_choice"
            else:
                break
        return to_client, to_server

    def _from_client(self, data: bytes) -> Tuple[bytes, bytes]:
        if self.done:
            return b"", data
        self.cbuf += data
        to_client, to_server = b"", b""
        while True:
            if self.state == "client_version" and len(self.cbuf) >= 12:
                version, self.cbuf = self.cbuf[:12], self.cbuf[12:]
                to_server += version
                if version not in VERSIONS:
                    a, b = self._pass_through(to_client, to_server)
                    return a, b
                self.version = min(self.version, version)
                self.state = "security_types"
            elif self.state == "client_choice" and len(self.cbuf) >= 1:
                choice, self.cbuf = self.cbuf[0], self.cbuf[1:]
                if choice != NONE:
                    self.failed = "the browser chose a security type the gateway did not offer"
                    self.done = True
                    return to_client, b""
                if self.version == VERSIONS[1]:
                    to_client += struct.pack(">I", 0)  # SecurityResult OK (3.8 only)
                a, b = self._pass_through(to_client, to_server)
                return a, b
            else:
                break
        return to_client, to_server
