/* bind_hash.c: DiffSynth's model hash: hash_files (from safetensors headers alone, plan.c),
 * keys_string (the canonical key string of entries Python gathered) and md5_hex. */
#include "module.h"

#include <stdlib.h>

#include "keyhash.h"
#include "plan.h"

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
    const char **fs = paths_fs(paths, n);
    st_header *hs = PyMem_Calloc(n ? (size_t)n : 1, sizeof *hs);
    io_file *files = PyMem_Calloc(n ? (size_t)n : 1, sizeof *files);
    int *opened = PyMem_Calloc(n ? (size_t)n : 1, sizeof *opened);
    if (!fs || !hs || !files || !opened) {
        PyMem_Free(fs);
        PyMem_Free(hs);
        PyMem_Free(files);
        PyMem_Free(opened);
        paths_free(paths, n);
        return PyErr_NoMemory();
    }
    ds_error err;
    char hex[33];
    int rc, threads = io_cpu_count();
    Py_BEGIN_ALLOW_THREADS
    rc = plan_open_headers(fs, (size_t)n, files, hs, opened, threads, &err);
    for (Py_ssize_t i = 0; i < n; i++)
        if (opened[i])
            io_close(&files[i]);
    if (!rc)
        rc = plan_hash_headers(hs, (size_t)n, with_shape, hex, &err);
    Py_END_ALLOW_THREADS
    PyObject *result = NULL;
    if (rc)
        raise_ds(st, &err, err.input >= 0 && err.input < n ? paths[err.input].display : NULL);
    else
        result = PyUnicode_FromString(hex);
    for (Py_ssize_t i = 0; i < n; i++)
        if (opened[i])
            st_free(&hs[i]);
    PyMem_Free(fs);
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
    Py_BEGIN_ALLOW_THREADS
    kh_md5_hex(view.buf, (size_t)view.len, hex);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyUnicode_FromString(hex);
}

PyMethodDef bind_hash_methods[] = {
    {"hash_files", (PyCFunction)(void (*)(void))hash_files, METH_VARARGS | METH_KEYWORDS, hash_files_doc},
    {"keys_string", (PyCFunction)(void (*)(void))keys_string, METH_VARARGS | METH_KEYWORDS, keys_string_doc},
    {"md5_hex", (PyCFunction)md5_hex, METH_O, md5_hex_doc},
    {NULL, NULL, 0, NULL},
};
