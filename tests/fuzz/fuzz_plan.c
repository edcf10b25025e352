/* libFuzzer harness: the buffer layout (plan_layout_build). The input is a safetensors file; once
 * its header parses, it is laid out under specs taken from its last bytes (split, merge, target,
 * conversions, alignment, readers, bucket size), over one or two copies of the header, and the
 * layout's invariants are checked: every tensor inside its buffer, at an aligned offset, no two
 * tensors overlapping, merged names unique, sizes as the dtypes say. A broken invariant aborts. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "plan.h"
#include "safetensors.h"

#define CHECK(c)                                                                                                       \
    do {                                                                                                               \
        if (!(c))                                                                                                      \
            abort();                                                                                                   \
    } while (0)

typedef struct {
    uint64_t begin, end;
} span;

static int span_cmp(const void *x, const void *y) {
    const span *a = x, *b = y;
    return a->begin < b->begin ? -1 : a->begin > b->begin;
}

static void check_layout(const st_header *hs, size_t n, const plan_layout_spec *spec, const plan_layout *l) {
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += hs[i].n_tensors;
    CHECK(spec->merge ? l->n_items <= total : l->n_items == total);
    if (spec->split == PLAN_PER_FILE)
        CHECK(l->n_buffers == n);
    for (size_t b = 0; b < l->n_buffers; b++) {
        CHECK(l->buffers[b].nbytes % spec->align == 0);
        CHECK(spec->split != PLAN_BUCKETS || l->buffers[b].reader < spec->readers);
    }
    span *spans = malloc((l->n_items ? l->n_items : 1) * sizeof *spans);
    CHECK(spans);
    for (size_t b = 0; b < l->n_buffers; b++) {
        size_t k = 0;
        for (size_t i = 0; i < l->n_items; i++) {
            const plan_item *it = &l->items[i];
            if (it->buffer != b || it->out_nbytes == 0)
                continue;
            spans[k++] = (span){it->buffer_offset, it->buffer_offset + it->out_nbytes};
        }
        qsort(spans, k, sizeof *spans, span_cmp);
        for (size_t i = 1; i < k; i++)
            CHECK(spans[i - 1].end <= spans[i].begin);
    }
    free(spans);
    for (size_t i = 0; i < l->n_items; i++) {
        const plan_item *it = &l->items[i];
        CHECK(it->file < n && it->tensor < hs[it->file].n_tensors);
        const st_tensor *t = &hs[it->file].tensors[it->tensor];
        CHECK(it->offset == hs[it->file].data_start + t->begin && it->nbytes == t->end - t->begin);
        CHECK(it->from == t->dtype);
        if (it->to == it->from)
            CHECK(it->out_nbytes == it->nbytes);
        else
            CHECK(it->to == spec->target &&
                  it->out_nbytes / (st_dtype_bits(it->to) / 8) == it->nbytes / (st_dtype_bits(it->from) / 8));
        if (it->buffer == SIZE_MAX) {
            CHECK(spec->converted_only);
            continue;
        }
        CHECK(it->buffer < l->n_buffers);
        CHECK(it->buffer_offset % spec->align == 0);
        CHECK(it->buffer_offset <= l->buffers[it->buffer].nbytes &&
              it->out_nbytes <= l->buffers[it->buffer].nbytes - it->buffer_offset);
        if (spec->split == PLAN_PER_FILE)
            CHECK(it->buffer == it->file);
        if (spec->merge) /* names unique, and the kept entry is the last file's */
            for (size_t j = i + 1; j < l->n_items; j++) {
                const st_tensor *u = &hs[l->items[j].file].tensors[l->items[j].tensor];
                CHECK(u->name_len != t->name_len || memcmp(u->name, t->name, t->name_len) != 0);
            }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    ds_error err;
    uint64_t header_len;
    st_header h;
    if (size < 8 || st_check_prefix(data, size, &header_len, &err) != 0 || header_len > size - 8)
        return 0;
    if (st_parse(data + 8, (size_t)header_len, size, &h, &err) != 0)
        return 0;
    /* the spec bytes: the file's last four (a safetensors file's data section is free-form) */
    uint8_t k[4] = {0, 0, 0, 0};
    for (size_t i = 0; i < 4 && i < size; i++)
        k[i] = data[size - 1 - i];
    static const st_dtype targets[] = {ST_F32, ST_F16, ST_BF16, ST_F8_E4M3, ST_F8_E5M2};
    st_header hs[2] = {h, h};
    for (int round = 0; round < 3; round++) {
        uint8_t a = (uint8_t)(k[round] + round * 77), b = k[(round + 1) % 4];
        plan_layout_spec spec = {0};
        spec.split = a % 3;
        spec.merge = (a >> 2) & 1;
        spec.converted_only = spec.split == PLAN_PER_FILE && ((a >> 3) & 1);
        spec.target = targets[(a >> 4) % 5];
        spec.convert =
            (b & 1) ? 0
                    : ((1u << ST_F32) | (1u << ST_F16) | (1u << ST_BF16) | (1u << ST_F8_E4M3) | (1u << ST_F8_E5M2)) &
                          ~(unsigned)(b & 0x2 ? 1u << ST_F16 : 0);
        static const uint64_t aligns[] = {1, 64, 256, 4096};
        spec.align = aligns[(b >> 2) & 3];
        spec.readers = 1 + ((b >> 4) & 7);
        spec.bucket_bytes = (b & 0x80) ? (uint64_t)k[3] * 16 : 0;
        size_t n = 1 + (size_t)((a >> 7) & 1); /* two copies: every name repeats, the second wins */
        plan_layout l;
        if (plan_layout_build(hs, n, &spec, &l, &err) == 0) {
            check_layout(hs, n, &spec, &l);
            if (spec.merge && n == 2)
                for (size_t i = 0; i < l.n_items; i++)
                    CHECK(l.items[i].file == 1);
            plan_layout_free(&l);
        }
    }
    st_free(&h);
    return 0;
}
