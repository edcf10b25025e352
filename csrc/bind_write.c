/* bind_write.c: write_file, the binding of writer.c (save_state_dict): the pieces' addresses come
 * from Python (the caller keeps the memory alive); the write runs with the GIL released. */
#include "module.h"

#include "writer.h"

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
    path_arg path = {NULL, NULL};
    PyObject *items_obj, *fast = NULL, *result = NULL;
    Py_buffer header;
    int threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&y*O|i:write_file", kwlist, path_converter, &path, &header,
                                     &items_obj, &threads))
        return NULL;
    wr_piece *pieces = NULL;
    fast = PySequence_Fast(items_obj, "items must be a sequence of (address, nbytes)");
    if (!fast)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    pieces = PyMem_Calloc(n ? (size_t)n : 1, sizeof *pieces);
    if (!pieces) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *addr;
        unsigned long long nbytes;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "OK:item", &addr, &nbytes))
            goto done;
        pieces[i].src = PyLong_AsVoidPtr(addr);
        if (!pieces[i].src && PyErr_Occurred())
            goto done;
        pieces[i].nbytes = nbytes;
    }
    ds_error err;
    err.input = -1;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = wr_write_file(path_fs(&path), header.buf, (size_t)header.len, pieces, (size_t)n, threads, &err);
    Py_END_ALLOW_THREADS
    if (rc)
        raise_ds(st, &err, path.display);
    else
        result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&header);
    PyMem_Free(pieces);
    Py_XDECREF(fast);
    path_clear(&path);
    return result;
}

PyMethodDef bind_write_methods[] = {
    {"write_file", (PyCFunction)(void (*)(void))write_file, METH_VARARGS | METH_KEYWORDS, write_file_doc},
    {NULL, NULL, 0, NULL},
};
