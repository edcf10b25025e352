/* bind.c: the helpers the binding files share (declared in module.h): exceptions from ds_error
 * records, dtype names, path arguments, Ctrl-C polls without the GIL, and the files of the item
 * lists of read_into and cuda_upload. */
#include "module.h"

#include <stdio.h>
#include <string.h>

#include "dlpack_abi.h"

/* ---- errors ------------------------------------------------------------------------------- */

/* Raises the exception for err, prefixing the file's name. path may be NULL. */
PyObject *raise_ds(module_state *st, const ds_error *err, PyObject *path) {
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

PyObject *bind_raise(PyObject *module, const ds_error *err, PyObject *path) {
    return raise_ds(state_of(module), err, path);
}

/* ---- arguments ---------------------------------------------------------------------------- */

int dtype_from_name(PyObject *name, st_dtype *out) {
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

int bind_dtype_from_name(PyObject *name, st_dtype *out) { return dtype_from_name(name, out); }

PyObject *shape_tuple(int ndim, const uint64_t *shape) {
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

int path_converter(PyObject *obj, void *out) {
    path_arg *p = out;
    if (!obj) { /* cleanup after a later argument failed */
        path_clear(p);
        return 1;
    }
    if (!PyUnicode_FSConverter(obj, &p->fs))
        return 0;
    p->display = PyUnicode_DecodeFSDefault(PyBytes_AS_STRING(p->fs));
    if (!p->display) {
        Py_CLEAR(p->fs);
        return 0;
    }
    return Py_CLEANUP_SUPPORTED;
}

void path_clear(path_arg *p) {
    Py_CLEAR(p->display);
    Py_CLEAR(p->fs);
}

void paths_free(path_arg *p, Py_ssize_t n) {
    if (!p)
        return;
    for (Py_ssize_t i = 0; i < n; i++)
        path_clear(&p[i]);
    PyMem_Free(p);
}

/* Converts a sequence of str/bytes/os.PathLike into paths. Returns NULL with an
 * exception set. */
path_arg *paths_from(PyObject *seq, Py_ssize_t *n_out) {
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
    for (Py_ssize_t i = 0; i < n; i++)
        if (!path_converter(PySequence_Fast_GET_ITEM(fast, i), &p[i]))
            goto error;
    Py_DECREF(fast);
    *n_out = n;
    return p;
error:
    Py_DECREF(fast);
    paths_free(p, n);
    return NULL;
}

const char **paths_fs(const path_arg *p, Py_ssize_t n) {
    const char **fs = PyMem_Calloc(n ? (size_t)n : 1, sizeof *fs);
    if (!fs)
        return (const char **)PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++)
        fs[i] = path_fs(&p[i]);
    return fs;
}

/* ---- Ctrl-C while the GIL is released ------------------------------------------------------- */

/* Checks for Ctrl-C from the thread that released the GIL. */
int poll_signals(void *arg) {
    poll_ctx *pc = arg;
    PyEval_RestoreThread(*pc->ts);
    int r = PyErr_CheckSignals();
    *pc->ts = PyEval_SaveThread();
    return r != 0;
}

/* ---- files and items of read_into / cuda_upload ---------------------------------------------- */

void item_files_free(item_files *f) {
    Py_XDECREF(f->items);
    if (f->paths)
        paths_free(f->paths, f->n_paths);
    PyMem_Free(f->files);
    PyMem_Free(f->opened);
}

int item_files_init(item_files *f, PyObject *seq, PyObject *items_obj) {
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
int item_file(item_files *f, Py_ssize_t i, int file, const char *what) {
    if (file < 0 || file >= f->n_paths) {
        PyErr_Format(PyExc_IndexError, "%s: item %zd names file %d of %zd", what, i, file, f->n_paths);
        return -1;
    }
    return 0;
}

/* Opens every file; runs without the GIL. err->input names the file that failed. */
int item_files_open(item_files *f, ds_error *err) {
    for (Py_ssize_t i = 0; i < f->n_paths; i++) {
        if (io_open(PyBytes_AS_STRING(f->paths[i].fs), &f->files[i], err)) {
            err->input = (int)i;
            return -1;
        }
        f->opened[i] = 1;
    }
    return 0;
}

void item_files_close(item_files *f) {
    for (Py_ssize_t i = 0; i < f->n_paths; i++)
        if (f->opened[i]) {
            io_close(&f->files[i]);
            f->opened[i] = 0;
        }
}

PyObject *item_files_raise(module_state *st, item_files *f, const ds_error *err) {
    return raise_ds(st, err, err->input >= 0 && err->input < f->n_paths ? f->paths[err->input].display : NULL);
}

/* ---- destination buffers and planned items (read_into, cuda_upload) ------------------------- */

static int dest_from_capsule(PyObject *cap, Py_ssize_t index, const char *what, dest_buffer *d) {
    const DLTensor *t;
    if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
        const DLManagedTensorVersioned *m = PyCapsule_GetPointer(cap, "dltensor_versioned");
        if (m->flags & DL_FLAG_READ_ONLY) {
            PyErr_Format(PyExc_ValueError, "%s: buffer %zd is read-only", what, index);
            return -1;
        }
        t = &m->dl_tensor;
    } else if (PyCapsule_IsValid(cap, "dltensor"))
        t = &((const DLManagedTensor *)PyCapsule_GetPointer(cap, "dltensor"))->dl_tensor;
    else {
        PyErr_Format(PyExc_TypeError, "%s: buffer %zd: expected an unconsumed DLPack capsule", what, index);
        return -1;
    }
    uint64_t numel = 1, expect = 1;
    int overflow = 0;
    for (int k = t->ndim - 1; k >= 0; k--) {
        if (t->shape[k] < 0) {
            PyErr_Format(PyExc_ValueError, "%s: buffer %zd has a negative dimension", what, index);
            return -1;
        }
        if (t->strides && t->shape[k] != 1 && (uint64_t)t->strides[k] != expect) {
            PyErr_Format(PyExc_ValueError, "%s: buffer %zd is not contiguous", what, index);
            return -1;
        }
        uint64_t s = (uint64_t)t->shape[k];
        overflow |= s && numel > UINT64_MAX / s;
        numel *= s;
        expect *= s;
    }
    uint64_t bits = (uint64_t)t->dtype.bits * t->dtype.lanes;
    if (overflow || (bits && numel > UINT64_MAX / bits)) {
        PyErr_Format(PyExc_ValueError, "%s: buffer %zd: its size overflows 64 bits", what, index);
        return -1;
    }
    d->data = (char *)t->data + t->byte_offset;
    d->nbytes = numel * bits / 8; /* whole bytes only: a partial last byte is not ours to write */
    d->device_type = t->device.device_type;
    d->device_id = t->device.device_id;
    d->capsule = Py_NewRef(cap);
    return 0;
}

int dest_buffer_get(PyObject *obj, Py_ssize_t index, const char *what, dest_buffer *d) {
    memset(d, 0, sizeof *d);
    if (PyCapsule_CheckExact(obj))
        return dest_from_capsule(obj, index, what, d);
    if (PyObject_CheckBuffer(obj)) {
        if (PyObject_GetBuffer(obj, &d->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            return -1;
        d->has_view = 1;
        d->data = d->view.buf;
        d->nbytes = (uint64_t)d->view.len;
        d->device_type = DL_CPU;
        return 0;
    }
    PyObject *cap = PyObject_CallMethod(obj, "__dlpack__", NULL);
    if (!cap) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError,
                         "%s: buffer %zd (%.100s) is neither a buffer, a DLPack capsule nor has __dlpack__", what,
                         index, Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    int rc = dest_from_capsule(cap, index, what, d);
    Py_DECREF(cap);
    return rc;
}

void dest_buffer_release(dest_buffer *d) {
    if (d->has_view)
        PyBuffer_Release(&d->view);
    d->has_view = 0;
    Py_CLEAR(d->capsule);
}

int dest_buffers_get(PyObject *seq, const char *what, dest_buffers *out) {
    out->b = NULL;
    out->n = 0;
    PyObject *fast = PySequence_Fast(seq, "buffers must be a sequence");
    if (!fast)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    out->b = PyMem_Calloc(n ? (size_t)n : 1, sizeof *out->b);
    if (!out->b) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (dest_buffer_get(PySequence_Fast_GET_ITEM(fast, i), i, what, &out->b[i]) < 0) {
            Py_DECREF(fast);
            dest_buffers_release(out);
            return -1;
        }
        out->n = i + 1;
    }
    Py_DECREF(fast);
    return 0;
}

void dest_buffers_release(dest_buffers *bufs) {
    for (Py_ssize_t i = 0; i < bufs->n; i++)
        dest_buffer_release(&bufs->b[i]);
    PyMem_Free(bufs->b);
    bufs->b = NULL;
    bufs->n = 0;
}

int planned_item_parse(PyObject *obj, const char *what, planned_item *it) {
    PyObject *key, *from, *to, *shape;
    unsigned long long offset, nbytes, boff, out_nbytes;
    char fmt[64];
    snprintf(fmt, sizeof fmt, "UiKKUUOnKK:%s item", what);
    if (!PyArg_ParseTuple(obj, fmt, &key, &it->file, &offset, &nbytes, &from, &to, &shape, &it->buffer, &boff,
                          &out_nbytes))
        return -1;
    (void)shape;
    it->key = PyUnicode_AsUTF8(key); /* borrowed: the item, which the caller keeps alive, holds the str */
    if (!it->key || dtype_from_name(from, &it->from) < 0 || dtype_from_name(to, &it->to) < 0)
        return -1;
    it->offset = offset;
    it->nbytes = nbytes;
    it->buffer_offset = boff;
    it->out_nbytes = out_nbytes;
    return 0;
}

int planned_item_check(const planned_item *it, const dest_buffers *bufs, PyObject *display, const char *what) {
    PyObject *name = display ? display : Py_None;
    if (it->from != it->to) {
        uint64_t fb = st_dtype_bits(it->from) / 8, tb = st_dtype_bits(it->to) / 8;
        if (fb == 0 || tb == 0 || it->nbytes % fb) {
            PyErr_Format(PyExc_ValueError, "%S: tensor '%s': %llu bytes is not a whole number of %s elements", name,
                         it->key, (unsigned long long)it->nbytes, st_dtype_name(it->from));
            return -1;
        }
        if (it->nbytes / fb > UINT64_MAX / tb || it->nbytes / fb * tb != it->out_nbytes) {
            PyErr_Format(PyExc_ValueError, "%S: tensor '%s': %llu bytes of %s are not %llu bytes of %s", name, it->key,
                         (unsigned long long)it->nbytes, st_dtype_name(it->from), (unsigned long long)it->out_nbytes,
                         st_dtype_name(it->to));
            return -1;
        }
    } else if (it->out_nbytes != it->nbytes) {
        PyErr_Format(PyExc_ValueError, "%S: tensor '%s': a copy of %llu bytes cannot write %llu", name, it->key,
                     (unsigned long long)it->nbytes, (unsigned long long)it->out_nbytes);
        return -1;
    }
    if (it->buffer < 0 || it->buffer >= bufs->n) {
        PyErr_Format(PyExc_IndexError, "%s: tensor '%s' names buffer %zd of %zd", what, it->key, it->buffer, bufs->n);
        return -1;
    }
    uint64_t size = bufs->b[it->buffer].nbytes;
    if (it->buffer_offset > size || it->out_nbytes > size - it->buffer_offset) {
        PyErr_Format(PyExc_ValueError, "%S: tensor '%s': bytes [%llu, %llu) do not fit in buffer %zd (%llu bytes)",
                     name, it->key, (unsigned long long)it->buffer_offset,
                     (unsigned long long)(it->buffer_offset + it->out_nbytes), it->buffer, (unsigned long long)size);
        return -1;
    }
    return 0;
}
