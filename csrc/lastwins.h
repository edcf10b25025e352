/* lastwins.h: names sorted bytewise, a repeated name keeping its last entry.
 *
 * Three lists follow this rule: a safetensors header's tensors and its metadata (a JSON object
 * whose repeated key keeps its last value, as serde does) and the union of several headers that a
 * model hash covers (a later file's entry replaces an earlier one, as dict.update does). Plain C.
 * Prefix: lw_. */
#ifndef DS_LASTWINS_H
#define DS_LASTWINS_H

#include <stddef.h>

/* Orders two elements by name, then by position (the later one last). */
typedef int (*lw_order)(const void *a, const void *b);
/* Nonzero when two elements have the same name. */
typedef int (*lw_same)(const void *a, const void *b);

/* Sorts the n elements of `size` bytes at base by `order` (skipping the sort when they already are
 * in order, as writers usually list them), then keeps the last of each run of equal names, moved
 * to the front in order. Returns how many are kept. */
size_t lw_sort_keep_last(void *base, size_t n, size_t size, lw_order order, lw_same same);

#endif
