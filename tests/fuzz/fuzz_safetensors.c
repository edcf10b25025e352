/* libFuzzer harness: a whole safetensors file. The 8-byte prefix is checked against the input's
 * size, then the header JSON is parsed and validated (offsets, sizes, dtypes) against it. */
#include <stddef.h>
#include <stdint.h>

#include "safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    ds_error err;
    uint64_t header_len;
    st_header h;
    if (size < 8 || st_check_prefix(data, size, &header_len, &err) != 0)
        return 0;
    if (header_len > size - 8)
        return 0;
    if (st_parse(data + 8, (size_t)header_len, size, &h, &err) == 0) {
        for (size_t i = 0; i < h.n_tensors; i++)
            (void)st_find(&h, h.tensors[i].name, h.tensors[i].name_len);
        st_free(&h);
    }
    return 0;
}
