# shellcheck shell=sh
# The kill exec: the proxy's second exec on every early end, which ends a command's process
# group from outside its wrapper. Needs end_group.sh in front. Stdin carries two lines, the
# process group id and the grace in seconds, so the exec URL is the same for every kill.
IFS= read -r __sp_pgid || exit 2
IFS= read -r __sp_grace || exit 2
# Digits only, and never 0 or 1: `kill -TERM -0` would hit our own group, -1 everything.
case $__sp_pgid$__sp_grace in *[!0-9]*) exit 2 ;; esac
[ "$__sp_pgid" -gt 1 ] || exit 2
[ -n "$__sp_grace" ] || exit 2
# A command started without setsid (an image lacking it) has no group of its own: then only
# its own process can be reached.
__sp_target=-$__sp_pgid
kill -0 "$__sp_target" 2>/dev/null || __sp_target=$__sp_pgid
__sp_end_group "$__sp_target" "$__sp_grace"
exit 0
