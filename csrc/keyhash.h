/* keyhash.h: DiffSynth's model hash, computed from tensor names and shapes.
 *
 * DiffSynth identifies a model by the MD5 of one string: for every tensor the
 * piece "name:d0_d1_..." (when shapes count) and the piece "name"; for a nested
 * dict the piece "name|<the nested dict's own string>"; all pieces sorted
 * (bytewise, which is Python's order for str) and joined with ",". */
#ifndef DS_KEYHASH_H
#define DS_KEYHASH_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"

typedef struct {
    const char *key;
    size_t key_len;
    int ndim;              /* -1 for a nested dict */
    const uint64_t *shape; /* ndim entries when ndim >= 0 */
    const char *nested;    /* the nested dict's string when ndim == -1 */
    size_t nested_len;
} kh_entry;

/* Builds the canonical string of n entries (keys need not be unique or sorted;
 * every entry contributes). On success *out is malloc'd (caller frees),
 * NUL-terminated, of *out_len bytes. Returns 0 or -1 with err. */
int kh_keys_string(const kh_entry *entries, size_t n, int with_shape, char **out, size_t *out_len, ds_error *err);

/* MD5 (RFC 1321) of len bytes, as 32 lowercase hex digits plus NUL. */
void kh_md5_hex(const void *data, size_t len, char hex[33]);

#endif
