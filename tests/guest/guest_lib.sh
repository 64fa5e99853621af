# Sourced by each guest job (/job/run.sh) before its own steps; copied into the job share at every
# run, so changing it needs no image rebuild. /job/env.sh (written by the host) sets PORTAL,
# TARGET, INITIATOR and REPLACEMENT_TIMEOUT.
# shellcheck shell=sh
. /job/env.sh
OUT=/job/out

log() {
    echo "[$(cut -d' ' -f1 /proc/uptime)] $*"
}

# The host polls for $OUT/mark-NAME to act while the guest runs (pause a LUN, kill the target).
mark() {
    log "mark $1"
    : >"$OUT/mark-$1"
}

# ... and the guest waits for /job/in/NAME when it needs the host to have acted first.
wait_host() {
    i=0
    while [ ! -e "/job/in/$1" ]; do
        i=$((i + 1))
        if [ "$i" -gt "$((${2:-60} * 10))" ]; then
            log "the host did not answer $1"
            return 1
        fi
        sleep 0.1
    done
}

iscsi_start() {
    mkdir -p /etc/iscsi /var/lib/iscsi /run/lock/iscsi
    echo "InitiatorName=$INITIATOR" >/etc/iscsi/initiatorname.iscsi
    # Debian's iscsid.conf starts iscsid through systemctl, which this guest does not have; the
    # replacement timeout (120 s by default) bounds how long a session may be down and recover.
    sed -i \
        -e 's|^iscsid.startup = .*|iscsid.startup = /usr/sbin/iscsid|' \
        -e "s|^node.session.timeo.replacement_timeout = .*|node.session.timeo.replacement_timeout = $REPLACEMENT_TIMEOUT|" \
        /etc/iscsi/iscsid.conf
    # In the foreground (in the background of this script) so its messages land in the job's
    # output instead of a syslog the guest does not run.
    /usr/sbin/iscsid -f >"$OUT/iscsid.log" 2>&1 &
    # Ready once it listens on its abstract Unix socket, which iscsiadm connects to.
    i=0
    until grep -q ISCSIADM_ABSTRACT_NAMESPACE /proc/net/unix; do
        i=$((i + 1))
        if [ "$i" -gt 100 ]; then
            log "iscsid did not start"
            return 1
        fi
        sleep 0.1
    done
}

discover() {
    iscsiadm -m discovery -t st -p "$PORTAL" | tee "$OUT/discovery.txt"
}

# SendTargets discovery through a discovery record, whose settings (CHAP) apply to it.
disc_set() {
    iscsiadm -m discoverydb -t st -p "$PORTAL" -o update -n "$1" -v "$2"
}

# (Create the record first: iscsiadm -m discoverydb -t st -p "$PORTAL" -o new.)
discover_db() {
    iscsiadm -m discoverydb -t st -p "$PORTAL" --discover >"$OUT/discovery.txt"
    status=$?
    cat "$OUT/discovery.txt"
    return $status
}

node_set() {
    iscsiadm -m node -T "$TARGET" -p "$PORTAL" -o update -n "$1" -v "$2"
}

login() {
    iscsiadm -m node -T "$TARGET" -p "$PORTAL" --login
}

logout() {
    iscsiadm -m node -T "$TARGET" -p "$PORTAL" --logout
    # iscsiadm exits 21 when there is no session left.
    left=0
    iscsiadm -m session || left=$?
    if [ "$left" -ne 21 ]; then
        log "iscsiadm -m session exited $left after logout: a session is left"
        return 1
    fi
}

# Prints the /dev/sdX of LUN $1 once the kernel's scan has attached it. Without udev there is no
# /dev/disk/by-path: the SCSI address H:C:T:L in sysfs says which LUN a disk is. Each LUN found
# is also recorded with its size in $OUT/luns.txt, which the host checks against the target's.
lun_dev() {
    i=0
    while [ "$i" -lt 300 ]; do
        for blk in /sys/bus/scsi/devices/*:*:*:"$1"/block/*; do
            dev="/dev/${blk##*/}"
            if [ -b "$dev" ]; then
                echo "$1 $dev $(blockdev --getsize64 "$dev")" >>"$OUT/luns.txt"
                echo "$dev"
                return 0
            fi
        done
        i=$((i + 1))
        sleep 0.1
    done
    log "no disk for LUN $1"
    ls -l /sys/bus/scsi/devices >&2
    return 1
}

# fio_run NAME [fio options...]: the result as JSON in $OUT/fio-NAME.json for the host to check.
fio_run() {
    name=$1
    shift
    log "fio $name $*"
    fio --name="$name" --output-format=json --output="$OUT/fio-$name.json" "$@"
}
