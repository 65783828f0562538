# shellcheck shell=sh
# The probe, run once per pod: prints the tools the wrapper needs that the image lacks,
# separated by spaces (nothing at all when every one is there).
for __sp_tool in setsid head cat sleep; do
    command -v "$__sp_tool" >/dev/null 2>&1 || printf '%s ' "$__sp_tool"
done
