#!/bin/sh
# Fuzzes the supervisor's header parser with libFuzzer (clang) under ASan and UBSan, for
# SECONDS (default 10), from a seed corpus of valid headers; any crash fails.
# Usage: supervisor/fuzz.sh [SECONDS]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -o "$work/fuzz-header" "$here/fuzz_header.c" "$here/header.c"
mkdir "$work/corpus"
# Seeds: valid bodies (without the 8-byte prefix) written by the proxy's own encoder.
python3 - "$work/corpus" <<'PY'
import struct, sys
def string(b): return struct.pack(">I", len(b)) + b + b"\0"
def body(argv, env=(), workdir=b""):
    head = b"0" * 32 + struct.pack(">IIQII", 1000, 500, 3, len(env), len(argv))
    return head + string(workdir) + b"".join(map(string, env)) + b"".join(map(string, argv))
seeds = [body([b"true"]), body([b"sh", b"-c", b"echo $X"], [b"X=1"], b"/tmp"), body([b"a"] * 5, [b"A=" * 3])]
for i, seed in enumerate(seeds):
    open(f"{sys.argv[1]}/seed{i}", "wb").write(seed)
PY
status=0
"$work/fuzz-header" -max_total_time="${1:-10}" -max_len=4096 -print_final_stats=1 \
    -artifact_prefix="$work/" "$work/corpus" >"$work/log" 2>&1 || status=$?
tail -n 25 "$work/log"
exit "$status"
