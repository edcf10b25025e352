/* region.c: the Region type: memory that tensors point into.
 *
 * A Region owns one page-aligned block: a file mapped privately, or anonymous memory (io_alloc),
 * and releases it when the last reference goes. Tensors (tensor.c) and every DLPack capsule they
 * hand out hold a reference, so memory lives exactly as long as the last tensor that uses it. */
#include "module.h"

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
PyObject *region_new(module_state *st, void *base, size_t len, int file_backed) {
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

PyObject *bind_region_new(PyObject *module, void *base, size_t len, int file_backed) {
    return region_new(state_of(module), base, len, file_backed);
}

/* Creates the Region type and adds it to the module. Returns 0, or -1 with an exception set. */
int region_exec(PyObject *module) {
    module_state *st = state_of(module);
    st->RegionType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &Region_spec, NULL);
    if (!st->RegionType || PyModule_AddType(module, st->RegionType) < 0)
        return -1;
    return 0;
}
