/* libFuzzer harness: a data.pkl stream through the restricted pickle machine. */
#include <stddef.h>
#include <stdint.h>

#include "unpickle.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    ds_error err;
    pk_result r;
    if (pk_run(data, size, NULL, &r, &err) == 0)
        pk_free(&r);
    return 0;
}
