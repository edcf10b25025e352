/* safetensors.h: parsing and validating a safetensors header.
 *
 * File layout: an 8-byte little-endian length N, N bytes of UTF-8 JSON, then
 * the data section. The JSON maps tensor names to {dtype, shape, data_offsets}
 * (offsets relative to the data section) and may hold "__metadata__", a map of
 * strings to strings. st_parse accepts exactly the headers that the safetensors
 * library accepts (measured against it in tests/test_safetensors_format.py) and
 * says precisely what is wrong with the others. No tensor byte is needed. */
#ifndef DS_SAFETENSORS_H
#define DS_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"

/* The format's header-length cap (safetensors' MAX_HEADER_SIZE). */
#define ST_MAX_HEADER 100000000ULL

typedef enum {
    ST_BOOL,
    ST_U8,
    ST_I8,
    ST_F8_E5M2,
    ST_F8_E4M3,
    ST_F8_E8M0,
    ST_F8_E4M3FNUZ,
    ST_F8_E5M2FNUZ,
    ST_I16,
    ST_U16,
    ST_F16,
    ST_BF16,
    ST_I32,
    ST_U32,
    ST_F32,
    ST_C64,
    ST_F64,
    ST_I64,
    ST_U64,
    ST_F4,
    ST_F6_E2M3,
    ST_F6_E3M2,
    ST_NDTYPES
} st_dtype;

typedef struct {
    const char *name; /* UTF-8, NUL-terminated, owned by the header's arena */
    size_t name_len;
    st_dtype dtype;
    int ndim;
    const uint64_t *shape; /* ndim entries, in the arena */
    uint64_t begin, end;   /* data_offsets, relative to the data section */
} st_tensor;

typedef struct {
    const char *key, *value; /* NUL-terminated, in the arena */
    size_t key_len, value_len;
} st_meta;

#include "arena.h"

typedef struct {
    uint64_t header_len; /* N */
    uint64_t data_start; /* 8 + N: file offset of the data section */
    uint64_t data_len;   /* bytes in the data section */
    size_t n_tensors;
    st_tensor *tensors; /* sorted by name, bytewise: the order of safe_open().keys() */
    int has_metadata;   /* "__metadata__" present and not null */
    size_t n_meta;
    st_meta *meta; /* sorted by key */
    ds_arena_block *arena;
} st_header;

/* Number of dtypes' bits per element, and their names in the format. */
unsigned st_dtype_bits(st_dtype d);
const char *st_dtype_name(st_dtype d);

/* Checks the 8-byte length prefix against the file size. On success sets
 * *header_len. Returns 0, or -1 with err filled. */
int st_check_prefix(const uint8_t prefix[8], uint64_t file_size, uint64_t *header_len, ds_error *err);

/* Parses and validates the JSON header (json, json_len = N bytes following the
 * prefix) of a file of file_size bytes. On success fills *h, which the caller
 * releases with st_free. Returns 0, or -1 with err filled (h needs no free). */
int st_parse(const uint8_t *json, size_t json_len, uint64_t file_size, st_header *h, ds_error *err);

void st_free(st_header *h);

/* Finds a tensor by name (binary search). Returns NULL when absent. */
const st_tensor *st_find(const st_header *h, const char *name, size_t name_len);

#endif
