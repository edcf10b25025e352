/* arena.c: bump allocation (contract in arena.h). */
#include "arena.h"

#include <stdlib.h>

#define ARENA_BLOCK ((size_t)1 << 16)

struct ds_arena_block {
    ds_arena_block *next;
    size_t used, cap;
    _Alignas(16) unsigned char data[];
};

void *ds_arena_alloc(ds_arena_block **arena, size_t n) {
    ds_arena_block *b = *arena;
    n = (n + 15) & ~(size_t)15;
    if (!b || b->cap - b->used < n) {
        size_t cap = n > ARENA_BLOCK ? n : ARENA_BLOCK;
        b = malloc(sizeof *b + cap);
        if (!b)
            return NULL;
        b->next = *arena;
        b->used = 0;
        b->cap = cap;
        *arena = b;
    }
    void *p = b->data + b->used;
    b->used += n;
    return p;
}

void ds_arena_free(ds_arena_block **arena) {
    while (*arena) {
        ds_arena_block *next = (*arena)->next;
        free(*arena);
        *arena = next;
    }
}
