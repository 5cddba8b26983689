"""sshd: the bed's users with their keys (who may log in as whom), a host key and an sshd per host."""
from __future__ import annotations

import os
import pwd
from pathlib import Path

from hpcbed.core import CLUSTER_USERS, HOSTS, MARKER, SGE_ADMIN, USERS, WS_USER, WS_USER2, _sh


class SshdMixin:
    """Users, keys and one sshd per host."""

    def _ensure_users(self) -> None:
        try:
            pwd.getpwnam(SGE_ADMIN)
        except KeyError:  # what gridengine-common's postinst would make (a system user, no login)
            _sh(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                 "--shell", "/usr/sbin/nologin", SGE_ADMIN])
        for user in USERS:
            try:
                pwd.getpwnam(user)
            except KeyError:
                _sh(["useradd", "--create-home", "--user-group", "--shell", "/bin/bash", user])
            _sh(["usermod", "-p", "*", "-s", "/bin/bash", user])  # unlocked for sshd with UsePAM no
            pw = pwd.getpwnam(user)
            home = Path(pw.pw_dir)
            home.mkdir(parents=True, exist_ok=True)
            os.chown(home, pw.pw_uid, pw.pw_gid)
            home.chmod(0o700)
            ssh_dir = home / ".ssh"
            ssh_dir.mkdir(exist_ok=True)
            os.chown(ssh_dir, pw.pw_uid, pw.pw_gid)
            ssh_dir.chmod(0o700)
            key = ssh_dir / "id_ed25519"
            if not key.exists() or not key.with_suffix(".pub").exists():
                for p in (key, key.with_suffix(".pub")):
                    p.unlink(missing_ok=True)
                _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{user}@hpcbed", "-f", str(key)])
            for p in (key, key.with_suffix(".pub")):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            key.chmod(0o600)

    def _ssh_setup(self) -> None:
        known = []
        for host, addr in HOSTS.items():
            d = self.host_dir(host)
            d.mkdir(parents=True, exist_ok=True)
            key = d / "ssh_host_ed25519_key"
            if not key.exists():
                _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{host}", "-f", str(key)])
            pub = key.with_suffix(".pub").read_text().split()
            known.append(f"{host},{addr} {pub[0]} {pub[1]}")
            (d / "sshd_config").write_text(_sshd_config(d, key))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        pubs = {u: (Path(pwd.getpwnam(u).pw_dir) / ".ssh/id_ed25519.pub").read_text().strip() for u in USERS}
        authorized = {WS_USER: [pubs[WS_USER], *(pubs[c] for c in CLUSTER_USERS)], WS_USER2: [pubs[WS_USER2]]}
        for c in CLUSTER_USERS:
            authorized[c] = [pubs[WS_USER], pubs[c]]
        for user in USERS:
            pw = pwd.getpwnam(user)
            ssh_dir = Path(pw.pw_dir) / ".ssh"
            self.write_user_file(user, ssh_dir / "authorized_keys", "\n".join(authorized[user]) + "\n", 0o600)
            self.write_user_file(user, ssh_dir / "known_hosts", "\n".join(known) + "\n", 0o644)

    def _start_sshd(self, host: str) -> None:
        d = self.host_dir(host)
        self._daemon(host, ["/usr/sbin/sshd", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")], f"sshd-{host}")


def _sshd_config(d: Path, key: Path) -> str:
    return f"""{MARKER}
Port 22
AddressFamily inet
ListenAddress 0.0.0.0
HostKey {key}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile .ssh/authorized_keys
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin no
AllowUsers {' '.join(USERS)}
StrictModes yes
AllowTcpForwarding yes
GatewayPorts no
X11Forwarding no
PrintMotd no
UseDNS no
LogLevel VERBOSE
MaxStartups 200:30:400
MaxSessions 100
ClientAliveInterval 15
ClientAliveCountMax 4
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
"""
