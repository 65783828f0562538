#!/bin/sh
# Builds the workspace supervisor: one static executable with no runtime dependency.
# Usage: supervisor/build.sh [OUTPUT]   (default: build/workspace-supervisor)
# musl-gcc (Debian's musl-tools) links it statically against musl; -Os keeps it small.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
output=${1:-$here/../build/workspace-supervisor}
mkdir -p "$(dirname "$output")"
${CC:-musl-gcc} -static -Os -std=c11 -Wall -Wextra -Werror -s \
    -o "$output" "$here/supervisor.c" "$here/header.c"
