#!/bin/bash
# The batch job of the bare VNC path (bare_vnc_start.sh submits it through stdin): on the compute node, what a user's
# script would do by hand - take the first display without an X lock, make the VNC password file from the token with
# vncpasswd -f (stdin), start Xvnc with its RFB on a unix socket, xfce4 in its own D-Bus session, websockify serving
# noVNC under /me/WSPORT/, and keep `ssh -R WSPORT:127.0.0.1:PORT` to the workspace. scancel ends it all.
set -u
cd "$SLURM_SUBMIT_DIR" || exit 1
umask 077
port=$(/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
display=""
for n in $(seq 40 99); do
  if [ ! -e "/tmp/.X$n-lock" ] && [ ! -e "/tmp/.X11-unix/X$n" ]; then display=$n; break; fi
done
head -c 8 secret | vncpasswd -f >passwd
Xvnc ":$display" -geometry 1280x800 -depth 24 -rfbunixpath "$PWD/rfb.sock" -rfbport -1 -SecurityTypes VncAuth \
  -PasswordFile "$PWD/passwd" -nolisten tcp >xvnc.log 2>&1 &
for _ in $(seq 100); do [ -S rfb.sock ] && break; sleep 0.1; done
DISPLAY=":$display" dbus-run-session -- startxfce4 >desktop.log 2>&1 &
mkdir -p "web/me/$BARE_WSPORT"
ln -s /usr/share/novnc/* "web/me/$BARE_WSPORT/"
websockify --web "$PWD/web" --unix-target="$PWD/rfb.sock" "127.0.0.1:$port" >websockify.log 2>&1 &
ssh -N -o BatchMode=yes -o ExitOnForwardFailure=yes -o ServerAliveInterval=15 \
  -R "127.0.0.1:$BARE_WSPORT:127.0.0.1:$port" "$BARE_WS" >tunnel.log 2>&1 &
wait
