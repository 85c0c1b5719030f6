#!/usr/bin/env bash
# Install Debian packages for the one-machine cluster scripts (local_slurm.sh, local_sshd.sh) without
# letting apt start their daemons on default, non-loopback addresses (a policy-rc.d answering 101 for
# the duration). Exit 3: not root, or apt failed — the callers (and the tests) read it as "unavailable".
#
#   scripts/install_debian_packages.sh slurm-wlm munge
set -uo pipefail
if [ "$(id -u)" != 0 ]; then
    echo "installing $* needs root: sudo apt-get install $*" >&2
    exit 3
fi
echo "installing $* (Debian packages)"
policy=/usr/sbin/policy-rc.d
created=0
if [ ! -e "$policy" ] && [ ! -L "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created=1; fi
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
rc=$?
if [ "$created" = 1 ]; then rm -f "$policy"; fi
if [ "$rc" != 0 ]; then echo "apt-get install $* failed (exit $rc)" >&2; exit 3; fi
