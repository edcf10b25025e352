/* bind_torch.c: torch_read, the binding of torchfile.c: a torch.save checkpoint's zip directory
 * and data.pkl read with the GIL released (Ctrl-C polled), then the pickle graph converted to
 * Python objects, tensors as TensorRef (tensorref.c). */
#include "module.h"

#include <string.h>

#include "torchfile.h"

/* Converting a pickle graph: one Python object per pickle object (built[id]), so shared objects
 * stay shared (and `is` the same) and the work is linear in the pickle, cycles included. */
typedef struct {
    module_state *st;
    PyObject **built; /* by pk_obj id; new references, freed with the walk */
    size_t n;
    size_t until_check; /* Ctrl-C is checked every PK_POLL_EVERY objects */
} py_walk;

static PyObject *pk_to_py(py_walk *w, const pk_obj *o, int depth);

/* Sets the attributes that BUILD gave an OrderedDict: obj.__dict__.update(state), as torch does. */
static int set_odict_state(py_walk *w, PyObject *obj, const pk_obj *state, int depth) {
    PyObject *st = pk_to_py(w, state, depth + 1), *d = st ? PyObject_GetAttrString(obj, "__dict__") : NULL;
    int rc = d ? PyDict_Update(d, st) : -1;
    Py_XDECREF(d);
    Py_XDECREF(st);
    return rc;
}

static PyObject *pk_to_py_new(py_walk *w, const pk_obj *o, int depth) {
    module_state *st = w->st;
    switch (o->kind) {
    case PK_NONE: Py_RETURN_NONE;
    case PK_BOOL: return PyBool_FromLong((long)o->u.i);
    case PK_INT: return PyLong_FromLongLong(o->u.i);
    case PK_FLOAT: return PyFloat_FromDouble(o->u.f);
    case PK_STR: return PyUnicode_DecodeUTF8(o->u.str.s, (Py_ssize_t)o->u.str.len, "surrogatepass");
    case PK_BYTES: return PyBytes_FromStringAndSize(o->u.str.s, (Py_ssize_t)o->u.str.len);
    case PK_TUPLE:
    case PK_LIST: {
        /* registered before its items are built: an item may refer back to it (a cycle through a list) */
        PyObject *r = o->kind == PK_TUPLE ? PyTuple_New((Py_ssize_t)o->u.seq.n) : PyList_New((Py_ssize_t)o->u.seq.n);
        if (!r)
            return NULL;
        for (size_t i = 0; i < o->u.seq.n; i++) /* never a NULL item, even while it is being filled */
            if (o->kind == PK_TUPLE)
                PyTuple_SET_ITEM(r, (Py_ssize_t)i, Py_NewRef(Py_None));
            else
                PyList_SET_ITEM(r, (Py_ssize_t)i, Py_NewRef(Py_None));
        w->built[o->id] = Py_NewRef(r);
        for (size_t i = 0; i < o->u.seq.n; i++) {
            PyObject *v = pk_to_py(w, o->u.seq.v[i], depth + 1);
            if (!v) {
                Py_DECREF(r);
                return NULL;
            }
            PyObject **slot =
                o->kind == PK_TUPLE ? &PyTuple_GET_ITEM(r, (Py_ssize_t)i) : &PyList_GET_ITEM(r, (Py_ssize_t)i);
            Py_SETREF(*slot, v);
        }
        return r;
    }
    case PK_DICT:
    case PK_ODICT: {
        PyObject *r = o->kind == PK_DICT ? PyDict_New() : PyObject_CallNoArgs(st->OrderedDict);
        if (!r)
            return NULL;
        w->built[o->id] = Py_NewRef(r);
        for (size_t i = 0; i + 1 < o->u.seq.n; i += 2) {
            PyObject *k = pk_to_py(w, o->u.seq.v[i], depth + 1);
            PyObject *v = k ? pk_to_py(w, o->u.seq.v[i + 1], depth + 1) : NULL;
            int bad = !v;
            if (v && PyObject_SetItem(r, k, v) < 0) {
                bad = 1;
                if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                    PyErr_Clear();
                    PyErr_Format(st->FormatError, "data.pkl has a dict key of type %s", Py_TYPE(k)->tp_name);
                }
            }
            Py_XDECREF(k);
            Py_XDECREF(v);
            if (bad) {
                Py_DECREF(r);
                return NULL;
            }
        }
        if (o->state && set_odict_state(w, r, o->state, depth) < 0) {
            Py_DECREF(r);
            return NULL;
        }
        return r;
    }
    case PK_TENSOR: {
        const pk_tensor *t = o->u.tensor;
        PyObject *r = PyStructSequence_New(st->TensorRefType);
        if (!r)
            return NULL;
        PyObject *vals[9] = {
            PyLong_FromSize_t(t->storage->u.storage.index),
            PyUnicode_FromString(st_dtype_name((st_dtype)t->dtype)),
            PyLong_FromUnsignedLongLong(t->offset),
            shape_tuple(t->ndim, t->size),
            shape_tuple(t->ndim, t->stride),
            PyBool_FromLong(t->requires_grad),
            PyBool_FromLong(t->parameter),
            t->metadata ? pk_to_py(w, t->metadata, depth + 1) : Py_NewRef(Py_None),
            t->state ? pk_to_py(w, t->state, depth + 1) : Py_NewRef(Py_None),
        };
        int ok = 1;
        for (int i = 0; i < 9; i++) {
            if (!vals[i])
                ok = 0;
            PyStructSequence_SET_ITEM(r, i, vals[i] ? vals[i] : Py_NewRef(Py_None));
        }
        if (!ok) {
            Py_DECREF(r);
            return NULL;
        }
        return r;
    }
    default: PyErr_SetString(st->FormatError, "data.pkl holds a value this reader does not represent"); return NULL;
    }
}

/* The Python value of a pickle object (a new reference); tensors become TensorRef. */
static PyObject *pk_to_py(py_walk *w, const pk_obj *o, int depth) {
    if (o->id < w->n && w->built[o->id])
        return Py_NewRef(w->built[o->id]);
    if (depth > 1000) {
        PyErr_SetString(w->st->FormatError, "data.pkl nests containers more than 1000 deep");
        return NULL;
    }
    if (--w->until_check == 0) {
        w->until_check = PK_POLL_EVERY;
        if (PyErr_CheckSignals() < 0)
            return NULL;
    }
    PyObject *r = pk_to_py_new(w, o, depth);
    if (r && o->id < w->n && !w->built[o->id])
        w->built[o->id] = Py_NewRef(r);
    return r;
}

/* Tests only: a sleep per pickle opcode, so that a run lasts long enough to be interrupted.
 * Process-wide (a test hook, not state of a module object): written and read with the GIL held,
 * which is one reason the module does not claim a per-interpreter GIL (module.c). */
static unsigned pickle_delay_us;

PyDoc_STRVAR(debug_pickle_delay_doc, "_debug_pickle_delay(us) -> None\n\n"
                                     "Tests only: sleep us microseconds per pickle opcode in torch_read (0: off).");

static PyObject *debug_pickle_delay(PyObject *module, PyObject *arg) {
    (void)module;
    unsigned long us = PyLong_AsUnsignedLong(arg);
    if (us == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    pickle_delay_us = (unsigned)us;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(torch_read_doc,
             "torch_read(path, allowed=()) -> (obj, storages)\n\n"
             "Reads a torch.save checkpoint's zip directory and data.pkl (nothing else) through the restricted\n"
             "pickle machine. obj: the saved value, tensors as TensorRef (an object the pickle shares is one\n"
             "object here too); storages: list of (key, dtype or None for untyped, nbytes, file offset).\n"
             "allowed: 'module.name' strings of globals the user allowed torch.load to resolve; the file is\n"
             "then left to torch.load. Raises NotNativeError (a FormatError) for a file this reader does not\n"
             "represent (legacy format, big-endian, constructs outside its allow-list that torch accepts),\n"
             "FormatError for a malformed one or one that names a refused global, KeyboardInterrupt on Ctrl-C.");

static PyObject *torch_read(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"path", "allowed", NULL};
    module_state *st = state_of(module);
    path_arg path = {NULL, NULL};
    PyObject *allowed_obj = NULL, *obj = NULL, *stor = NULL, *result = NULL;
    PyObject *allowed_fast = NULL;
    const char **allowed = NULL;
    py_walk w = {st, NULL, 0, PK_POLL_EVERY};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&|O:torch_read", kwlist, path_converter, &path, &allowed_obj))
        return NULL;
    pk_options opt;
    memset(&opt, 0, sizeof opt);
    if (allowed_obj) {
        allowed_fast = PySequence_Fast(allowed_obj, "allowed must be a sequence of str");
        if (!allowed_fast)
            goto done;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(allowed_fast);
        allowed = PyMem_Calloc(n ? (size_t)n : 1, sizeof *allowed);
        if (!allowed) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t i = 0; i < n; i++)
            if (!(allowed[i] = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(allowed_fast, i))))
                goto done;
        opt.allowed = allowed;
        opt.n_allowed = (size_t)n;
    }
    tf_checkpoint c;
    ds_error err;
    err.input = -1;
    PyThreadState *ts = NULL;
    poll_ctx pc = {&ts};
    opt.poll = poll_signals;
    opt.poll_ctx = &pc;
    opt.delay_us = pickle_delay_us;
    ts = PyEval_SaveThread();
    int rc = tf_open(path_fs(&path), &opt, &c, &err);
    PyEval_RestoreThread(ts);
    if (rc) {
        if (err.status == DS_ERR_UNSUPPORTED)
            PyErr_Format(st->NotNativeError, "%U: %s", path.display, err.msg);
        else
            raise_ds(st, &err, path.display);
        goto done;
    }
    w.n = c.pk.n_objs;
    w.built = PyMem_Calloc(w.n ? w.n : 1, sizeof *w.built);
    obj = w.built ? pk_to_py(&w, c.pk.root, 0) : PyErr_NoMemory();
    if (obj)
        stor = PyList_New((Py_ssize_t)c.pk.n_storages);
    for (size_t i = 0; stor && i < c.pk.n_storages; i++) {
        const pk_storage *s = &c.pk.storages[i]->u.storage;
        PyObject *item;
        if (s->dtype == PK_UNTYPED)
            item = Py_BuildValue("(s#OKK)", s->key, (Py_ssize_t)s->key_len, Py_None,
                                 (unsigned long long)c.storage_nbytes[i], (unsigned long long)c.storage_offset[i]);
        else
            item = Py_BuildValue("(s#sKK)", s->key, (Py_ssize_t)s->key_len, st_dtype_name((st_dtype)s->dtype),
                                 (unsigned long long)c.storage_nbytes[i], (unsigned long long)c.storage_offset[i]);
        if (!item)
            Py_CLEAR(stor);
        else
            PyList_SET_ITEM(stor, (Py_ssize_t)i, item);
    }
    tf_close(&c);
    if (obj && stor)
        result = PyTuple_Pack(2, obj, stor);
    else if (PyErr_ExceptionMatches(st->FormatError)) {
        /* name the file */
        PyObject *value = bind_error_take();
        PyErr_Format(st->FormatError, "%U: %S", path.display, value ? value : Py_None);
        Py_XDECREF(value);
    }
done:
    for (size_t i = 0; w.built && i < w.n; i++)
        Py_XDECREF(w.built[i]);
    PyMem_Free(w.built);
    PyMem_Free(allowed);
    Py_XDECREF(allowed_fast);
    Py_XDECREF(obj);
    Py_XDECREF(stor);
    path_clear(&path);
    return result;
}

PyMethodDef bind_torch_methods[] = {
    {"torch_read", (PyCFunction)(void (*)(void))torch_read, METH_VARARGS | METH_KEYWORDS, torch_read_doc},
    {"_debug_pickle_delay", (PyCFunction)debug_pickle_delay, METH_O, debug_pickle_delay_doc},
    {NULL, NULL, 0, NULL},
};
