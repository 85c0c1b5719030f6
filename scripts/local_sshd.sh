#!/usr/bin/env bash
# An ssh "cluster" on this one machine, for trying `deepspeed --hostfile` (pdsh over ssh) and for the
# test that runs it: sshd listening on 127.0.0.1, 127.0.0.2 and 127.0.0.3 only, key-only login for the
# current user, with a client configuration and an `ssh` wrapper that uses it. Needs root (sshd).
#
#   scripts/local_sshd.sh up [DIR] [PORT]     # install (Debian: openssh-server, pdsh) when absent, start
#   export PATH=DIR/bin:$PATH                 # `ssh 127.0.0.2` (and so pdsh and deepspeed) now log in
#   printf '127.0.0.2 slots=1\n127.0.0.3 slots=1\n' > hosts
#   deepspeed --hostfile hosts --master_addr 127.0.0.1 launchers/pretrain.py --config ds_configs/tiny_cpu.yaml
#   scripts/local_sshd.sh down [DIR]
#
# DIR (default /tmp/xtra-sshd) holds the host and user keys and both configurations; nothing under
# /etc or ~/.ssh is changed. On a real cluster the same role is played by your ~/.ssh/config.
set -euo pipefail

ACTION=${1:?usage: scripts/local_sshd.sh up|down [DIR] [PORT]}
BASE=${2:-/tmp/xtra-sshd}
PORT=${3:-2222}

install_if_missing() {
    if [ -x /usr/sbin/sshd ] && command -v pdsh >/dev/null; then return; fi
    bash "$(dirname "$0")/install_debian_packages.sh" openssh-server openssh-client pdsh
}

up() {
    install_if_missing
    mkdir -p "$BASE/bin"; chmod 700 "$BASE"
    BASE=$(readlink -f "$BASE")
    [ -f "$BASE/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$BASE/host_ed25519" -C xtra-local-host
    [ -f "$BASE/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$BASE/id_ed25519" -C xtra-local-user
    cp "$BASE/id_ed25519.pub" "$BASE/authorized_keys"; chmod 600 "$BASE/authorized_keys"
    cat > "$BASE/sshd_config" <<CONF
ListenAddress 127.0.0.1
ListenAddress 127.0.0.2
ListenAddress 127.0.0.3
Port $PORT
HostKey $BASE/host_ed25519
PidFile $BASE/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile $BASE/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# keys may live under a world-writable /tmp, which StrictModes would refuse
StrictModes no
X11Forwarding no
AllowTcpForwarding no
PrintMotd no
CONF
    cat > "$BASE/ssh_config" <<CONF
Host *
  Port $PORT
  User $(id -un)
  IdentityFile $BASE/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile /dev/null
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking no
  LogLevel ERROR
  BatchMode yes
CONF
    # pdsh, DeepSpeed's reachability check and its address lookup all run plain `ssh` from PATH.
    printf '#!/bin/sh\nexec /usr/bin/ssh -F %s/ssh_config "$@"\n' "$BASE" > "$BASE/bin/ssh"
    chmod +x "$BASE/bin/ssh"
    if [ ! -d /run/sshd ]; then mkdir -p /run/sshd; chmod 755 /run/sshd; touch "$BASE/.created_run_sshd"; fi
    /usr/sbin/sshd -t -f "$BASE/sshd_config"
    /usr/sbin/sshd -f "$BASE/sshd_config" -E "$BASE/sshd.log"
    for _ in $(seq 1 40); do
        if "$BASE/bin/ssh" 127.0.0.2 true 2>/dev/null && "$BASE/bin/ssh" 127.0.0.3 true 2>/dev/null; then
            echo "sshd is up on 127.0.0.{1,2,3}:$PORT: export PATH=$BASE/bin:\$PATH"; return
        fi
        sleep 0.25
    done
    echo "sshd is not reachable; see $BASE/sshd.log" >&2
    exit 1
}

down() {
    [ -d "$BASE" ] || return 0
    BASE=$(readlink -f "$BASE")
    if [ -f "$BASE/sshd.pid" ]; then kill "$(cat "$BASE/sshd.pid")" 2>/dev/null || true; fi
    if [ -e "$BASE/.created_run_sshd" ]; then rmdir /run/sshd 2>/dev/null || true; fi
    rm -rf "$BASE"
    echo "sshd is down"
}

case "$ACTION" in
    up) up ;;
    down) down ;;
    *) echo "usage: scripts/local_sshd.sh up|down [DIR] [PORT]" >&2; exit 2 ;;
esac
