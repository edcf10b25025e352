/* bind_cuda.c: the CUDA bindings: cuda_open (the library built from kernels/, opened with dlopen
 * on demand by cuda.c), cuda_device_count, and the kernels cuda_cast, cuda_norm and cuda_upload,
 * which take DLPack capsules (the consumer side: a capsule keeps its producer's memory alive while
 * we hold it) and raw stream handles, and run with the GIL released. */
#include "module.h"

#include <string.h>

#include "cuda.h"
#include "dlpack.h"

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
    Py_BEGIN_ALLOW_THREADS
    n = api->device_count(why, sizeof why);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(is)", n, why);
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
    Py_BEGIN_ALLOW_THREADS
    rc = api->cast(a.device, a.data, (dsk_dtype)s, b.data, (dsk_dtype)d, (size_t)a.numel, rules, stream, msg,
                   sizeof msg);
    Py_END_ALLOW_THREADS
    if (rc)
        return raise_cuda(msg);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(cuda_norm_doc,
             "cuda_norm(layer, x, y, weight, bias, dtype, weight_dtype, eps, stream)\n\n"
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
    Py_BEGIN_ALLOW_THREADS
    if (layer)
        rc = api->layer_norm(xv.device, xv.data, yv.data, (dsk_dtype)t, w != Py_None ? wv.data : NULL,
                             b != Py_None ? bv.data : NULL, (dsk_dtype)wt, (size_t)rows, (size_t)cols, (float)eps,
                             stream, msg, sizeof msg);
    else
        rc = api->rms_norm(xv.device, xv.data, yv.data, (dsk_dtype)t, w != Py_None ? wv.data : NULL, (dsk_dtype)wt,
                           (size_t)rows, (size_t)cols, (float)eps, stream, msg, sizeof msg);
    Py_END_ALLOW_THREADS
    if (rc)
        return raise_cuda(msg);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(cuda_upload_doc,
             "cuda_upload(paths, buffers, items, device, scratch, staging_bytes, threads, stream, nan=1,\n"
             "            saturate=0)\n\n"
             "Reads tensors from files into CUDA memory through pinned staging buffers of staging_bytes in all.\n"
             "buffers: DLPack producers (capsules, or objects with __dlpack__) of memory on `device`; items as\n"
             "read_into takes them (dtype == out_dtype copies the bytes as they are), each checked to fit in\n"
             "its buffer before anything is read. scratch: None, or device memory of at least staging_bytes\n"
             "that conversions need. A failed read raises RuntimeError(message, item index).");

/* Whether d is memory the upload may write on device: CUDA memory of that device, or host memory
 * when the library is the test stand-in whose device memory is host memory (tests/cuda_fake). */
static int on_device(const cu_api *api, const dest_buffer *d, int device, const char *what, Py_ssize_t i) {
    if ((d->device_type == DL_CUDA && d->device_id == device) || (api->device_is_host && d->device_type == DL_CPU))
        return 0;
    PyErr_Format(PyExc_ValueError, "cuda_upload: %s %zd is not memory of cuda:%d (DLPack device %d:%d)", what, i,
                 device, d->device_type, d->device_id);
    return -1;
}

static PyObject *cuda_upload(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"paths",   "buffers", "items", "device",   "scratch", "staging_bytes",
                             "threads", "stream",  "nan",   "saturate", NULL};
    module_state *st = state_of(module);
    PyObject *seq, *bufs_obj, *items_obj, *scratch_obj, *stream_obj, *result = NULL;
    int device, threads, nan = 1, saturate = 0;
    unsigned long long staging_bytes;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOiOKiO|ii:cuda_upload", kwlist, &seq, &bufs_obj, &items_obj,
                                     &device, &scratch_obj, &staging_bytes, &threads, &stream_obj, &nan, &saturate))
        return NULL;
    const cu_api *api = cuda_api();
    void *stream;
    if (!api || stream_of(stream_obj, &stream) < 0)
        return NULL;
    item_files f;
    dest_buffers bufs = {NULL, 0};
    dest_buffer scratch = {0};
    dsk_item *items = NULL;
    int *item_fi = NULL;
    if (item_files_init(&f, seq, items_obj) < 0 || dest_buffers_get(bufs_obj, "cuda_upload", &bufs) < 0)
        goto done;
    for (Py_ssize_t b = 0; b < bufs.n; b++)
        if (on_device(api, &bufs.b[b], device, "buffer", b) < 0)
            goto done;
    if (scratch_obj != Py_None) {
        if (dest_buffer_get(scratch_obj, 0, "cuda_upload: scratch", &scratch) < 0 ||
            on_device(api, &scratch, device, "scratch", 0) < 0)
            goto done;
        if (scratch.nbytes < staging_bytes) {
            PyErr_Format(PyExc_ValueError, "cuda_upload: the scratch buffer holds %llu bytes, fewer than %llu",
                         (unsigned long long)scratch.nbytes, staging_bytes);
            goto done;
        }
    }
    items = PyMem_Calloc(f.n_items ? (size_t)f.n_items : 1, sizeof *items);
    item_fi = PyMem_Calloc(f.n_items ? (size_t)f.n_items : 1, sizeof *item_fi);
    if (!items || !item_fi) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < f.n_items; i++) {
        planned_item it;
        if (planned_item_parse(PySequence_Fast_GET_ITEM(f.items, i), "cuda_upload", &it) < 0 ||
            item_file(&f, i, it.file, "cuda_upload") < 0)
            goto done;
        item_fi[i] = it.file;
        items[i].src_t = items[i].dst_t = -1;
        if (it.from != it.to) {
            PyObject *from = PyUnicode_FromString(st_dtype_name(it.from)),
                     *to = PyUnicode_FromString(st_dtype_name(it.to));
            int bad =
                !from || !to || dsk_from_name(from, &items[i].src_t) < 0 || dsk_from_name(to, &items[i].dst_t) < 0;
            Py_XDECREF(from);
            Py_XDECREF(to);
            if (bad)
                goto done;
        }
        if (planned_item_check(&it, &bufs, f.paths[it.file].display, "cuda_upload") < 0)
            goto done;
        items[i].dst = bufs.b[it.buffer].data + it.buffer_offset;
        items[i].offset = it.offset;
        items[i].nbytes = it.nbytes;
    }
    ds_error err;
    err.input = -1;
    char msg[512] = "";
    size_t bad = (size_t)-1;
    int rc, cuda_rc = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = item_files_open(&f, &err);
    if (!rc) {
        for (Py_ssize_t i = 0; i < f.n_items; i++)
            items[i].fd = f.files[item_fi[i]].fd;
        dsk_rules rules = {nan, saturate};
        cuda_rc = api->upload(device, items, (size_t)f.n_items, scratch.data, (size_t)staging_bytes, threads, rules,
                              stream, &bad, msg, sizeof msg);
    }
    item_files_close(&f);
    Py_END_ALLOW_THREADS
    if (rc)
        item_files_raise(st, &f, &err);
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
    dest_buffer_release(&scratch);
    dest_buffers_release(&bufs);
    item_files_free(&f);
    return result;
}

PyMethodDef bind_cuda_methods[] = {
    {"cuda_open", (PyCFunction)cuda_open, METH_O, cuda_open_doc},
    {"cuda_device_count", (PyCFunction)cuda_device_count, METH_NOARGS,
     "cuda_device_count() -> (n, why): CUDA devices the driver sees, and why none when n is 0."},
    {"cuda_cast", (PyCFunction)(void (*)(void))cuda_cast, METH_VARARGS | METH_KEYWORDS, cuda_cast_doc},
    {"cuda_norm", (PyCFunction)cuda_norm, METH_VARARGS, cuda_norm_doc},
    {"cuda_upload", (PyCFunction)(void (*)(void))cuda_upload, METH_VARARGS | METH_KEYWORDS, cuda_upload_doc},
    {NULL, NULL, 0, NULL},
};
