/* bind.c: the helpers the binding files share (declared in module.h): exceptions from ds_error
 * records, dtype names, path arguments, Ctrl-C polls without the GIL, and the files of the item
 * lists of read_into and cuda_upload. */
#include "module.h"

#include <string.h>

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
