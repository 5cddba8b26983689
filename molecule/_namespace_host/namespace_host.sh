# namespace_host.sh up|down NAME INDEX STATE_DIR - a network namespace NAME with a veth to the root namespace
# (root side 10.203.INDEX.1, namespace side 10.203.INDEX.2) and its own sshd for root (key STATE_DIR/id_ed25519).
# `down` kills every process inside the namespace, then removes it; both are idempotent.
set -eu
op=$1 ns=$2 idx=$3 state=$4
case "$ns" in isn-mol-*) ;; *) echo "refusing namespace name $ns" >&2; exit 2 ;; esac
case "$idx" in [1-9] | [1-9][0-9] | 1[0-9][0-9]) ;; *) echo "bad index $idx" >&2; exit 2 ;; esac
dir="$state/$ns"
veth="isnm$idx"
if [ "$op" = down ]; then
  if ip netns list | grep -qw "$ns"; then
    for pid in $(ip netns pids "$ns"); do kill -TERM "$pid" 2>/dev/null || true; done
    sleep 0.5
    for pid in $(ip netns pids "$ns"); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns delete "$ns"
  fi
  ip link delete "$veth-r" 2>/dev/null || true
  exit 0
fi
mkdir -p "$dir" /run/sshd
ip netns list | grep -qw "$ns" || ip netns add "$ns"
if ! ip link show "$veth-r" >/dev/null 2>&1; then
  ip link add "$veth-r" type veth peer name "$veth-n"
  ip link set "$veth-n" netns "$ns"
  ip addr add "10.203.$idx.1/24" dev "$veth-r"
  ip link set "$veth-r" up
  ip netns exec "$ns" ip addr add "10.203.$idx.2/24" dev "$veth-n"
  ip netns exec "$ns" ip link set "$veth-n" up
  ip netns exec "$ns" ip link set lo up
fi
[ -f "$dir/host_key" ] || ssh-keygen -q -t ed25519 -N "" -f "$dir/host_key"
cp "$state/id_ed25519.pub" "$dir/authorized_keys"
cat >"$dir/sshd_config" <<CONF
Port 22
ListenAddress 10.203.$idx.2
HostKey $dir/host_key
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
CONF
if ! { [ -f "$dir/sshd.pid" ] && kill -0 "$(cat "$dir/sshd.pid")" 2>/dev/null; }; then
  ip netns exec "$ns" /usr/sbin/sshd -f "$dir/sshd_config" -E "$dir/sshd.log"
fi
for _ in $(seq 50); do
  ip netns exec "$ns" bash -c "exec 3<>/dev/tcp/10.203.$idx.2/22" 2>/dev/null && exit 0
  sleep 0.1
done
echo "sshd in $ns did not come up: $(tail -n 3 "$dir/sshd.log")" >&2
exit 1
