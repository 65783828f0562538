/* Parses the supervisor's request header (see header.h); no allocation but the two arrays. */
#include "header.h"

#include <stdlib.h>
#include <string.h>

struct cursor {
    uint8_t *at;
    size_t left;
};

static int take_u32(struct cursor *c, uint32_t *value) {
    if (c->left < 4)
        return -1;
    *value = (uint32_t)c->at[0] << 24 | (uint32_t)c->at[1] << 16 | (uint32_t)c->at[2] << 8 | c->at[3];
    c->at += 4;
    c->left -= 4;
    return 0;
}

static int take_u64(struct cursor *c, uint64_t *value) {
    uint32_t high, low;
    if (take_u32(c, &high) || take_u32(c, &low))
        return -1;
    *value = (uint64_t)high << 32 | low;
    return 0;
}

/* A string: u32 length, the bytes (no NUL among them), one NUL. */
static int take_string(struct cursor *c, char **value) {
    uint32_t length;
    if (take_u32(c, &length) || c->left < (size_t)length + 1)
        return -1;
    if (c->at[length] != 0 || memchr(c->at, 0, length) != NULL)
        return -1;
    *value = (char *)c->at;
    c->at += (size_t)length + 1;
    c->left -= (size_t)length + 1;
    return 0;
}

/* COUNT strings into a new NULL-terminated array; the count is checked against the bytes left
 * (every string takes at least 5) before anything is allocated. */
static int take_strings(struct cursor *c, uint32_t count, char ***values) {
    if (count > c->left / 5)
        return -1;
    char **array = calloc((size_t)count + 1, sizeof *array);
    if (array == NULL)
        return -1;
    for (uint32_t i = 0; i < count; i++) {
        if (take_string(c, &array[i])) {
            free(array);
            return -1;
        }
    }
    *values = array;
    return 0;
}

long sp_body_length(const uint8_t prefix[SP_PREFIX_LENGTH]) {
    if (memcmp(prefix, SP_MAGIC, 4) != 0)
        return -1;
    uint32_t length = (uint32_t)prefix[4] << 24 | (uint32_t)prefix[5] << 16 | (uint32_t)prefix[6] << 8 | prefix[7];
    return length > SP_MAX_BODY ? -1 : (long)length;
}

static int valid_entry(const char *entry) {
    const char *equals = strchr(entry, '=');
    return equals != NULL && equals != entry;
}

int sp_parse_body(uint8_t *body, size_t length, struct sp_request *request) {
    struct cursor c = {body, length};
    uint32_t env_count, argc;
    char *workdir;
    memset(request, 0, sizeof *request);
    if (c.left < SP_NONCE_LENGTH)
        return -1;
    for (int i = 0; i < SP_NONCE_LENGTH; i++) {
        char digit = (char)c.at[i];
        if (!((digit >= '0' && digit <= '9') || (digit >= 'a' && digit <= 'f')))
            return -1;
        request->nonce[i] = digit;
    }
    c.at += SP_NONCE_LENGTH;
    c.left -= SP_NONCE_LENGTH;
    if (take_u32(&c, &request->deadline_ms) || take_u32(&c, &request->grace_ms) ||
        take_u64(&c, &request->stdin_length) || take_u32(&c, &env_count) || take_u32(&c, &argc) ||
        take_string(&c, &workdir))
        return -1;
    if (request->stdin_length > SP_MAX_STDIN || argc == 0)
        return -1;
    request->workdir = workdir[0] ? workdir : NULL;
    if (take_strings(&c, env_count, &request->env))
        return -1;
    if (take_strings(&c, argc, &request->argv) || c.left != 0 || request->argv[0][0] == 0) {
        sp_free_request(request);
        return -1;
    }
    for (uint32_t i = 0; i < env_count; i++) {
        if (!valid_entry(request->env[i])) {
            sp_free_request(request);
            return -1;
        }
    }
    return 0;
}

void sp_free_request(struct sp_request *request) {
    free(request->env);
    free(request->argv);
    request->env = NULL;
    request->argv = NULL;
}
