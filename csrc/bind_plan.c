/* bind_plan.c: _core.plan_buffers, the binding of the buffer layout (plan_layout_build in plan.c):
 * the headers of the files are read and laid out with the GIL released, and the layout comes back
 * as a BufferPlan (bufferplan.c) that loader/direct_fill.py and loader/distributed.py allocate and
 * fill (read_into, cuda_upload) instead of planning themselves. */
#include "module.h"

#include <string.h>

#include "convert.h"
#include "plan.h"

PyDoc_STRVAR(plan_buffers_doc,
             "plan_buffers(paths, align, split='file', *, merge=False, target=None, convert_from=(), readers=1,\n"
             "             bucket_bytes=0) -> BufferPlan\n\n"
             "Reads the safetensors headers of paths and lays their tensors out in buffers. split: 'file' (one\n"
             "buffer per file), 'tensor' (one per tensor) or 'buckets' (the tensors cut into `readers` runs of\n"
             "about equal bytes, each run into buckets of at most bucket_bytes; 0: no limit). merge: one dict over\n"
             "all files (a later file's tensor replaces an earlier one of the same name, at the first one's place).\n"
             "Tensors whose dtype is in convert_from are converted to target (each pair one the C core converts).\n"
             "align (a power of two) separates tensors inside a buffer. Deterministic from the headers.");

static int split_from_name(const char *s, int *out) {
    if (strcmp(s, "file") == 0)
        *out = PLAN_PER_FILE;
    else if (strcmp(s, "tensor") == 0)
        *out = PLAN_PER_TENSOR;
    else if (strcmp(s, "buckets") == 0)
        *out = PLAN_BUCKETS;
    else {
        PyErr_Format(PyExc_ValueError, "split must be 'file', 'tensor' or 'buckets', not '%s'", s);
        return -1;
    }
    return 0;
}

static PyObject *u64(uint64_t v) { return PyLong_FromUnsignedLongLong((unsigned long long)v); }

/* The BufferPlan of a layout (new reference), or NULL with an exception set. */
static PyObject *plan_object(module_state *st, const st_header *hs, const plan_layout *l) {
    PyObject *buffers = PyList_New((Py_ssize_t)l->n_buffers), *tensors = PyList_New((Py_ssize_t)l->n_items);
    PyObject *result = NULL;
    if (!buffers || !tensors)
        goto done;
    for (size_t i = 0; i < l->n_buffers; i++) {
        const plan_buffer *b = &l->buffers[i];
        PyObject *o = PyStructSequence_New(st->PlanBufferType);
        if (!o)
            goto done;
        PyList_SET_ITEM(buffers, (Py_ssize_t)i, o);
        PyObject *fields[3] = {u64(b->nbytes), PyLong_FromUnsignedLong(b->reader),
                               b->file == SIZE_MAX ? PyLong_FromLong(-1) : PyLong_FromSize_t(b->file)};
        for (int f = 0; f < 3; f++) {
            if (!fields[f]) {
                for (int g = f + 1; g < 3; g++)
                    Py_XDECREF(fields[g]);
                goto done;
            }
            PyStructSequence_SET_ITEM(o, f, fields[f]);
        }
    }
    for (size_t i = 0; i < l->n_items; i++) {
        const plan_item *it = &l->items[i];
        const st_tensor *t = &hs[it->file].tensors[it->tensor];
        PyObject *o = PyStructSequence_New(st->PlannedTensorType);
        if (!o)
            goto done;
        PyList_SET_ITEM(tensors, (Py_ssize_t)i, o);
        PyObject *fields[10] = {
            PyUnicode_DecodeUTF8(t->name, (Py_ssize_t)t->name_len, "surrogatepass"),
            PyLong_FromSize_t(it->file),
            u64(it->offset),
            u64(it->nbytes),
            PyUnicode_FromString(st_dtype_name(it->from)),
            PyUnicode_FromString(st_dtype_name(it->to)),
            shape_tuple(t->ndim, t->shape),
            it->buffer == SIZE_MAX ? PyLong_FromLong(-1) : PyLong_FromSize_t(it->buffer),
            u64(it->buffer_offset),
            u64(it->out_nbytes),
        };
        for (int f = 0; f < 10; f++) {
            if (!fields[f]) {
                for (int g = f + 1; g < 10; g++)
                    Py_XDECREF(fields[g]);
                goto done;
            }
            PyStructSequence_SET_ITEM(o, f, fields[f]);
        }
    }
    result = PyStructSequence_New(st->BufferPlanType);
    if (result) {
        PyStructSequence_SET_ITEM(result, 0, buffers);
        PyStructSequence_SET_ITEM(result, 1, tensors);
        return result;
    }
done:
    Py_XDECREF(buffers);
    Py_XDECREF(tensors);
    return NULL;
}

static PyObject *plan_buffers(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"paths",        "align",   "split",        "merge", "target",
                             "convert_from", "readers", "bucket_bytes", NULL};
    module_state *st = state_of(module);
    PyObject *seq, *target_obj = Py_None, *from_obj = NULL, *result = NULL;
    unsigned long long align, bucket_bytes = 0;
    const char *split_name = "file";
    int merge = 0;
    int readers = 1;
    plan_layout_spec spec = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OK|s$pOOiK:plan_buffers", kwlist, &seq, &align, &split_name, &merge,
                                     &target_obj, &from_obj, &readers, &bucket_bytes))
        return NULL;
    if (split_from_name(split_name, &spec.split) < 0)
        return NULL;
    spec.merge = merge;
    spec.align = align;
    if (readers < 1)
        return PyErr_Format(PyExc_ValueError, "plan_buffers: readers must be at least 1, not %d", readers);
    spec.readers = (unsigned)readers;
    spec.bucket_bytes = bucket_bytes;
    if (target_obj != Py_None && dtype_from_name(target_obj, &spec.target) < 0)
        return NULL;
    if (from_obj) {
        PyObject *fast = PySequence_Fast(from_obj, "convert_from must be a sequence of dtype names");
        if (!fast)
            return NULL;
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast); i++) {
            st_dtype d;
            if (dtype_from_name(PySequence_Fast_GET_ITEM(fast, i), &d) < 0) {
                Py_DECREF(fast);
                return NULL;
            }
            if (target_obj == Py_None || (d != spec.target && !cv_supported(d, spec.target))) {
                Py_DECREF(fast);
                if (target_obj == Py_None)
                    return PyErr_Format(PyExc_ValueError, "plan_buffers: convert_from needs a target");
                return PyErr_Format(PyExc_ValueError, "plan_buffers: no conversion from %s to %s", st_dtype_name(d),
                                    st_dtype_name(spec.target));
            }
            spec.convert |= 1u << d;
        }
        Py_DECREF(fast);
    }
    Py_ssize_t n;
    path_arg *paths = paths_from(seq, &n);
    if (!paths)
        return NULL;
    const char **fs = paths_fs(paths, n);
    io_file *files = PyMem_Calloc(n ? (size_t)n : 1, sizeof *files);
    st_header *headers = PyMem_Calloc(n ? (size_t)n : 1, sizeof *headers);
    int *opened = PyMem_Calloc(n ? (size_t)n : 1, sizeof *opened);
    plan_layout l = {0};
    if (!fs || !files || !headers || !opened) {
        PyErr_NoMemory();
        goto done;
    }
    ds_error err;
    err.input = -1;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = plan_open_headers(fs, (size_t)n, files, headers, opened, io_cpu_count(), &err);
    for (Py_ssize_t i = 0; i < n; i++)
        if (opened[i])
            io_close(&files[i]);
    if (!rc)
        rc = plan_layout_build(headers, (size_t)n, &spec, &l, &err);
    Py_END_ALLOW_THREADS
    if (rc)
        raise_ds(st, &err, err.input >= 0 && err.input < n ? paths[err.input].display : NULL);
    else
        result = plan_object(st, headers, &l);
done:
    plan_layout_free(&l);
    for (Py_ssize_t i = 0; opened && i < n; i++)
        if (opened[i])
            st_free(&headers[i]);
    PyMem_Free(files);
    PyMem_Free(headers);
    PyMem_Free(opened);
    PyMem_Free(fs);
    paths_free(paths, n);
    return result;
}

PyMethodDef bind_plan_methods[] = {
    {"plan_buffers", (PyCFunction)(void (*)(void))plan_buffers, METH_VARARGS | METH_KEYWORDS, plan_buffers_doc},
    {NULL, NULL, 0, NULL},
};
