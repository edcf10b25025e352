/* plan.h: the load planner: safetensors files -> buffers -> read / populate / convert tasks.
 *
 * Plain C, no Python: the bindings (bind_load.c, bind_hash.c, openfile.c) call it with the GIL
 * released. A load opens every file and parses its header (in parallel), then plans each file:
 * its buffer (a private mapping of the file, or anonymous memory read with pread), an anonymous
 * buffer for the tensors converted to another dtype (each at a 64-byte aligned offset), and the
 * tasks that fill them, cut into chunks so that io_run spreads one big tensor over threads.
 * In read mode the conversions wait for the bytes: plan_read_conversions plans them as a second
 * phase. A plan owns its files, headers and buffers until plan_free; the binding takes the buffers
 * over (setting the pointers to NULL) to hand them to Python. Prefix: plan_. */
#ifndef DS_PLAN_H
#define DS_PLAN_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "io.h"
#include "safetensors.h"

#define PLAN_POPULATE_CHUNK ((size_t)32 << 20) /* bytes a populate task reads in */
#define PLAN_READ_CHUNK ((size_t)8 << 20)      /* bytes a read (or write) task moves */
#define PLAN_CONVERT_CHUNK ((size_t)1 << 20)   /* elements a convert task converts */

enum { PLAN_POPULATE, PLAN_READ, PLAN_CONVERT };

typedef struct {
    int kind;
    int file;
    const char *src; /* POPULATE, CONVERT */
    char *dst;       /* READ, CONVERT */
    size_t n;        /* bytes (POPULATE, READ) or elements (CONVERT) */
    uint64_t off;    /* READ: file offset */
    st_dtype from, to;
} plan_task;

typedef struct {
    io_file f;
    st_header h;
    int opened;
    char *map; /* the file mapping (mmap mode), or NULL */
    size_t map_len;
    char *copy; /* the data section read into anonymous memory (read mode), or NULL */
    size_t copy_len;
    char *conv; /* converted tensors, or NULL */
    size_t conv_len;
    uint64_t *conv_off; /* per tensor: offset in conv, or UINT64_MAX when not converted */
} plan_file;

typedef struct {
    plan_file *files;
    size_t n_files;
    plan_task *tasks;
    size_t n_tasks, cap_tasks;
} load_plan;

/* ---- buffer layout: which tensor goes into which buffer, at which offset ----------------------
 *
 * One layout function serves every load that fills buffers of its own: the conversion buffer of a
 * host load (plan_load), the pinned host buffers and CUDA tensors of loader/direct_fill.py and the
 * buckets of a distributed load (loader/distributed.py, through _core.plan_buffers). Alignment is
 * the caller's, one constant per kind of buffer: */
#define PLAN_ALIGN_HOST 64 /* our own anonymous memory: a cache line, and AVX-512's vector width */
/* Buffers torch allocates (pinned host memory, CUDA memory) start 256-byte aligned (its caching
 * allocators round blocks to 512 bytes); 256 between tensors keeps every view as aligned as a
 * tensor torch allocated alone, which its vectorized kernels and cudaMemcpy's fast path expect. */
#define PLAN_ALIGN_TORCH 256

enum {
    PLAN_PER_FILE,   /* one buffer per file (empty files get an empty buffer) */
    PLAN_PER_TENSOR, /* one buffer per tensor (a tensor allocated alone, at offset 0) */
    PLAN_BUCKETS,    /* the tensors cut into runs of about equal bytes, one per reader, each run into
                        buckets of at most bucket_bytes (a larger tensor is a bucket of its own) */
};

typedef struct {
    int split;             /* PLAN_PER_FILE, PLAN_PER_TENSOR or PLAN_BUCKETS */
    int merge;             /* one dict over all files: a later file's tensor of a name replaces an earlier
                              one, at the place the name was first seen (dict.update) */
    int converted_only;    /* lay out only the tensors converted (plan_load's conversion buffer) */
    unsigned convert;      /* mask (1 << from dtype) of the dtypes converted to target; 0: none */
    st_dtype target;       /* the dtype converted to, when convert is not 0 */
    uint64_t align;        /* a power of two: every tensor's offset in its buffer is a multiple */
    unsigned readers;      /* PLAN_BUCKETS: readers (at least 1) */
    uint64_t bucket_bytes; /* PLAN_BUCKETS: the bucket size; 0: no limit */
} plan_layout_spec;

typedef struct {
    uint64_t nbytes; /* the bytes the buffer must hold (a multiple of align, 0 when empty) */
    unsigned reader; /* PLAN_BUCKETS: the reader that fills it; else 0 */
    size_t file;     /* PLAN_PER_FILE, PLAN_PER_TENSOR: the file it belongs to; SIZE_MAX for a bucket */
} plan_buffer;

typedef struct {
    size_t file;            /* index into the headers */
    size_t tensor;          /* index into that header's tensors */
    uint64_t offset;        /* absolute file offset of the bytes (data_start + begin) */
    uint64_t nbytes;        /* bytes to read */
    st_dtype from, to;      /* to == from: copied as it is */
    size_t buffer;          /* SIZE_MAX: not laid out (converted_only and not converted) */
    uint64_t buffer_offset; /* a multiple of align */
    uint64_t out_nbytes;    /* bytes written: nbytes, or nbytes / size(from) * size(to) */
} plan_item;

typedef struct {
    plan_buffer *buffers;
    size_t n_buffers;
    plan_item *items; /* merged: the merged dict's keys in order; else file by file, in header order */
    size_t n_items;
} plan_layout;

/* Lays out the tensors of n parsed headers into buffers (see plan_layout_spec). Every size and
 * offset is overflow-checked. Deterministic: the same headers and spec give the same layout on
 * every machine. Returns 0 with *out filled (caller frees with plan_layout_free), or -1 with err. */
int plan_layout_build(const st_header *hs, size_t n, const plan_layout_spec *spec, plan_layout *out, ds_error *err);

void plan_layout_free(plan_layout *l);

/* Parses the safetensors header of an open file into h (caller frees with st_free). Returns 0, or
 * -1 with err. */
int plan_parse_header(const io_file *f, st_header *h, ds_error *err);

/* Opens path and parses its header into h, the file left open in f. Returns 0, or -1 with err (the
 * file closed). */
int plan_open_header(const char *path, io_file *f, st_header *h, ds_error *err);

/* Opens and parses the headers of n files on up to `threads` threads. On failure the files opened
 * so far stay open (opened[i] set) for the caller to close, and err->input names the failing file.
 * Returns 0 or -1. */
int plan_open_headers(const char *const *paths, size_t n, io_file *files, st_header *headers, int *opened, int threads,
                      ds_error *err);

/* DiffSynth's model hash of the union of several headers (a later file's entry replaces an earlier
 * one of the same name, as dict.update does), as 32 hex digits. Returns 0, or -1 with err. */
int plan_hash_headers(st_header *hs, size_t n_files, int with_shape, char hex[33], ds_error *err);

/* Opens, validates and plans every file. convert: a mask of the dtypes to convert to target (0:
 * none). Returns 0, or -1 with err->input set to the failing file. */
int plan_load(load_plan *plan, const char *const *paths, size_t n, int use_map, unsigned convert, st_dtype target,
              ds_error *err);

/* The second phase of a load that converts: the conversions of the files read rather than mapped.
 * Replaces the plan's tasks. Returns 0, or -1 with err. */
int plan_read_conversions(load_plan *plan, st_dtype target, ds_error *err);

/* Plans byte ranges (offs[i], lens[i]) of one file (map_ranges): opened, checked against its size,
 * then mapped and leased (populate tasks) or, without a lease or with use_map 0, read into one
 * anonymous buffer at dest[i] (read tasks). *use_map says which it became. Returns 0, or -1 with
 * err. */
int plan_ranges(load_plan *plan, const char *path, const uint64_t *offs, const uint64_t *lens, const uint64_t *dest,
                size_t n, uint64_t total, int *use_map, ds_error *err);

/* Appends the tasks that move [off, off+len) in chunks: POPULATE pages src in, READ preads file
 * offset off into dst. Returns 0, or -1 with err. */
int plan_add_byte_tasks(load_plan *plan, int kind, int file, const char *src, char *dst, uint64_t off, size_t len,
                        size_t chunk, ds_error *err);

/* An io_run task of the plan (ctx: the load_plan). */
int plan_run_task(void *ctx, size_t i, ds_error *err);

/* Closes the files that are still open (their descriptors only; headers stay). */
void plan_close_files(load_plan *plan);

/* Frees everything the plan still owns. */
void plan_free(load_plan *plan);

#endif
