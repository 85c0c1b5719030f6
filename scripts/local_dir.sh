# Sourced by scripts/local_sshd.sh and scripts/local_slurm.sh (which set MARKER first): the folder each
# keeps its keys, configuration, state and logs in.
#
# Nothing already on disk is trusted, since these folders hold root's keys and often live under a
# world-writable /tmp: `up` makes its folder itself (mktemp, or mkdir of a path that must not exist yet,
# so a planted folder, key or symlink is refused, never reused) and every key in it is new; `down`
# removes only a real folder (never through a symlink) of this user that bears the marker `up` wrote,
# and stops only processes whose command line names that folder.

# refuse MESSAGE: stop with the reason (exit 2: nothing was created, started or removed).
refuse() {
    echo "$0: $*" >&2
    exit 2
}

# strip_slashes PATH: PATH without trailing slashes, so that a symlink given as "link/" is still seen as one.
strip_slashes() {
    local path=$1
    while [ "$path" != / ] && [ "${path%/}" != "$path" ]; do path=${path%/}; done
    printf '%s\n' "$path"
}

# new_dir NAME [DIR]: create DIR (0700, its parent must exist), or a fresh NAME.XXXXXX under $TMPDIR (else
# /tmp) when DIR is empty, write the marker in it, print it, and set BASE to its absolute path.
new_dir() {
    local name=$1 dir
    dir=$(strip_slashes "${2:-}")
    if [ -z "$dir" ]; then
        dir=$(mktemp -d -t "$name.XXXXXX") || refuse "could not create a folder under ${TMPDIR:-/tmp}"
    else
        if [ -L "$dir" ] || [ -e "$dir" ]; then
            refuse "$dir already exists: pass a path that does not exist yet (it is created, 0700), or none" \
                "for a fresh folder; a folder left by '$0 up' goes with '$0 down $dir'"
        fi
        # mkdir without -p fails on anything already there (a symlink planted after the test above included)
        mkdir -m 700 -- "$dir" || refuse "could not create $dir (its parent must exist)"
    fi
    BASE=$(cd -P -- "$dir" && pwd)
    [ -O "$BASE" ] && [ ! -L "$BASE" ] || refuse "$dir changed under us; nothing was started"
    chmod 700 "$BASE"
    echo "$MARKER: made by '$0 up'; '$0 down' removes this folder" > "$BASE/$MARKER"
    echo "folder $BASE (remove it with: $0 down $BASE)"
}

# own_dir DIR: set BASE to DIR's absolute path when DIR is a folder `up` made; return 1 when nothing is
# at DIR; refuse a symlink, anything of another user, and a folder without the marker.
own_dir() {
    local dir
    dir=$(strip_slashes "$1")
    [ -L "$dir" ] && refuse "$dir is a symlink: pass the folder '$0 up' printed; nothing was removed"
    [ -e "$dir" ] || return 1
    [ -d "$dir" ] && [ -O "$dir" ] || refuse "$dir is not a folder of $(id -un); nothing was removed"
    if [ ! -f "$dir/$MARKER" ] || [ -L "$dir/$MARKER" ] || [ ! -O "$dir/$MARKER" ]; then
        refuse "$dir was not made by '$0 up' (it has no $MARKER); nothing was removed"
    fi
    BASE=$(cd -P -- "$dir" && pwd)
}

# pid_from PIDFILE TEXT: print the process id in PIDFILE when that process is alive and its command line
# holds TEXT (the folder's path), so that a stale or planted pid file never gets another process killed.
pid_from() {
    local pid
    [ -f "$1" ] && [ ! -L "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2" || return 1
    echo "$pid"
}
