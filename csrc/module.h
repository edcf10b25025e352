/* module.h: binding helpers that module.c defines for the other binding files (openfile.c).
 *
 * Each takes the module object, whose state holds the exception and type objects; every
 * function that returns a PyObject * returns a new reference, or NULL with an exception set. */
#ifndef DS_MODULE_H
#define DS_MODULE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "error.h"
#include "io.h"
#include "safetensors.h"

/* Raises the exception for err (OSError, MemoryError, FormatError, KeyboardInterrupt), prefixing
 * the file's name when path (a str) is not NULL. Returns NULL. */
PyObject *bind_raise(PyObject *module, const ds_error *err, PyObject *path);

/* A Region owning [base, base+len) (a file mapping when file_backed, else io_alloc memory); takes
 * ownership of base, released on failure too. */
PyObject *bind_region_new(PyObject *module, void *base, size_t len, int file_backed);

/* A Tensor of dtype and shape over nbytes at data, keeping owner (a Region) alive. */
PyObject *bind_tensor_new(PyObject *module, PyObject *owner, char *data, st_dtype dtype, int ndim,
                          const uint64_t *shape, uint64_t nbytes);

/* The safetensors dtype a str names. Returns 0, or -1 with ValueError set. */
int bind_dtype_from_name(PyObject *name, st_dtype *out);

/* Parses the safetensors header of an open file into h (caller frees with st_free). Runs without
 * the GIL. Returns 0, or -1 with err. */
int bind_parse_header(const io_file *f, st_header *h, ds_error *err);

/* (header_len, data_start, tensors, metadata) of a parsed header, as read_header returns it. */
PyObject *bind_header_tuple(const st_header *h);

/* Adds the OpenFile type (openfile.c) to the module. Returns 0, or -1 with an exception set. */
int openfile_add_type(PyObject *module);

#endif
