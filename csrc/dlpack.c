/* dlpack.c: capsules over owned memory (contract in dlpack.h). */
#include "dlpack.h"

#include <stdlib.h>
#include <string.h>

static int interpreter_alive(void) {
#if PY_VERSION_HEX >= 0x030D0000
    return Py_IsInitialized() && !Py_IsFinalizing();
#else
    return Py_IsInitialized() && !_Py_IsFinalizing();
#endif
}

static void release_owner(void *owner) {
    if (!owner || !interpreter_alive())
        return;
    PyGILState_STATE g = PyGILState_Ensure();
    Py_DECREF((PyObject *)owner);
    PyGILState_Release(g);
}

static void deleter_legacy(DLManagedTensor *self) {
    release_owner(self->manager_ctx);
    free(self);
}

static void deleter_versioned(DLManagedTensorVersioned *self) {
    release_owner(self->manager_ctx);
    free(self);
}

static void capsule_destructor_legacy(PyObject *capsule) {
    if (PyCapsule_IsValid(capsule, "used_dltensor"))
        return; /* a consumer took it and will call the deleter */
    DLManagedTensor *m = PyCapsule_GetPointer(capsule, "dltensor");
    if (!m) {
        PyErr_WriteUnraisable(capsule);
        return;
    }
    m->deleter(m);
}

static void capsule_destructor_versioned(PyObject *capsule) {
    if (PyCapsule_IsValid(capsule, "used_dltensor_versioned"))
        return;
    DLManagedTensorVersioned *m = PyCapsule_GetPointer(capsule, "dltensor_versioned");
    if (!m) {
        PyErr_WriteUnraisable(capsule);
        return;
    }
    m->deleter(m);
}

/* Fills t; shape and strides storage (2 * ndim int64) follows at dims. */
static void fill_tensor(DLTensor *t, int64_t *dims, void *data, DLDataType dtype, int ndim, const int64_t *shape) {
    t->data = data;
    t->device.device_type = DL_CPU;
    t->device.device_id = 0;
    t->ndim = ndim;
    t->dtype = dtype;
    t->byte_offset = 0; /* some torch versions ignore byte_offset: the offset is in data */
    t->shape = dims;
    t->strides = dims + ndim;
    int64_t stride = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        dims[i] = shape[i];
        dims[ndim + i] = stride;
        stride *= shape[i] > 0 ? shape[i] : 1;
    }
}

PyObject *dl_capsule(PyObject *owner, void *data, DLDataType dtype, int ndim, const int64_t *shape, int versioned,
                     uint64_t flags) {
    size_t dims_bytes = (size_t)ndim * 2 * sizeof(int64_t);
    PyObject *capsule;
    if (versioned) {
        size_t head = (sizeof(DLManagedTensorVersioned) + 7) & ~(size_t)7;
        DLManagedTensorVersioned *m = malloc(head + dims_bytes + 8);
        if (!m)
            return PyErr_NoMemory();
        m->version.major = DL_VERSION_MAJOR;
        m->version.minor = DL_VERSION_MINOR;
        m->manager_ctx = NULL;
        m->deleter = deleter_versioned;
        m->flags = flags;
        fill_tensor(&m->dl_tensor, (int64_t *)((char *)m + head), data, dtype, ndim, shape);
        capsule = PyCapsule_New(m, "dltensor_versioned", capsule_destructor_versioned);
        if (!capsule) {
            free(m);
            return NULL;
        }
        Py_INCREF(owner);
        m->manager_ctx = owner;
    } else {
        size_t head = (sizeof(DLManagedTensor) + 7) & ~(size_t)7;
        DLManagedTensor *m = malloc(head + dims_bytes + 8);
        if (!m)
            return PyErr_NoMemory();
        m->manager_ctx = NULL;
        m->deleter = deleter_legacy;
        fill_tensor(&m->dl_tensor, (int64_t *)((char *)m + head), data, dtype, ndim, shape);
        capsule = PyCapsule_New(m, "dltensor", capsule_destructor_legacy);
        if (!capsule) {
            free(m);
            return NULL;
        }
        Py_INCREF(owner);
        m->manager_ctx = owner;
    }
    return capsule;
}
