#!/usr/bin/env bash
# An ssh "cluster" on this one machine, for trying `deepspeed --hostfile` (pdsh over ssh) and for the
# test that runs it: sshd listening on 127.0.0.1, 127.0.0.2 and 127.0.0.3 only, key-only login for the
# current user, with a client configuration and an `ssh` wrapper that uses it. Needs root (sshd).
#
#   scripts/local_sshd.sh up [DIR] [PORT]     # install (Debian: openssh-server, pdsh) when absent, start
#   export PATH=DIR/bin:$PATH                 # `ssh 127.0.0.2` (and so pdsh and deepspeed) now log in
#   printf '127.0.0.2 slots=1\n127.0.0.3 slots=1\n' > hosts
#   deepspeed --hostfile hosts --master_addr 127.0.0.1 launchers/pretrain.py --config ds_configs/tiny_cpu.yaml
#   scripts/local_sshd.sh down DIR            # stop that sshd, remove DIR
#
# DIR holds the host and user keys (both made by this `up`) and both configurations; nothing under /etc
# or ~/.ssh is changed. Without DIR (or with DIR '', to give a PORT, default 2222) `up` makes a fresh
# folder, $TMPDIR/xtra-sshd.XXXXXX, and prints it; a DIR that already exists, or is a symlink, is refused
# rather than trusted, and `down` removes only a folder `up` made (scripts/local_dir.sh). On a real
# cluster the same role is played by your ~/.ssh/config.
set -euo pipefail
source "$(dirname "$0")/local_dir.sh"
MARKER=.xtra-local-sshd

ACTION=${1:-}
DIR=${2:-}
PORT=${3:-2222}

# sshd from PATH first, then Debian's place for it (outside a non-root PATH)
sshd_path() { PATH=$PATH:/usr/sbin command -v sshd || true; }

install_if_missing() {
    if [ -n "$(sshd_path)" ] && command -v pdsh >/dev/null; then return; fi
    bash "$(dirname "$0")/install_debian_packages.sh" openssh-server openssh-client pdsh
}

up() {
    new_dir xtra-sshd "$DIR"
    install_if_missing
    local sshd
    sshd=$(sshd_path)
    mkdir "$BASE/bin"
    # BASE was empty a moment ago: both keys are new (ssh-keygen would stop at a file already there)
    ssh-keygen -q -t ed25519 -N '' -f "$BASE/host_ed25519" -C xtra-local-host </dev/null
    ssh-keygen -q -t ed25519 -N '' -f "$BASE/id_ed25519" -C xtra-local-user </dev/null
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
# DIR may lie under a world-writable /tmp, which StrictModes would refuse (DIR itself is 0700)
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
    "$sshd" -t -f "$BASE/sshd_config"
    "$sshd" -f "$BASE/sshd_config" -E "$BASE/sshd.log"
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
    [ -n "$DIR" ] || refuse "usage: $0 down DIR (the folder '$0 up' printed)"
    own_dir "$DIR" || { echo "nothing at $DIR"; return 0; }
    local pid
    if pid=$(pid_from "$BASE/sshd.pid" "$BASE/sshd_config"); then kill "$pid" 2>/dev/null || true; fi
    if [ -e "$BASE/.created_run_sshd" ]; then rmdir /run/sshd 2>/dev/null || true; fi
    rm -rf -- "$BASE"
    echo "sshd is down"
}

case "$ACTION" in
    up) up ;;
    down) down ;;
    *) echo "usage: scripts/local_sshd.sh up [DIR] [PORT] | down DIR" >&2; exit 2 ;;
esac
