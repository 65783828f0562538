# shellcheck shell=sh
# The probe, run once per pod: prints the tools the wrapper needs that the image lacks,
# separated by spaces (nothing at all when every one is there), and +supervisor when the
# workspace supervisor is at $1 and answers with the protocol this proxy speaks.
for __sp_tool in setsid head cat sleep; do
    command -v "$__sp_tool" >/dev/null 2>&1 || printf '%s ' "$__sp_tool"
done
if [ -n "${1:-}" ] && [ "$("$1" --version 2>/dev/null)" = "session-proxy workspace-supervisor SPB1" ]; then
    printf '+supervisor '
fi
