/* The request header of the workspace supervisor: length-prefixed binary, no escaping.
 *
 *   "SPB1"  u32 BODY_LENGTH  then BODY_LENGTH bytes:
 *   NONCE          32 bytes, lowercase hex digits; carried by every marker
 *   u32 DEADLINE   milliseconds from the end of the header: the backstop
 *   u32 GRACE      milliseconds between TERM and KILL
 *   u64 STDIN      bytes of stdin for the command, right after the header
 *   u32 N_ENV      environment entries
 *   u32 ARGC       arguments, at least one
 *   WORKDIR        a string; empty keeps the current directory
 *   N_ENV strings  NAME=VALUE
 *   ARGC strings   the argv; argv[0] is not empty
 *
 * Integers are big-endian. A string is u32 LENGTH, LENGTH bytes without NUL, then one NUL, so
 * the parsed strings point into the body itself. The body must end with the last string.
 */
#ifndef SP_HEADER_H
#define SP_HEADER_H

#include <stddef.h>
#include <stdint.h>

#define SP_MAGIC "SPB1"
#define SP_PREFIX_LENGTH 8
#define SP_NONCE_LENGTH 32
#define SP_MAX_BODY (64u * 1024 * 1024)
#define SP_MAX_STDIN (1024ull * 1024 * 1024)

struct sp_request {
    char nonce[SP_NONCE_LENGTH + 1];
    uint32_t deadline_ms;
    uint32_t grace_ms;
    uint64_t stdin_length;
    const char *workdir; /* NULL: keep the current directory */
    char **env;          /* N_ENV entries, NULL-terminated */
    char **argv;         /* ARGC entries, NULL-terminated */
};

/* The body length from the 8-byte prefix, or -1 when the prefix is not a valid one. */
long sp_body_length(const uint8_t prefix[SP_PREFIX_LENGTH]);

/* Parses BODY (which must outlive REQUEST: its strings point into it). Returns 0, or -1 for a
 * malformed body (REQUEST then owns nothing). sp_free_request releases the two arrays. */
int sp_parse_body(uint8_t *body, size_t length, struct sp_request *request);
void sp_free_request(struct sp_request *request);

#endif
