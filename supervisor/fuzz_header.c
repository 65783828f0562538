/* libFuzzer target for the header parser: any bytes, no crash, no read outside the body, and
 * every parsed string within it. Build and run: supervisor/fuzz.sh */
#include <stdlib.h>
#include <string.h>

#include "header.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size >= SP_PREFIX_LENGTH)
        (void)sp_body_length(data);
    /* An exact-size copy, so that the sanitizer sees any read past the end. */
    uint8_t *body = malloc(size ? size : 1);
    if (body == NULL)
        return 0;
    memcpy(body, data, size);
    struct sp_request request;
    if (sp_parse_body(body, size, &request) == 0) {
        if (request.argv[0] == NULL || request.argv[0][0] == 0)
            abort();
        for (char **entry = request.env; *entry; entry++)
            if ((uint8_t *)*entry < body || (uint8_t *)*entry + strlen(*entry) >= body + size)
                abort();
        for (char **argument = request.argv; *argument; argument++)
            if ((uint8_t *)*argument < body || (uint8_t *)*argument + strlen(*argument) >= body + size)
                abort();
        sp_free_request(&request);
    }
    free(body);
    return 0;
}
