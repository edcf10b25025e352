/* lastwins.c: sort, then keep the last of equal names (contract in lastwins.h). */
#include "lastwins.h"

#include <stdlib.h>
#include <string.h>

size_t lw_sort_keep_last(void *base, size_t n, size_t size, lw_order order, lw_same same) {
    char *p = base;
    int sorted = 1;
    for (size_t k = 1; k < n && sorted; k++)
        sorted = order(p + (k - 1) * size, p + k * size) < 0;
    if (!sorted)
        qsort(base, n, size, order);
    size_t kept = 0;
    for (size_t k = 0; k < n; k++) {
        if (k + 1 < n && same(p + k * size, p + (k + 1) * size))
            continue;
        if (kept != k)
            memcpy(p + kept * size, p + k * size, size);
        kept++;
    }
    return kept;
}
