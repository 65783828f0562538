# shellcheck shell=sh
# Ends a process group for good; shared by the wrapper and the kill exec (each is sent with
# this file in front). TERM, then CONT (a stopped process cannot act on TERM), up to GRACE
# seconds for the group to go, then KILL, as process_tree.py does on the local backend.
#   $1: the target as kill takes it: -PGID for a group, or a PID (a command without setsid)
#   $2: GRACE, whole seconds
# kill is spelled `kill -SIG TARGET`, the one form dash, bash and busybox all accept:
# dash reads the -PGID of `kill -s TERM -PGID` as an option, and busybox refuses a `--`
# (it still sends the signal but fails, which would skip the rest).
# Polls ten times a second where sleep takes fractions (GNU, busybox), else once a second.
__sp_end_group() {
    kill -TERM "$1" 2>/dev/null || return 0
    kill -CONT "$1" 2>/dev/null
    __sp_tenths=0
    while kill -0 "$1" 2>/dev/null && [ "$__sp_tenths" -lt "$(($2 * 10))" ]; do
        if sleep 0.1 2>/dev/null; then
            __sp_tenths=$((__sp_tenths + 1))
        else
            sleep 1
            __sp_tenths=$((__sp_tenths + 10))
        fi
    done
    kill -KILL "$1" 2>/dev/null
    return 0
}
