/* module.h: what the binding files of diffsynth_c._core share.
 *
 * The binding is split the way python-zstandard splits its own: module.c holds the module
 * definition alone; each Python type has a file (region.c, tensor.c, tensorref.c, openfile.c);
 * each concern's functions have a binding file (bind_load.c, bind_hash.c, bind_convert.c,
 * bind_torch.c, bind_write.c, bind_download.c, bind_cuda.c); the helpers they share live in
 * bind.c and are declared here. The logic under them is plain C without Python (plan.c, writer.c,
 * the parsers, io.c, ...).
 *
 * Module state holds every Python object the core keeps (exceptions, types, OrderedDict): no
 * global PyObject *. Every function here that returns a PyObject * returns a new reference, or
 * NULL with an exception set; those that return int return 0, or -1 with an exception set. */
#ifndef DS_MODULE_H
#define DS_MODULE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "error.h"
#include "io.h"
#include "safetensors.h"

#ifndef DS_VERSION
#define DS_VERSION "0.0.0"
#endif

/* ---- module state ------------------------------------------------------------------------- */

typedef struct {
    PyObject *FormatError;
    PyObject *NotNativeError;
    PyTypeObject *RegionType;
    PyTypeObject *TensorType;
    PyTypeObject *TensorRefType;
    PyTypeObject *BufferPlanType; /* bufferplan.c */
    PyTypeObject *PlanBufferType;
    PyTypeObject *PlannedTensorType;
    PyObject *OrderedDict;
} module_state;

static inline module_state *state_of(PyObject *module) { return (module_state *)PyModule_GetState(module); }

/* ---- errors and arguments (bind.c) -------------------------------------------------------- */

/* Raises the exception for err (OSError, MemoryError, FormatError, KeyboardInterrupt), prefixing
 * the file's name when path (a str) is not NULL. Returns NULL. */
PyObject *raise_ds(module_state *st, const ds_error *err, PyObject *path);

/* raise_ds for a caller that holds the module object (openfile.c). */
PyObject *bind_raise(PyObject *module, const ds_error *err, PyObject *path);

/* The safetensors dtype a str names; ValueError otherwise. */
int dtype_from_name(PyObject *name, st_dtype *out);
int bind_dtype_from_name(PyObject *name, st_dtype *out);

/* A tuple of ndim ints. */
PyObject *shape_tuple(int ndim, const uint64_t *shape);

/* A file path argument: str, bytes or os.PathLike. */
typedef struct {
    PyObject *display; /* str, for messages */
    PyObject *fs;      /* bytes, for open() */
} path_arg;

/* The bytes to hand to open(). */
static inline const char *path_fs(const path_arg *p) { return PyBytes_AS_STRING(p->fs); }

/* The pending exception, taken out of the thread state (new reference; NULL when none is set), and
 * put back (the reference is stolen). PyErr_Fetch/PyErr_Restore are deprecated from Python 3.12,
 * which would break a -Werror build there; its single-object calls replace them. */
static inline PyObject *bind_error_take(void) {
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (!type)
        return NULL;
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb && value)
        PyException_SetTraceback(value, tb);
    Py_DECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

static inline void bind_error_give(PyObject *exc) {
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
#endif
}

/* The "O&" converter of a path_arg (*out must start zeroed). Supports cleanup: the argument parser
 * releases it when a later argument fails; otherwise the caller releases it with path_clear. */
int path_converter(PyObject *obj, void *out);
void path_clear(path_arg *p);

/* A sequence of paths (caller frees with paths_free), and its open() names (caller frees the
 * array with PyMem_Free; the strings belong to the paths). */
path_arg *paths_from(PyObject *seq, Py_ssize_t *n_out);
void paths_free(path_arg *p, Py_ssize_t n);
const char **paths_fs(const path_arg *p, Py_ssize_t n);

/* What poll_signals needs: the thread state saved when the GIL was released. */
typedef struct {
    PyThreadState **ts;
} poll_ctx;

/* An io_run/pk poll callback: takes the GIL for a moment to check for Ctrl-C. Returns nonzero to
 * stop (the exception stays set). */
int poll_signals(void *arg);

/* The files named by `paths` and the item tuples that point into them (read_into, cuda_upload). */
typedef struct {
    path_arg *paths;
    Py_ssize_t n_paths;
    PyObject *items; /* PySequence_Fast of the item tuples */
    Py_ssize_t n_items;
    io_file *files;
    int *opened;
} item_files;

int item_files_init(item_files *f, PyObject *seq, PyObject *items_obj);
void item_files_free(item_files *f);
/* Item i's file index, checked against the paths (IndexError). */
int item_file(item_files *f, Py_ssize_t i, int file, const char *what);
/* Opens every file; runs without the GIL. err->input names the file that failed. */
int item_files_open(item_files *f, ds_error *err);
void item_files_close(item_files *f);
PyObject *item_files_raise(module_state *st, item_files *f, const ds_error *err);

/* A destination of read_into / cuda_upload: memory whose size C knows, so that every write is
 * checked against it. From a buffer-protocol object (host memory: writable, C-contiguous), a
 * DLPack capsule, or an object with __dlpack__ (its DLTensor's data pointer, byte offset, shape and
 * dtype give the bytes; contiguous only). The view or capsule is held until release, which keeps
 * the producer's memory alive while C writes it. */
typedef struct {
    char *data;
    uint64_t nbytes;
    int device_type, device_id; /* DLPack's: DL_CPU for a buffer-protocol object */
    Py_buffer view;
    int has_view;
    PyObject *capsule;
} dest_buffer;

typedef struct {
    dest_buffer *b;
    Py_ssize_t n;
} dest_buffers;

/* Returns 0 with d filled (release with dest_buffer_release), or -1 with an exception set. */
int dest_buffer_get(PyObject *obj, Py_ssize_t index, const char *what, dest_buffer *d);
void dest_buffer_release(dest_buffer *d);
/* Every buffer of a sequence. Returns 0 (release with dest_buffers_release), or -1 with an exception. */
int dest_buffers_get(PyObject *seq, const char *what, dest_buffers *out);
void dest_buffers_release(dest_buffers *bufs);

/* An item of read_into / cuda_upload: a PlannedTensor (bufferplan.c) or a tuple of its ten fields. */
typedef struct {
    const char *key; /* borrowed from the item */
    int file;
    uint64_t offset, nbytes;
    st_dtype from, to;
    Py_ssize_t buffer;
    uint64_t buffer_offset, out_nbytes;
} planned_item;

/* Parses one item. Returns 0, or -1 with an exception set. */
int planned_item_parse(PyObject *obj, const char *what, planned_item *it);
/* Checks an item's sizes and that [buffer_offset, buffer_offset + out_nbytes) lies inside its
 * buffer: ValueError naming the file (display, may be NULL) and the tensor otherwise. */
int planned_item_check(const planned_item *it, const dest_buffers *bufs, PyObject *display, const char *what);

/* ---- types ---------------------------------------------------------------------------------- */

/* region.c: memory that tensors point into. */
typedef struct {
    PyObject_HEAD
    void *base;
    size_t len;
    int file_backed; /* a private mapping of a file, else anonymous memory */
} RegionObject;

/* A Region owning [base, base+len) (a file mapping when file_backed, else io_alloc memory); takes
 * ownership of base, released on failure too. */
PyObject *region_new(module_state *st, void *base, size_t len, int file_backed);
PyObject *bind_region_new(PyObject *module, void *base, size_t len, int file_backed);
int region_exec(PyObject *module);

/* tensor.c: a Tensor of dtype and shape over nbytes at data, keeping owner (a Region) alive. */
PyObject *tensor_new(module_state *st, PyObject *owner, char *data, st_dtype dtype, int ndim, const uint64_t *shape,
                     uint64_t nbytes);
PyObject *bind_tensor_new(PyObject *module, PyObject *owner, char *data, st_dtype dtype, int ndim,
                          const uint64_t *shape, uint64_t nbytes);
int tensor_exec(PyObject *module);

/* tensorref.c: the TensorRef struct sequence of torch_read. */
int tensorref_exec(PyObject *module);
/* bufferplan.c: BufferPlan, PlanBuffer, PlannedTensor (what _core.plan_buffers returns). */
int bufferplan_exec(PyObject *module);

/* openfile.c: the OpenFile type. */
int openfile_add_type(PyObject *module);

/* ---- shared by bind_load.c and openfile.c ----------------------------------------------------- */

/* (header_len, data_start, tensors, metadata) of a parsed header, as read_header returns it. */
PyObject *bind_header_tuple(const st_header *h);

/* ---- each concern's functions: added to the module by module_exec ------------------------------- */

extern PyMethodDef bind_load_methods[];     /* bind_load.c */
extern PyMethodDef bind_hash_methods[];     /* bind_hash.c */
extern PyMethodDef bind_convert_methods[];  /* bind_convert.c */
extern PyMethodDef bind_torch_methods[];    /* bind_torch.c */
extern PyMethodDef bind_write_methods[];    /* bind_write.c */
extern PyMethodDef bind_download_methods[]; /* bind_download.c */
extern PyMethodDef bind_cuda_methods[];     /* bind_cuda.c */
extern PyMethodDef bind_plan_methods[];     /* bind_plan.c */

#endif
