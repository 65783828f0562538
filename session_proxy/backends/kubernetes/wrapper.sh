# shellcheck shell=sh
# The wrapper: runs one command in the workspace for session-proxy. Needs end_group.sh in front.
#
# Every exec runs the same argv, `/bin/sh -c <this script>`, so no user value reaches the exec
# URL (or the API server's audit log). The inputs arrive on stdin instead: a header of lines,
# then exactly STDIN_LENGTH bytes for the command. Each value is `=TEXT` on one line (no newline
# in it), or `:LENGTH` and then exactly LENGTH raw bytes (a newline in it, or a long one); it is
# stored as data and never evaluated.
#
#   SP2                 protocol tag
#   NONCE               32 hex digits, carried by every marker
#   DEADLINE            the backstop: whole seconds from the end of the header
#   GRACE               whole seconds between TERM and KILL
#   LEFTOVER_GRACE      whole seconds before what the command left in its group is ended
#   STDIN_LENGTH        bytes of stdin for the command, right after the header
#   WORKDIR             a value; empty keeps the current directory
#   N                   then N values: environment entries NAME=VALUE
#   M                   then M values (M >= 1): the argv
#   .                   the end of the header (a header cut short never runs anything)
#
# Reports are markers on stderr, \036SP<NONCE>:<kind>\036 (the command never sees the nonce):
#   pgid:<id>           the command's process group (its pid; a bare pid without setsid)
#   deadline | gone     the wrapper is ending the command itself: the backstop passed, or its
#                       stdin reached EOF (the proxy or its client is gone)
#   exit:<status>[:empty]
#                       the command ended, $? style (128+N for signal N); `:empty` when nothing
#                       is left in its group, so no output can follow: the request may end here
#   error:workdir | error:env | error:notfound
#                       the command could not be started; nothing ran
#
# The wrapper's own variables all start with __sp_, and the request's environment is applied
# in the command's process alone (__sp_exec_command), after every tool the wrapper needs was
# found: no name or value in it (PATH, IFS, __sp_*, ...) can change what the wrapper does.

__sp_require_number() {
    case $1 in '' | *[!0-9]*) exit 91 ;; esac
}

# Reads one header value into __sp_value. `read` takes a pipe one byte per call, so a long
# value comes length-prefixed and head takes it in one go; the x keeps trailing newlines, which
# command substitution would strip.
__sp_read_value() {
    IFS= read -r __sp_line || exit 90
    case $__sp_line in
        =*) __sp_value=${__sp_line#=} ;;
        :*)
            __sp_require_number "${__sp_line#:}"
            __sp_value=$(head -c "${__sp_line#:}" && echo x) || exit 90
            __sp_value=${__sp_value%x}
            ;;
        *) exit 91 ;;
    esac
}

__sp_mark() {
    printf '\036SP%s:%s\036' "$__sp_nonce" "$1" >&2
}

# stdout and stderr reach the proxy as separate streams that a runtime may reorder, so the end
# of the command's stdout is marked on stdout itself: written after the command exited, it
# follows every byte the command wrote there (one pipe keeps its order). It comes after the exit
# marker, which a leftover flooding stdout cannot hold up (the proxy bounds its wait for this).
__sp_mark_stdout_end() {
    printf '\036SP%s:end:stdout\036' "$__sp_nonce"
}

# These two run in a subshell, with positional parameters laid out as
#   ENTRY... -- PROGRAM [SETSID --] ARGV...
# Once the first entry is exported they read no variable (a name in the request may have
# replaced it), only their parameters, builtins and the `case` syntax.
#
# Tries the environment and looks the program up with the request's PATH, as the command will
# be: exit 0 when both work, 127 when the program is not found, else the environment failed.
# This is a trial in a throwaway subshell because an entry can be refused (a read-only
# variable, such as bash's UID) and bash in POSIX mode then exits instead of returning.
__sp_check_command() {
    while :; do
        case $1 in --) shift && break ;; esac
        # shellcheck disable=SC2163 # $1 is NAME=VALUE, exported as such
        export "$1" || exit 1
        shift
    done
    command -v -- "$1" >/dev/null 2>&1 || exit 127
}

# Becomes the command: exports the environment, then execs setsid (by the full path found
# before, never through the request's PATH) or, without it, the argv itself.
__sp_exec_command() {
    while :; do
        case $1 in --) shift && break ;; esac
        # shellcheck disable=SC2163
        export "$1"
        shift
    done
    shift
    exec "$@"
}

# ---- Per pod: nothing here depends on the request. ----------------------------------------
__sp_setsid=$(command -v setsid 2>/dev/null) || __sp_setsid=

# ---- The header, read in one step; after it only the command's own work is left. ----------
# `IFS= read -r` keeps each line as it is, and neither `read` nor `head -c` reads past what it
# needs, so the command's stdin after the header stays unread. A short header (stdin closed
# early) ends us.
IFS= read -r __sp_tag || exit 90
[ "$__sp_tag" = SP2 ] || exit 91
IFS= read -r __sp_nonce || exit 90
IFS= read -r __sp_deadline || exit 90
__sp_require_number "$__sp_deadline"
IFS= read -r __sp_grace || exit 90
__sp_require_number "$__sp_grace"
IFS= read -r __sp_leftover_grace || exit 90
__sp_require_number "$__sp_leftover_grace"
IFS= read -r __sp_stdin_length || exit 90
__sp_require_number "$__sp_stdin_length"
__sp_read_value
__sp_workdir=$__sp_value
set --
IFS= read -r __sp_count || exit 90
__sp_require_number "$__sp_count"
__sp_env_count=$__sp_count
while [ "$__sp_count" -gt 0 ]; do
    __sp_read_value
    set -- "$@" "$__sp_value"
    __sp_count=$((__sp_count - 1))
done
IFS= read -r __sp_count || exit 90
__sp_require_number "$__sp_count"
[ "$__sp_count" -gt 0 ] || exit 91
__sp_read_value
__sp_program=$__sp_value
set -- "$@" -- "$__sp_value"
if [ -n "$__sp_setsid" ]; then
    # setsid's options end at `--`, so a program named like one (-f) is still the program.
    set -- "$@" "$__sp_setsid" --
fi
set -- "$@" "$__sp_value"
__sp_count=$((__sp_count - 1))
while [ "$__sp_count" -gt 0 ]; do
    __sp_read_value
    set -- "$@" "$__sp_value"
    __sp_count=$((__sp_count - 1))
done
IFS= read -r __sp_tag || exit 90
[ "$__sp_tag" = . ] || exit 91

# ---- The command. --------------------------------------------------------------------------
if [ -n "$__sp_workdir" ]; then
    cd "$__sp_workdir" 2>/dev/null || {
        __sp_mark error:workdir
        exit 0
    }
fi
# Without an environment of its own the command sees our PATH, so the program is looked up
# right here; with one, in the throwaway trial subshell.
if [ "$__sp_env_count" -gt 0 ]; then
    (__sp_check_command "$@") >/dev/null 2>&1
    __sp_found=$?
else
    __sp_found=0
    command -v -- "$__sp_program" >/dev/null 2>&1 || __sp_found=127
fi
case $__sp_found in
    0) ;;
    127)
        __sp_mark error:notfound
        exit 0
        ;;
    *)
        __sp_mark error:env
        exit 0
        ;;
esac

__sp_main=$$
__sp_stop=
__sp_interrupted=
__sp_group=
__sp_ender=
# A stop (USR1 from the dead-man switch, USR2 from the backstop) starts ending the group right
# where it lands, beside us, so that we go on waiting for (and reaping) the command and report
# its real status. One that lands before the group is known is taken up once it is.
__sp_on_stop() {
    __sp_stop=${__sp_stop:-$1}
    __sp_interrupted=1
    if [ -n "$__sp_group" ] && [ -z "$__sp_ender" ]; then
        __sp_end_command "$__sp_pid" "$__sp_group" "$__sp_grace" </dev/null >/dev/null 2>&1 &
        __sp_ender=$!
    fi
}

# Ends the command's group ($2) once it exists: a stop can come before the command's process
# ($1) has reached setsid, and a TERM to a group not yet there would be lost.
__sp_end_command() {
    while ! kill -0 "$2" 2>/dev/null; do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1 2>/dev/null || sleep 1
    done
    __sp_end_group "$2" "$3"
}
trap '__sp_on_stop gone' USR1
trap '__sp_on_stop deadline' USR2
# The dead-man switch: EOF on our stdin means the proxy or its client is gone (the API server
# half-closes it when the stream dies), and ends the command. It reads with the `read` builtin,
# so ending the watcher's shell ends all of it.
__sp_watch_stdin() {
    while IFS= read -r __sp_line; do :; done <&3
    kill -USR1 "$__sp_main"
}
# A background command reads /dev/null unless told otherwise (POSIX), so our stdin is kept on
# fd 3. With stdin for the command, the watcher first hands it exactly STDIN_LENGTH bytes
# through a FIFO (the pipeline of old made bash wait for the feeder as for the command); only
# where no FIFO can be made does a pipeline feeder do it, leaving the watcher behind as its
# own child. Redirections are done with exec, not `{ } 2>...`: dash would keep the real
# stderr on a saved fd that the watcher inherits, holding the stream open.
# Reports the group as soon as the command is forked, before it can start processes of its
# own. From here on a report that cannot be written (the stream is gone) must not stop the
# rest; only now, as a signal ignored before the command started would stay ignored in it.
__sp_report_group() {
    trap '' PIPE
    __sp_mark "pgid:$__sp_pid"
}
exec 3<&0
__sp_watcher=
__sp_fifo=
if [ "$__sp_stdin_length" -gt 0 ]; then
    __sp_fifo=${TMPDIR:-/tmp}/.session-proxy-stdin-$$
    mkfifo -m 600 "$__sp_fifo" 2>/dev/null || __sp_fifo=
fi
if [ -n "$__sp_fifo" ]; then
    __sp_exec_command "$@" <"$__sp_fifo" 3<&- &
    __sp_pid=$!
    __sp_report_group
    (
        exec 2>/dev/null >"$__sp_fifo"
        head -c "$__sp_stdin_length" <&3
        exec >/dev/null
        __sp_watch_stdin
    ) &
    __sp_watcher=$!
elif [ "$__sp_stdin_length" -gt 0 ]; then
    (
        exec 2>/dev/null
        head -c "$__sp_stdin_length" <&3
        exec >/dev/null
        __sp_watch_stdin &
    ) | __sp_exec_command "$@" 3<&- &
    __sp_pid=$!
    __sp_report_group
else
    __sp_exec_command "$@" </dev/null 3<&- &
    __sp_pid=$!
    __sp_report_group
    (
        exec >/dev/null 2>&1
        __sp_watch_stdin
    ) &
    __sp_watcher=$!
fi
# The backstop. A sleep that cannot run (it failed, rather than slept) fires nothing.
# A TERM can come at any point, even before the sleep's pid is known: the first trap only notes
# it, and the note is looked at again once the trap that kills the sleep is in place, so the
# sleep never outlives the timer. The sleep gets KILL: a TERM sent between its fork and its exec
# is caught by the forked shell's own handler and lost (seen in dash and busybox).
(
    exec </dev/null >/dev/null 2>&1 3<&-
    __sp_timer_ended=
    trap '__sp_timer_ended=1' TERM
    sleep "$__sp_deadline" &
    __sp_sleeper=$!
    trap 'kill -KILL "$__sp_sleeper" 2>/dev/null; exit 0' TERM
    if [ -n "$__sp_timer_ended" ]; then
        kill -KILL "$__sp_sleeper" 2>/dev/null
        exit 0
    fi
    wait "$__sp_sleeper" && kill -USR2 "$__sp_main"
) &
__sp_timer=$!
# Only now is the group known to a stop: an ender started by a trap before this point would
# have taken the place of $! that the lines above read.
# With setsid the command leads its own group (a background job of a shell without job
# control is no group leader, so setsid does not fork): its pid is the group's id.
if [ -n "$__sp_setsid" ]; then
    __sp_group=-$__sp_pid
else
    __sp_group=$__sp_pid
fi
[ -z "$__sp_stop" ] || __sp_on_stop "$__sp_stop"

# `wait` returns early, with a status over 128, when a trapped signal arrives (POSIX): the
# command may then still run, or have been reaped by the shell already, and either way a second
# `wait` gives its real status. When that second wait no longer knows the pid (127, the process
# gone), the trap ran just after the first one returned, which had the real status.
__sp_interrupted=
wait "$__sp_pid"
__sp_status=$?
while [ -n "$__sp_interrupted" ] && [ "$__sp_status" -gt 128 ]; do
    __sp_interrupted=
    wait "$__sp_pid" 2>/dev/null
    __sp_again=$?
    if [ "$__sp_again" -eq 127 ] && ! kill -0 "$__sp_pid" 2>/dev/null; then
        break
    fi
    __sp_status=$__sp_again
done
# The command is over: a stop from now on (the proxy closing the stream after the exit) ends
# nothing early; what is left is ended below. Anything still in the command's group may yet
# write; without setsid the group is not the command's own, so that cannot be told.
__sp_leftovers=$__sp_group
__sp_group=
__sp_empty=
if [ -n "$__sp_setsid" ] && ! kill -0 "$__sp_leftovers" 2>/dev/null; then
    __sp_empty=:empty
fi
[ -z "$__sp_ender" ] || __sp_mark "$__sp_stop"
__sp_mark "exit:$__sp_status$__sp_empty"
__sp_mark_stdout_end
# From here on we hold none of the stream's output pipes: once whatever is left of the command
# has closed them too, the stream ends. A stop now ends nothing early, and the watchers are
# reaped before we exit, so none of their signals can reach a later process that got our pid.
trap '' USR1 USR2
exec >/dev/null 2>&1
kill -TERM "$__sp_timer" 2>/dev/null
wait "$__sp_timer"
if [ -n "$__sp_watcher" ]; then
    kill -TERM "$__sp_watcher" 2>/dev/null
    wait "$__sp_watcher"
else
    # The watcher is the pipeline feeder's child, out of our reach: we wait for the same EOF
    # it does, the proxy closing the stream once it has the markers.
    while IFS= read -r __sp_line; do :; done <&3
fi
[ -z "$__sp_fifo" ] || rm -f "$__sp_fifo"
# Whatever the command left in its group (`sleep 300 &`) is ended too, after a moment, from a
# process of its own: a child forked just before the command exited may still be on its way to
# a session of its own (`setsid server ... &` as a command's last words). Without setsid the
# command's pid alone was its target, and that is reaped already.
[ -n "$__sp_setsid" ] && [ -z "$__sp_ender" ] && [ -z "$__sp_empty" ] || exit 0
(
    sleep "$__sp_leftover_grace"
    __sp_end_group "$__sp_leftovers" "$__sp_grace"
) </dev/null 3<&- &
exit 0
