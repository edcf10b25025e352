/* tensor.c: the Tensor type: a C-contiguous view into a Region, exported through DLPack
 * (__dlpack__ / __dlpack_device__).
 *
 * It holds a reference to its Region; every capsule it hands out holds another (dlpack.c), so
 * memory lives exactly as long as the last tensor that uses it. The dims array holds the shape as
 * the file writes it, then the shape exported (F4 halves the last dimension, F6 is flat bytes). */
#include "module.h"

#include <string.h>

#include "dlpack.h"

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
    case ST_I16:
        t.code = DL_INT;
        t.bits = 16;
        break;
    case ST_U16: t.bits = 16; break;
    case ST_I32:
        t.code = DL_INT;
        t.bits = 32;
        break;
    case ST_U32: t.bits = 32; break;
    case ST_I64:
        t.code = DL_INT;
        t.bits = 64;
        break;
    case ST_U64: t.bits = 64; break;
    case ST_F16:
        t.code = DL_FLOAT;
        t.bits = 16;
        break;
    case ST_BF16:
        t.code = DL_BFLOAT;
        t.bits = 16;
        break;
    case ST_F32:
        t.code = DL_FLOAT;
        t.bits = 32;
        break;
    case ST_F64:
        t.code = DL_FLOAT;
        t.bits = 64;
        break;
    case ST_C64:
        t.code = DL_COMPLEX;
        t.bits = 64;
        break;
    default: break; /* U8, F8_*, F4, F6: bytes */
    }
    return t;
}

PyObject *tensor_new(module_state *st, PyObject *owner, char *data, st_dtype dtype, int ndim, const uint64_t *shape,
                     uint64_t nbytes) {
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
    PyObject *cap =
        dl_capsule(region, mem, self->export, self->export_ndim, shape, versioned, versioned ? DL_FLAG_IS_COPIED : 0);
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

PyObject *bind_tensor_new(PyObject *module, PyObject *owner, char *data, st_dtype dtype, int ndim,
                          const uint64_t *shape, uint64_t nbytes) {
    return tensor_new(state_of(module), owner, data, dtype, ndim, shape, nbytes);
}

/* Creates the Tensor type and adds it to the module. Returns 0, or -1 with an exception set. */
int tensor_exec(PyObject *module) {
    module_state *st = state_of(module);
    st->TensorType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &Tensor_spec, NULL);
    if (!st->TensorType || PyModule_AddType(module, st->TensorType) < 0)
        return -1;
    return 0;
}
