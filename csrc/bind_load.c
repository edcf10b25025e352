/* bind_load.c: the load bindings: read_header, load, read_into, map_ranges, region_view (a view
 * of a Region that OpenFile.map made), and the SIGBUS guard of the mappings they make.
 *
 * Argument checks and Python objects only: the planning and the reads are plan.c's, run with the
 * GIL released; the memory they fill is handed to Region objects, and the tensors become Tensor
 * objects (in the order of safe_open().keys(): names sorted bytewise). */
#include "module.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "convert.h"
#include "dlpack_abi.h"
#include "guard.h"
#include "plan.h"
#include "readinto.h"

/* ---- headers -------------------------------------------------------------------------------- */

PyDoc_STRVAR(read_header_doc,
             "read_header(path) -> (header_len, data_start, tensors, metadata)\n\n"
             "Reads and validates a safetensors header without reading tensor data. tensors is a list of\n"
             "(name, dtype, shape, begin, end) sorted by name; metadata a dict, or None when absent.");

static PyObject *read_header(PyObject *module, PyObject *arg) {
    module_state *st = state_of(module);
    path_arg path = {NULL, NULL};
    PyObject *result = NULL;
    io_file f;
    st_header h;
    ds_error err;
    int rc;
    if (!path_converter(arg, &path))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = plan_open_header(path_fs(&path), &f, &h, &err);
    if (!rc)
        io_close(&f);
    Py_END_ALLOW_THREADS
    if (rc) {
        raise_ds(st, &err, path.display);
        goto done;
    }
    result = bind_header_tuple(&h);
    st_free(&h);
done:
    path_clear(&path);
    return result;
}

PyObject *bind_header_tuple(const st_header *h) {
    PyObject *result = NULL, *list = NULL, *meta = Py_None;
    list = PyList_New((Py_ssize_t)h->n_tensors);
    if (!list)
        goto done;
    for (size_t i = 0; i < h->n_tensors; i++) {
        const st_tensor *t = &h->tensors[i];
        PyObject *shape = shape_tuple(t->ndim, t->shape);
        if (!shape)
            goto done;
        PyObject *item = Py_BuildValue("(s#sNKK)", t->name, (Py_ssize_t)t->name_len, st_dtype_name(t->dtype), shape,
                                       (unsigned long long)t->begin, (unsigned long long)t->end);
        if (!item)
            goto done;
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    if (h->has_metadata) {
        meta = PyDict_New();
        if (!meta)
            goto done;
        for (size_t i = 0; i < h->n_meta; i++) {
            PyObject *k = PyUnicode_FromStringAndSize(h->meta[i].key, (Py_ssize_t)h->meta[i].key_len);
            PyObject *v = k ? PyUnicode_FromStringAndSize(h->meta[i].value, (Py_ssize_t)h->meta[i].value_len) : NULL;
            int bad = !v || PyDict_SetItem(meta, k, v) < 0;
            Py_XDECREF(k);
            Py_XDECREF(v);
            if (bad)
                goto done;
        }
    } else {
        Py_INCREF(meta);
    }
    result = Py_BuildValue("(KKOO)", (unsigned long long)h->header_len, (unsigned long long)h->data_start, list, meta);
done:
    Py_XDECREF(list);
    if (meta != Py_None || result)
        Py_XDECREF(meta);
    return result;
}

/* ---- loads ---------------------------------------------------------------------------------- */

PyDoc_STRVAR(load_doc,
             "load(paths, dtype=None, threads=1, mode='mmap', convert_from=None) -> list\n\n"
             "Loads safetensors files. For each file, a list of (name, Tensor) in name order.\n"
             "mode 'mmap': tensors are views into a private mapping of the file (copy-on-write),\n"
             "its pages read in in parallel; 'read': the data is read with pread into anonymous memory.\n"
             "dtype: a safetensors dtype name; tensors of F32/F16/BF16/F8_E4M3/F8_E5M2 (or only those named\n"
             "in convert_from) are converted to it (bit-identical to torch's .to()), others keep their dtype.");

static PyObject *load(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"paths", "dtype", "threads", "mode", "convert_from", NULL};
    module_state *st = state_of(module);
    PyObject *seq, *dtype_obj = Py_None, *from_obj = Py_None, *result = NULL;
    int threads = 1;
    const char *mode = "mmap";
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|Ois$O:load", kwlist, &seq, &dtype_obj, &threads, &mode,
                                     &from_obj))
        return NULL;
    int use_map;
    if (strcmp(mode, "mmap") == 0)
        use_map = 1;
    else if (strcmp(mode, "read") == 0)
        use_map = 0;
    else {
        PyErr_Format(PyExc_ValueError, "mode must be 'mmap' or 'read', not '%s'", mode);
        return NULL;
    }
    st_dtype target = ST_U8;
    int convert = dtype_obj != Py_None;
    if (convert && dtype_from_name(dtype_obj, &target) < 0)
        return NULL;
    convert = convert && cv_supported(target, target);
    unsigned convert_mask = 0; /* bit d: tensors of dtype d are converted */
    if (convert) {
        if (from_obj == Py_None) {
            for (int d = 0; d < ST_NDTYPES; d++)
                if (cv_supported((st_dtype)d, target))
                    convert_mask |= 1u << d;
        } else {
            PyObject *fast = PySequence_Fast(from_obj, "convert_from must be a sequence of dtype names");
            if (!fast)
                return NULL;
            for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast); i++) {
                st_dtype d;
                if (dtype_from_name(PySequence_Fast_GET_ITEM(fast, i), &d) < 0) {
                    Py_DECREF(fast);
                    return NULL;
                }
                if (cv_supported(d, target))
                    convert_mask |= 1u << d;
            }
            Py_DECREF(fast);
        }
        convert = convert_mask != 0;
    }
    Py_ssize_t n;
    path_arg *paths = paths_from(seq, &n);
    if (!paths)
        return NULL;
    const char **fs = paths_fs(paths, n);
    if (!fs) {
        paths_free(paths, n);
        return NULL;
    }
    load_plan plan;
    memset(&plan, 0, sizeof plan);
    ds_error err;
    err.input = -1;
    int rc;
    PyThreadState *ts = PyEval_SaveThread();
    poll_ctx pc = {&ts};
    rc = plan_load(&plan, fs, (size_t)n, use_map, convert ? convert_mask : 0, target, &err);
    if (!rc)
        rc = io_run(plan.n_tasks, threads, plan_run_task, &plan, poll_signals, &pc, &err);
    if (!rc && convert) { /* files read rather than mapped (read mode, or no lease) */
        rc = plan_read_conversions(&plan, target, &err);
        if (!rc)
            rc = io_run(plan.n_tasks, threads, plan_run_task, &plan, poll_signals, &pc, &err);
    }
    plan_close_files(&plan);
    PyEval_RestoreThread(ts);
    PyMem_Free(fs);
    if (rc) {
        Py_ssize_t which = err.input;
        raise_ds(st, &err, which >= 0 && which < n ? paths[which].display : NULL);
        plan_free(&plan);
        paths_free(paths, n);
        return NULL;
    }
    /* Hand the memory to Region objects, then build the tensors. */
    result = PyList_New(n);
    if (!result)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        plan_file *lf = &plan.files[i];
        st_header *h = &lf->h;
        PyObject *base_region, *conv_region = NULL;
        char *base, *conv_base = lf->conv;
        if (lf->map) {
            base_region = region_new(st, lf->map, lf->map_len, 1);
            base = lf->map + h->data_start;
            lf->map = NULL;
        } else {
            base_region = region_new(st, lf->copy, lf->copy_len, 0);
            base = lf->copy;
            lf->copy = NULL;
        }
        if (!base_region)
            goto fail;
        if (lf->conv) {
            conv_region = region_new(st, lf->conv, lf->conv_len, 0);
            lf->conv = NULL;
            if (!conv_region) {
                Py_DECREF(base_region);
                goto fail;
            }
        }
        PyObject *list = PyList_New((Py_ssize_t)h->n_tensors);
        if (!list) {
            Py_DECREF(base_region);
            Py_XDECREF(conv_region);
            goto fail;
        }
        PyList_SET_ITEM(result, i, list);
        for (size_t k = 0; k < h->n_tensors; k++) {
            const st_tensor *t = &h->tensors[k];
            PyObject *tensor;
            if (lf->conv_off && lf->conv_off[k] != UINT64_MAX) {
                uint64_t numel = (t->end - t->begin) / (st_dtype_bits(t->dtype) / 8);
                tensor = tensor_new(st, conv_region, conv_base + lf->conv_off[k], target, t->ndim, t->shape,
                                    numel * (st_dtype_bits(target) / 8));
            } else {
                tensor = tensor_new(st, base_region, base + t->begin, t->dtype, t->ndim, t->shape, t->end - t->begin);
            }
            PyObject *name = tensor ? PyUnicode_FromStringAndSize(t->name, (Py_ssize_t)t->name_len) : NULL;
            PyObject *pair = name ? PyTuple_Pack(2, name, tensor) : NULL;
            Py_XDECREF(name);
            Py_XDECREF(tensor);
            if (!pair) {
                Py_DECREF(base_region);
                Py_XDECREF(conv_region);
                goto fail;
            }
            PyList_SET_ITEM(list, (Py_ssize_t)k, pair);
        }
        Py_DECREF(base_region);
        Py_XDECREF(conv_region);
    }
    plan_free(&plan);
    paths_free(paths, n);
    return result;
fail:
    Py_XDECREF(result);
    plan_free(&plan);
    paths_free(paths, n);
    return NULL;
}

/* ---- the SIGBUS guard of file mappings (guard.h) -------------------------------------------- */

static void guard_notify(void) {
    /* async-signal-safe: Python runs its SIGBUS handler (diffsynth_c.loader.guard) at its next check */
    PyErr_SetInterruptEx(SIGBUS);
}

PyDoc_STRVAR(guard_install_doc,
             "guard_install(notify=True) -> None\n\n"
             "Installs the SIGBUS handler that keeps a truncated file's mappings readable (as zeros).\n"
             "With notify, each guarded fault also makes Python run its own SIGBUS handler.");

static PyObject *guard_install(PyObject *module, PyObject *args) {
    (void)module;
    int notify = 1;
    if (!PyArg_ParseTuple(args, "|p:guard_install", &notify))
        return NULL;
    if (mg_install(notify ? guard_notify : NULL) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(guard_faults_doc, "guard_faults() -> list of str\n\n"
                               "The files whose mappings faulted (were truncated under them) since the last call.");

static PyObject *guard_faults(PyObject *module, PyObject *noargs) {
    (void)module;
    (void)noargs;
    char *labels[64];
    size_t n = mg_take_faults(labels, 64);
    PyObject *out = PyList_New(0);
    for (size_t i = 0; i < n; i++) {
        PyObject *s = out ? PyUnicode_DecodeFSDefault(labels[i]) : NULL;
        if (!s || PyList_Append(out, s) < 0)
            Py_CLEAR(out);
        Py_XDECREF(s);
        free(labels[i]);
    }
    return out;
}
/* ---- reads into caller-owned memory (pinned loads) ------------------------------------------ */

PyDoc_STRVAR(read_into_doc,
             "read_into(paths, buffers, items, threads=1)\n\n"
             "Reads tensors into buffers the caller owns: buffers are buffer-protocol objects or DLPack\n"
             "producers (capsules, or objects with __dlpack__) of host memory. items: PlannedTensor\n"
             "(plan_buffers) or tuples of its fields (key, file, offset, nbytes, dtype, out_dtype, shape,\n"
             "buffer, buffer_offset, out_nbytes), file an index into paths, offset absolute, buffer an index\n"
             "into buffers; dtype != out_dtype converts (F32/F16/BF16/F8_E4M3/F8_E5M2) as load() does. Every\n"
             "item is checked to fit in its buffer before anything is read (ValueError naming the tensor).");

static PyObject *read_into(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"paths", "buffers", "items", "threads", NULL};
    module_state *st = state_of(module);
    PyObject *seq, *bufs_obj, *items_obj, *result = NULL;
    int threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|i:read_into", kwlist, &seq, &bufs_obj, &items_obj, &threads))
        return NULL;
    item_files f;
    dest_buffers bufs = {NULL, 0};
    ri_item *items = NULL;
    if (item_files_init(&f, seq, items_obj) < 0 || dest_buffers_get(bufs_obj, "read_into", &bufs) < 0)
        goto done;
    for (Py_ssize_t b = 0; b < bufs.n; b++)
        if (bufs.b[b].device_type != DL_CPU && bufs.b[b].device_type != DL_CUDA_HOST) {
            PyErr_Format(PyExc_ValueError, "read_into: buffer %zd is not in host memory (DLPack device type %d)", b,
                         bufs.b[b].device_type);
            goto done;
        }
    items = PyMem_Calloc(f.n_items ? (size_t)f.n_items : 1, sizeof *items);
    if (!items) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < f.n_items; i++) {
        planned_item it;
        if (planned_item_parse(PySequence_Fast_GET_ITEM(f.items, i), "read_into", &it) < 0 ||
            item_file(&f, i, it.file, "read_into") < 0)
            goto done;
        if (it.from != it.to && !cv_supported(it.from, it.to)) {
            PyErr_Format(PyExc_ValueError, "read_into: no conversion from %s to %s", st_dtype_name(it.from),
                         st_dtype_name(it.to));
            goto done;
        }
        if (planned_item_check(&it, &bufs, f.paths[it.file].display, "read_into") < 0)
            goto done;
        items[i].src = it.from;
        items[i].dst = it.to;
        items[i].out = bufs.b[it.buffer].data + it.buffer_offset;
        items[i].file = it.file;
        items[i].offset = it.offset;
        items[i].nbytes = it.nbytes;
        items[i].name = it.key; /* borrowed from the item, which f.items keeps alive */
    }
    ds_error err;
    err.input = -1;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = item_files_open(&f, &err);
    for (Py_ssize_t i = 0; !rc && i < f.n_items; i++)
        items[i].fd = f.files[items[i].file].fd;
    if (!rc)
        rc = ri_run(items, (size_t)f.n_items, threads, &err);
    item_files_close(&f);
    Py_END_ALLOW_THREADS
    if (rc)
        item_files_raise(st, &f, &err);
    else
        result = Py_NewRef(Py_None);
done:
    PyMem_Free(items);
    dest_buffers_release(&bufs);
    item_files_free(&f);
    return result;
}

/* ---- byte ranges and lazy views of a mapped file (DiskMap) ---------------------------------- */

PyDoc_STRVAR(map_ranges_doc,
             "map_ranges(path, ranges, threads=1, mode='mmap') -> list of Tensor\n\n"
             "Byte ranges (offset, nbytes) of one file as 1-D U8 Tensors sharing one Region, their pages read\n"
             "in on worker threads: a private mapping of the file (mode 'mmap') or pread into anonymous memory\n"
             "(mode 'read'). The ranges must lie inside the file.");

static PyObject *map_ranges(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"path", "ranges", "threads", "mode", NULL};
    module_state *st = state_of(module);
    path_arg path = {NULL, NULL};
    PyObject *ranges_obj, *fast = NULL, *result = NULL, *region = NULL;
    int threads = 1;
    const char *mode = "mmap";
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&O|is:map_ranges", kwlist, path_converter, &path, &ranges_obj,
                                     &threads, &mode))
        return NULL;
    load_plan plan;
    memset(&plan, 0, sizeof plan);
    uint64_t *offs = NULL, *lens = NULL, *dest = NULL;
    int use_map = strcmp(mode, "read") != 0;
    if (use_map && strcmp(mode, "mmap") != 0) {
        PyErr_Format(PyExc_ValueError, "mode must be 'mmap' or 'read', not '%s'", mode);
        goto done;
    }
    fast = PySequence_Fast(ranges_obj, "ranges must be a sequence of (offset, nbytes)");
    if (!fast)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    offs = PyMem_Calloc(n ? (size_t)n : 1, sizeof *offs);
    lens = PyMem_Calloc(n ? (size_t)n : 1, sizeof *lens);
    dest = PyMem_Calloc(n ? (size_t)n : 1, sizeof *dest);
    if (!offs || !lens || !dest) {
        PyErr_NoMemory();
        goto done;
    }
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long o, l;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "KK:range", &o, &l))
            goto done;
        offs[i] = o;
        lens[i] = l;
        dest[i] = total;
        total += (l + 63) & ~(uint64_t)63;
    }
    ds_error err;
    err.input = -1;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = plan_ranges(&plan, path_fs(&path), offs, lens, dest, (size_t)n, total, &use_map, &err);
    if (!rc)
        rc = io_run(plan.n_tasks, threads, plan_run_task, &plan, NULL, NULL, &err);
    plan_close_files(&plan);
    Py_END_ALLOW_THREADS
    if (rc) {
        raise_ds(st, &err, path.display);
        goto done;
    }
    plan_file *lf = plan.files;
    char *base = use_map ? lf->map : lf->copy;
    region = use_map ? region_new(st, lf->map, lf->map_len, 1) : region_new(st, lf->copy, lf->copy_len, 0);
    lf->map = lf->copy = NULL;
    if (!region)
        goto done;
    result = PyList_New(n);
    for (Py_ssize_t i = 0; result && i < n; i++) {
        uint64_t shape[1] = {lens[i]};
        PyObject *t = tensor_new(st, region, base + (use_map ? offs[i] : dest[i]), ST_U8, 1, shape, lens[i]);
        if (!t)
            Py_CLEAR(result);
        else
            PyList_SET_ITEM(result, i, t);
    }
done:
    plan_free(&plan);
    PyMem_Free(offs);
    PyMem_Free(lens);
    PyMem_Free(dest);
    Py_XDECREF(region);
    Py_XDECREF(fast);
    path_clear(&path);
    return result;
}

PyDoc_STRVAR(region_view_doc, "region_view(region, offset, nbytes, threads=1) -> Tensor\n\n"
                              "A 1-D U8 Tensor over [offset, offset+nbytes) of a file Region, its pages read in first\n"
                              "(on `threads` worker threads, GIL released).");

static PyObject *region_view(PyObject *module, PyObject *args) {
    module_state *st = state_of(module);
    PyObject *region_obj;
    unsigned long long off, nbytes;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "O!KK|i:region_view", st->RegionType, &region_obj, &off, &nbytes, &threads))
        return NULL;
    RegionObject *region = (RegionObject *)region_obj;
    if (off > region->len || nbytes > region->len - off)
        return PyErr_Format(PyExc_ValueError, "bytes [%llu, %llu) are outside the region of %zu bytes", off,
                            off + nbytes, region->len);
    load_plan plan;
    memset(&plan, 0, sizeof plan);
    ds_error err;
    err.input = -1;
    int rc = plan_add_byte_tasks(&plan, PLAN_POPULATE, 0, (char *)region->base + off, NULL, 0, (size_t)nbytes,
                                 threads > 1 ? PLAN_READ_CHUNK : PLAN_POPULATE_CHUNK, &err);
    if (!rc) {
        Py_BEGIN_ALLOW_THREADS
        rc = io_run(plan.n_tasks, threads, plan_run_task, &plan, NULL, NULL, &err);
        Py_END_ALLOW_THREADS
    }
    free(plan.tasks);
    if (rc)
        return raise_ds(st, &err, NULL);
    uint64_t shape[1] = {nbytes};
    return tensor_new(st, region_obj, (char *)region->base + off, ST_U8, 1, shape, nbytes);
}

PyMethodDef bind_load_methods[] = {
    {"read_header", (PyCFunction)read_header, METH_O, read_header_doc},
    {"load", (PyCFunction)(void (*)(void))load, METH_VARARGS | METH_KEYWORDS, load_doc},
    {"guard_install", (PyCFunction)guard_install, METH_VARARGS, guard_install_doc},
    {"guard_faults", (PyCFunction)guard_faults, METH_NOARGS, guard_faults_doc},
    {"region_view", (PyCFunction)region_view, METH_VARARGS, region_view_doc},
    {"map_ranges", (PyCFunction)(void (*)(void))map_ranges, METH_VARARGS | METH_KEYWORDS, map_ranges_doc},
    {"read_into", (PyCFunction)(void (*)(void))read_into, METH_VARARGS | METH_KEYWORDS, read_into_doc},
    {NULL, NULL, 0, NULL},
};
