/* unpickle.c: the restricted pickle machine (contract in unpickle.h). */
#define _POSIX_C_SOURCE 200809L /* nanosleep */
#include "unpickle.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PK_MAX_STACK (1u << 22)
#define PK_MAX_MEMO (1u << 24)

/* ---- arena ---- */

static void *arena_alloc(ds_arena_block **arena, size_t n) {
    void *p = ds_arena_alloc(arena, n);
    if (p)
        memset(p, 0, n);
    return p;
}

void pk_free(pk_result *r) {
    ds_arena_free(&r->arena);
    free(r->storages);
    memset(r, 0, sizeof *r);
}

/* ---- the allow-list ---- */

enum {
    G_ORDERED_DICT,
    G_REBUILD_V1,
    G_REBUILD_V2,
    G_REBUILD_V3,
    G_REBUILD_PARAMETER,
    G_REBUILD_PARAMETER_STATE,
    G_CODECS_ENCODE,
    G_STORAGE,                            /* + st_dtype, or + ST_NDTYPES for UntypedStorage */
    G_DTYPE = G_STORAGE + ST_NDTYPES + 1, /* + st_dtype */
    G_END = G_DTYPE + ST_NDTYPES,
};

static const struct {
    const char *name;
    int dtype;
} storage_names[] = {
    {"FloatStorage", ST_F32}, {"DoubleStorage", ST_F64}, {"HalfStorage", ST_F16},         {"BFloat16Storage", ST_BF16},
    {"LongStorage", ST_I64},  {"IntStorage", ST_I32},    {"ShortStorage", ST_I16},        {"CharStorage", ST_I8},
    {"ByteStorage", ST_U8},   {"BoolStorage", ST_BOOL},  {"ComplexFloatStorage", ST_C64},
};

static const struct {
    const char *name;
    int dtype;
} dtype_names[] = {
    /* str(dtype) only, as torch's weights-only unpickler (it refuses aliases such as torch.half) */
    {"float32", ST_F32},
    {"float64", ST_F64},
    {"float16", ST_F16},
    {"bfloat16", ST_BF16},
    {"int64", ST_I64},
    {"int32", ST_I32},
    {"int16", ST_I16},
    {"int8", ST_I8},
    {"uint8", ST_U8},
    {"bool", ST_BOOL},
    {"uint16", ST_U16},
    {"uint32", ST_U32},
    {"uint64", ST_U64},
    {"complex64", ST_C64},
    {"float8_e4m3fn", ST_F8_E4M3},
    {"float8_e5m2", ST_F8_E5M2},
    {"float8_e8m0fnu", ST_F8_E8M0},
    {"float8_e4m3fnuz", ST_F8_E4M3FNUZ},
    {"float8_e5m2fnuz", ST_F8_E5M2FNUZ},
};

/* Globals torch's weights-only unpickler accepts (its _get_allowed_globals, torch 2.14) that this
 * machine does not represent: they send the file to torch.load. Sorted, for bsearch. */
static const char *const torch_only[] = {
    "builtins.bytearray",
    "builtins.complex",
    "builtins.set",
    "collections.Counter",
    "torch.BFloat16Tensor",
    "torch.BoolTensor",
    "torch.ByteTensor",
    "torch.CharTensor",
    "torch.ComplexDoubleStorage",
    "torch.DoubleTensor",
    "torch.FloatTensor",
    "torch.HalfTensor",
    "torch.IntTensor",
    "torch.LongTensor",
    "torch.QInt32Storage",
    "torch.QInt8Storage",
    "torch.QUInt2x4Storage",
    "torch.QUInt4x2Storage",
    "torch.QUInt8Storage",
    "torch.ShortTensor",
    "torch.Size",
    "torch.Tensor",
    "torch._tensor._rebuild_from_type_v2",
    "torch._utils._rebuild_device_tensor_from_cpu_tensor",
    "torch._utils._rebuild_device_tensor_from_numpy",
    "torch._utils._rebuild_meta_tensor_no_storage",
    "torch._utils._rebuild_nested_tensor",
    "torch._utils._rebuild_qtensor",
    "torch._utils._rebuild_sparse_tensor",
    "torch._utils._rebuild_wrapper_subclass",
    "torch.bcomplex32",
    "torch.bits16",
    "torch.bits1x8",
    "torch.bits2x4",
    "torch.bits4x2",
    "torch.bits8",
    "torch.complex128",
    "torch.complex32",
    "torch.cuda.BFloat16Storage",
    "torch.cuda.BFloat16Tensor",
    "torch.cuda.BoolStorage",
    "torch.cuda.BoolTensor",
    "torch.cuda.ByteStorage",
    "torch.cuda.ByteTensor",
    "torch.cuda.CharStorage",
    "torch.cuda.CharTensor",
    "torch.cuda.ComplexDoubleStorage",
    "torch.cuda.ComplexFloatStorage",
    "torch.cuda.DoubleStorage",
    "torch.cuda.DoubleTensor",
    "torch.cuda.FloatStorage",
    "torch.cuda.FloatTensor",
    "torch.cuda.HalfStorage",
    "torch.cuda.HalfTensor",
    "torch.cuda.IntStorage",
    "torch.cuda.IntTensor",
    "torch.cuda.LongStorage",
    "torch.cuda.LongTensor",
    "torch.cuda.ShortStorage",
    "torch.cuda.ShortTensor",
    "torch.cuda.sparse.BFloat16Tensor",
    "torch.cuda.sparse.ByteTensor",
    "torch.cuda.sparse.CharTensor",
    "torch.cuda.sparse.DoubleTensor",
    "torch.cuda.sparse.FloatTensor",
    "torch.cuda.sparse.HalfTensor",
    "torch.cuda.sparse.IntTensor",
    "torch.cuda.sparse.LongTensor",
    "torch.cuda.sparse.ShortTensor",
    "torch.device",
    "torch.float4_e2m1fn_x2",
    "torch.int1",
    "torch.int2",
    "torch.int3",
    "torch.int4",
    "torch.int5",
    "torch.int6",
    "torch.int7",
    "torch.nn.parameter.Parameter",
    "torch.per_channel_affine",
    "torch.per_channel_affine_float_qparams",
    "torch.per_channel_symmetric",
    "torch.per_tensor_affine",
    "torch.per_tensor_symmetric",
    "torch.qint32",
    "torch.qint8",
    "torch.quint2x4",
    "torch.quint4x2",
    "torch.quint8",
    "torch.serialization._get_layout",
    "torch.sparse.BFloat16Tensor",
    "torch.sparse.ByteTensor",
    "torch.sparse.CharTensor",
    "torch.sparse.DoubleTensor",
    "torch.sparse.FloatTensor",
    "torch.sparse.HalfTensor",
    "torch.sparse.IntTensor",
    "torch.sparse.LongTensor",
    "torch.sparse.ShortTensor",
    "torch.storage.TypedStorage",
    "torch.uint1",
    "torch.uint2",
    "torch.uint3",
    "torch.uint4",
    "torch.uint5",
    "torch.uint6",
    "torch.uint7",
};

/* pickle's compatibility mapping (Lib/_compat_pickle.py) for the Python 2 names a protocol-2 GLOBAL
 * may carry, as torch's weights-only unpickler applies it: these names first, then any other
 * __builtin__ name moves to builtins (and copy_reg to copyreg). */
static const char *const compat_names[][3] = {
    {"xrange", "builtins", "range"},   {"reduce", "functools", "reduce"}, {"intern", "sys", "intern"},
    {"unichr", "builtins", "chr"},     {"unicode", "builtins", "str"},    {"long", "builtins", "int"},
    {"basestring", "builtins", "str"},
};

static int cmp_str(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

static int eq(const char *a, size_t al, const char *b) { return strlen(b) == al && memcmp(a, b, al) == 0; }

/* Looks "module name" up: the global's id, or -1 with err. */
static int lookup_global(const char *mod, size_t ml, const char *name, size_t nl, const pk_options *opt,
                         ds_error *err) {
    if (eq(mod, ml, "collections") && eq(name, nl, "OrderedDict"))
        return G_ORDERED_DICT;
    if (eq(mod, ml, "torch._utils")) {
        if (eq(name, nl, "_rebuild_tensor"))
            return G_REBUILD_V1;
        if (eq(name, nl, "_rebuild_tensor_v2"))
            return G_REBUILD_V2;
        if (eq(name, nl, "_rebuild_tensor_v3"))
            return G_REBUILD_V3;
        if (eq(name, nl, "_rebuild_parameter"))
            return G_REBUILD_PARAMETER;
        if (eq(name, nl, "_rebuild_parameter_with_state"))
            return G_REBUILD_PARAMETER_STATE;
    }
    if (eq(mod, ml, "_codecs") && eq(name, nl, "encode"))
        return G_CODECS_ENCODE;
    if (eq(mod, ml, "torch.storage") && eq(name, nl, "UntypedStorage"))
        return G_STORAGE + ST_NDTYPES;
    if (eq(mod, ml, "torch")) {
        for (size_t i = 0; i < sizeof storage_names / sizeof *storage_names; i++)
            if (eq(name, nl, storage_names[i].name))
                return G_STORAGE + storage_names[i].dtype;
        for (size_t i = 0; i < sizeof dtype_names / sizeof *dtype_names; i++)
            if (eq(name, nl, dtype_names[i].name))
                return G_DTYPE + dtype_names[i].dtype;
    }
    char full[300];
    snprintf(full, sizeof full, "%.*s.%.*s", (int)(ml < 140 ? ml : 140), mod, (int)(nl < 140 ? nl : 140), name);
    const char *key = full;
    if (bsearch(&key, torch_only, sizeof torch_only / sizeof *torch_only, sizeof *torch_only, cmp_str))
        return ds_fail(err, DS_ERR_UNSUPPORTED, "the pickle uses %s, which this reader does not represent", full);
    for (size_t i = 0; opt && i < opt->n_allowed; i++)
        if (strcmp(full, opt->allowed[i]) == 0)
            return ds_fail(err, DS_ERR_UNSUPPORTED,
                           "the pickle uses %s, which the user allowed (torch.serialization.add_safe_globals) and "
                           "this reader does not represent",
                           full);
    return ds_fail(err, DS_ERR_FORMAT,
                   "the pickle names the global %.*s.%.*s, which a weights-only checkpoint may not use: refused "
                   "(nothing was imported or run)",
                   (int)(ml < 140 ? ml : 140), mod, (int)(nl < 140 ? nl : 140), name);
}

size_t pk_dtype_size(int dtype) { return dtype == PK_UNTYPED ? 1 : st_dtype_bits((st_dtype)dtype) / 8; }

/* ---- the machine ---- */

typedef struct {
    const uint8_t *p, *end;
    ds_arena_block **arena;
    pk_obj **stack;
    size_t sp, stack_cap;
    size_t *marks;
    size_t n_marks, marks_cap;
    struct memo_slot {
        uint64_t idx; /* memo index + 1; 0: empty */
        pk_obj *obj;
    } * memo; /* open addressing: pickle memo indexes are 32-bit and may be sparse */
    size_t memo_cap, memo_n;
    pk_obj **storage_index; /* open addressing over r->storages by key */
    size_t storage_index_cap, storages_cap;
    const pk_options *opt;
    pk_result *r;
    ds_error *err;
    size_t pos0; /* start, for offsets in messages */
    const uint8_t *base;
} vm;

static size_t at(vm *m) { return (size_t)(m->p - m->base); }

static int bad(vm *m, const char *what) {
    return ds_fail(m->err, DS_ERR_FORMAT, "data.pkl: %s at byte %zu", what, at(m));
}

static int need(vm *m, size_t n) {
    if ((size_t)(m->end - m->p) < n)
        return bad(m, "the pickle ends in the middle of an opcode");
    return 0;
}

static pk_obj *new_obj(vm *m, pk_kind kind) {
    pk_obj *o = arena_alloc(m->arena, sizeof *o);
    if (!o) {
        ds_fail(m->err, DS_ERR_NOMEM, "out of memory while reading data.pkl");
        return NULL;
    }
    o->kind = kind;
    o->id = m->r->n_objs++;
    return o;
}

static int push(vm *m, pk_obj *o) {
    if (!o)
        return -1;
    if (m->sp == m->stack_cap) {
        if (m->stack_cap >= PK_MAX_STACK)
            return bad(m, "the pickle stack grows past its limit");
        size_t cap = m->stack_cap ? m->stack_cap * 2 : 64;
        pk_obj **s = realloc(m->stack, cap * sizeof *s);
        if (!s)
            return ds_fail(m->err, DS_ERR_NOMEM, "out of memory while reading data.pkl");
        m->stack = s;
        m->stack_cap = cap;
    }
    m->stack[m->sp++] = o;
    return 0;
}

static pk_obj *pop(vm *m) {
    size_t floor = m->n_marks ? m->marks[m->n_marks - 1] : 0;
    if (m->sp <= floor) {
        bad(m, "the pickle pops an empty stack");
        return NULL;
    }
    return m->stack[--m->sp];
}

static pk_obj *top(vm *m) {
    size_t floor = m->n_marks ? m->marks[m->n_marks - 1] : 0;
    if (m->sp <= floor) {
        bad(m, "the pickle reads an empty stack");
        return NULL;
    }
    return m->stack[m->sp - 1];
}

/* Pops back to the last MARK; the items above it are m->stack[*first .. m->sp). */
static int pop_mark(vm *m, size_t *first) {
    if (!m->n_marks)
        return bad(m, "the pickle uses a MARK it never set");
    *first = m->marks[--m->n_marks];
    return 0;
}

static int seq_add(vm *m, pk_obj *s, pk_obj *item) {
    if (s->u.seq.n == s->u.seq.cap) {
        size_t cap = s->u.seq.cap ? s->u.seq.cap * 2 : 8;
        pk_obj **v = arena_alloc(m->arena, cap * sizeof *v);
        if (!v)
            return ds_fail(m->err, DS_ERR_NOMEM, "out of memory while reading data.pkl");
        if (s->u.seq.n)
            memcpy(v, s->u.seq.v, s->u.seq.n * sizeof *v);
        s->u.seq.v = v;
        s->u.seq.cap = cap;
    }
    s->u.seq.v[s->u.seq.n++] = item;
    return 0;
}

/* A sequence of the n stack items from index first (indexes, not a pointer: the stack may not be
 * allocated yet when n is 0, and NULL + 0 is undefined). */
static pk_obj *make_seq(vm *m, pk_kind kind, size_t first, size_t n) {
    pk_obj *o = new_obj(m, kind);
    if (!o)
        return NULL;
    for (size_t i = 0; i < n; i++)
        if (seq_add(m, o, m->stack[first + i]))
            return NULL;
    return o;
}

static pk_obj *make_str(vm *m, pk_kind kind, const uint8_t *s, size_t len) {
    pk_obj *o = new_obj(m, kind);
    if (!o)
        return NULL;
    char *c = arena_alloc(m->arena, len + 1);
    if (!c) {
        ds_fail(m->err, DS_ERR_NOMEM, "out of memory while reading data.pkl");
        return NULL;
    }
    memcpy(c, s, len);
    c[len] = 0;
    o->u.str.s = c;
    o->u.str.len = len;
    return o;
}

static size_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return (size_t)x;
}

/* The memo slot of idx: the one holding it, or the empty one where it goes. */
static struct memo_slot *memo_slot(vm *m, size_t idx) {
    size_t i = mix(idx) & (m->memo_cap - 1);
    while (m->memo[i].idx && m->memo[i].idx != (uint64_t)idx + 1)
        i = (i + 1) & (m->memo_cap - 1);
    return &m->memo[i];
}

static int memo_put(vm *m, size_t idx, pk_obj *o) {
    if (idx > UINT32_MAX)
        return bad(m, "memo index too large");
    if (2 * (m->memo_n + 1) > m->memo_cap) { /* grow: at most half full */
        size_t cap = m->memo_cap ? 2 * m->memo_cap : 64;
        if (m->memo_n >= PK_MAX_MEMO)
            return bad(m, "the pickle memoises more objects than its limit");
        struct memo_slot *old = m->memo;
        size_t old_cap = m->memo_cap;
        m->memo = calloc(cap, sizeof *m->memo);
        if (!m->memo) {
            m->memo = old;
            return ds_fail(m->err, DS_ERR_NOMEM, "out of memory while reading data.pkl");
        }
        m->memo_cap = cap;
        for (size_t i = 0; i < old_cap; i++)
            if (old[i].idx)
                *memo_slot(m, (size_t)old[i].idx - 1) = old[i];
        free(old);
    }
    struct memo_slot *slot = memo_slot(m, idx);
    if (!slot->idx) {
        slot->idx = (uint64_t)idx + 1;
        m->memo_n++;
    }
    slot->obj = o;
    return 0;
}

static int memo_get(vm *m, size_t idx) {
    struct memo_slot *slot = m->memo_cap ? memo_slot(m, idx) : NULL;
    if (!slot || !slot->idx) {
        char msg[80];
        snprintf(msg, sizeof msg, "memo index %zu was never set", idx);
        return bad(m, msg);
    }
    return push(m, slot->obj);
}

static int as_int(pk_obj *o, int64_t *v) {
    if (!o || (o->kind != PK_INT && o->kind != PK_BOOL))
        return -1;
    *v = o->u.i;
    return 0;
}

/* A tuple of non-negative ints (a size or stride); n out. */
static int as_dims(vm *m, pk_obj *o, uint64_t *out, int *n, const char *what) {
    if (!o || o->kind != PK_TUPLE)
        return bad(m, what);
    if (o->u.seq.n > PK_MAX_DIMS)
        return bad(m, "a tensor has more than 64 dimensions");
    for (size_t i = 0; i < o->u.seq.n; i++) {
        int64_t v;
        if (as_int(o->u.seq.v[i], &v) || v < 0)
            return bad(m, what);
        out[i] = (uint64_t)v;
    }
    *n = (int)o->u.seq.n;
    return 0;
}

/* torch._utils._rebuild_tensor (version 1): (storage, offset, size, stride);
 * _rebuild_tensor_v2/_v3: (storage, offset, size, stride, requires_grad, hooks[, dtype][, metadata]). */
static pk_obj *rebuild_tensor(vm *m, pk_obj *args, int version) {
    int v3 = version == 3;
    size_t least = version == 1 ? 4 : v3 ? 7 : 6, most = version == 1 ? 4 : least + 1;
    if (args->u.seq.n < least) {
        bad(m, "a tensor is rebuilt with too few arguments");
        return NULL;
    }
    if (args->u.seq.n > most) {
        bad(m, "a tensor is rebuilt with too many arguments");
        return NULL;
    }
    pk_obj **a = args->u.seq.v;
    if (a[0]->kind != PK_STORAGE) {
        bad(m, "a tensor is rebuilt from something that is not a storage");
        return NULL;
    }
    pk_tensor *t = arena_alloc(m->arena, sizeof *t);
    pk_obj *o = t ? new_obj(m, PK_TENSOR) : NULL;
    if (!o) {
        ds_fail(m->err, DS_ERR_NOMEM, "out of memory while reading data.pkl");
        return NULL;
    }
    o->u.tensor = t;
    t->storage = a[0];
    int64_t off, rg;
    int ns, nt;
    if (as_int(a[1], &off) || off < 0) {
        bad(m, "a tensor's storage offset is not a non-negative int");
        return NULL;
    }
    t->offset = (uint64_t)off;
    if (as_dims(m, a[2], t->size, &ns, "a tensor's size is not a tuple of non-negative ints") ||
        as_dims(m, a[3], t->stride, &nt, "a tensor's stride is not a tuple of non-negative ints"))
        return NULL;
    if (ns != nt) {
        bad(m, "a tensor's size and stride differ in length");
        return NULL;
    }
    t->ndim = ns;
    if (version == 1) {
        /* torch builds it with the storage's dtype (bytes for an untyped storage) */
        t->dtype = a[0]->u.storage.dtype == PK_UNTYPED ? ST_U8 : a[0]->u.storage.dtype;
        return o;
    }
    t->requires_grad = !as_int(a[4], &rg) && rg;
    if (args->u.seq.n == most) { /* metadata: torch applies it when truthy (a non-empty dict) */
        pk_obj *md = a[most - 1];
        if (md->kind == PK_DICT || md->kind == PK_ODICT) {
            if (md->u.seq.n)
                t->metadata = md;
        } else if (md->kind != PK_NONE) {
            ds_fail(m->err, DS_ERR_UNSUPPORTED, "data.pkl: a tensor's metadata is not a dict");
            return NULL;
        }
    }
    if (v3) {
        if (a[6]->kind != PK_GLOBAL || a[6]->u.global < G_DTYPE || a[6]->u.global >= G_END) {
            bad(m, "_rebuild_tensor_v3 is not given a dtype");
            return NULL;
        }
        t->dtype = a[6]->u.global - G_DTYPE;
    } else {
        if (a[0]->u.storage.dtype == PK_UNTYPED) {
            bad(m, "_rebuild_tensor_v2 is given an untyped storage");
            return NULL;
        }
        t->dtype = a[0]->u.storage.dtype;
    }
    return o;
}

static pk_obj *call(vm *m, pk_obj *fn, pk_obj *args) {
    if (fn->kind != PK_GLOBAL || args->kind != PK_TUPLE) {
        bad(m, "REDUCE on something other than an allowed global and a tuple");
        return NULL;
    }
    size_t n = args->u.seq.n;
    switch (fn->u.global) {
    case G_ORDERED_DICT:
        if (n) {
            ds_fail(m->err, DS_ERR_UNSUPPORTED, "OrderedDict is built from arguments");
            return NULL;
        }
        return new_obj(m, PK_ODICT);
    case G_REBUILD_V1: return rebuild_tensor(m, args, 1);
    case G_REBUILD_V2: return rebuild_tensor(m, args, 2);
    case G_REBUILD_V3: return rebuild_tensor(m, args, 3);
    case G_REBUILD_PARAMETER:
    case G_REBUILD_PARAMETER_STATE: {
        /* (data, requires_grad, hooks[, state]): a new object, as nn.Parameter(data) is; data, which
         * the pickle may have memoised and used elsewhere, stays a plain tensor */
        int64_t rg;
        size_t want = fn->u.global == G_REBUILD_PARAMETER ? 3 : 4;
        if (n != want || args->u.seq.v[0]->kind != PK_TENSOR) {
            bad(m, fn->u.global == G_REBUILD_PARAMETER
                       ? "_rebuild_parameter is not given (tensor, requires_grad, hooks)"
                       : "_rebuild_parameter_with_state is not given (tensor, "
                         "requires_grad, hooks, state)");
            return NULL;
        }
        pk_tensor *t = arena_alloc(m->arena, sizeof *t);
        pk_obj *o = t ? new_obj(m, PK_TENSOR) : NULL;
        if (!o) {
            ds_fail(m->err, DS_ERR_NOMEM, "out of memory while reading data.pkl");
            return NULL;
        }
        *t = *args->u.seq.v[0]->u.tensor;
        o->u.tensor = t;
        t->parameter = 1;
        t->requires_grad = !as_int(args->u.seq.v[1], &rg) && rg;
        if (want == 4) {
            pk_obj *state = args->u.seq.v[3];
            if (state->kind == PK_DICT || state->kind == PK_ODICT)
                t->state = state->u.seq.n ? state : NULL;
            else if (state->kind != PK_NONE) { /* (dict, slots) and the like: torch.load knows them */
                ds_fail(m->err, DS_ERR_UNSUPPORTED, "data.pkl: a parameter's state is not a dict");
                return NULL;
            }
        }
        return o;
    }
    case G_CODECS_ENCODE: {
        /* how protocol 2 writes bytes: _codecs.encode(str, 'latin1') */
        if (n != 2 || args->u.seq.v[0]->kind != PK_STR || args->u.seq.v[1]->kind != PK_STR ||
            strcmp(args->u.seq.v[1]->u.str.s, "latin1") != 0) {
            ds_fail(m->err, DS_ERR_UNSUPPORTED, "_codecs.encode with other than (str, 'latin1')");
            return NULL;
        }
        const uint8_t *s = (const uint8_t *)args->u.seq.v[0]->u.str.s;
        size_t len = args->u.seq.v[0]->u.str.len, k = 0;
        uint8_t *b = arena_alloc(m->arena, len + 1);
        if (!b) {
            ds_fail(m->err, DS_ERR_NOMEM, "out of memory while reading data.pkl");
            return NULL;
        }
        for (size_t i = 0; i < len; i++) { /* UTF-8 of code points < 256 back to bytes */
            if (s[i] < 0x80)
                b[k++] = s[i];
            else if ((s[i] == 0xC2 || s[i] == 0xC3) && i + 1 < len) {
                b[k++] = (uint8_t)(((s[i] & 0x03) << 6) | (s[i + 1] & 0x3F));
                i++;
            } else {
                bad(m, "_codecs.encode of a character beyond latin-1");
                return NULL;
            }
        }
        return make_str(m, PK_BYTES, b, k);
    }
    default: bad(m, "a storage class or dtype is called"); return NULL;
    }
}

/* The storage index slot for key: the storage with that key, or the empty slot where it goes
 * (NULL with err when the index cannot grow). The index stays at most half full. */
static pk_obj **storage_slot(vm *m, const char *key, size_t len) {
    if (2 * (m->r->n_storages + 1) > m->storage_index_cap) {
        size_t cap = m->storage_index_cap ? 2 * m->storage_index_cap : 64;
        pk_obj **idx = calloc(cap, sizeof *idx);
        if (!idx) {
            ds_fail(m->err, DS_ERR_NOMEM, "out of memory while reading data.pkl");
            return NULL;
        }
        free(m->storage_index);
        m->storage_index = idx;
        m->storage_index_cap = cap;
        for (size_t i = 0; i < m->r->n_storages; i++) {
            const pk_storage *s = &m->r->storages[i]->u.storage;
            pk_obj **slot = storage_slot(m, s->key, s->key_len);
            *slot = m->r->storages[i];
        }
    }
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < len; i++)
        h = (h ^ (uint8_t)key[i]) * 1099511628211ull;
    size_t i = (size_t)h & (m->storage_index_cap - 1);
    while (m->storage_index[i]) {
        const pk_storage *s = &m->storage_index[i]->u.storage;
        if (s->key_len == len && memcmp(s->key, key, len) == 0)
            break;
        i = (i + 1) & (m->storage_index_cap - 1);
    }
    return &m->storage_index[i];
}

/* ('storage', storage class, key, location, numel) */
static pk_obj *persistent(vm *m, pk_obj *pid) {
    if (pid->kind != PK_TUPLE || pid->u.seq.n < 5 || pid->u.seq.v[0]->kind != PK_STR ||
        strcmp(pid->u.seq.v[0]->u.str.s, "storage") != 0) {
        bad(m, "a persistent id that is not ('storage', class, key, location, numel)");
        return NULL;
    }
    pk_obj **a = pid->u.seq.v;
    int64_t numel;
    if (a[1]->kind != PK_GLOBAL || a[1]->u.global < G_STORAGE || a[1]->u.global > G_STORAGE + ST_NDTYPES ||
        a[2]->kind != PK_STR || as_int(a[4], &numel) || numel < 0) {
        bad(m, "a malformed storage persistent id");
        return NULL;
    }
    pk_obj **slot = storage_slot(m, a[2]->u.str.s, a[2]->u.str.len);
    if (!slot)
        return NULL;
    if (*slot) /* the same key is the same storage (shared) */
        return *slot;
    pk_obj *s = new_obj(m, PK_STORAGE);
    if (!s)
        return NULL;
    for (size_t i = 0; i < a[2]->u.str.len; i++) {
        char c = a[2]->u.str.s[i];
        if (c == '/' || c == 0 || (c == '.' && a[2]->u.str.len <= 2)) {
            bad(m, "a storage key that is not a plain name");
            return NULL;
        }
    }
    s->u.storage.key = a[2]->u.str.s;
    s->u.storage.key_len = a[2]->u.str.len;
    int g = a[1]->u.global - G_STORAGE;
    s->u.storage.dtype = g == ST_NDTYPES ? PK_UNTYPED : g;
    s->u.storage.numel = (uint64_t)numel;
    s->u.storage.index = m->r->n_storages;
    if (m->r->n_storages == m->storages_cap) {
        size_t cap = m->storages_cap ? 2 * m->storages_cap : 16;
        pk_obj **v = realloc(m->r->storages, cap * sizeof *v);
        if (!v) {
            ds_fail(m->err, DS_ERR_NOMEM, "out of memory while reading data.pkl");
            return NULL;
        }
        m->r->storages = v;
        m->storages_cap = cap;
    }
    m->r->storages[m->r->n_storages++] = s;
    *slot = s;
    return s;
}

static uint64_t rd_le(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* Pushes the allow-list entry for "module name", or fails naming it. */
static int push_global(vm *m, const char *mod, size_t ml, const char *name, size_t nl) {
    int g = lookup_global(mod, ml, name, nl, m->opt, m->err);
    if (g < 0)
        return -1;
    pk_obj *o = new_obj(m, PK_GLOBAL);
    if (!o)
        return -1;
    o->u.global = g;
    return push(m, o);
}

/* The memo index operand of a (LONG_)BINPUT / (LONG_)BINGET: one byte, or four. */
static int memo_index(vm *m, int one_byte, size_t *idx) {
    int n = one_byte ? 1 : 4;
    if (need(m, (size_t)n))
        return -1;
    *idx = (size_t)rd_le(m->p, n);
    m->p += n;
    return 0;
}

/* The name of a pickle opcode torch's weights-only unpickler does not run (it reads exactly the
 * opcodes of the switch in run(), plus EMPTY_SET, which sends the file to torch.load), or NULL. */
static const char *refused_opcode(uint8_t op) {
    static const struct {
        uint8_t op;
        const char *name;
    } names[] = {
        {0x95, "FRAME"},        {'0', "POP"},         {'1', "POP_MARK"},       {'2', "DUP"},
        {0x93, "STACK_GLOBAL"}, {0x94, "MEMOIZE"},    {0x8d, "BINUNICODE8"},   {0x8c, "SHORT_BINUNICODE"},
        {'T', "BINSTRING"},     {'B', "BINBYTES"},    {'C', "SHORT_BINBYTES"}, {0x8e, "BINBYTES8"},
        {'i', "INST"},          {'o', "OBJ"},         {0x92, "NEWOBJ_EX"},     {'I', "INT"},
        {'L', "LONG"},          {'F', "FLOAT"},       {'S', "STRING"},         {'V', "UNICODE"},
        {'p', "PUT"},           {'g', "GET"},         {'P', "PERSID"},         {0x82, "EXT1"},
        {0x83, "EXT2"},         {0x84, "EXT4"},       {0x8b, "LONG4"},         {0x90, "ADDITEMS"},
        {0x91, "FROZENSET"},    {0x96, "BYTEARRAY8"}, {0x97, "NEXT_BUFFER"},   {0x98, "READONLY_BUFFER"},
        {'l', "LIST"},          {'d', "DICT"},
    };
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (names[i].op == op)
            return names[i].name;
    return NULL;
}

/* Whether s[0, len) is UTF-8 as Python's strict decoder takes it (no surrogates, no overlongs). */
static int utf8_strict(const uint8_t *s, size_t len) {
    size_t i = 0;
    while (i < len) {
        uint8_t c = s[i];
        size_t n = c < 0x80 ? 0 : (c & 0xE0) == 0xC0 ? 1 : (c & 0xF0) == 0xE0 ? 2 : (c & 0xF8) == 0xF0 ? 3 : 9;
        if (n == 9 || (n && len - i - 1 < n) || (n == 1 && c < 0xC2) || (n == 3 && c > 0xF4))
            return 0;
        for (size_t k = 1; k <= n; k++)
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
        if (n == 2 && ((c == 0xE0 && s[i + 1] < 0xA0) || (c == 0xED && s[i + 1] >= 0xA0)))
            return 0; /* overlong, surrogate */
        if (n == 3 && ((c == 0xF0 && s[i + 1] < 0x90) || (c == 0xF4 && s[i + 1] >= 0x90)))
            return 0; /* overlong, past U+10FFFF */
        i += n + 1;
    }
    return 1;
}

static int run(vm *m) {
    size_t until_poll = PK_POLL_EVERY;
    while (m->p < m->end) {
        if (m->opt && m->opt->delay_us) {
            struct timespec ts = {(time_t)(m->opt->delay_us / 1000000), (long)(m->opt->delay_us % 1000000) * 1000};
            nanosleep(&ts, NULL);
        }
        if (--until_poll == 0) {
            until_poll = PK_POLL_EVERY;
            if (m->opt && m->opt->poll && m->opt->poll(m->opt->poll_ctx))
                return ds_fail(m->err, DS_ERR_INTERRUPTED, "interrupted");
        }
        uint8_t op = *m->p++;
        switch (op) {
        case 0x80: /* PROTO */
            if (need(m, 1))
                return -1;
            if (*m->p < 2 || *m->p > 5)
                return ds_fail(m->err, DS_ERR_UNSUPPORTED, "data.pkl: pickle protocol %d", *m->p);
            m->p++;
            break;
        case '.': { /* STOP */
            pk_obj *o = pop(m);
            if (!o)
                return -1;
            m->r->root = o;
            return 0;
        }
        case '(': /* MARK */
            if (m->n_marks == m->marks_cap) {
                size_t cap = m->marks_cap ? m->marks_cap * 2 : 16;
                if (cap > PK_MAX_STACK)
                    return bad(m, "too many nested MARKs");
                size_t *mk = realloc(m->marks, cap * sizeof *mk);
                if (!mk)
                    return ds_fail(m->err, DS_ERR_NOMEM, "out of memory while reading data.pkl");
                m->marks = mk;
                m->marks_cap = cap;
            }
            m->marks[m->n_marks++] = m->sp;
            break;
        case 'N':
        case ')':
        case ']':
        case '}': /* NONE, EMPTY_TUPLE, EMPTY_LIST, EMPTY_DICT */
            if (push(m, new_obj(m, op == 'N' ? PK_NONE : op == ')' ? PK_TUPLE : op == ']' ? PK_LIST : PK_DICT)))
                return -1;
            break;
        case 0x88:
        case 0x89: { /* NEWTRUE, NEWFALSE */
            pk_obj *o = new_obj(m, PK_BOOL);
            if (!o)
                return -1;
            o->u.i = op == 0x88;
            if (push(m, o))
                return -1;
            break;
        }
        case 'J':
        case 'K':
        case 'M': { /* BININT, BININT1, BININT2 */
            int n = op == 'J' ? 4 : op == 'K' ? 1 : 2;
            if (need(m, (size_t)n))
                return -1;
            pk_obj *o = new_obj(m, PK_INT);
            if (!o)
                return -1;
            uint64_t v = rd_le(m->p, n);
            o->u.i = op == 'J' ? (int64_t)(int32_t)(uint32_t)v : (int64_t)v;
            m->p += n;
            if (push(m, o))
                return -1;
            break;
        }
        case 0x8a: { /* LONG1 */
            if (need(m, 1))
                return -1;
            int n = *m->p++;
            if (need(m, (size_t)n))
                return -1;
            if (n > 8)
                return ds_fail(m->err, DS_ERR_UNSUPPORTED, "data.pkl: an integer of %d bytes", n);
            uint64_t v = rd_le(m->p, n);
            if (n && n < 8 && (m->p[n - 1] & 0x80))
                v |= ~(uint64_t)0 << (8 * n); /* sign-extend */
            pk_obj *o = new_obj(m, PK_INT);
            if (!o)
                return -1;
            o->u.i = (int64_t)v;
            m->p += n;
            if (push(m, o))
                return -1;
            break;
        }
        case 'G': { /* BINFLOAT, big-endian */
            if (need(m, 8))
                return -1;
            uint64_t v = 0;
            for (int i = 0; i < 8; i++)
                v = (v << 8) | m->p[i];
            pk_obj *o = new_obj(m, PK_FLOAT);
            if (!o)
                return -1;
            memcpy(&o->u.f, &v, 8);
            m->p += 8;
            if (push(m, o))
                return -1;
            break;
        }
        case 'X':
        case 'U': { /* BINUNICODE (UTF-8, surrogates passed), SHORT_BINSTRING (decoded as strict UTF-8, as
                     * torch.load's encoding='utf-8' does) */
            int lb = op == 'U' ? 1 : 4;
            if (need(m, (size_t)lb))
                return -1;
            uint64_t len = rd_le(m->p, lb);
            m->p += lb;
            if (len > (uint64_t)(m->end - m->p))
                return bad(m, "a string runs past the end of the pickle");
            if (op == 'U' && !utf8_strict(m->p, (size_t)len))
                return bad(m, "a SHORT_BINSTRING that is not UTF-8");
            if (push(m, make_str(m, PK_STR, m->p, (size_t)len)))
                return -1;
            m->p += len;
            break;
        }
        case 't': { /* TUPLE */
            size_t first = 0;
            if (pop_mark(m, &first))
                return -1;
            pk_obj *o = make_seq(m, PK_TUPLE, first, m->sp - first);
            m->sp = first;
            if (push(m, o))
                return -1;
            break;
        }
        case 0x85:
        case 0x86:
        case 0x87: { /* TUPLE1..3 */
            size_t n = (size_t)(op - 0x84);
            size_t floor = m->n_marks ? m->marks[m->n_marks - 1] : 0;
            if (m->sp < floor + n)
                return bad(m, "TUPLE of more items than the stack holds");
            pk_obj *o = make_seq(m, PK_TUPLE, m->sp - n, n);
            m->sp -= n;
            if (push(m, o))
                return -1;
            break;
        }
        case 'a': { /* APPEND */
            pk_obj *item = pop(m), *list = item ? top(m) : NULL;
            if (!list)
                return -1;
            if (list->kind != PK_LIST)
                return bad(m, "APPEND to something that is not a list");
            if (seq_add(m, list, item))
                return -1;
            break;
        }
        case 'e': { /* APPENDS */
            size_t first = 0;
            if (pop_mark(m, &first))
                return -1;
            size_t floor = m->n_marks ? m->marks[m->n_marks - 1] : 0;
            if (first < floor + 1)
                return bad(m, "APPENDS without a list below the items");
            pk_obj *list = m->stack[first - 1];
            if (list->kind != PK_LIST)
                return bad(m, "APPENDS to something that is not a list");
            for (size_t i = first; i < m->sp; i++)
                if (seq_add(m, list, m->stack[i]))
                    return -1;
            m->sp = first;
            break;
        }
        case 's':
        case 'u': { /* SETITEM, SETITEMS */
            size_t first = 0;
            if (op == 's') {
                if (m->sp < 2)
                    return bad(m, "SETITEM with too few items on the stack");
                first = m->sp - 2;
            } else if (pop_mark(m, &first)) {
                return -1;
            }
            size_t floor = m->n_marks ? m->marks[m->n_marks - 1] : 0;
            if ((m->sp - first) % 2)
                return bad(m, "SETITEMS with an odd number of items");
            if (first < floor + 1)
                return bad(m, "SETITEM(S) without a dict below the items");
            pk_obj *d = m->stack[first - 1];
            if (d->kind != PK_DICT && d->kind != PK_ODICT)
                return bad(m, "SETITEM(S) on something that is not a dict");
            for (size_t i = first; i < m->sp; i++)
                if (seq_add(m, d, m->stack[i]))
                    return -1;
            m->sp = first;
            break;
        }
        case 'c': { /* GLOBAL "module\nname\n" */
            const uint8_t *nl1 = memchr(m->p, '\n', (size_t)(m->end - m->p));
            const uint8_t *nl2 = nl1 ? memchr(nl1 + 1, '\n', (size_t)(m->end - nl1 - 1)) : NULL;
            if (!nl2)
                return bad(m, "GLOBAL without its two lines");
            const char *mod = (const char *)m->p, *name = (const char *)nl1 + 1;
            size_t ml = (size_t)(nl1 - (const uint8_t *)mod), nl = (size_t)(nl2 - nl1 - 1);
            m->p = nl2 + 1;
            if (eq(mod, ml, "__builtin__")) { /* a Python 2 name (protocol 2): pickle's compatibility mapping */
                const char *to_mod = "builtins", *to_name = NULL;
                for (size_t i = 0; i < sizeof compat_names / sizeof *compat_names; i++)
                    if (eq(name, nl, compat_names[i][0])) {
                        to_mod = compat_names[i][1];
                        to_name = compat_names[i][2];
                    }
                mod = to_mod;
                ml = strlen(to_mod);
                if (to_name) {
                    name = to_name;
                    nl = strlen(to_name);
                }
            } else if (eq(mod, ml, "copy_reg")) {
                mod = "copyreg";
                ml = strlen(mod);
            }
            if (push_global(m, mod, ml, name, nl))
                return -1;
            break;
        }
        case 'R':
        case 0x81: { /* REDUCE: callable(*args) for the allow-list only; NEWOBJ: cls.__new__(cls, *args), which
                      * of our globals only an OrderedDict answers (torch.load decides the others) */
            pk_obj *args = pop(m), *fn = args ? pop(m) : NULL;
            if (!fn)
                return -1;
            if (op == 0x81 && (fn->kind != PK_GLOBAL || fn->u.global != G_ORDERED_DICT))
                return ds_fail(m->err, DS_ERR_UNSUPPORTED,
                               "data.pkl: NEWOBJ of a class this reader does not represent");
            pk_obj *o = op == 0x81 ? new_obj(m, PK_ODICT) : call(m, fn, args);
            if (!o || push(m, o))
                return -1;
            break;
        }
        case 'b': { /* BUILD: an OrderedDict keeps its state (a state dict's _metadata) */
            pk_obj *state = pop(m), *obj = state ? top(m) : NULL;
            if (!obj)
                return -1;
            if (obj->kind == PK_ODICT && !obj->state && (state->kind == PK_DICT || state->kind == PK_ODICT)) {
                obj->state = state;
                break;
            }
            if (obj->kind == PK_ODICT || obj->kind == PK_TENSOR) /* twice, a tensor's legacy set_(): torch.load */
                return ds_fail(m->err, DS_ERR_UNSUPPORTED, "data.pkl: a BUILD this reader does not represent");
            return bad(m, "BUILD on something that is not a tensor or an OrderedDict");
        }
        case 'Q': { /* BINPERSID */
            pk_obj *pid = pop(m);
            if (!pid)
                return -1;
            if (push(m, persistent(m, pid)))
                return -1;
            break;
        }
        case 'q':
        case 'r': { /* BINPUT, LONG_BINPUT */
            size_t idx;
            if (memo_index(m, op == 'q', &idx))
                return -1;
            pk_obj *o = top(m);
            if (!o || memo_put(m, idx, o))
                return -1;
            break;
        }
        case 'h':
        case 'j': { /* BINGET, LONG_BINGET */
            size_t idx;
            if (memo_index(m, op == 'h', &idx) || memo_get(m, idx))
                return -1;
            break;
        }
        default: {
            const char *name = refused_opcode(op);
            if (name) /* valid pickle, but outside what torch's weights-only unpickler runs */
                return ds_fail(m->err, DS_ERR_FORMAT,
                               "data.pkl: pickle opcode %s at byte %zu, which torch's weights-only unpickler refuses "
                               "too (torch.save never writes it)",
                               name, at(m) - 1);
            return ds_fail(m->err, DS_ERR_UNSUPPORTED, "data.pkl: pickle opcode 0x%02x at byte %zu is not supported",
                           op, at(m) - 1);
        }
        }
    }
    return bad(m, "the pickle ends without STOP");
}

int pk_run(const uint8_t *data, size_t len, const pk_options *opt, pk_result *r, ds_error *err) {
    memset(r, 0, sizeof *r);
    vm m;
    memset(&m, 0, sizeof m);
    m.p = m.base = data;
    m.end = data + len;
    m.arena = &r->arena;
    m.r = r;
    m.err = err;
    m.opt = opt;
    int rc = run(&m);
    free(m.stack);
    free(m.marks);
    free(m.memo);
    free(m.storage_index);
    if (rc)
        pk_free(r);
    return rc;
}
