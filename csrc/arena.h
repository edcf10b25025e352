/* arena.h: bump allocation in large blocks, freed all at once. Parsed headers and pickle trees
 * hold many small strings and arrays that live exactly as long as their parse result. */
#ifndef DS_ARENA_H
#define DS_ARENA_H

#include <stddef.h>

typedef struct ds_arena_block ds_arena_block;

/* n bytes (16-byte aligned, not zeroed) from the arena whose newest block is *arena; NULL when
 * out of memory. */
void *ds_arena_alloc(ds_arena_block **arena, size_t n);

/* Frees every block and sets *arena to NULL. */
void ds_arena_free(ds_arena_block **arena);

#endif
