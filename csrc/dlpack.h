/* dlpack.h: DLPack capsules over memory that a Python object owns.
 *
 * A capsule holds a strong reference to the owner (the object whose lifetime
 * keeps the bytes valid) until the consumer calls the deleter, or until the
 * capsule dies unconsumed. Shape and strides live in the same allocation as the
 * managed tensor. The deleter may run on any thread and after interpreter
 * shutdown began: it takes the GIL, and leaks rather than touch a dying
 * interpreter. */
#ifndef DS_DLPACK_H
#define DS_DLPACK_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "dlpack_abi.h"

/* The DLPack version we produce for versioned capsules. */
#define DL_VERSION_MAJOR 1
#define DL_VERSION_MINOR 0

/* Returns a new capsule named "dltensor_versioned" (versioned != 0) or
 * "dltensor" exporting a C-contiguous CPU tensor at data, or NULL with an
 * exception set. Takes a new reference to owner only once the capsule exists. */
PyObject *dl_capsule(PyObject *owner, void *data, DLDataType dtype, int ndim, const int64_t *shape, int versioned,
                     uint64_t flags);

#endif
