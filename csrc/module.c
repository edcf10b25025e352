/* module.c: diffsynth_c._core: the module, its functions and types (OpenFile
 * lives in openfile.c, with the helpers of module.h). Everything here is
 * binding: argument checks, releasing the GIL,
 * turning ds_error records into exceptions that name the file, and wrapping
 * memory regions and tensors as Python objects.
 *
 * Objects:
 *   Region  owns one page-aligned mapping (a file mapped privately, or
 *           anonymous memory) and unmaps it when the last reference goes.
 *   Tensor  a C-contiguous view into a Region, exported through DLPack
 *           (__dlpack__ / __dlpack_device__). It holds a reference to its Region;
 *           every capsule it hands out holds another, so memory lives exactly
 *           as long as the last tensor that uses it.
 *
 * A load (load()) runs in three steps: with the GIL released, open every file,
 * read and validate its header and plan its tasks (populate the mapping's
 * pages, or read into anonymous memory, or convert dtypes into anonymous
 * memory); run the tasks on worker threads; then, with the GIL, build the
 * Tensor objects in the order of safe_open().keys() (names sorted bytewise). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <signal.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "convert.h"
#include "cuda.h"
#include "dlpack.h"
#include "download.h"
#include "guard.h"
#include "lease.h"
#include "io.h"
#include "keyhash.h"
#include "module.h"
#include "readinto.h"
#include "safetensors.h"
#include "torchfile.h"

#ifndef DS_VERSION
#define DS_VERSION "0.0.0"
#endif

typedef struct {
    PyObject *FormatError;
    PyObject *NotNativeError;
    PyTypeObject *RegionType;
    PyTypeObject *TensorType;
    PyTypeObject *TensorRefType;
    PyObject *OrderedDict;
} module_state;

static module_state *state_of(PyObject *module) { return (module_state *)PyModule_GetState(module); }

/* ---- errors -------------------------------------------------------------- */

/* Raises the exception for err, prefixing the file's name. path may be NULL. */
static PyObject *raise_ds(module_state *st, const ds_error *err, PyObject *path) {
    switch (err->status) {
    case DS_ERR_INTERRUPTED:
        if (!PyErr_Occurred())
            PyErr_SetNone(PyExc_KeyboardInterrupt);
        return NULL;
    case DS_ERR_OS: {
        PyObject *msg = path ? PyUnicode_FromFormat("%U: %s", path, err->msg) : PyUnicode_FromString(err->msg);
        if (!msg)
            return NULL;
        PyObject *args = Py_BuildValue("(iOO)", err->errnum, msg, path ? path : Py_None);
        Py_DECREF(msg);
        if (args) {
            PyErr_SetObject(PyExc_OSError, args);
            Py_DECREF(args);
        }
        return NULL;
    }
    case DS_ERR_NOMEM:
        if (path)
            PyErr_Format(PyExc_MemoryError, "%U: %s", path, err->msg);
        else
            PyErr_SetString(PyExc_MemoryError, err->msg);
        return NULL;
    default:
        if (path)
            PyErr_Format(st->FormatError, "%U: %s", path, err->msg);
        else
            PyErr_SetString(st->FormatError, err->msg);
        return NULL;
    }
}

static int dtype_from_name(PyObject *name, st_dtype *out) {
    const char *s = PyUnicode_AsUTF8(name);
    if (!s)
        return -1;
    for (int d = 0; d < ST_NDTYPES; d++)
        if (strcmp(s, st_dtype_name((st_dtype)d)) == 0) {
            *out = (st_dtype)d;
            return 0;
        }
    PyErr_Format(PyExc_ValueError, "unknown safetensors dtype name '%s'", s);
    return -1;
}

/* ---- Region --------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    void *base;
    size_t len;
    int file_backed; /* a private mapping of a file, else anonymous memory */
} RegionObject;

static void Region_dealloc(RegionObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    io_release(self->base, self->len);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *Region_get_nbytes(RegionObject *self, void *closure) {
    (void)closure;
    return PyLong_FromSize_t(self->len);
}

static PyObject *Region_get_file_backed(RegionObject *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->file_backed);
}

static PyGetSetDef Region_getset[] = {
    {"nbytes", (getter)Region_get_nbytes, NULL, "Bytes in the region.", NULL},
    {"file_backed", (getter)Region_get_file_backed, NULL, "True for a private mapping of a file.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Region_slots[] = {
    {Py_tp_dealloc, Region_dealloc},
    {Py_tp_getset, Region_getset},
    {Py_tp_doc, "Memory that tensors point into; unmapped when the last of them dies."},
    {0, NULL},
};

static PyType_Spec Region_spec = {
    .name = "diffsynth_c._core.Region",
    .basicsize = sizeof(RegionObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = Region_slots,
};

/* Takes ownership of base (released on failure too). */
static PyObject *region_new(module_state *st, void *base, size_t len, int file_backed) {
    RegionObject *r = PyObject_New(RegionObject, st->RegionType);
    if (!r) {
        io_release(base, len);
        return NULL;
    }
    r->base = base;
    r->len = len;
    r->file_backed = file_backed;
    return (PyObject *)r;
}

/* ---- Tensor --------------------------------------------------------------- */

typedef struct {
    PyObject_VAR_HEAD
    PyObject *owner; /* the Region (strong) */
    char *data;
    uint64_t nbytes;
    st_dtype dtype;    /* the elements' dtype */
    DLDataType export; /* what __dlpack__ reports */
    int ndim;          /* len(shape) */
    int export_ndim;   /* dims exported: F4 halves the last one, F6 is flat bytes */
    int64_t dims[1];   /* shape (ndim) then exported shape (export_ndim) */
} TensorObject;

/* What a consumer can take. torch refuses the float8 codes, so F8 leaves as
 * UInt8 and the Python side views it; F4 as UInt8 pairs (float4_e2m1fn_x2). */
static DLDataType export_dtype(st_dtype d) {
    DLDataType t = {DL_UINT, 8, 1};
    switch (d) {
    case ST_BOOL: t.code = DL_BOOL; break;
    case ST_I8: t.code = DL_INT; break;
    case ST_I16: t.code = DL_INT; t.bits = 16; break;
    case ST_U16: t.bits = 16; break;
    case ST_I32: t.code = DL_INT; t.bits = 32; break;
    case ST_U32: t.bits = 32; break;
    case ST_I64: t.code = DL_INT; t.bits = 64; break;
    case ST_U64: t.bits = 64; break;
    case ST_F16: t.code = DL_FLOAT; t.bits = 16; break;
    case ST_BF16: t.code = DL_BFLOAT; t.bits = 16; break;
    case ST_F32: t.code = DL_FLOAT; t.bits = 32; break;
    case ST_F64: t.code = DL_FLOAT; t.bits = 64; break;
    case ST_C64: t.code = DL_COMPLEX; t.bits = 64; break;
    default: break; /* U8, F8_*, F4, F6: bytes */
    }
    return t;
}

static PyObject *tensor_new(module_state *st, PyObject *owner, char *data, st_dtype dtype, int ndim,
                            const uint64_t *shape, uint64_t nbytes) {
    int export_ndim = dtype == ST_F6_E2M3 || dtype == ST_F6_E3M2 ? 1 : ndim;
    TensorObject *t = PyObject_NewVar(TensorObject, st->TensorType, ndim + export_ndim);
    if (!t)
        return NULL;
    t->owner = Py_NewRef(owner);
    t->data = data;
    t->nbytes = nbytes;
    t->dtype = dtype;
    t->export = export_dtype(dtype);
    t->ndim = ndim;
    t->export_ndim = export_ndim;
    for (int i = 0; i < ndim; i++)
        t->dims[i] = (int64_t)shape[i];
    int64_t *ex = t->dims + ndim;
    if (dtype == ST_F6_E2M3 || dtype == ST_F6_E3M2)
        ex[0] = (int64_t)nbytes;
    else
        for (int i = 0; i < ndim; i++)
            ex[i] = (int64_t)shape[i];
    if (dtype == ST_F4 && ndim > 0)
        ex[ndim - 1] /= 2; /* checked by the caller: even */
    return (PyObject *)t;
}

static void Tensor_dealloc(TensorObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    Py_CLEAR(self->owner);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *Tensor_dlpack(TensorObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"stream", "max_version", "dl_device", "copy", NULL};
    PyObject *stream = Py_None, *max_version = Py_None, *dl_device = Py_None, *copy = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OOOO:__dlpack__", kwlist, &stream, &max_version, &dl_device,
                                     &copy))
        return NULL;
    if (stream != Py_None) {
        PyErr_SetString(PyExc_ValueError, "a CPU tensor is exported with stream=None only");
        return NULL;
    }
    int versioned = 0;
    if (max_version != Py_None) {
        long major;
        if (!PyTuple_Check(max_version) || PyTuple_GET_SIZE(max_version) != 2) {
            PyErr_SetString(PyExc_TypeError, "max_version must be a tuple (major, minor)");
            return NULL;
        }
        major = PyLong_AsLong(PyTuple_GET_ITEM(max_version, 0));
        if (major == -1 && PyErr_Occurred())
            return NULL;
        versioned = major >= DL_VERSION_MAJOR;
    }
    if (dl_device != Py_None) {
        long type, id;
        if (!PyArg_ParseTuple(dl_device, "ll:dl_device", &type, &id))
            return NULL;
        if (type != DL_CPU || id != 0) {
            PyErr_Format(PyExc_BufferError, "this tensor lives on the CPU and cannot be exported to device (%ld, %ld)",
                         type, id);
            return NULL;
        }
    }
    int do_copy = 0;
    if (copy != Py_None) {
        do_copy = PyObject_IsTrue(copy);
        if (do_copy < 0)
            return NULL;
    }
    const int64_t *shape = self->dims + self->ndim;
    if (!do_copy)
        return dl_capsule(self->owner, self->data, self->export, self->export_ndim, shape, versioned, 0);
    /* copy=True: a private copy that the capsule owns through a new Region */
    module_state *st = PyType_GetModuleState(Py_TYPE(self));
    ds_error err;
    void *mem = io_alloc((size_t)self->nbytes, &err);
    if (!mem)
        return raise_ds(st, &err, NULL);
    memcpy(mem, self->data, (size_t)self->nbytes);
    PyObject *region = region_new(st, mem, (size_t)self->nbytes, 0);
    if (!region)
        return NULL;
    PyObject *cap = dl_capsule(region, mem, self->export, self->export_ndim, shape, versioned,
                               versioned ? DL_FLAG_IS_COPIED : 0);
    Py_DECREF(region);
    return cap;
}

static PyObject *Tensor_dlpack_device(TensorObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return Py_BuildValue("(ii)", DL_CPU, 0);
}

/* The same bytes as unsigned integers of the element's width (numpy has no
 * bfloat16 or float8): a new Tensor sharing the region. */
static PyObject *Tensor_bits(TensorObject *self, PyObject *unused) {
    (void)unused;
    module_state *st = PyType_GetModuleState(Py_TYPE(self));
    uint64_t shape[1];
    const uint64_t *sp = shape;
    uint64_t *tmp = NULL;
    if (self->ndim > 0) {
        tmp = PyMem_Malloc((size_t)self->ndim * sizeof(uint64_t));
        if (!tmp)
            return PyErr_NoMemory();
        for (int i = 0; i < self->ndim; i++)
            tmp[i] = (uint64_t)self->dims[i];
        sp = tmp;
    }
    TensorObject *t =
        (TensorObject *)tensor_new(st, self->owner, self->data, self->dtype, self->ndim, sp, self->nbytes);
    PyMem_Free(tmp);
    if (t && t->export.code != DL_BOOL) {
        t->export.code = DL_UINT;
    }
    return (PyObject *)t;
}

static PyObject *Tensor_get_dtype(TensorObject *self, void *closure) {
    (void)closure;
    return PyUnicode_FromString(st_dtype_name(self->dtype));
}

static PyObject *Tensor_get_shape(TensorObject *self, void *closure) {
    (void)closure;
    PyObject *t = PyTuple_New(self->ndim);
    if (!t)
        return NULL;
    for (int i = 0; i < self->ndim; i++) {
        PyObject *v = PyLong_FromLongLong(self->dims[i]);
        if (!v) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

static PyObject *Tensor_get_nbytes(TensorObject *self, void *closure) {
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->nbytes);
}

static PyObject *Tensor_get_data_ptr(TensorObject *self, void *closure) {
    (void)closure;
    return PyLong_FromVoidPtr(self->data);
}

static PyObject *Tensor_get_region(TensorObject *self, void *closure) {
    (void)closure;
    return Py_NewRef(self->owner);
}

static PyObject *Tensor_repr(TensorObject *self) {
    PyObject *shape = Tensor_get_shape(self, NULL);
    if (!shape)
        return NULL;
    PyObject *r = PyUnicode_FromFormat("<diffsynth_c Tensor %s %R>", st_dtype_name(self->dtype), shape);
    Py_DECREF(shape);
    return r;
}

static PyMethodDef Tensor_methods[] = {
    {"__dlpack__", (PyCFunction)(void (*)(void))Tensor_dlpack, METH_VARARGS | METH_KEYWORDS,
     "__dlpack__(*, stream=None, max_version=None, dl_device=None, copy=None)\n--\n\n"
     "Exports the tensor as a DLPack capsule (versioned when max_version >= (1, 0))."},
    {"__dlpack_device__", (PyCFunction)Tensor_dlpack_device, METH_NOARGS, "Returns (kDLCPU, 0)."},
    {"bits", (PyCFunction)Tensor_bits, METH_NOARGS,
     "The same bytes exported as unsigned integers of the element width (for numpy, which lacks bfloat16)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Tensor_getset[] = {
    {"dtype", (getter)Tensor_get_dtype, NULL, "The safetensors dtype name of the elements.", NULL},
    {"shape", (getter)Tensor_get_shape, NULL, "The shape as written in the file.", NULL},
    {"nbytes", (getter)Tensor_get_nbytes, NULL, "Bytes of data.", NULL},
    {"data_ptr", (getter)Tensor_get_data_ptr, NULL, "Address of the first byte.", NULL},
    {"region", (getter)Tensor_get_region, NULL, "The Region that owns the bytes.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Tensor_slots[] = {
    {Py_tp_dealloc, Tensor_dealloc},
    {Py_tp_methods, Tensor_methods},
    {Py_tp_getset, Tensor_getset},
    {Py_tp_repr, Tensor_repr},
    {Py_tp_doc, "A tensor's bytes in memory owned by diffsynth_c, exported through DLPack."},
    {0, NULL},
};

static PyType_Spec Tensor_spec = {
    .name = "diffsynth_c._core.Tensor",
    .basicsize = offsetof(TensorObject, dims),
    .itemsize = sizeof(int64_t),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = Tensor_slots,
};

/* ---- helpers for the other binding files (module.h) ------------------------------- */

PyObject *bind_raise(PyObject *module, const ds_error *err, PyObject *path) {
    return raise_ds(state_of(module), err, path);
}

PyObject *bind_region_new(PyObject *module, void *base, size_t len, int file_backed) {
    return region_new(state_of(module), base, len, file_backed);
}

PyObject *bind_tensor_new(PyObject *module, PyObject *owner, char *data, st_dtype dtype, int ndim,
                          const uint64_t *shape, uint64_t nbytes) {
    return tensor_new(state_of(module), owner, data, dtype, ndim, shape, nbytes);
}

int bind_dtype_from_name(PyObject *name, st_dtype *out) { return dtype_from_name(name, out); }

/* ---- paths ---------------------------------------------------------------- */

typedef struct {
    PyObject *display; /* str, for messages */
    PyObject *fs;      /* bytes, for open() */
} path_arg;

static void paths_free(path_arg *p, Py_ssize_t n) {
    if (!p)
        return;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_XDECREF(p[i].display);
        Py_XDECREF(p[i].fs);
    }
    PyMem_Free(p);
}

/* Converts a sequence of str/bytes/os.PathLike into paths. Returns NULL with an
 * exception set. */
static path_arg *paths_from(PyObject *seq, Py_ssize_t *n_out) {
    PyObject *fast = PySequence_Fast(seq, "paths must be a sequence of file paths");
    if (!fast)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    path_arg *p = PyMem_Calloc(n ? (size_t)n : 1, sizeof *p);
    if (!p) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyUnicode_FSConverter(item, &p[i].fs))
            goto error;
        p[i].display = PyUnicode_DecodeFSDefault(PyBytes_AS_STRING(p[i].fs));
        if (!p[i].display)
            goto error;
    }
    Py_DECREF(fast);
    *n_out = n;
    return p;
error:
    Py_DECREF(fast);
    paths_free(p, n);
    return NULL;
}

/* ---- reading headers -------------------------------------------------------- */

/* Opens path and parses its safetensors header into h (file left open in f).
 * Runs without the GIL. */
static int open_header(const char *path, io_file *f, st_header *h, ds_error *err) {
    memset(h, 0, sizeof *h);
    if (io_open(path, f, err))
        return -1;
    if (bind_parse_header(f, h, err)) {
        io_close(f);
        return -1;
    }
    return 0;
}

int bind_parse_header(const io_file *f, st_header *h, ds_error *err) {
    uint8_t prefix[8];
    uint64_t n;
    memset(h, 0, sizeof *h);
    if (f->size < 8) {
        ds_fail(err, DS_ERR_FORMAT,
                "the file holds %llu bytes, fewer than the 8-byte header length: is this a safetensors file?",
                (unsigned long long)f->size);
        goto fail;
    }
    if (io_pread(f->fd, prefix, 8, 0, err) || st_check_prefix(prefix, f->size, &n, err))
        goto fail;
    uint8_t *json = malloc(n ? (size_t)n : 1);
    if (!json) {
        ds_fail(err, DS_ERR_NOMEM, "cannot allocate %llu bytes for the header", (unsigned long long)n);
        goto fail;
    }
    if (io_pread(f->fd, json, (size_t)n, 8, err)) {
        free(json);
        goto fail;
    }
    int rc = st_parse(json, (size_t)n, f->size, h, err);
    free(json);
    return rc ? -1 : 0;
fail:
    return -1;
}

typedef struct {
    path_arg *paths;
    io_file *files;
    st_header *headers;
    int *opened;
} header_job;

static int header_task(void *ctx, size_t i, ds_error *err) {
    header_job *job = ctx;
    if (open_header(PyBytes_AS_STRING(job->paths[i].fs), &job->files[i], &job->headers[i], err)) {
        err->input = (int)i;
        return -1;
    }
    job->opened[i] = 1;
    return 0;
}

/* Opens and parses the headers of n files on up to `threads` threads. On
 * failure the files opened so far stay open (opened[i] set) for the caller to
 * close, and err->input names the failing file. Runs without the GIL. */
static int open_headers(path_arg *paths, size_t n, io_file *files, st_header *headers, int *opened, int threads,
                        ds_error *err) {
    header_job job = {paths, files, headers, opened};
    return io_run(n, threads, header_task, &job, NULL, NULL, err);
}

static PyObject *shape_tuple(int ndim, const uint64_t *shape) {
    PyObject *t = PyTuple_New(ndim);
    if (!t)
        return NULL;
    for (int i = 0; i < ndim; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(shape[i]);
        if (!v) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

PyDoc_STRVAR(read_header_doc,
             "read_header(path) -> (header_len, data_start, tensors, metadata)\n\n"
             "Reads and validates a safetensors header without reading tensor data. tensors is a list of\n"
             "(name, dtype, shape, begin, end) sorted by name; metadata a dict, or None when absent.");

static PyObject *read_header(PyObject *module, PyObject *arg) {
    module_state *st = state_of(module);
    PyObject *fs = NULL, *display = NULL, *result = NULL;
    io_file f;
    st_header h;
    ds_error err;
    int rc;
    if (!PyUnicode_FSConverter(arg, &fs))
        return NULL;
    display = PyUnicode_DecodeFSDefault(PyBytes_AS_STRING(fs));
    if (!display)
        goto done;
    Py_BEGIN_ALLOW_THREADS rc = open_header(PyBytes_AS_STRING(fs), &f, &h, &err);
    if (!rc)
        io_close(&f);
    Py_END_ALLOW_THREADS if (rc) {
        raise_ds(st, &err, display);
        goto done;
    }
    result = bind_header_tuple(&h);
    st_free(&h);
done:
    Py_XDECREF(display);
    Py_XDECREF(fs);
    return result;
}

PyObject *bind_header_tuple(const st_header *h) {
    PyObject *result = NULL, *list = NULL, *meta = Py_None;
    list = PyList_New((Py_ssize_t)h->n_tensors);
    if (!list)
        goto done;
    for (size_t i = 0; i < h->n_tensors; i++) {
        const st_tensor *t = &h->tensors[i];
        PyObject *shape = shape_tuple(t->ndim, t->shape);
        if (!shape)
            goto done;
        PyObject *item = Py_BuildValue("(s#sNKK)", t->name, (Py_ssize_t)t->name_len, st_dtype_name(t->dtype), shape,
                                       (unsigned long long)t->begin, (unsigned long long)t->end);
        if (!item)
            goto done;
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    if (h->has_metadata) {
        meta = PyDict_New();
        if (!meta)
            goto done;
        for (size_t i = 0; i < h->n_meta; i++) {
            PyObject *k = PyUnicode_FromStringAndSize(h->meta[i].key, (Py_ssize_t)h->meta[i].key_len);
            PyObject *v = k ? PyUnicode_FromStringAndSize(h->meta[i].value, (Py_ssize_t)h->meta[i].value_len) : NULL;
            int bad = !v || PyDict_SetItem(meta, k, v) < 0;
            Py_XDECREF(k);
            Py_XDECREF(v);
            if (bad)
                goto done;
        }
    } else {
        Py_INCREF(meta);
    }
    result = Py_BuildValue("(KKOO)", (unsigned long long)h->header_len, (unsigned long long)h->data_start, list, meta);
done:
    Py_XDECREF(list);
    if (meta != Py_None || result)
        Py_XDECREF(meta);
    return result;
}

/* ---- hashing ---------------------------------------------------------------- */

typedef struct {
    const st_tensor *t;
    size_t file;
} merged_entry;

static int merged_cmp(const void *x, const void *y) {
    const merged_entry *a = x, *b = y;
    size_t n = a->t->name_len < b->t->name_len ? a->t->name_len : b->t->name_len;
    int r = memcmp(a->t->name, b->t->name, n);
    if (r)
        return r;
    if (a->t->name_len != b->t->name_len)
        return a->t->name_len < b->t->name_len ? -1 : 1;
    return a->file < b->file ? -1 : a->file > b->file;
}

/* The hash of the union of several headers (a later file's entry replaces an
 * earlier one of the same name, as dict.update does). Runs without the GIL. */
static int hash_headers(st_header *hs, size_t n_files, int with_shape, char hex[33], ds_error *err) {
    size_t total = 0;
    for (size_t i = 0; i < n_files; i++)
        total += hs[i].n_tensors;
    merged_entry *all = malloc((total ? total : 1) * sizeof *all);
    kh_entry *entries = malloc((total ? total : 1) * sizeof *entries);
    if (!all || !entries) {
        free(all);
        free(entries);
        return ds_fail(err, DS_ERR_NOMEM, "out of memory while hashing %zu keys", total);
    }
    size_t k = 0;
    for (size_t i = 0; i < n_files; i++)
        for (size_t j = 0; j < hs[i].n_tensors; j++) {
            all[k].t = &hs[i].tensors[j];
            all[k].file = i;
            k++;
        }
    if (n_files > 1 && total > 1)
        qsort(all, total, sizeof *all, merged_cmp);
    size_t n = 0;
    for (size_t i = 0; i < total; i++) {
        if (i + 1 < total && all[i].t->name_len == all[i + 1].t->name_len &&
            memcmp(all[i].t->name, all[i + 1].t->name, all[i].t->name_len) == 0)
            continue;
        entries[n].key = all[i].t->name;
        entries[n].key_len = all[i].t->name_len;
        entries[n].ndim = all[i].t->ndim;
        entries[n].shape = all[i].t->shape;
        entries[n].nested = NULL;
        entries[n].nested_len = 0;
        n++;
    }
    char *s;
    size_t len;
    int rc = kh_keys_string(entries, n, with_shape, &s, &len, err);
    if (!rc) {
        kh_md5_hex(s, len, hex);
        free(s);
    }
    free(all);
    free(entries);
    return rc;
}

PyDoc_STRVAR(hash_files_doc, "hash_files(paths, with_shape=True) -> str\n\n"
                             "DiffSynth's model hash of one or more safetensors files, from their headers alone.");

static PyObject *hash_files(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"paths", "with_shape", NULL};
    module_state *st = state_of(module);
    PyObject *seq;
    int with_shape = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|p:hash_files", kwlist, &seq, &with_shape))
        return NULL;
    Py_ssize_t n;
    path_arg *paths = paths_from(seq, &n);
    if (!paths)
        return NULL;
    st_header *hs = PyMem_Calloc(n ? (size_t)n : 1, sizeof *hs);
    io_file *files = PyMem_Calloc(n ? (size_t)n : 1, sizeof *files);
    int *opened = PyMem_Calloc(n ? (size_t)n : 1, sizeof *opened);
    if (!hs || !files || !opened) {
        PyMem_Free(hs);
        PyMem_Free(files);
        PyMem_Free(opened);
        paths_free(paths, n);
        return PyErr_NoMemory();
    }
    ds_error err;
    char hex[33];
    int rc, threads = io_cpu_count();
    Py_BEGIN_ALLOW_THREADS rc = open_headers(paths, (size_t)n, files, hs, opened, threads, &err);
    for (Py_ssize_t i = 0; i < n; i++)
        if (opened[i])
            io_close(&files[i]);
    if (!rc)
        rc = hash_headers(hs, (size_t)n, with_shape, hex, &err);
    Py_END_ALLOW_THREADS PyObject *result = NULL;
    if (rc)
        raise_ds(st, &err, err.input >= 0 && err.input < n ? paths[err.input].display : NULL);
    else
        result = PyUnicode_FromString(hex);
    for (Py_ssize_t i = 0; i < n; i++)
        if (opened[i])
            st_free(&hs[i]);
    PyMem_Free(hs);
    PyMem_Free(files);
    PyMem_Free(opened);
    paths_free(paths, n);
    return result;
}

PyDoc_STRVAR(keys_string_doc,
             "keys_string(entries, with_shape=True) -> bytes\n\n"
             "DiffSynth's canonical key string of entries, a sequence of (name, shape) where shape is a\n"
             "sequence of ints, or (name, nested) where nested is the bytes of a nested dict's own string.");

static PyObject *keys_string(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"entries", "with_shape", NULL};
    (void)module;
    PyObject *seq, *fast, *result = NULL;
    int with_shape = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|p:keys_string", kwlist, &seq, &with_shape))
        return NULL;
    fast = PySequence_Fast(seq, "entries must be a sequence of (name, shape) pairs");
    if (!fast)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    kh_entry *entries = PyMem_Calloc(n ? (size_t)n : 1, sizeof *entries);
    uint64_t *dims = NULL;
    size_t total_dims = 0, used = 0;
    if (!entries) {
        PyErr_NoMemory();
        goto done;
    }
    /* first pass: count dims */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_TypeError, "each entry must be a (name, shape) tuple");
            goto done;
        }
        PyObject *v = PyTuple_GET_ITEM(item, 1);
        if (!PyBytes_Check(v)) {
            Py_ssize_t k = PySequence_Size(v);
            if (k < 0)
                goto done;
            total_dims += (size_t)k;
        }
    }
    dims = PyMem_Malloc((total_dims ? total_dims : 1) * sizeof *dims);
    if (!dims) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        PyObject *name = PyTuple_GET_ITEM(item, 0), *v = PyTuple_GET_ITEM(item, 1);
        Py_ssize_t len;
        if (!PyUnicode_Check(name)) {
            PyErr_SetString(PyExc_TypeError, "entry names must be str");
            goto done;
        }
        entries[i].key = PyUnicode_AsUTF8AndSize(name, &len);
        if (!entries[i].key)
            goto done;
        entries[i].key_len = (size_t)len;
        if (PyBytes_Check(v)) {
            entries[i].ndim = -1;
            entries[i].nested = PyBytes_AS_STRING(v);
            entries[i].nested_len = (size_t)PyBytes_GET_SIZE(v);
            continue;
        }
        PyObject *sf = PySequence_Fast(v, "a shape must be a sequence of ints");
        if (!sf)
            goto done;
        Py_ssize_t k = PySequence_Fast_GET_SIZE(sf);
        entries[i].ndim = (int)k;
        entries[i].shape = dims + used;
        for (Py_ssize_t d = 0; d < k; d++) {
            unsigned long long x = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(sf, d));
            if (x == (unsigned long long)-1 && PyErr_Occurred()) {
                Py_DECREF(sf);
                goto done;
            }
            dims[used++] = x;
        }
        Py_DECREF(sf);
    }
    {
        ds_error err;
        char *s;
        size_t len;
        if (kh_keys_string(entries, (size_t)n, with_shape, &s, &len, &err)) {
            PyErr_SetString(PyExc_MemoryError, err.msg);
            goto done;
        }
        result = PyBytes_FromStringAndSize(s, (Py_ssize_t)len);
        free(s);
    }
done:
    PyMem_Free(entries);
    PyMem_Free(dims);
    Py_DECREF(fast);
    return result;
}

PyDoc_STRVAR(md5_hex_doc, "md5_hex(data) -> str\n\nThe MD5 of a bytes-like object, as 32 hex digits.");

static PyObject *md5_hex(PyObject *module, PyObject *arg) {
    (void)module;
    Py_buffer view;
    char hex[33];
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS kh_md5_hex(view.buf, (size_t)view.len, hex);
    Py_END_ALLOW_THREADS PyBuffer_Release(&view);
    return PyUnicode_FromString(hex);
}

/* ---- loading ---------------------------------------------------------------- */

enum { TASK_POPULATE, TASK_READ, TASK_CONVERT };

typedef struct {
    int kind;
    int file;
    const char *src; /* POPULATE, CONVERT */
    char *dst;       /* READ, CONVERT */
    size_t n;        /* bytes (POPULATE, READ) or elements (CONVERT) */
    uint64_t off;    /* READ: file offset */
    st_dtype from, to;
} load_task;

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
} load_file;

typedef struct {
    load_file *files;
    size_t n_files;
    load_task *tasks;
    size_t n_tasks, cap_tasks;
} load_plan;

static int run_task(void *ctx, size_t i, ds_error *err) {
    load_plan *plan = ctx;
    load_task *t = &plan->tasks[i];
    int rc = 0;
    switch (t->kind) {
    case TASK_POPULATE: rc = io_populate((void *)t->src, t->n, err); break;
    case TASK_READ: rc = io_pread(plan->files[t->file].f.fd, t->dst, t->n, t->off, err); break;
    case TASK_CONVERT: {
        size_t in_bytes = t->n * (st_dtype_bits(t->from) / 8);
        rc = io_populate((void *)t->src, in_bytes, err);
        if (!rc) {
            cv_run(t->from, t->to, t->src, t->dst, t->n);
            /* only this task reads these source bytes: the resident peak stays near the output */
            io_discard((void *)t->src, in_bytes);
        }
        break;
    }
    }
    if (rc)
        err->input = t->file;
    return rc;
}

static int add_task(load_plan *plan, load_task t, ds_error *err) {
    if (plan->n_tasks == plan->cap_tasks) {
        size_t cap = plan->cap_tasks ? plan->cap_tasks * 2 : 256;
        load_task *p = realloc(plan->tasks, cap * sizeof *p);
        if (!p)
            return ds_fail(err, DS_ERR_NOMEM, "out of memory while planning the load");
        plan->tasks = p;
        plan->cap_tasks = cap;
    }
    plan->tasks[plan->n_tasks++] = t;
    return 0;
}

/* Splits [begin, begin+len) of kind POPULATE or READ into chunks. */
static int add_byte_tasks(load_plan *plan, int kind, int file, const char *src, char *dst, uint64_t off, size_t len,
                          size_t chunk, ds_error *err) {
    for (size_t done = 0; done < len; done += chunk) {
        load_task t = {kind, file, src ? src + done : NULL, dst ? dst + done : NULL,
                       len - done < chunk ? len - done : chunk, off + done, ST_U8, ST_U8};
        if (add_task(plan, t, err))
            return -1;
    }
    return 0;
}

#define POPULATE_CHUNK ((size_t)32 << 20)
#define READ_CHUNK ((size_t)8 << 20)
#define CONVERT_CHUNK ((size_t)1 << 20) /* elements */

static void plan_free(load_plan *plan) {
    for (size_t i = 0; i < plan->n_files; i++) {
        load_file *lf = &plan->files[i];
        if (lf->opened) {
            io_close(&lf->f);
            st_free(&lf->h);
        }
        io_release(lf->map, lf->map_len);
        io_release(lf->copy, lf->copy_len);
        io_release(lf->conv, lf->conv_len);
        free(lf->conv_off);
    }
    free(plan->files);
    free(plan->tasks);
    memset(plan, 0, sizeof *plan);
}

/* Leases lf's mapping (lease.h) for the bytes its tensors will view: all of them, or with
 * conversions the tensors left unconverted. Returns 0, or -1 when no lease could be had. */
static int protect_mapping(load_file *lf) {
    const st_header *h = &lf->h;
    if (!lf->conv_off)
        return ml_protect(lf->map, lf->map_len, lf->f.fd, NULL, NULL, 0);
    uint64_t *offs = malloc((h->n_tensors ? h->n_tensors : 1) * 2 * sizeof *offs);
    if (!offs)
        return -1;
    uint64_t *lens = offs + (h->n_tensors ? h->n_tensors : 1);
    size_t n = 0;
    for (size_t k = 0; k < h->n_tensors; k++) {
        const st_tensor *t = &h->tensors[k];
        if (lf->conv_off[k] == UINT64_MAX && t->end > t->begin) {
            offs[n] = h->data_start + t->begin;
            lens[n++] = t->end - t->begin;
        }
    }
    int rc = ml_protect(lf->map, lf->map_len, lf->f.fd, offs, lens, n);
    free(offs);
    return rc;
}

/* Opens, validates and plans every file. convert: a mask of the dtypes to
 * convert to target (0: none). Runs without the GIL. On failure sets
 * err->input to the failing file. */
static int plan_load(load_plan *plan, path_arg *paths, size_t n, int use_map, unsigned convert, st_dtype target,
                     ds_error *err) {
    plan->files = calloc(n ? n : 1, sizeof *plan->files);
    if (!plan->files)
        return ds_fail(err, DS_ERR_NOMEM, "out of memory");
    plan->n_files = n;
    {
        /* headers first, in parallel; then the plan, file by file */
        io_file *files = calloc(n ? n : 1, sizeof *files);
        st_header *headers = calloc(n ? n : 1, sizeof *headers);
        int *opened = calloc(n ? n : 1, sizeof *opened);
        int rc = -1;
        if (files && headers && opened)
            rc = open_headers(paths, n, files, headers, opened, io_cpu_count(), err);
        else
            ds_fail(err, DS_ERR_NOMEM, "out of memory");
        for (size_t k = 0; k < n && opened; k++)
            if (opened[k]) {
                plan->files[k].f = files[k];
                plan->files[k].h = headers[k];
                plan->files[k].opened = 1;
            }
        free(files);
        free(headers);
        free(opened);
        if (rc)
            return -1;
    }
    size_t i = 0;
    for (; i < n; i++) {
        load_file *lf = &plan->files[i];
        st_header *h = &lf->h;
        for (size_t k = 0; k < h->n_tensors; k++) {
            const st_tensor *t = &h->tensors[k];
            if (t->dtype == ST_F4 && (t->ndim == 0 || t->shape[t->ndim - 1] % 2)) {
                ds_fail(err, DS_ERR_UNSUPPORTED,
                        "tensor '%.200s': dtype F4 needs an even last dimension to become torch's float4_e2m1fn_x2",
                        t->name);
                goto fail;
            }
        }
        const char *data;
        if (use_map) {
            lf->map_len = (size_t)lf->f.size;
            lf->map = io_map_file(lf->f.fd, lf->f.size, err);
            if (!lf->map)
                goto fail;
        }
        /* conversion targets */
        if (convert) {
            lf->conv_off = malloc((h->n_tensors ? h->n_tensors : 1) * sizeof *lf->conv_off);
            if (!lf->conv_off) {
                ds_fail(err, DS_ERR_NOMEM, "out of memory");
                goto fail;
            }
            size_t total = 0;
            for (size_t k = 0; k < h->n_tensors; k++) {
                const st_tensor *t = &h->tensors[k];
                lf->conv_off[k] = UINT64_MAX;
                if (t->end == t->begin || t->dtype == target || !(convert & (1u << t->dtype)))
                    continue;
                size_t numel = (size_t)((t->end - t->begin) / (st_dtype_bits(t->dtype) / 8));
                lf->conv_off[k] = total;
                total += (numel * (st_dtype_bits(target) / 8) + 63) & ~(size_t)63;
            }
            if (total) {
                lf->conv_len = total;
                lf->conv = io_alloc(total, err);
                if (!lf->conv)
                    goto fail;
            }
        }
        /* The tensors will be views of resident pages: with a lease, the pages they use are copied
         * before the file changes in place (lease.h). Without one, the file could change under the
         * tensors unseen, so they get a copy of their own, read as in read mode. */
        if (lf->map && protect_mapping(lf) != 0) {
            io_release(lf->map, lf->map_len);
            lf->map = NULL;
        }
        if (lf->map) {
            data = lf->map + h->data_start;
        } else {
            lf->copy_len = (size_t)h->data_len;
            lf->copy = io_alloc(lf->copy_len, err);
            if (!lf->copy)
                goto fail;
            data = lf->copy;
        }
        /* tasks: bytes first (populate or read), then conversions */
        if (lf->map) {
            if (!convert || !lf->conv) {
                if (add_byte_tasks(plan, TASK_POPULATE, (int)i, data, NULL, 0, (size_t)h->data_len, POPULATE_CHUNK,
                                   err))
                    goto fail;
            } else {
                /* populate only what is not converted (conversion faults its own source in) */
                for (size_t k = 0; k < h->n_tensors; k++) {
                    const st_tensor *t = &h->tensors[k];
                    if (lf->conv_off[k] == UINT64_MAX &&
                        add_byte_tasks(plan, TASK_POPULATE, (int)i, data + t->begin, NULL, 0,
                                       (size_t)(t->end - t->begin), POPULATE_CHUNK, err))
                        goto fail;
                }
            }
        } else {
            if (add_byte_tasks(plan, TASK_READ, (int)i, NULL, lf->copy, h->data_start, (size_t)h->data_len,
                               READ_CHUNK, err))
                goto fail;
        }
        if (convert && lf->conv && lf->map) {
            for (size_t k = 0; k < h->n_tensors; k++) {
                const st_tensor *t = &h->tensors[k];
                if (lf->conv_off[k] == UINT64_MAX)
                    continue;
                size_t in_size = st_dtype_bits(t->dtype) / 8, out_size = st_dtype_bits(target) / 8;
                size_t numel = (size_t)((t->end - t->begin) / in_size);
                for (size_t e = 0; e < numel; e += CONVERT_CHUNK) {
                    load_task task = {TASK_CONVERT,
                                      (int)i,
                                      data + t->begin + e * in_size,
                                      lf->conv + lf->conv_off[k] + e * out_size,
                                      numel - e < CONVERT_CHUNK ? numel - e : CONVERT_CHUNK,
                                      0,
                                      t->dtype,
                                      target};
                    if (add_task(plan, task, err))
                        goto fail;
                }
            }
        }
    }
    return 0;
fail:
    err->input = (int)i;
    return -1;
}

/* In read mode the conversion must wait for the bytes: a second phase. */
static int plan_read_conversions(load_plan *plan, st_dtype target, ds_error *err) {
    plan->n_tasks = 0;
    for (size_t i = 0; i < plan->n_files; i++) {
        load_file *lf = &plan->files[i];
        if (!lf->conv || lf->map) /* a mapped file converted in the first phase */
            continue;
        for (size_t k = 0; k < lf->h.n_tensors; k++) {
            const st_tensor *t = &lf->h.tensors[k];
            if (lf->conv_off[k] == UINT64_MAX)
                continue;
            size_t in_size = st_dtype_bits(t->dtype) / 8, out_size = st_dtype_bits(target) / 8;
            size_t numel = (size_t)((t->end - t->begin) / in_size);
            for (size_t e = 0; e < numel; e += CONVERT_CHUNK) {
                load_task task = {TASK_CONVERT,
                                  (int)i,
                                  lf->copy + t->begin + e * in_size,
                                  lf->conv + lf->conv_off[k] + e * out_size,
                                  numel - e < CONVERT_CHUNK ? numel - e : CONVERT_CHUNK,
                                  0,
                                  t->dtype,
                                  target};
                if (add_task(plan, task, err))
                    return -1;
            }
        }
    }
    return 0;
}

typedef struct {
    PyThreadState **ts;
} poll_ctx;

/* Checks for Ctrl-C from the thread that released the GIL. */
static int poll_signals(void *arg) {
    poll_ctx *pc = arg;
    PyEval_RestoreThread(*pc->ts);
    int r = PyErr_CheckSignals();
    *pc->ts = PyEval_SaveThread();
    return r != 0;
}

PyDoc_STRVAR(load_doc,
             "load(paths, dtype=None, threads=1, mode='mmap', convert_from=None) -> list\n\n"
             "Loads safetensors files. For each file, a list of (name, Tensor) in name order.\n"
             "mode 'mmap': tensors are views into a private mapping of the file (copy-on-write),\n"
             "its pages read in in parallel; 'read': the data is read with pread into anonymous memory.\n"
             "dtype: a safetensors dtype name; tensors of F32/F16/BF16/F8_E4M3/F8_E5M2 (or only those named\n"
             "in convert_from) are converted to it (bit-identical to torch's .to()), others keep their dtype.");

static PyObject *load(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"paths", "dtype", "threads", "mode", "convert_from", NULL};
    module_state *st = state_of(module);
    PyObject *seq, *dtype_obj = Py_None, *from_obj = Py_None, *result = NULL;
    int threads = 1;
    const char *mode = "mmap";
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|Ois$O:load", kwlist, &seq, &dtype_obj, &threads, &mode,
                                     &from_obj))
        return NULL;
    int use_map;
    if (strcmp(mode, "mmap") == 0)
        use_map = 1;
    else if (strcmp(mode, "read") == 0)
        use_map = 0;
    else {
        PyErr_Format(PyExc_ValueError, "mode must be 'mmap' or 'read', not '%s'", mode);
        return NULL;
    }
    st_dtype target = ST_U8;
    int convert = dtype_obj != Py_None;
    if (convert && dtype_from_name(dtype_obj, &target) < 0)
        return NULL;
    convert = convert && cv_supported(target, target);
    unsigned convert_mask = 0; /* bit d: tensors of dtype d are converted */
    if (convert) {
        if (from_obj == Py_None) {
            for (int d = 0; d < ST_NDTYPES; d++)
                if (cv_supported((st_dtype)d, target))
                    convert_mask |= 1u << d;
        } else {
            PyObject *fast = PySequence_Fast(from_obj, "convert_from must be a sequence of dtype names");
            if (!fast)
                return NULL;
            for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast); i++) {
                st_dtype d;
                if (dtype_from_name(PySequence_Fast_GET_ITEM(fast, i), &d) < 0) {
                    Py_DECREF(fast);
                    return NULL;
                }
                if (cv_supported(d, target))
                    convert_mask |= 1u << d;
            }
            Py_DECREF(fast);
        }
        convert = convert_mask != 0;
    }
    Py_ssize_t n;
    path_arg *paths = paths_from(seq, &n);
    if (!paths)
        return NULL;
    load_plan plan;
    memset(&plan, 0, sizeof plan);
    ds_error err;
    err.input = -1;
    int rc;
    PyThreadState *ts = PyEval_SaveThread();
    poll_ctx pc = {&ts};
    rc = plan_load(&plan, paths, (size_t)n, use_map, convert ? convert_mask : 0, target, &err);
    if (!rc)
        rc = io_run(plan.n_tasks, threads, run_task, &plan, poll_signals, &pc, &err);
    if (!rc && convert) { /* files read rather than mapped (read mode, or no lease) */
        rc = plan_read_conversions(&plan, target, &err);
        if (!rc)
            rc = io_run(plan.n_tasks, threads, run_task, &plan, poll_signals, &pc, &err);
    }
    for (size_t i = 0; i < plan.n_files; i++)
        if (plan.files[i].opened)
            io_close(&plan.files[i].f);
    PyEval_RestoreThread(ts);
    if (rc) {
        Py_ssize_t which = err.input;
        raise_ds(st, &err, which >= 0 && which < n ? paths[which].display : NULL);
        plan_free(&plan);
        paths_free(paths, n);
        return NULL;
    }
    /* Hand the memory to Region objects, then build the tensors. */
    result = PyList_New(n);
    if (!result)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        load_file *lf = &plan.files[i];
        st_header *h = &lf->h;
        PyObject *base_region, *conv_region = NULL;
        char *base, *conv_base = lf->conv;
        if (lf->map) {
            base_region = region_new(st, lf->map, lf->map_len, 1);
            base = lf->map + h->data_start;
            lf->map = NULL;
        } else {
            base_region = region_new(st, lf->copy, lf->copy_len, 0);
            base = lf->copy;
            lf->copy = NULL;
        }
        if (!base_region)
            goto fail;
        if (lf->conv) {
            conv_region = region_new(st, lf->conv, lf->conv_len, 0);
            lf->conv = NULL;
            if (!conv_region) {
                Py_DECREF(base_region);
                goto fail;
            }
        }
        PyObject *list = PyList_New((Py_ssize_t)h->n_tensors);
        if (!list) {
            Py_DECREF(base_region);
            Py_XDECREF(conv_region);
            goto fail;
        }
        PyList_SET_ITEM(result, i, list);
        for (size_t k = 0; k < h->n_tensors; k++) {
            const st_tensor *t = &h->tensors[k];
            PyObject *tensor;
            if (lf->conv_off && lf->conv_off[k] != UINT64_MAX) {
                uint64_t numel = (t->end - t->begin) / (st_dtype_bits(t->dtype) / 8);
                tensor = tensor_new(st, conv_region, conv_base + lf->conv_off[k], target, t->ndim, t->shape,
                                    numel * (st_dtype_bits(target) / 8));
            } else {
                tensor = tensor_new(st, base_region, base + t->begin, t->dtype, t->ndim, t->shape, t->end - t->begin);
            }
            PyObject *name = tensor ? PyUnicode_FromStringAndSize(t->name, (Py_ssize_t)t->name_len) : NULL;
            PyObject *pair = name ? PyTuple_Pack(2, name, tensor) : NULL;
            Py_XDECREF(name);
            Py_XDECREF(tensor);
            if (!pair) {
                Py_DECREF(base_region);
                Py_XDECREF(conv_region);
                goto fail;
            }
            PyList_SET_ITEM(list, (Py_ssize_t)k, pair);
        }
        Py_DECREF(base_region);
        Py_XDECREF(conv_region);
    }
    plan_free(&plan);
    paths_free(paths, n);
    return result;
fail:
    Py_XDECREF(result);
    plan_free(&plan);
    paths_free(paths, n);
    return NULL;
}

/* ---- conversion (tests, small arrays) ------------------------------------------ */

PyDoc_STRVAR(convert_doc, "convert(src_dtype, dst_dtype, data, *, portable=False, rules=None) -> bytes\n\n"
                          "Converts the elements in a bytes-like object between F32, F16, BF16, F8_E4M3 and\n"
                          "F8_E5M2 with the CPU path of the loader; portable=True avoids the F16C instructions\n"
                          "so that tests can check the shared helpers of kernels/dtype.h. rules=(nan, saturate)\n"
                          "runs those helpers element by element with the CUDA kernels' rules instead.");

static PyObject *convert(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"src_dtype", "dst_dtype", "data", "portable", "rules", NULL};
    (void)module;
    PyObject *src_obj, *dst_obj, *data, *rules = Py_None;
    st_dtype src, dst;
    int portable = 0, nan = 0, saturate = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "UUO|$pO:convert", kwlist, &src_obj, &dst_obj, &data, &portable,
                                     &rules))
        return NULL;
    if (rules != Py_None && !PyArg_ParseTuple(rules, "ii:rules", &nan, &saturate))
        return NULL;
    if (dtype_from_name(src_obj, &src) < 0 || dtype_from_name(dst_obj, &dst) < 0)
        return NULL;
    if (!cv_supported(src, dst)) {
        PyErr_Format(PyExc_ValueError, "no conversion from %s to %s", st_dtype_name(src), st_dtype_name(dst));
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    size_t in_size = st_dtype_bits(src) / 8, out_size = st_dtype_bits(dst) / 8;
    if ((size_t)view.len % in_size) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "%zd bytes is not a whole number of %s elements", view.len,
                     st_dtype_name(src));
        return NULL;
    }
    size_t n = (size_t)view.len / in_size;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * out_size));
    if (out) {
        char *o = PyBytes_AS_STRING(out);
        int by_rules = rules != Py_None;
        Py_BEGIN_ALLOW_THREADS if (by_rules) cv_run_rules(src, dst, view.buf, o, n, nan, saturate);
        else if (portable) cv_run_with(src, dst, view.buf, o, n, 0);
        else cv_run(src, dst, view.buf, o, n);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&view);
    return out;
}

PyDoc_STRVAR(convert_into_doc, "convert_into(src_dtype, dst_dtype, src, dst, threads=1) -> None\n\n"
                               "Converts the elements of the buffer src into the writable buffer dst (same\n"
                               "element count, no overlap) on `threads` threads, with the GIL released: the\n"
                               "CPU cast of the VRAM-managed layers (fp8 storage, bf16 computation).");

typedef struct {
    st_dtype src, dst;
    const char *in;
    char *out;
    size_t n, in_size, out_size;
} convert_job;

static int convert_task(void *ctx, size_t task, ds_error *err) {
    (void)err;
    const convert_job *j = ctx;
    size_t begin = task * CONVERT_CHUNK, k = j->n - begin < CONVERT_CHUNK ? j->n - begin : CONVERT_CHUNK;
    cv_run(j->src, j->dst, j->in + begin * j->in_size, j->out + begin * j->out_size, k);
    return 0;
}

static PyObject *convert_into(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"src_dtype", "dst_dtype", "src", "dst", "threads", NULL};
    (void)module;
    PyObject *src_obj, *dst_obj, *src, *dst, *result = NULL;
    int threads = 1;
    convert_job job;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "UUOO|i:convert_into", kwlist, &src_obj, &dst_obj, &src, &dst,
                                     &threads))
        return NULL;
    if (dtype_from_name(src_obj, &job.src) < 0 || dtype_from_name(dst_obj, &job.dst) < 0)
        return NULL;
    if (!cv_supported(job.src, job.dst))
        return PyErr_Format(PyExc_ValueError, "no conversion from %s to %s", st_dtype_name(job.src),
                            st_dtype_name(job.dst));
    Py_buffer in, out;
    if (PyObject_GetBuffer(src, &in, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(dst, &out, PyBUF_SIMPLE | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&in);
        return NULL;
    }
    job.in_size = st_dtype_bits(job.src) / 8;
    job.out_size = st_dtype_bits(job.dst) / 8;
    job.n = (size_t)in.len / job.in_size;
    job.in = in.buf;
    job.out = out.buf;
    const char *in_end = job.in + in.len, *out_end = job.out + out.len;
    if ((size_t)in.len % job.in_size) {
        PyErr_Format(PyExc_ValueError, "convert_into: %zd bytes is not a whole number of %s elements", in.len,
                     st_dtype_name(job.src));
    } else if ((size_t)out.len != job.n * job.out_size) {
        PyErr_Format(PyExc_ValueError, "convert_into: %zu %s elements need %zu bytes, dst has %zd", job.n,
                     st_dtype_name(job.dst), job.n * job.out_size, out.len);
    } else if (job.n && job.in < out_end && job.out < in_end) {
        PyErr_SetString(PyExc_ValueError, "convert_into: src and dst overlap");
    } else {
        ds_error err;
        memset(&err, 0, sizeof err);
        size_t n_tasks = (job.n + CONVERT_CHUNK - 1) / CONVERT_CHUNK;
        Py_BEGIN_ALLOW_THREADS io_run(n_tasks, threads < 1 ? 1 : threads, convert_task, &job, NULL, NULL, &err);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&out);
    PyBuffer_Release(&in);
    return result;
}

/* ---- the SIGBUS guard of file mappings (guard.h) -------------------------------------- */

static void guard_notify(void) {
    /* async-signal-safe: Python runs its SIGBUS handler (diffsynth_c.loader.guard) at its next check */
    PyErr_SetInterruptEx(SIGBUS);
}

PyDoc_STRVAR(guard_install_doc, "guard_install(notify=True) -> None\n\n"
                                "Installs the SIGBUS handler that keeps a truncated file's mappings readable (as zeros).\n"
                                "With notify, each guarded fault also makes Python run its own SIGBUS handler.");

static PyObject *guard_install(PyObject *module, PyObject *args) {
    (void)module;
    int notify = 1;
    if (!PyArg_ParseTuple(args, "|p:guard_install", &notify))
        return NULL;
    if (mg_install(notify ? guard_notify : NULL) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(guard_faults_doc, "guard_faults() -> list of str\n\n"
                               "The files whose mappings faulted (were truncated under them) since the last call.");

static PyObject *guard_faults(PyObject *module, PyObject *noargs) {
    (void)module;
    (void)noargs;
    char *labels[64];
    size_t n = mg_take_faults(labels, 64);
    PyObject *out = PyList_New(0);
    for (size_t i = 0; i < n; i++) {
        PyObject *s = out ? PyUnicode_DecodeFSDefault(labels[i]) : NULL;
        if (!s || PyList_Append(out, s) < 0)
            Py_CLEAR(out);
        Py_XDECREF(s);
        free(labels[i]);
    }
    return out;
}

/* ---- files and items of read_into / cuda_upload ------------------------------------- */

/* The files named by `paths` and the item tuples that point into them. */
typedef struct {
    path_arg *paths;
    Py_ssize_t n_paths;
    PyObject *items; /* PySequence_Fast of the item tuples */
    Py_ssize_t n_items;
    io_file *files;
    int *opened;
} item_files;

static void item_files_free(item_files *f) {
    Py_XDECREF(f->items);
    if (f->paths)
        paths_free(f->paths, f->n_paths);
    PyMem_Free(f->files);
    PyMem_Free(f->opened);
}

static int item_files_init(item_files *f, PyObject *seq, PyObject *items_obj) {
    memset(f, 0, sizeof *f);
    f->paths = paths_from(seq, &f->n_paths);
    if (!f->paths)
        return -1;
    f->items = PySequence_Fast(items_obj, "items must be a sequence of tuples");
    if (!f->items)
        return -1;
    f->n_items = PySequence_Fast_GET_SIZE(f->items);
    f->files = PyMem_Calloc(f->n_paths ? (size_t)f->n_paths : 1, sizeof *f->files);
    f->opened = PyMem_Calloc(f->n_paths ? (size_t)f->n_paths : 1, sizeof *f->opened);
    if (!f->files || !f->opened) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* Item i's file index, checked against the paths. */
static int item_file(item_files *f, Py_ssize_t i, int file, const char *what) {
    if (file < 0 || file >= f->n_paths) {
        PyErr_Format(PyExc_IndexError, "%s: item %zd names file %d of %zd", what, i, file, f->n_paths);
        return -1;
    }
    return 0;
}

/* Opens every file; runs without the GIL. err->input names the file that failed. */
static int item_files_open(item_files *f, ds_error *err) {
    for (Py_ssize_t i = 0; i < f->n_paths; i++) {
        if (io_open(PyBytes_AS_STRING(f->paths[i].fs), &f->files[i], err)) {
            err->input = (int)i;
            return -1;
        }
        f->opened[i] = 1;
    }
    return 0;
}

static void item_files_close(item_files *f) {
    for (Py_ssize_t i = 0; i < f->n_paths; i++)
        if (f->opened[i]) {
            io_close(&f->files[i]);
            f->opened[i] = 0;
        }
}

static PyObject *item_files_raise(module_state *st, item_files *f, const ds_error *err) {
    return raise_ds(st, err, err->input >= 0 && err->input < f->n_paths ? f->paths[err->input].display : NULL);
}

/* ---- reads into caller-owned memory (pinned loads) ------------------------------ */

PyDoc_STRVAR(read_into_doc,
             "read_into(paths, items, threads=1)\n\n"
             "Reads tensors into memory the caller owns. items: (file, offset, nbytes, src_dtype, dst_dtype,\n"
             "address, key) with file an index into paths and offset absolute; src_dtype != dst_dtype converts\n"
             "(F32/F16/BF16/F8_E4M3/F8_E5M2) as load() does. The caller keeps the memory alive.");

static PyObject *read_into(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"paths", "items", "threads", NULL};
    module_state *st = state_of(module);
    PyObject *seq, *items_obj, *result = NULL;
    int threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|i:read_into", kwlist, &seq, &items_obj, &threads))
        return NULL;
    item_files f;
    ri_item *items = NULL;
    if (item_files_init(&f, seq, items_obj) < 0)
        goto done;
    items = PyMem_Calloc(f.n_items ? (size_t)f.n_items : 1, sizeof *items);
    if (!items) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < f.n_items; i++) {
        int file;
        unsigned long long off, nbytes;
        PyObject *src, *dst, *addr;
        const char *key;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(f.items, i), "iKKUUOs:read_into item", &file, &off, &nbytes,
                              &src, &dst, &addr, &key) ||
            item_file(&f, i, file, "read_into") < 0)
            goto done;
        if (dtype_from_name(src, &items[i].src) < 0 || dtype_from_name(dst, &items[i].dst) < 0)
            goto done;
        if (items[i].src != items[i].dst && !cv_supported(items[i].src, items[i].dst)) {
            PyErr_Format(PyExc_ValueError, "read_into: no conversion from %s to %s", st_dtype_name(items[i].src),
                         st_dtype_name(items[i].dst));
            goto done;
        }
        if (items[i].src != items[i].dst && nbytes % (st_dtype_bits(items[i].src) / 8)) {
            PyErr_Format(PyExc_ValueError, "read_into: tensor '%s': %llu bytes is not a whole number of elements", key,
                         nbytes);
            goto done;
        }
        items[i].out = PyLong_AsVoidPtr(addr);
        if (!items[i].out && PyErr_Occurred())
            goto done;
        items[i].file = file;
        items[i].offset = off;
        items[i].nbytes = nbytes;
        items[i].name = key; /* borrowed from the tuple, which f.items keeps alive */
    }
    ds_error err;
    err.input = -1;
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = item_files_open(&f, &err);
    for (Py_ssize_t i = 0; !rc && i < f.n_items; i++)
        items[i].fd = f.files[items[i].file].fd;
    if (!rc)
        rc = ri_run(items, (size_t)f.n_items, threads, &err);
    item_files_close(&f);
    Py_END_ALLOW_THREADS if (rc) item_files_raise(st, &f, &err);
    else result = Py_NewRef(Py_None);
done:
    PyMem_Free(items);
    item_files_free(&f);
    return result;
}

/* ---- CUDA (kernels/, opened on demand) -------------------------------------------- */

PyDoc_STRVAR(cuda_open_doc, "cuda_open(path) -> None or str\n\n"
                            "Opens the CUDA library built from kernels/; returns None, or why it cannot be used.");

static PyObject *cuda_open(PyObject *module, PyObject *arg) {
    (void)module;
    PyObject *fs;
    if (!PyUnicode_FSConverter(arg, &fs))
        return NULL;
    char why[512] = "";
    const cu_api *api = cu_open(PyBytes_AS_STRING(fs), why, sizeof why);
    Py_DECREF(fs);
    if (!api)
        return PyUnicode_FromString(why);
    Py_RETURN_NONE;
}

static const cu_api *cuda_api(void) {
    const cu_api *api = cu_get();
    if (!api)
        PyErr_SetString(PyExc_RuntimeError, "the CUDA library is not loaded (diffsynth_c.cuda_available() is False)");
    return api;
}

static PyObject *cuda_device_count(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    const cu_api *api = cuda_api();
    if (!api)
        return NULL;
    char why[512] = "";
    int n;
    Py_BEGIN_ALLOW_THREADS n = api->device_count(why, sizeof why);
    Py_END_ALLOW_THREADS return Py_BuildValue("(is)", n, why);
}

static int dsk_from_name(PyObject *name, int *out) {
    static const char *names[] = {"F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"};
    const char *s = PyUnicode_AsUTF8(name);
    if (!s)
        return -1;
    for (int i = 0; i < DSK_NTYPES; i++)
        if (strcmp(s, names[i]) == 0) {
            *out = i;
            return 0;
        }
    PyErr_Format(PyExc_TypeError, "the CUDA kernels take F32, F16, BF16, F8_E4M3 or F8_E5M2, not %s", s);
    return -1;
}

/* What a kernel needs of a DLPack capsule (the consumer side: the capsule keeps its producer's
 * memory alive while we hold it, and its own destructor runs the deleter). */
typedef struct {
    void *data;
    int device;
    int bits;
    uint64_t numel;
    int64_t last; /* size of the last dimension (1 for a scalar) */
} dl_view;

static int dl_view_of(PyObject *cap, const char *what, int dsk, dl_view *v) {
    const DLTensor *t;
    if (PyCapsule_IsValid(cap, "dltensor_versioned"))
        t = &((DLManagedTensorVersioned *)PyCapsule_GetPointer(cap, "dltensor_versioned"))->dl_tensor;
    else if (PyCapsule_IsValid(cap, "dltensor"))
        t = &((DLManagedTensor *)PyCapsule_GetPointer(cap, "dltensor"))->dl_tensor;
    else {
        PyErr_Format(PyExc_TypeError, "%s: expected an unconsumed DLPack capsule", what);
        return -1;
    }
    if (t->device.device_type != DL_CUDA) {
        PyErr_Format(PyExc_ValueError, "%s: the tensor is not in CUDA device memory (DLPack device type %d)", what,
                     (int)t->device.device_type);
        return -1;
    }
    static const int sizes[] = {32, 16, 16, 8, 8};
    if ((int)t->dtype.bits * (int)t->dtype.lanes != sizes[dsk]) {
        PyErr_Format(PyExc_TypeError, "%s: elements of %d bits do not hold the dtype asked for", what,
                     (int)t->dtype.bits * (int)t->dtype.lanes);
        return -1;
    }
    uint64_t numel = 1, expect = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {
        if (t->shape[d] < 0) {
            PyErr_Format(PyExc_ValueError, "%s: negative dimension", what);
            return -1;
        }
        if (t->strides && t->shape[d] != 1 && (uint64_t)t->strides[d] != expect) {
            PyErr_Format(PyExc_ValueError, "%s: the tensor is not contiguous (call .contiguous() first)", what);
            return -1;
        }
        expect *= (uint64_t)t->shape[d];
        numel *= (uint64_t)t->shape[d];
    }
    v->data = (char *)t->data + t->byte_offset;
    v->device = t->device.device_id;
    v->bits = sizes[dsk];
    v->numel = numel;
    v->last = t->ndim ? t->shape[t->ndim - 1] : 1;
    return 0;
}

static PyObject *raise_cuda(const char *msg) {
    PyErr_SetString(PyExc_RuntimeError, msg);
    return NULL;
}

static int stream_of(PyObject *obj, void **out) {
    *out = PyLong_AsVoidPtr(obj);
    return (*out == NULL && PyErr_Occurred()) ? -1 : 0;
}

PyDoc_STRVAR(cuda_cast_doc, "cuda_cast(src, dst, src_dtype, dst_dtype, stream, nan=1, saturate=0)\n\n"
                            "dst = src converted, on the CUDA stream given as an int; src and dst are DLPack\n"
                            "capsules of contiguous tensors on the same device with as many elements.");

static PyObject *cuda_cast(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"src", "dst", "src_dtype", "dst_dtype", "stream", "nan", "saturate", NULL};
    (void)module;
    PyObject *src, *dst, *sn, *dn, *stream_obj;
    int nan = 1, saturate = 0, s, d;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOUUO|ii:cuda_cast", kwlist, &src, &dst, &sn, &dn, &stream_obj,
                                     &nan, &saturate))
        return NULL;
    const cu_api *api = cuda_api();
    dl_view a, b;
    void *stream;
    if (!api || dsk_from_name(sn, &s) < 0 || dsk_from_name(dn, &d) < 0 || dl_view_of(src, "cast: src", s, &a) < 0 ||
        dl_view_of(dst, "cast: dst", d, &b) < 0 || stream_of(stream_obj, &stream) < 0)
        return NULL;
    if (a.device != b.device)
        return PyErr_Format(PyExc_ValueError, "cast: src is on cuda:%d, dst on cuda:%d", a.device, b.device);
    if (a.numel != b.numel)
        return PyErr_Format(PyExc_ValueError, "cast: src has %llu elements, dst %llu", (unsigned long long)a.numel,
                            (unsigned long long)b.numel);
    char msg[512];
    int rc;
    dsk_rules rules = {nan, saturate};
    Py_BEGIN_ALLOW_THREADS rc = api->cast(a.device, a.data, (dsk_dtype)s, b.data, (dsk_dtype)d, (size_t)a.numel, rules,
                                          stream, msg, sizeof msg);
    Py_END_ALLOW_THREADS if (rc) return raise_cuda(msg);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(cuda_norm_doc, "cuda_norm(layer, x, y, weight, bias, dtype, weight_dtype, eps, stream)\n\n"
                            "RMS norm (layer=False) or layer norm over the last dimension of x into y (DLPack capsules;\n"
                            "weight and bias may be None).");

static PyObject *cuda_norm(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *x, *y, *w, *b, *tn, *wn, *stream_obj;
    int layer, t, wt;
    double eps;
    if (!PyArg_ParseTuple(args, "pOOOOUUdO:cuda_norm", &layer, &x, &y, &w, &b, &tn, &wn, &eps, &stream_obj))
        return NULL;
    const cu_api *api = cuda_api();
    dl_view xv, yv, wv = {0}, bv = {0};
    void *stream;
    if (!api || dsk_from_name(tn, &t) < 0 || dsk_from_name(wn, &wt) < 0 || dl_view_of(x, "norm: x", t, &xv) < 0 ||
        dl_view_of(y, "norm: out", t, &yv) < 0 || (w != Py_None && dl_view_of(w, "norm: weight", wt, &wv) < 0) ||
        (b != Py_None && dl_view_of(b, "norm: bias", wt, &bv) < 0) || stream_of(stream_obj, &stream) < 0)
        return NULL;
    if (t == DSK_E4M3 || t == DSK_E5M2 || wt == DSK_E4M3 || wt == DSK_E5M2)
        return PyErr_Format(PyExc_TypeError, "norm: F32, F16 or BF16 only");
    uint64_t cols = (uint64_t)xv.last;
    if (xv.numel != yv.numel)
        return PyErr_Format(PyExc_ValueError, "norm: x has %llu elements, out %llu", (unsigned long long)xv.numel,
                            (unsigned long long)yv.numel);
    if ((w != Py_None && wv.numel != cols) || (b != Py_None && bv.numel != cols))
        return PyErr_Format(PyExc_ValueError, "norm: weight and bias must have %llu elements (x's last dimension)",
                            (unsigned long long)cols);
    if (yv.device != xv.device || (w != Py_None && wv.device != xv.device) || (b != Py_None && bv.device != xv.device))
        return PyErr_Format(PyExc_ValueError, "norm: all tensors must be on cuda:%d", xv.device);
    uint64_t rows = cols ? xv.numel / cols : 0;
    char msg[512];
    int rc;
    Py_BEGIN_ALLOW_THREADS if (layer) rc =
        api->layer_norm(xv.device, xv.data, yv.data, (dsk_dtype)t, w != Py_None ? wv.data : NULL,
                        b != Py_None ? bv.data : NULL, (dsk_dtype)wt, (size_t)rows, (size_t)cols, (float)eps, stream,
                        msg, sizeof msg);
    else rc = api->rms_norm(xv.device, xv.data, yv.data, (dsk_dtype)t, w != Py_None ? wv.data : NULL, (dsk_dtype)wt,
                            (size_t)rows, (size_t)cols, (float)eps, stream, msg, sizeof msg);
    Py_END_ALLOW_THREADS if (rc) return raise_cuda(msg);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(cuda_upload_doc,
             "cuda_upload(paths, items, device, scratch, scratch_bytes, threads, stream, nan=1, saturate=0)\n\n"
             "Reads tensors from files into CUDA memory through pinned staging buffers. items: (file, offset,\n"
             "nbytes, src_dtype or None, dst_dtype or None, address); None copies the bytes as they are.\n"
             "A failed read raises RuntimeError(message, item index).");

static PyObject *cuda_upload(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"paths", "items", "device", "scratch", "scratch_bytes", "threads", "stream", "nan",
                             "saturate", NULL};
    module_state *st = state_of(module);
    PyObject *seq, *items_obj, *scratch_obj, *stream_obj, *result = NULL;
    int device, threads, nan = 1, saturate = 0;
    unsigned long long scratch_bytes;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOiOKiO|ii:cuda_upload", kwlist, &seq, &items_obj, &device,
                                     &scratch_obj, &scratch_bytes, &threads, &stream_obj, &nan, &saturate))
        return NULL;
    const cu_api *api = cuda_api();
    void *scratch, *stream;
    if (!api || stream_of(scratch_obj, &scratch) < 0 || stream_of(stream_obj, &stream) < 0)
        return NULL;
    item_files f;
    dsk_item *items = NULL;
    int *item_fi = NULL;
    if (item_files_init(&f, seq, items_obj) < 0)
        goto done;
    items = PyMem_Calloc(f.n_items ? (size_t)f.n_items : 1, sizeof *items);
    item_fi = PyMem_Calloc(f.n_items ? (size_t)f.n_items : 1, sizeof *item_fi);
    if (!items || !item_fi) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < f.n_items; i++) {
        unsigned long long off, nbytes;
        PyObject *src, *dst, *addr;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(f.items, i), "iKKOOO:cuda_upload item", &item_fi[i], &off,
                              &nbytes, &src, &dst, &addr) ||
            item_file(&f, i, item_fi[i], "cuda_upload") < 0)
            goto done;
        items[i].src_t = items[i].dst_t = -1;
        if (src != Py_None && (dsk_from_name(src, &items[i].src_t) < 0 || dsk_from_name(dst, &items[i].dst_t) < 0))
            goto done;
        items[i].dst = PyLong_AsVoidPtr(addr);
        if (!items[i].dst && PyErr_Occurred())
            goto done;
        items[i].offset = off;
        items[i].nbytes = nbytes;
    }
    ds_error err;
    err.input = -1;
    char msg[512] = "";
    size_t bad = (size_t)-1;
    int rc, cuda_rc = 0;
    Py_BEGIN_ALLOW_THREADS rc = item_files_open(&f, &err);
    if (!rc) {
        for (Py_ssize_t i = 0; i < f.n_items; i++)
            items[i].fd = f.files[item_fi[i]].fd;
        dsk_rules rules = {nan, saturate};
        cuda_rc = api->upload(device, items, (size_t)f.n_items, scratch, (size_t)scratch_bytes, threads, rules, stream,
                              &bad, msg, sizeof msg);
    }
    item_files_close(&f);
    Py_END_ALLOW_THREADS if (rc) item_files_raise(st, &f, &err);
    else if (cuda_rc) {
        PyObject *exc_args = Py_BuildValue("(sn)", msg, bad == (size_t)-1 ? (Py_ssize_t)-1 : (Py_ssize_t)bad);
        if (exc_args) {
            PyErr_SetObject(PyExc_RuntimeError, exc_args);
            Py_DECREF(exc_args);
        }
    } else
        result = Py_NewRef(Py_None);
done:
    PyMem_Free(items);
    PyMem_Free(item_fi);
    item_files_free(&f);
    return result;
}

/* ---- torch.save checkpoints ----------------------------------------------------------- */

static PyStructSequence_Field tensor_ref_fields[] = {
    {"storage", "index into the storages list"},
    {"dtype", "safetensors dtype name of the elements"},
    {"offset", "storage offset, in elements"},
    {"shape", "tuple of sizes"},
    {"stride", "tuple of strides, in elements"},
    {"requires_grad", "as saved"},
    {"parameter", "saved as an nn.Parameter"},
    {"metadata", "the tensor's saved metadata (e.g. {'conj': True}, {'neg': True}), or None"},
    {"state", "the Python attributes saved with an nn.Parameter (a dict), or None"},
    {NULL, NULL},
};

static PyStructSequence_Desc tensor_ref_desc = {
    "diffsynth_c._core.TensorRef",
    "A tensor of a checkpoint as data.pkl describes it: a view into one of its storages.",
    tensor_ref_fields,
    9,
};

/* Converting a pickle graph: one Python object per pickle object (built[id]), so shared objects
 * stay shared (and `is` the same) and the work is linear in the pickle, cycles included. */
typedef struct {
    module_state *st;
    PyObject **built; /* by pk_obj id; new references, freed with the walk */
    size_t n;
    size_t until_check; /* Ctrl-C is checked every PK_POLL_EVERY objects */
} py_walk;

static PyObject *pk_to_py(py_walk *w, const pk_obj *o, int depth);

/* Sets the attributes that BUILD gave an OrderedDict: obj.__dict__.update(state), as torch does. */
static int set_odict_state(py_walk *w, PyObject *obj, const pk_obj *state, int depth) {
    PyObject *st = pk_to_py(w, state, depth + 1), *d = st ? PyObject_GetAttrString(obj, "__dict__") : NULL;
    int rc = d ? PyDict_Update(d, st) : -1;
    Py_XDECREF(d);
    Py_XDECREF(st);
    return rc;
}

static PyObject *pk_to_py_new(py_walk *w, const pk_obj *o, int depth) {
    module_state *st = w->st;
    switch (o->kind) {
    case PK_NONE: Py_RETURN_NONE;
    case PK_BOOL: return PyBool_FromLong((long)o->u.i);
    case PK_INT: return PyLong_FromLongLong(o->u.i);
    case PK_FLOAT: return PyFloat_FromDouble(o->u.f);
    case PK_STR: return PyUnicode_DecodeUTF8(o->u.str.s, (Py_ssize_t)o->u.str.len, "surrogatepass");
    case PK_BYTES: return PyBytes_FromStringAndSize(o->u.str.s, (Py_ssize_t)o->u.str.len);
    case PK_TUPLE:
    case PK_LIST: {
        /* registered before its items are built: an item may refer back to it (a cycle through a list) */
        PyObject *r = o->kind == PK_TUPLE ? PyTuple_New((Py_ssize_t)o->u.seq.n) : PyList_New((Py_ssize_t)o->u.seq.n);
        if (!r)
            return NULL;
        for (size_t i = 0; i < o->u.seq.n; i++) /* never a NULL item, even while it is being filled */
            if (o->kind == PK_TUPLE)
                PyTuple_SET_ITEM(r, (Py_ssize_t)i, Py_NewRef(Py_None));
            else
                PyList_SET_ITEM(r, (Py_ssize_t)i, Py_NewRef(Py_None));
        w->built[o->id] = Py_NewRef(r);
        for (size_t i = 0; i < o->u.seq.n; i++) {
            PyObject *v = pk_to_py(w, o->u.seq.v[i], depth + 1);
            if (!v) {
                Py_DECREF(r);
                return NULL;
            }
            PyObject **slot = o->kind == PK_TUPLE ? &PyTuple_GET_ITEM(r, (Py_ssize_t)i) : &PyList_GET_ITEM(r, (Py_ssize_t)i);
            Py_SETREF(*slot, v);
        }
        return r;
    }
    case PK_DICT:
    case PK_ODICT: {
        PyObject *r = o->kind == PK_DICT ? PyDict_New() : PyObject_CallNoArgs(st->OrderedDict);
        if (!r)
            return NULL;
        w->built[o->id] = Py_NewRef(r);
        for (size_t i = 0; i + 1 < o->u.seq.n; i += 2) {
            PyObject *k = pk_to_py(w, o->u.seq.v[i], depth + 1);
            PyObject *v = k ? pk_to_py(w, o->u.seq.v[i + 1], depth + 1) : NULL;
            int bad = !v;
            if (v && PyObject_SetItem(r, k, v) < 0) {
                bad = 1;
                if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                    PyErr_Clear();
                    PyErr_Format(st->FormatError, "data.pkl has a dict key of type %s", Py_TYPE(k)->tp_name);
                }
            }
            Py_XDECREF(k);
            Py_XDECREF(v);
            if (bad) {
                Py_DECREF(r);
                return NULL;
            }
        }
        if (o->state && set_odict_state(w, r, o->state, depth) < 0) {
            Py_DECREF(r);
            return NULL;
        }
        return r;
    }
    case PK_TENSOR: {
        const pk_tensor *t = o->u.tensor;
        PyObject *r = PyStructSequence_New(st->TensorRefType);
        if (!r)
            return NULL;
        PyObject *vals[9] = {
            PyLong_FromSize_t(t->storage->u.storage.index),
            PyUnicode_FromString(st_dtype_name((st_dtype)t->dtype)),
            PyLong_FromUnsignedLongLong(t->offset),
            shape_tuple(t->ndim, t->size),
            shape_tuple(t->ndim, t->stride),
            PyBool_FromLong(t->requires_grad),
            PyBool_FromLong(t->parameter),
            t->metadata ? pk_to_py(w, t->metadata, depth + 1) : Py_NewRef(Py_None),
            t->state ? pk_to_py(w, t->state, depth + 1) : Py_NewRef(Py_None),
        };
        int ok = 1;
        for (int i = 0; i < 9; i++) {
            if (!vals[i])
                ok = 0;
            PyStructSequence_SET_ITEM(r, i, vals[i] ? vals[i] : Py_NewRef(Py_None));
        }
        if (!ok) {
            Py_DECREF(r);
            return NULL;
        }
        return r;
    }
    default:
        PyErr_SetString(st->FormatError, "data.pkl holds a value this reader does not represent");
        return NULL;
    }
}

/* The Python value of a pickle object (a new reference); tensors become TensorRef. */
static PyObject *pk_to_py(py_walk *w, const pk_obj *o, int depth) {
    if (o->id < w->n && w->built[o->id])
        return Py_NewRef(w->built[o->id]);
    if (depth > 1000) {
        PyErr_SetString(w->st->FormatError, "data.pkl nests containers more than 1000 deep");
        return NULL;
    }
    if (--w->until_check == 0) {
        w->until_check = PK_POLL_EVERY;
        if (PyErr_CheckSignals() < 0)
            return NULL;
    }
    PyObject *r = pk_to_py_new(w, o, depth);
    if (r && o->id < w->n && !w->built[o->id])
        w->built[o->id] = Py_NewRef(r);
    return r;
}

/* Tests only: a sleep per pickle opcode, so that a run lasts long enough to be interrupted. */
static unsigned pickle_delay_us;

PyDoc_STRVAR(debug_pickle_delay_doc, "_debug_pickle_delay(us) -> None\n\n"
                                     "Tests only: sleep us microseconds per pickle opcode in torch_read (0: off).");

static PyObject *debug_pickle_delay(PyObject *module, PyObject *arg) {
    (void)module;
    unsigned long us = PyLong_AsUnsignedLong(arg);
    if (us == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    pickle_delay_us = (unsigned)us;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(torch_read_doc,
             "torch_read(path, allowed=()) -> (obj, storages)\n\n"
             "Reads a torch.save checkpoint's zip directory and data.pkl (nothing else) through the restricted\n"
             "pickle machine. obj: the saved value, tensors as TensorRef (an object the pickle shares is one\n"
             "object here too); storages: list of (key, dtype or None for untyped, nbytes, file offset).\n"
             "allowed: 'module.name' strings of globals the user allowed torch.load to resolve; the file is\n"
             "then left to torch.load. Raises NotNativeError (a FormatError) for a file this reader does not\n"
             "represent (legacy format, big-endian, constructs outside its allow-list that torch accepts),\n"
             "FormatError for a malformed one or one that names a refused global, KeyboardInterrupt on Ctrl-C.");

static PyObject *torch_read(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"path", "allowed", NULL};
    module_state *st = state_of(module);
    PyObject *path, *allowed_obj = NULL, *fs = NULL, *display = NULL, *obj = NULL, *stor = NULL, *result = NULL;
    PyObject *allowed_fast = NULL;
    const char **allowed = NULL;
    py_walk w = {st, NULL, 0, PK_POLL_EVERY};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O:torch_read", kwlist, &path, &allowed_obj))
        return NULL;
    if (!PyUnicode_FSConverter(path, &fs))
        return NULL;
    pk_options opt;
    memset(&opt, 0, sizeof opt);
    if (allowed_obj) {
        allowed_fast = PySequence_Fast(allowed_obj, "allowed must be a sequence of str");
        if (!allowed_fast)
            goto done;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(allowed_fast);
        allowed = PyMem_Calloc(n ? (size_t)n : 1, sizeof *allowed);
        if (!allowed) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t i = 0; i < n; i++)
            if (!(allowed[i] = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(allowed_fast, i))))
                goto done;
        opt.allowed = allowed;
        opt.n_allowed = (size_t)n;
    }
    display = PyUnicode_DecodeFSDefault(PyBytes_AS_STRING(fs));
    if (!display)
        goto done;
    tf_checkpoint c;
    ds_error err;
    err.input = -1;
    PyThreadState *ts = NULL;
    poll_ctx pc = {&ts};
    opt.poll = poll_signals;
    opt.poll_ctx = &pc;
    opt.delay_us = pickle_delay_us;
    ts = PyEval_SaveThread();
    int rc = tf_open(PyBytes_AS_STRING(fs), &opt, &c, &err);
    PyEval_RestoreThread(ts);
    if (rc) {
        if (err.status == DS_ERR_UNSUPPORTED)
            PyErr_Format(st->NotNativeError, "%U: %s", display, err.msg);
        else
            raise_ds(st, &err, display);
        goto done;
    }
    w.n = c.pk.n_objs;
    w.built = PyMem_Calloc(w.n ? w.n : 1, sizeof *w.built);
    obj = w.built ? pk_to_py(&w, c.pk.root, 0) : PyErr_NoMemory();
    if (obj)
        stor = PyList_New((Py_ssize_t)c.pk.n_storages);
    for (size_t i = 0; stor && i < c.pk.n_storages; i++) {
        const pk_storage *s = &c.pk.storages[i]->u.storage;
        PyObject *item;
        if (s->dtype == PK_UNTYPED)
            item = Py_BuildValue("(s#OKK)", s->key, (Py_ssize_t)s->key_len, Py_None,
                                 (unsigned long long)c.storage_nbytes[i], (unsigned long long)c.storage_offset[i]);
        else
            item = Py_BuildValue("(s#sKK)", s->key, (Py_ssize_t)s->key_len, st_dtype_name((st_dtype)s->dtype),
                                 (unsigned long long)c.storage_nbytes[i], (unsigned long long)c.storage_offset[i]);
        if (!item)
            Py_CLEAR(stor);
        else
            PyList_SET_ITEM(stor, (Py_ssize_t)i, item);
    }
    tf_close(&c);
    if (obj && stor)
        result = PyTuple_Pack(2, obj, stor);
    else if (PyErr_ExceptionMatches(st->FormatError)) {
        /* name the file */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_Format(st->FormatError, "%U: %S", display, value ? value : Py_None);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
    }
done:
    for (size_t i = 0; w.built && i < w.n; i++)
        Py_XDECREF(w.built[i]);
    PyMem_Free(w.built);
    PyMem_Free(allowed);
    Py_XDECREF(allowed_fast);
    Py_XDECREF(obj);
    Py_XDECREF(stor);
    Py_XDECREF(display);
    Py_XDECREF(fs);
    return result;
}

PyDoc_STRVAR(map_ranges_doc,
             "map_ranges(path, ranges, threads=1, mode='mmap') -> list of Tensor\n\n"
             "Byte ranges (offset, nbytes) of one file as 1-D U8 Tensors sharing one Region, their pages read\n"
             "in on worker threads: a private mapping of the file (mode 'mmap') or pread into anonymous memory\n"
             "(mode 'read'). The ranges must lie inside the file.");

static PyObject *map_ranges(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"path", "ranges", "threads", "mode", NULL};
    module_state *st = state_of(module);
    PyObject *path, *ranges_obj, *fs = NULL, *display = NULL, *fast = NULL, *result = NULL, *region = NULL;
    int threads = 1;
    const char *mode = "mmap";
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|is:map_ranges", kwlist, &path, &ranges_obj, &threads, &mode))
        return NULL;
    int use_map = strcmp(mode, "read") != 0;
    if (use_map && strcmp(mode, "mmap") != 0)
        return PyErr_Format(PyExc_ValueError, "mode must be 'mmap' or 'read', not '%s'", mode);
    if (!PyUnicode_FSConverter(path, &fs))
        return NULL;
    load_plan plan;
    memset(&plan, 0, sizeof plan);
    uint64_t *offs = NULL, *lens = NULL, *dest = NULL;
    display = PyUnicode_DecodeFSDefault(PyBytes_AS_STRING(fs));
    fast = display ? PySequence_Fast(ranges_obj, "ranges must be a sequence of (offset, nbytes)") : NULL;
    if (!fast)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    offs = PyMem_Calloc(n ? (size_t)n : 1, sizeof *offs);
    lens = PyMem_Calloc(n ? (size_t)n : 1, sizeof *lens);
    dest = PyMem_Calloc(n ? (size_t)n : 1, sizeof *dest);
    if (!offs || !lens || !dest) {
        PyErr_NoMemory();
        goto done;
    }
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long o, l;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "KK:range", &o, &l))
            goto done;
        offs[i] = o;
        lens[i] = l;
        dest[i] = total;
        total += (l + 63) & ~(uint64_t)63;
    }
    ds_error err;
    err.input = -1;
    int rc = 0;
    load_file *lf = NULL;
    Py_BEGIN_ALLOW_THREADS plan.files = calloc(1, sizeof *plan.files);
    plan.n_files = 1;
    if (!plan.files)
        rc = ds_fail(&err, DS_ERR_NOMEM, "out of memory");
    lf = plan.files;
    if (!rc && !(rc = io_open(PyBytes_AS_STRING(fs), &lf->f, &err)))
        lf->opened = 1;
    for (Py_ssize_t i = 0; !rc && i < n; i++)
        if (offs[i] > lf->f.size || lens[i] > lf->f.size - offs[i])
            rc = ds_fail(&err, DS_ERR_FORMAT, "bytes [%llu, %llu) are past the end of the file (%llu bytes)",
                         (unsigned long long)offs[i], (unsigned long long)(offs[i] + lens[i]),
                         (unsigned long long)lf->f.size);
    if (!rc && use_map) {
        lf->map_len = (size_t)lf->f.size;
        lf->map = lf->f.size ? io_map_file(lf->f.fd, lf->f.size, &err) : NULL;
        rc = lf->f.size && !lf->map;
        /* as a load's (protect_mapping): leased for the ranges, or read when no lease can be had */
        if (!rc && lf->map && ml_protect(lf->map, lf->map_len, lf->f.fd, offs, lens, (size_t)n) != 0) {
            io_release(lf->map, lf->map_len);
            lf->map = NULL;
            use_map = 0;
        }
        for (Py_ssize_t i = 0; !rc && use_map && i < n; i++)
            rc = add_byte_tasks(&plan, TASK_POPULATE, 0, lf->map + offs[i], NULL, 0, (size_t)lens[i], POPULATE_CHUNK,
                                &err);
    }
    if (!rc && !use_map) {
        lf->copy_len = (size_t)(total ? total : 1);
        lf->copy = io_alloc(lf->copy_len, &err);
        rc = !lf->copy;
        for (Py_ssize_t i = 0; !rc && i < n; i++)
            rc = add_byte_tasks(&plan, TASK_READ, 0, NULL, lf->copy + dest[i], offs[i], (size_t)lens[i], READ_CHUNK,
                                &err);
    }
    if (!rc)
        rc = io_run(plan.n_tasks, threads, run_task, &plan, NULL, NULL, &err);
    if (lf && lf->opened) {
        io_close(&lf->f);
        lf->opened = 0;
    }
    Py_END_ALLOW_THREADS if (rc) {
        raise_ds(st, &err, display);
        goto done;
    }
    char *base = use_map ? lf->map : lf->copy;
    region = use_map ? region_new(st, lf->map, lf->map_len, 1) : region_new(st, lf->copy, lf->copy_len, 0);
    lf->map = lf->copy = NULL;
    if (!region)
        goto done;
    result = PyList_New(n);
    for (Py_ssize_t i = 0; result && i < n; i++) {
        uint64_t shape[1] = {lens[i]};
        PyObject *t = tensor_new(st, region, base + (use_map ? offs[i] : dest[i]), ST_U8, 1, shape, lens[i]);
        if (!t)
            Py_CLEAR(result);
        else
            PyList_SET_ITEM(result, i, t);
    }
done:
    plan_free(&plan);
    PyMem_Free(offs);
    PyMem_Free(lens);
    PyMem_Free(dest);
    Py_XDECREF(region);
    Py_XDECREF(fast);
    Py_XDECREF(display);
    Py_XDECREF(fs);
    return result;
}

/* ---- lazy views of a mapped file (DiskMap) -------------------------------------------- */

PyDoc_STRVAR(map_file_doc, "map_file(path) -> Region\n\n"
                           "A private (copy-on-write) mapping of the whole file; nothing is read until a view asks.");

static PyObject *map_file(PyObject *module, PyObject *arg) {
    module_state *st = state_of(module);
    PyObject *fs = NULL, *display = NULL, *result = NULL;
    if (!PyUnicode_FSConverter(arg, &fs))
        return NULL;
    display = PyUnicode_DecodeFSDefault(PyBytes_AS_STRING(fs));
    if (!display)
        goto done;
    io_file f;
    ds_error err;
    void *map = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = io_open(PyBytes_AS_STRING(fs), &f, &err);
    if (!rc) {
        map = f.size ? io_map_file(f.fd, f.size, &err) : NULL;
        rc = f.size && !map;
        io_close(&f);
    }
    Py_END_ALLOW_THREADS if (rc) raise_ds(st, &err, display);
    else result = region_new(st, map, (size_t)f.size, 1);
done:
    Py_XDECREF(display);
    Py_XDECREF(fs);
    return result;
}

PyDoc_STRVAR(region_view_doc, "region_view(region, offset, nbytes, threads=1) -> Tensor\n\n"
                              "A 1-D U8 Tensor over [offset, offset+nbytes) of a file Region, its pages read in first\n"
                              "(on `threads` worker threads, GIL released).");

static PyObject *region_view(PyObject *module, PyObject *args) {
    module_state *st = state_of(module);
    PyObject *region_obj;
    unsigned long long off, nbytes;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "O!KK|i:region_view", st->RegionType, &region_obj, &off, &nbytes, &threads))
        return NULL;
    RegionObject *region = (RegionObject *)region_obj;
    if (off > region->len || nbytes > region->len - off)
        return PyErr_Format(PyExc_ValueError, "bytes [%llu, %llu) are outside the region of %zu bytes", off,
                            off + nbytes, region->len);
    load_plan plan;
    memset(&plan, 0, sizeof plan);
    ds_error err;
    err.input = -1;
    int rc = add_byte_tasks(&plan, TASK_POPULATE, 0, (char *)region->base + off, NULL, 0, (size_t)nbytes,
                            threads > 1 ? READ_CHUNK : POPULATE_CHUNK, &err);
    if (!rc) {
        Py_BEGIN_ALLOW_THREADS rc = io_run(plan.n_tasks, threads, run_task, &plan, NULL, NULL, &err);
        Py_END_ALLOW_THREADS
    }
    free(plan.tasks);
    if (rc)
        return raise_ds(st, &err, NULL);
    uint64_t shape[1] = {nbytes};
    return tensor_new(st, region_obj, (char *)region->base + off, ST_U8, 1, shape, nbytes);
}

/* ---- writing safetensors files (save_state_dict) ------------------------------------------ */

typedef struct {
    int fd;
    const char *src;
    size_t n;
    uint64_t off;
} write_task;

static int run_write(void *ctx, size_t i, ds_error *err) {
    write_task *t = &((write_task *)ctx)[i];
    return io_pwrite(t->fd, t->src, t->n, t->off, err);
}

PyDoc_STRVAR(write_file_doc,
             "write_file(path, header, items, threads=1)\n\n"
             "Writes a safetensors file: the 8-byte length of header (bytes, already padded), header, then for\n"
             "each item (address, nbytes) its bytes, in order, pwritten on `threads` threads. The file is written\n"
             "under a temporary name in the same folder, flushed, and renamed over path only when complete;\n"
             "on any failure the temporary file is removed and path is untouched. The caller keeps the\n"
             "memory alive.");

static PyObject *write_file(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"path", "header", "items", "threads", NULL};
    module_state *st = state_of(module);
    PyObject *path, *items_obj, *fs = NULL, *display = NULL, *fast = NULL, *result = NULL;
    Py_buffer header;
    int threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Oy*O|i:write_file", kwlist, &path, &header, &items_obj, &threads))
        return NULL;
    write_task *tasks = NULL;
    char *tmp = NULL;
    if (!PyUnicode_FSConverter(path, &fs))
        goto done;
    display = PyUnicode_DecodeFSDefault(PyBytes_AS_STRING(fs));
    fast = display ? PySequence_Fast(items_obj, "items must be a sequence of (address, nbytes)") : NULL;
    if (!fast)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    size_t n_tasks = 0, cap = (size_t)n + 1;
    tasks = PyMem_Malloc(cap * sizeof *tasks);
    if (!tasks) {
        PyErr_NoMemory();
        goto done;
    }
    uint64_t off = 8 + (uint64_t)header.len;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *addr;
        unsigned long long nbytes;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "OK:item", &addr, &nbytes))
            goto done;
        const char *src = PyLong_AsVoidPtr(addr);
        if (!src && PyErr_Occurred())
            goto done;
        for (uint64_t done = 0; done < nbytes; done += READ_CHUNK) { /* 8 MiB pieces */
            if (n_tasks == cap) {
                cap *= 2;
                write_task *t = PyMem_Realloc(tasks, cap * sizeof *t);
                if (!t) {
                    PyErr_NoMemory();
                    goto done;
                }
                tasks = t;
            }
            size_t len = nbytes - done < READ_CHUNK ? (size_t)(nbytes - done) : READ_CHUNK;
            tasks[n_tasks++] = (write_task){-1, src + done, len, off + done};
        }
        off += nbytes;
    }
    size_t plen = strlen(PyBytes_AS_STRING(fs));
    tmp = PyMem_Malloc(plen + 32);
    if (!tmp) {
        PyErr_NoMemory();
        goto done;
    }
    snprintf(tmp, plen + 32, "%s.tmp-%ld", PyBytes_AS_STRING(fs), (long)getpid());
    ds_error err;
    err.input = -1;
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        rc = ds_fail_os(&err, errno, "cannot create %s: %s", tmp, strerror(errno));
    uint8_t len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (uint8_t)((uint64_t)header.len >> (8 * i));
    if (!rc && ftruncate(fd, (off_t)off) != 0)
        rc = ds_fail_os(&err, errno, "cannot size the file to %llu bytes: %s", (unsigned long long)off, strerror(errno));
    if (!rc)
        rc = io_pwrite(fd, len8, 8, 0, &err);
    if (!rc)
        rc = io_pwrite(fd, header.buf, (size_t)header.len, 8, &err);
    for (size_t i = 0; i < n_tasks; i++)
        tasks[i].fd = fd;
    if (!rc)
        rc = io_run(n_tasks, threads, run_write, tasks, NULL, NULL, &err);
    if (!rc && fsync(fd) != 0)
        rc = ds_fail_os(&err, errno, "fsync failed: %s", strerror(errno));
    if (fd >= 0 && close(fd) != 0 && !rc)
        rc = ds_fail_os(&err, errno, "close failed: %s", strerror(errno));
    if (!rc && rename(tmp, PyBytes_AS_STRING(fs)) != 0)
        rc = ds_fail_os(&err, errno, "cannot rename %s into place: %s", tmp, strerror(errno));
    if (rc)
        unlink(tmp);
    Py_END_ALLOW_THREADS if (rc) raise_ds(st, &err, display);
    else result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&header);
    PyMem_Free(tasks);
    PyMem_Free(tmp);
    Py_XDECREF(fast);
    Py_XDECREF(display);
    Py_XDECREF(fs);
    return result;
}

/* ---- downloads ------------------------------------------------------------ */

/* Copies a sequence of str into a NULL-free array of UTF-8 pointers that live
 * as long as *keep (a list of bytes). Returns the count, or -1 with an exception. */
static Py_ssize_t header_strings(PyObject *seq, const char ***out, PyObject **keep) {
    *out = NULL;
    *keep = PySequence_List(seq);
    if (!*keep)
        return -1;
    Py_ssize_t n = PyList_GET_SIZE(*keep);
    *out = PyMem_Calloc((size_t)n + 1, sizeof **out);
    if (!*out) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *b = PyUnicode_AsUTF8String(PyList_GET_ITEM(*keep, i));
        if (!b)
            return -1;
        PyList_SetItem(*keep, i, b); /* steals b, drops the str */
        (*out)[i] = PyBytes_AS_STRING(b);
    }
    return n;
}

PyDoc_STRVAR(http_get_doc, "http_get(url, headers, max_body) -> (status, final_url, header_bytes, body)\n\n"
                           "GETs url with redirects followed; the GIL is released. OSError on a transport error.");

static PyObject *http_get(PyObject *module, PyObject *args) {
    (void)module;
    const char *url;
    PyObject *hseq, *keep = NULL, *result = NULL;
    Py_ssize_t max_body;
    const char **hs = NULL;
    if (!PyArg_ParseTuple(args, "sOn", &url, &hseq, &max_body))
        return NULL;
    Py_ssize_t nh = header_strings(hseq, &hs, &keep);
    if (nh >= 0) {
        dn_reply reply;
        ds_error err;
        int rc;
        Py_BEGIN_ALLOW_THREADS rc = dn_get(url, hs, (size_t)nh, (size_t)max_body, &reply, &err);
        Py_END_ALLOW_THREADS if (rc) {
            /* a build without libcurl is not a network failure to retry */
            PyErr_Format(err.status == DS_ERR_UNSUPPORTED ? PyExc_RuntimeError : PyExc_ConnectionError, "%s: %s", url,
                         err.msg);
        }
        else {
            result = Py_BuildValue("(lsy#y#)", reply.status, reply.final_url, reply.headers,
                                   (Py_ssize_t)reply.headers_len, reply.body, (Py_ssize_t)reply.body_len);
            dn_reply_free(&reply);
        }
    }
    PyMem_Free(hs);
    Py_XDECREF(keep);
    return result;
}

typedef struct {
    PyThreadState *ts;
    PyObject *progress; /* borrowed; None for none */
    const dn_job *jobs; /* the transfer's jobs: the poll runs on its thread, between its steps */
    size_t n_jobs;
    unsigned char *told; /* per job: already reported as finished */
} fetch_poll;

/* The indices of the jobs finished since the last call, as a tuple (NULL on no memory). */
static PyObject *newly_finished(fetch_poll *fp) {
    size_t k = 0;
    for (size_t j = 0; j < fp->n_jobs; j++)
        k += fp->jobs[j].state == DN_DONE && !fp->told[j];
    PyObject *t = PyTuple_New((Py_ssize_t)k);
    if (!t)
        return NULL;
    k = 0;
    for (size_t j = 0; j < fp->n_jobs; j++) {
        if (fp->jobs[j].state != DN_DONE || fp->told[j])
            continue;
        PyObject *i = PyLong_FromSize_t(j);
        if (!i) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, (Py_ssize_t)k++, i);
        fp->told[j] = 1;
    }
    return t;
}

/* Takes the GIL for a moment: Ctrl-C, then the progress callback with the bytes so far and the
 * jobs finished since the last call (so that the caller can seal a complete file while the
 * others still transfer). */
static int fetch_poll_fn(void *arg, int64_t bytes) {
    fetch_poll *fp = arg;
    PyEval_RestoreThread(fp->ts);
    int stop = PyErr_CheckSignals() != 0;
    if (!stop && fp->progress != Py_None) {
        PyObject *finished = newly_finished(fp);
        PyObject *r = finished ? PyObject_CallFunction(fp->progress, "LO", (long long)bytes, finished) : NULL;
        stop = r == NULL;
        Py_XDECREF(r);
        Py_XDECREF(finished);
    }
    fp->ts = PyEval_SaveThread();
    return stop;
}

PyDoc_STRVAR(fetch_doc,
             "fetch(jobs, headers, connections, retries, stall_seconds, progress, out) -> None\n\n"
             "jobs: (url, fd, start, end, done) byte ranges [start, end) of open files (end -1: to the end of\n"
             "the body), done bytes of each already present. Runs them over `connections` connections with\n"
             "the GIL released; progress(bytes, finished) is called about every 100 ms, finished a tuple of\n"
             "the indices of the jobs done since its last call. Appends to the list out one\n"
             "(done, ok, status, ignored_range, attempts, message) per job, also when it raises: OSError when\n"
             "a write fails; the exception\n"
             "of progress or KeyboardInterrupt stops every transfer (partial bytes stay in the files).");

static PyObject *fetch(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *jseq, *hseq, *progress, *out, *keep = NULL, *jl = NULL, *result = NULL;
    int connections, retries;
    double stall;
    const char **hs = NULL;
    dn_job *jobs = NULL;
    if (!PyArg_ParseTuple(args, "OOiidOO!", &jseq, &hseq, &connections, &retries, &stall, &progress, &PyList_Type,
                          &out))
        return NULL;
    Py_ssize_t nh = header_strings(hseq, &hs, &keep);
    if (nh < 0)
        goto done;
    jl = PySequence_List(jseq);
    if (!jl)
        goto done;
    Py_ssize_t n = PyList_GET_SIZE(jl);
    jobs = PyMem_Calloc((size_t)n + 1, sizeof *jobs);
    if (!jobs) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long start, end, have;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(jl, i), "siLLL", &jobs[i].url, &jobs[i].fd, &start, &end, &have))
            goto done;
        jobs[i].start = start;
        jobs[i].end = end;
        jobs[i].done = have;
    }
    ds_error err;
    fetch_poll fp = {NULL, progress, jobs, (size_t)n, PyMem_Calloc((size_t)n + 1, 1)};
    if (!fp.told) {
        PyErr_NoMemory();
        goto done;
    }
    fp.ts = PyEval_SaveThread();
    int rc = dn_fetch(jobs, (size_t)n, hs, (size_t)nh, connections, retries, stall, fetch_poll_fn, &fp, &err);
    PyEval_RestoreThread(fp.ts);
    PyMem_Free(fp.told);
    /* The results go to `out` even when the transfers were stopped, so that the
     * caller can record how far each partial file got. */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = Py_BuildValue("(LOliis)", (long long)jobs[i].done, jobs[i].state == DN_DONE ? Py_True : Py_False,
                                    jobs[i].status, jobs[i].ignored_range, jobs[i].attempts, jobs[i].msg);
        if (!t || PyList_Append(out, t)) {
            Py_XDECREF(t);
            goto done;
        }
        Py_DECREF(t);
    }
    if (rc) {
        if (err.status == DS_ERR_INTERRUPTED) {
            if (!PyErr_Occurred())
                PyErr_SetNone(PyExc_KeyboardInterrupt);
        } else if (err.status == DS_ERR_OS) {
            PyObject *e = Py_BuildValue("(is)", err.errnum, err.msg);
            if (e) {
                PyErr_SetObject(PyExc_OSError, e);
                Py_DECREF(e);
            }
        } else {
            PyErr_SetString(err.status == DS_ERR_UNSUPPORTED ? PyExc_RuntimeError : PyExc_MemoryError, err.msg);
        }
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(jobs);
    PyMem_Free(hs);
    Py_XDECREF(jl);
    Py_XDECREF(keep);
    return result;
}

static PyObject *build_info(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
#ifdef DS_NO_CURL
    const int curl = 0;
#else
    const int curl = 1;
#endif
    return Py_BuildValue("{s:s,s:s,s:i,s:N,s:N}", "version", DS_VERSION, "f16_conversion", cv_f16_impl(), "cpu_count",
                         io_cpu_count(), "cuda", PyBool_FromLong(cu_get() != NULL), "curl", PyBool_FromLong(curl));
}

/* ---- module ----------------------------------------------------------------- */

static PyMethodDef module_methods[] = {
    {"http_get", (PyCFunction)http_get, METH_VARARGS, http_get_doc},
    {"fetch", (PyCFunction)fetch, METH_VARARGS, fetch_doc},
    {"read_header", (PyCFunction)read_header, METH_O, read_header_doc},
    {"hash_files", (PyCFunction)(void (*)(void))hash_files, METH_VARARGS | METH_KEYWORDS, hash_files_doc},
    {"keys_string", (PyCFunction)(void (*)(void))keys_string, METH_VARARGS | METH_KEYWORDS, keys_string_doc},
    {"md5_hex", (PyCFunction)md5_hex, METH_O, md5_hex_doc},
    {"load", (PyCFunction)(void (*)(void))load, METH_VARARGS | METH_KEYWORDS, load_doc},
    {"convert", (PyCFunction)(void (*)(void))convert, METH_VARARGS | METH_KEYWORDS, convert_doc},
    {"convert_into", (PyCFunction)(void (*)(void))convert_into, METH_VARARGS | METH_KEYWORDS, convert_into_doc},
    {"guard_install", (PyCFunction)guard_install, METH_VARARGS, guard_install_doc},
    {"guard_faults", (PyCFunction)guard_faults, METH_NOARGS, guard_faults_doc},
    {"torch_read", (PyCFunction)(void (*)(void))torch_read, METH_VARARGS | METH_KEYWORDS, torch_read_doc},
    {"_debug_pickle_delay", (PyCFunction)debug_pickle_delay, METH_O, debug_pickle_delay_doc},
    {"map_file", (PyCFunction)map_file, METH_O, map_file_doc},
    {"write_file", (PyCFunction)(void (*)(void))write_file, METH_VARARGS | METH_KEYWORDS, write_file_doc},
    {"region_view", (PyCFunction)region_view, METH_VARARGS, region_view_doc},
    {"map_ranges", (PyCFunction)(void (*)(void))map_ranges, METH_VARARGS | METH_KEYWORDS, map_ranges_doc},
    {"read_into", (PyCFunction)(void (*)(void))read_into, METH_VARARGS | METH_KEYWORDS, read_into_doc},
    {"cuda_open", (PyCFunction)cuda_open, METH_O, cuda_open_doc},
    {"cuda_device_count", (PyCFunction)cuda_device_count, METH_NOARGS,
     "cuda_device_count() -> (n, why): CUDA devices the driver sees, and why none when n is 0."},
    {"cuda_cast", (PyCFunction)(void (*)(void))cuda_cast, METH_VARARGS | METH_KEYWORDS, cuda_cast_doc},
    {"cuda_norm", (PyCFunction)cuda_norm, METH_VARARGS, cuda_norm_doc},
    {"cuda_upload", (PyCFunction)(void (*)(void))cuda_upload, METH_VARARGS | METH_KEYWORDS, cuda_upload_doc},
    {"build_info", (PyCFunction)build_info, METH_NOARGS, "Facts about this build: version, conversion paths."},
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *m) {
    module_state *st = state_of(m);
    st->FormatError = PyErr_NewExceptionWithDoc(
        "diffsynth_c._core.FormatError",
        "A model file breaks its format (the message names the file, the tensor and what is wrong).",
        PyExc_ValueError, NULL);
    if (!st->FormatError || PyModule_AddObjectRef(m, "FormatError", st->FormatError) < 0)
        return -1;
    st->NotNativeError = PyErr_NewExceptionWithDoc(
        "diffsynth_c._core.NotNativeError",
        "A checkpoint the C reader does not represent (legacy format, constructs outside its allow-list that "
        "torch accepts): the caller may hand it to torch.load(weights_only=True).",
        st->FormatError, NULL);
    if (!st->NotNativeError || PyModule_AddObjectRef(m, "NotNativeError", st->NotNativeError) < 0)
        return -1;
    PyObject *collections = PyImport_ImportModule("collections");
    st->OrderedDict = collections ? PyObject_GetAttrString(collections, "OrderedDict") : NULL;
    Py_XDECREF(collections);
    if (!st->OrderedDict)
        return -1;
    st->TensorRefType = PyStructSequence_NewType(&tensor_ref_desc);
    if (!st->TensorRefType || PyModule_AddType(m, st->TensorRefType) < 0)
        return -1;
    st->RegionType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &Region_spec, NULL);
    if (!st->RegionType || PyModule_AddType(m, st->RegionType) < 0)
        return -1;
    st->TensorType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &Tensor_spec, NULL);
    if (!st->TensorType || PyModule_AddType(m, st->TensorType) < 0)
        return -1;
    if (PyModule_AddStringConstant(m, "__version__", DS_VERSION) < 0)
        return -1;
    if (PyModule_AddIntConstant(m, "MAX_HEADER", (long)ST_MAX_HEADER) < 0)
        return -1;
    if (openfile_add_type(m) < 0)
        return -1;
    return 0;
}

static int module_traverse(PyObject *m, visitproc visit, void *arg) {
    module_state *st = state_of(m);
    Py_VISIT(st->FormatError);
    Py_VISIT(st->NotNativeError);
    Py_VISIT(st->TensorRefType);
    Py_VISIT(st->OrderedDict);
    Py_VISIT(st->RegionType);
    Py_VISIT(st->TensorType);
    return 0;
}

static int module_clear(PyObject *m) {
    module_state *st = state_of(m);
    Py_CLEAR(st->FormatError);
    Py_CLEAR(st->NotNativeError);
    Py_CLEAR(st->TensorRefType);
    Py_CLEAR(st->OrderedDict);
    Py_CLEAR(st->RegionType);
    Py_CLEAR(st->TensorType);
    return 0;
}

static void module_free(void *m) { module_clear((PyObject *)m); }

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "diffsynth_c._core",
    .m_doc = "The C core of diffsynth_c: safetensors headers, parallel loads, dtype conversion, model hashes.",
    .m_size = sizeof(module_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&module_def); }
