/* unpickle.h: a restricted pickle machine for the data.pkl of torch.save checkpoints.
 *
 * It runs the opcodes of protocols 2 to 5 that checkpoints use and builds a tree of plain values
 * (None, bool, int, float, str, bytes, tuple, list, dict) and tensors. Globals are never imported
 * or called: each one is looked up in a fixed table of what a checkpoint may name (OrderedDict, the
 * storage classes, dtypes, torch._utils' rebuild functions, _codecs.encode) and interpreted here.
 * Anything else fails: with DS_ERR_FORMAT for globals no weights-only loader would allow (the
 * message names the global) and for malformed streams; with DS_ERR_UNSUPPORTED for constructs torch's
 * own weights-only unpickler accepts but this machine does not represent (the caller may hand the
 * file to torch.load(weights_only=True)). Everything lives in one arena freed by pk_free.
 *
 * Cost: work and memory are linear in the pickle. The memo holds pointers, so a memoised object
 * met again (BINGET) is the same pk_obj, never a copy: the result is a graph (shared objects, even
 * cycles through lists and dicts), and each object carries a number (id) so that a walk can visit
 * it once. The memo itself is a hash table, so a huge memo index costs nothing. */
#ifndef DS_UNPICKLE_H
#define DS_UNPICKLE_H

#include <stddef.h>
#include <stdint.h>

#include "arena.h"
#include "error.h"
#include "safetensors.h"

typedef enum {
    PK_NONE,
    PK_BOOL,
    PK_INT,
    PK_FLOAT,
    PK_STR,
    PK_BYTES,
    PK_TUPLE,
    PK_LIST,
    PK_DICT,  /* items: key, value, key, value, ... in insertion order */
    PK_ODICT, /* the same, built by collections.OrderedDict() */
    PK_GLOBAL,
    PK_STORAGE,
    PK_TENSOR,
} pk_kind;

#define PK_MAX_DIMS 64
#define PK_UNTYPED (-1) /* a storage of bytes (UntypedStorage): the tensor names its dtype */

typedef struct pk_obj pk_obj;

typedef struct {
    const char *key; /* NUL-terminated: the storage's file is data/<key> */
    size_t key_len;
    int dtype;      /* st_dtype, or PK_UNTYPED */
    uint64_t numel; /* elements of dtype (bytes when untyped) */
    size_t index;   /* position in pk_result.storages */
} pk_storage;

typedef struct {
    pk_obj *storage; /* a PK_STORAGE */
    int dtype;       /* st_dtype of the elements */
    uint64_t offset; /* in elements of dtype */
    int ndim;
    uint64_t size[PK_MAX_DIMS];
    uint64_t stride[PK_MAX_DIMS];
    int requires_grad;
    int parameter;    /* came through _rebuild_parameter(_with_state) */
    pk_obj *metadata; /* _rebuild_tensor_v2/v3's metadata ({'conj': True}, {'neg': True}), or NULL */
    pk_obj *state;    /* _rebuild_parameter_with_state's state (Python attributes), or NULL */
} pk_tensor;

struct pk_obj {
    pk_kind kind;
    size_t id;     /* 0, 1, 2, ... in order of creation: index for a walk's visited marks */
    pk_obj *state; /* ODICT: the dict BUILD gave it (e.g. {'_metadata': ...}), or NULL */
    union {
        int64_t i; /* INT, BOOL */
        double f;
        struct {
            const char *s; /* NUL-terminated copy */
            size_t len;
        } str; /* STR (UTF-8), BYTES */
        struct {
            pk_obj **v;
            size_t n, cap;
        } seq;      /* TUPLE, LIST, DICT */
        int global; /* GLOBAL: an entry of the allow-list (unpickle.c) */
        pk_storage storage;
        pk_tensor *tensor;
    } u;
};

typedef struct {
    pk_obj *root;
    pk_obj **storages; /* distinct storages in order of first appearance */
    size_t n_storages;
    size_t n_objs; /* ids run from 0 to n_objs - 1 */
    ds_arena_block *arena;
} pk_result;

typedef struct {
    /* "module.name" of globals the user allowed (torch.serialization.add_safe_globals): one of
     * them outside the table fails with DS_ERR_UNSUPPORTED, so the caller hands the file to
     * torch.load, which honours the user's list. */
    const char *const *allowed;
    size_t n_allowed;
    /* Called every PK_POLL_EVERY opcodes; nonzero stops the run with DS_ERR_INTERRUPTED (Ctrl-C). */
    int (*poll)(void *ctx);
    void *poll_ctx;
    unsigned delay_us; /* tests only: sleep this long per opcode, to make a run long enough to interrupt */
} pk_options;

#define PK_POLL_EVERY 4096

/* Runs the pickle in data[0, len) (opt may be NULL). Returns 0 with r filled, or -1 with err (r freed). */
int pk_run(const uint8_t *data, size_t len, const pk_options *opt, pk_result *r, ds_error *err);
void pk_free(pk_result *r);

/* Bytes per element of a storage or tensor dtype. */
size_t pk_dtype_size(int dtype);

#endif
