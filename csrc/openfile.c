/* openfile.c: the OpenFile type, one model file opened once and read many times.
 *
 * safe_open and DiskMap read a header now and tensors later. Opening the path again for every
 * read would serve the bytes of whatever file has that name by then: after an atomic replace
 * (os.replace of a new version) the old header's offsets would land in the new file. An OpenFile
 * keeps the descriptor it opened, so every read sees the inode the header came from, as
 * safetensors' safe_open does, until close().
 *
 * Reads: map() maps the whole file privately (one Region that views share); map_range() maps one
 * tensor's bytes into a fresh private mapping of their own (copy-on-write: a write to the tensor
 * reaches neither the file nor any other tensor), its pages read in on worker threads unless
 * asked not to; read_into() preads (and converts) into memory the caller owns. Mappings are
 * guarded against truncation like every other (guard.h; its table grows without limit); should the
 * guard fail to register a mapping (no memory for a new chunk of its table), map_range() reads the
 * bytes into memory of their own instead (Region.file_backed is False), never leaving a mapping
 * unguarded.
 *
 * close() may come from any thread while another reads with the GIL released: the descriptor is
 * closed only when the last read in flight ends (`busy`, changed with the GIL held). */
#include "module.h"

#include <stdlib.h>
#include <string.h>

#include "convert.h"
#include "dlpack_abi.h"
#include "plan.h"
#include "readinto.h"

#define POPULATE_TASK ((size_t)8 << 20)

typedef struct {
    PyObject_HEAD
    io_file f;         /* f.fd < 0 once the descriptor is closed */
    PyObject *display; /* str: the path as given, for messages */
    int closed;        /* close() was called */
    int busy;          /* reads in flight without the GIL */
} OpenFileObject;

/* ---- helpers ------------------------------------------------------------------ */

/* Starts a read: refuses a closed file. Returns 0, or -1 with ValueError set. */
static int begin_read(OpenFileObject *self) {
    if (self->closed) {
        PyErr_Format(PyExc_ValueError, "%U: the file is closed", self->display);
        return -1;
    }
    self->busy++;
    return 0;
}

/* Ends a read (GIL held): the last one closes a descriptor that close() left open. */
static void end_read(OpenFileObject *self) {
    if (--self->busy == 0 && self->closed)
        io_close(&self->f);
}

typedef struct {
    char *base;
    size_t len;
    int fd; /* >= 0: pread [offset, offset+len) of fd into base instead of populating */
    uint64_t offset;
} populate_job;

static int populate_task(void *ctx, size_t i, ds_error *err) {
    populate_job *job = ctx;
    size_t off = i * POPULATE_TASK;
    size_t n = job->len - off < POPULATE_TASK ? job->len - off : POPULATE_TASK;
    if (job->fd >= 0)
        return io_pread(job->fd, job->base + off, n, job->offset + off, err);
    return io_populate(job->base + off, n, err);
}

/* ---- methods ------------------------------------------------------------------ */

static PyObject *OpenFile_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"path", NULL};
    PyObject *path, *fs = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:OpenFile", kwlist, &path))
        return NULL;
    if (!PyUnicode_FSConverter(path, &fs))
        return NULL;
    OpenFileObject *self = (OpenFileObject *)type->tp_alloc(type, 0);
    if (!self)
        goto error;
    self->f.fd = -1;
    self->display = PyUnicode_DecodeFSDefault(PyBytes_AS_STRING(fs));
    if (!self->display)
        goto error;
    ds_error err;
    err.input = -1;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = io_open(PyBytes_AS_STRING(fs), &self->f, &err);
    Py_END_ALLOW_THREADS
    if (rc) {
        bind_raise(PyType_GetModule(type), &err, self->display);
        goto error;
    }
    Py_DECREF(fs);
    return (PyObject *)self;
error:
    Py_XDECREF(self);
    Py_XDECREF(fs);
    return NULL;
}

static void OpenFile_dealloc(OpenFileObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    io_close(&self->f);
    Py_CLEAR(self->display);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

PyDoc_STRVAR(read_header_doc, "read_header() -> (header_len, data_start, tensors, metadata)\n\n"
                              "The file's safetensors header, read from this descriptor, as _core.read_header(path)\n"
                              "returns it.");

static PyObject *OpenFile_read_header(OpenFileObject *self, PyObject *unused) {
    (void)unused;
    st_header h;
    ds_error err;
    int rc;
    err.input = -1;
    if (begin_read(self) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = plan_parse_header(&self->f, &h, &err);
    Py_END_ALLOW_THREADS
    end_read(self);
    if (rc)
        return bind_raise(PyType_GetModule(Py_TYPE(self)), &err, self->display);
    PyObject *result = bind_header_tuple(&h);
    st_free(&h);
    return result;
}

PyDoc_STRVAR(map_doc, "map() -> Region\n\n"
                      "A private (copy-on-write) mapping of the whole file as it was opened; nothing is read\n"
                      "until a view asks (_core.region_view).");

static PyObject *OpenFile_map(OpenFileObject *self, PyObject *unused) {
    (void)unused;
    PyObject *module = PyType_GetModule(Py_TYPE(self));
    ds_error err;
    void *map = NULL;
    err.input = -1;
    if (begin_read(self) < 0)
        return NULL;
    uint64_t size = self->f.size;
    Py_BEGIN_ALLOW_THREADS
    map = size ? io_map_file(self->f.fd, size, &err) : NULL;
    Py_END_ALLOW_THREADS
    end_read(self);
    if (size && !map)
        return bind_raise(module, &err, self->display);
    return bind_region_new(module, map, (size_t)size, 1);
}

PyDoc_STRVAR(map_range_doc,
             "map_range(offset, nbytes, threads=1, populate=True) -> Tensor\n\n"
             "A 1-D U8 Tensor over the bytes [offset, offset+nbytes) of the file in a private mapping of\n"
             "their own: writes to it reach neither the file nor any other tensor. With populate, its pages\n"
             "are read in first on `threads` worker threads (GIL released); without, on first touch.\n"
             "Should the truncation guard fail to take the mapping, the bytes are read into memory of their own.");

static PyObject *OpenFile_map_range(OpenFileObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"offset", "nbytes", "threads", "populate", NULL};
    PyObject *module = PyType_GetModule(Py_TYPE(self));
    unsigned long long off, nbytes;
    int threads = 1, populate = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "KK|ip:map_range", kwlist, &off, &nbytes, &threads, &populate))
        return NULL;
    if (off > self->f.size || nbytes > self->f.size - off)
        return PyErr_Format(PyExc_ValueError, "%U: bytes [%llu, %llu) are past the end of the file (%llu bytes)",
                            self->display, off, off + nbytes, (unsigned long long)self->f.size);
    if (begin_read(self) < 0)
        return NULL;
    ds_error err;
    err.input = -1;
    char *base = NULL;
    size_t lead = 0, len = 0;
    int rc = 0;
    int mapped = 0;
    Py_BEGIN_ALLOW_THREADS
    if (nbytes) {
        base = io_map_range(self->f.fd, off, nbytes, &lead, &err);
        len = lead + (size_t)nbytes;
        mapped = base != NULL;
        if (!base && err.status == DS_ERR_UNSUPPORTED && nbytes <= SIZE_MAX) {
            /* the guard could not take the mapping: a copy of the bytes, never an unguarded mapping */
            lead = 0;
            len = (size_t)nbytes;
            base = io_alloc(len, &err);
            populate = base != NULL;
        }
        rc = !base;
        if (!rc && populate) {
            populate_job job = {base + lead, (size_t)nbytes, mapped ? -1 : self->f.fd, off};
            rc = io_run(((size_t)nbytes + POPULATE_TASK - 1) / POPULATE_TASK, threads, populate_task, &job, NULL, NULL,
                        &err);
        }
    } else {
        base = io_alloc(0, &err); /* an empty tensor still needs an address */
        len = 1;
        rc = !base;
    }
    Py_END_ALLOW_THREADS
    end_read(self);
    if (rc) {
        if (base)
            io_release(base, len);
        return bind_raise(module, &err, self->display);
    }
    PyObject *region = bind_region_new(module, base, len, mapped);
    if (!region)
        return NULL;
    uint64_t shape[1] = {nbytes};
    PyObject *t = bind_tensor_new(module, region, base + lead, ST_U8, 1, shape, nbytes);
    Py_DECREF(region);
    return t;
}

PyDoc_STRVAR(read_into_doc,
             "read_into(buffers, items, threads=1)\n\n"
             "Reads tensors of this file into buffers the caller owns (host memory: buffer-protocol objects\n"
             "or DLPack producers). items as _core.read_into takes them, with file 0; each is checked to fit\n"
             "in its buffer and in the file before anything is read.");

static PyObject *OpenFile_read_into(OpenFileObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"buffers", "items", "threads", NULL};
    PyObject *bufs_obj, *items_obj, *fast = NULL, *result = NULL;
    dest_buffers bufs = {NULL, 0};
    ri_item *items = NULL;
    int threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|i:read_into", kwlist, &bufs_obj, &items_obj, &threads))
        return NULL;
    fast = PySequence_Fast(items_obj, "items must be a sequence of tuples");
    if (!fast || dest_buffers_get(bufs_obj, "read_into", &bufs) < 0)
        goto done;
    for (Py_ssize_t b = 0; b < bufs.n; b++)
        if (bufs.b[b].device_type != DL_CPU && bufs.b[b].device_type != DL_CUDA_HOST) {
            PyErr_Format(PyExc_ValueError, "read_into: buffer %zd is not in host memory (DLPack device type %d)", b,
                         bufs.b[b].device_type);
            goto done;
        }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    items = PyMem_Calloc(n ? (size_t)n : 1, sizeof *items);
    if (!items) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        planned_item pi;
        ri_item *it = &items[i];
        if (planned_item_parse(PySequence_Fast_GET_ITEM(fast, i), "read_into", &pi) < 0)
            goto done;
        if (pi.file != 0) {
            PyErr_Format(PyExc_IndexError, "read_into: item %zd names file %d of 1", i, pi.file);
            goto done;
        }
        if (pi.from != pi.to && !cv_supported(pi.from, pi.to)) {
            PyErr_Format(PyExc_ValueError, "read_into: no conversion from %s to %s", st_dtype_name(pi.from),
                         st_dtype_name(pi.to));
            goto done;
        }
        if (planned_item_check(&pi, &bufs, self->display, "read_into") < 0)
            goto done;
        if (pi.offset > self->f.size || pi.nbytes > self->f.size - pi.offset) {
            PyErr_Format(PyExc_ValueError, "%U: tensor '%s': bytes [%llu, %llu) are past the end of the file",
                         self->display, pi.key, (unsigned long long)pi.offset,
                         (unsigned long long)(pi.offset + pi.nbytes));
            goto done;
        }
        it->src = pi.from;
        it->dst = pi.to;
        it->out = bufs.b[pi.buffer].data + pi.buffer_offset;
        it->offset = pi.offset;
        it->nbytes = pi.nbytes;
        it->name = pi.key; /* borrowed from the item, which fast keeps alive */
    }
    if (begin_read(self) < 0)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++)
        items[i].fd = self->f.fd;
    ds_error err;
    err.input = -1;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ri_run(items, (size_t)n, threads, &err);
    Py_END_ALLOW_THREADS
    end_read(self);
    if (rc)
        bind_raise(PyType_GetModule(Py_TYPE(self)), &err, self->display);
    else
        result = Py_NewRef(Py_None);
done:
    PyMem_Free(items);
    dest_buffers_release(&bufs);
    Py_XDECREF(fast);
    return result;
}

PyDoc_STRVAR(close_doc,
             "close()\n\nCloses the descriptor (once reads in flight end). Tensors already made stay valid.");

static PyObject *OpenFile_close(OpenFileObject *self, PyObject *unused) {
    (void)unused;
    self->closed = 1;
    if (self->busy == 0)
        io_close(&self->f);
    Py_RETURN_NONE;
}

static PyObject *OpenFile_fileno(OpenFileObject *self, PyObject *unused) {
    (void)unused;
    if (self->closed)
        return PyErr_Format(PyExc_ValueError, "%U: the file is closed", self->display);
    return PyLong_FromLong(self->f.fd);
}

static PyObject *OpenFile_get_path(OpenFileObject *self, void *closure) {
    (void)closure;
    return Py_NewRef(self->display);
}

static PyObject *OpenFile_get_size(OpenFileObject *self, void *closure) {
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->f.size);
}

static PyObject *OpenFile_get_closed(OpenFileObject *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->closed);
}

static PyObject *OpenFile_repr(OpenFileObject *self) {
    return PyUnicode_FromFormat("<diffsynth_c._core.OpenFile %R%s>", self->display, self->closed ? " (closed)" : "");
}

static PyMethodDef OpenFile_methods[] = {
    {"read_header", (PyCFunction)OpenFile_read_header, METH_NOARGS, read_header_doc},
    {"map", (PyCFunction)OpenFile_map, METH_NOARGS, map_doc},
    {"map_range", (PyCFunction)(void (*)(void))OpenFile_map_range, METH_VARARGS | METH_KEYWORDS, map_range_doc},
    {"read_into", (PyCFunction)(void (*)(void))OpenFile_read_into, METH_VARARGS | METH_KEYWORDS, read_into_doc},
    {"close", (PyCFunction)OpenFile_close, METH_NOARGS, close_doc},
    {"fileno", (PyCFunction)OpenFile_fileno, METH_NOARGS, "The descriptor (ValueError once closed)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef OpenFile_getset[] = {
    {"path", (getter)OpenFile_get_path, NULL, "The path as given (str).", NULL},
    {"size", (getter)OpenFile_get_size, NULL, "Bytes in the file when it was opened.", NULL},
    {"closed", (getter)OpenFile_get_closed, NULL, "Whether close() was called.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot OpenFile_slots[] = {
    {Py_tp_new, OpenFile_new},
    {Py_tp_dealloc, OpenFile_dealloc},
    {Py_tp_methods, OpenFile_methods},
    {Py_tp_getset, OpenFile_getset},
    {Py_tp_repr, OpenFile_repr},
    {Py_tp_doc, "OpenFile(path): a model file opened once; every read sees the inode opened then."},
    {0, NULL},
};

static PyType_Spec OpenFile_spec = {
    .name = "diffsynth_c._core.OpenFile",
    .basicsize = sizeof(OpenFileObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = OpenFile_slots,
};

int openfile_add_type(PyObject *module) {
    PyObject *type = PyType_FromModuleAndSpec(module, &OpenFile_spec, NULL);
    if (!type)
        return -1;
    int rc = PyModule_AddType(module, (PyTypeObject *)type);
    Py_DECREF(type);
    return rc;
}
