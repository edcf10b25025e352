/* unpickle.c: the restricted pickle machine (contract in unpickle.h). */
#include "unpickle.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    G_REBUILD_V2,
    G_REBUILD_V3,
    G_REBUILD_PARAMETER,
    G_REBUILD_PARAMETER_STATE,
    G_CODECS_ENCODE,
    G_STORAGE, /* + st_dtype, or + ST_NDTYPES for UntypedStorage */
    G_DTYPE = G_STORAGE + ST_NDTYPES + 1, /* + st_dtype */
    G_END = G_DTYPE + ST_NDTYPES,
};

static const struct {
    const char *name;
    int dtype;
} storage_names[] = {
    {"FloatStorage", ST_F32}, {"DoubleStorage", ST_F64}, {"HalfStorage", ST_F16}, {"BFloat16Storage", ST_BF16},
    {"LongStorage", ST_I64},  {"IntStorage", ST_I32},    {"ShortStorage", ST_I16}, {"CharStorage", ST_I8},
    {"ByteStorage", ST_U8},   {"BoolStorage", ST_BOOL},  {"ComplexFloatStorage", ST_C64},
};

static const struct {
    const char *name;
    int dtype;
} dtype_names[] = {
    {"float32", ST_F32},  {"float", ST_F32},         {"float64", ST_F64},         {"double", ST_F64},
    {"float16", ST_F16},  {"half", ST_F16},          {"bfloat16", ST_BF16},       {"int64", ST_I64},
    {"long", ST_I64},     {"int32", ST_I32},         {"int", ST_I32},             {"int16", ST_I16},
    {"short", ST_I16},    {"int8", ST_I8},           {"uint8", ST_U8},            {"bool", ST_BOOL},
    {"uint16", ST_U16},   {"uint32", ST_U32},        {"uint64", ST_U64},          {"complex64", ST_C64},
    {"cfloat", ST_C64},   {"float8_e4m3fn", ST_F8_E4M3}, {"float8_e5m2", ST_F8_E5M2}, {"float8_e8m0fnu", ST_F8_E8M0},
    {"float8_e4m3fnuz", ST_F8_E4M3FNUZ}, {"float8_e5m2fnuz", ST_F8_E5M2FNUZ},
};

/* Globals torch's weights-only unpickler accepts that this machine does not represent. */
static const char *const torch_only[] = {
    "torch Size", "torch device", "torch Tensor", "torch.nn.parameter Parameter", "builtins set",
    "builtins frozenset", "builtins bytearray", "builtins complex", "builtins slice", "builtins range",
    "collections Counter", "torch._tensor _rebuild_from_type_v2", "torch._utils _rebuild_sparse_tensor",
    "torch._utils _rebuild_qtensor", "torch._utils _rebuild_nested_tensor", "torch._utils _rebuild_wrapper_subclass",
    "torch._utils _rebuild_device_tensor_from_cpu_tensor", "torch._utils _rebuild_meta_tensor_no_storage",
    "torch ComplexDoubleStorage", "torch complex128", "torch cdouble", "torch QInt8Storage", "torch QUInt8Storage",
    "torch QInt32Storage", "torch.serialization _get_layout", "torch sparse_coo", "torch strided",
    "torch per_tensor_affine", "torch float4_e2m1fn_x2",
};

static int eq(const char *a, size_t al, const char *b) { return strlen(b) == al && memcmp(a, b, al) == 0; }

/* Looks "module name" up: the global's id, or -1 with err. */
static int lookup_global(const char *mod, size_t ml, const char *name, size_t nl, ds_error *err) {
    if (eq(mod, ml, "collections") && eq(name, nl, "OrderedDict"))
        return G_ORDERED_DICT;
    if (eq(mod, ml, "torch._utils")) {
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
        if (eq(name, nl, "UntypedStorage"))
            return G_STORAGE + ST_NDTYPES;
        for (size_t i = 0; i < sizeof storage_names / sizeof *storage_names; i++)
            if (eq(name, nl, storage_names[i].name))
                return G_STORAGE + storage_names[i].dtype;
        for (size_t i = 0; i < sizeof dtype_names / sizeof *dtype_names; i++)
            if (eq(name, nl, dtype_names[i].name))
                return G_DTYPE + dtype_names[i].dtype;
    }
    char full[300];
    snprintf(full, sizeof full, "%.*s %.*s", (int)(ml < 140 ? ml : 140), mod, (int)(nl < 140 ? nl : 140), name);
    for (size_t i = 0; i < sizeof torch_only / sizeof *torch_only; i++)
        if (strcmp(full, torch_only[i]) == 0)
            return ds_fail(err, DS_ERR_UNSUPPORTED, "the pickle uses %.*s.%.*s, which this reader does not represent",
                           (int)(ml < 140 ? ml : 140), mod, (int)(nl < 140 ? nl : 140), name);
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
    pk_obj **memo;
    size_t memo_cap;
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

static int memo_put(vm *m, size_t idx, pk_obj *o) {
    if (idx >= PK_MAX_MEMO)
        return bad(m, "memo index too large");
    if (idx >= m->memo_cap) {
        size_t cap = m->memo_cap ? m->memo_cap : 64;
        while (cap <= idx)
            cap *= 2;
        pk_obj **p = realloc(m->memo, cap * sizeof *p);
        if (!p)
            return ds_fail(m->err, DS_ERR_NOMEM, "out of memory while reading data.pkl");
        memset(p + m->memo_cap, 0, (cap - m->memo_cap) * sizeof *p);
        m->memo = p;
        m->memo_cap = cap;
    }
    m->memo[idx] = o;
    return 0;
}

static int memo_get(vm *m, size_t idx) {
    if (idx >= m->memo_cap || !m->memo[idx]) {
        char msg[80];
        snprintf(msg, sizeof msg, "memo index %zu was never set", idx);
        return bad(m, msg);
    }
    return push(m, m->memo[idx]);
}

static size_t memo_size(vm *m) {
    size_t n = m->memo_cap;
    while (n && !m->memo[n - 1])
        n--;
    return n;
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

/* torch._utils._rebuild_tensor_v2/_v3: (storage, offset, size, stride, requires_grad, hooks[, dtype][, metadata]) */
static pk_obj *rebuild_tensor(vm *m, pk_obj *args, int v3) {
    if (args->u.seq.n < (size_t)(v3 ? 7 : 6)) {
        bad(m, "a tensor is rebuilt with too few arguments");
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
    t->requires_grad = !as_int(a[4], &rg) && rg;
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
    case G_REBUILD_V2: return rebuild_tensor(m, args, 0);
    case G_REBUILD_V3: return rebuild_tensor(m, args, 1);
    case G_REBUILD_PARAMETER:
    case G_REBUILD_PARAMETER_STATE: {
        int64_t rg;
        if (n < 2 || args->u.seq.v[0]->kind != PK_TENSOR) {
            bad(m, "_rebuild_parameter is not given a tensor");
            return NULL;
        }
        pk_obj *t = args->u.seq.v[0];
        t->u.tensor->parameter = 1;
        t->u.tensor->requires_grad = !as_int(args->u.seq.v[1], &rg) && rg;
        return t;
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
    default:
        bad(m, "a storage class or dtype is called");
        return NULL;
    }
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
    for (size_t i = 0; i < m->r->n_storages; i++) { /* the same key is the same storage (shared) */
        pk_obj *s = m->r->storages[i];
        if (s->u.storage.key_len == a[2]->u.str.len && memcmp(s->u.storage.key, a[2]->u.str.s, s->u.storage.key_len) == 0)
            return s;
    }
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
    pk_obj **v = realloc(m->r->storages, (m->r->n_storages + 1) * sizeof *v);
    if (!v) {
        ds_fail(m->err, DS_ERR_NOMEM, "out of memory while reading data.pkl");
        return NULL;
    }
    v[m->r->n_storages++] = s;
    m->r->storages = v;
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
    int g = lookup_global(mod, ml, name, nl, m->err);
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

static int run(vm *m) {
    while (m->p < m->end) {
        uint8_t op = *m->p++;
        switch (op) {
        case 0x80: /* PROTO */
            if (need(m, 1))
                return -1;
            if (*m->p < 2 || *m->p > 5)
                return ds_fail(m->err, DS_ERR_UNSUPPORTED, "data.pkl: pickle protocol %d", *m->p);
            m->p++;
            break;
        case 0x95: /* FRAME */
            if (need(m, 8))
                return -1;
            m->p += 8;
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
        case '0': /* POP */
            if (!pop(m))
                return -1;
            break;
        case '1': { /* POP_MARK */
            size_t first = 0;
            if (pop_mark(m, &first))
                return -1;
            m->sp = first;
            break;
        }
        case '2': { /* DUP */
            pk_obj *o = top(m);
            if (!o || push(m, o))
                return -1;
            break;
        }
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
        case 0x8c:
        case 0x8d:
        case 'U':
        case 'T':
        case 'B':
        case 'C':
        case 0x8e: { /* BINUNICODE(8), SHORT_BINUNICODE, SHORT_BINSTRING, BINSTRING, BINBYTES(8), SHORT_BINBYTES */
            int lb = (op == 0x8c || op == 'U' || op == 'C') ? 1 : (op == 0x8d || op == 0x8e) ? 8 : 4;
            if (need(m, (size_t)lb))
                return -1;
            uint64_t len = rd_le(m->p, lb);
            m->p += lb;
            if (len > (uint64_t)(m->end - m->p))
                return bad(m, "a string runs past the end of the pickle");
            pk_kind kind = (op == 'B' || op == 'C' || op == 0x8e) ? PK_BYTES : PK_STR;
            if (push(m, make_str(m, kind, m->p, (size_t)len)))
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
            const char *mod = (const char *)m->p;
            m->p = nl2 + 1;
            if (push_global(m, mod, (size_t)(nl1 - (const uint8_t *)mod), (const char *)nl1 + 1, (size_t)(nl2 - nl1 - 1)))
                return -1;
            break;
        }
        case 0x93: { /* STACK_GLOBAL */
            pk_obj *name = pop(m), *mod = name ? pop(m) : NULL;
            if (!mod)
                return -1;
            if (name->kind != PK_STR || mod->kind != PK_STR)
                return bad(m, "STACK_GLOBAL of something other than two strings");
            if (push_global(m, mod->u.str.s, mod->u.str.len, name->u.str.s, name->u.str.len))
                return -1;
            break;
        }
        case 'R':
        case 0x81: { /* REDUCE, NEWOBJ: callable(*args) for the allow-list only */
            pk_obj *args = pop(m), *fn = args ? pop(m) : NULL;
            if (!fn)
                return -1;
            pk_obj *o = call(m, fn, args);
            if (!o || push(m, o))
                return -1;
            break;
        }
        case 'b': { /* BUILD: the state of an OrderedDict (_metadata) or a parameter is dropped */
            pk_obj *state = pop(m), *obj = state ? top(m) : NULL;
            if (!obj)
                return -1;
            if (obj->kind != PK_DICT && obj->kind != PK_ODICT && obj->kind != PK_TENSOR)
                return ds_fail(m->err, DS_ERR_UNSUPPORTED, "data.pkl: BUILD on an object this reader does not represent");
            break;
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
        case 0x94: { /* MEMOIZE */
            pk_obj *o = top(m);
            if (!o || memo_put(m, memo_size(m), o))
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
        default:
            return ds_fail(m->err, DS_ERR_UNSUPPORTED, "data.pkl: pickle opcode 0x%02x at byte %zu is not supported", op,
                           at(m) - 1);
        }
    }
    return bad(m, "the pickle ends without STOP");
}

int pk_run(const uint8_t *data, size_t len, pk_result *r, ds_error *err) {
    memset(r, 0, sizeof *r);
    vm m;
    memset(&m, 0, sizeof m);
    m.p = m.base = data;
    m.end = data + len;
    m.arena = &r->arena;
    m.r = r;
    m.err = err;
    int rc = run(&m);
    free(m.stack);
    free(m.marks);
    free(m.memo);
    if (rc)
        pk_free(r);
    return rc;
}
