/* bind_download.c: the download bindings of download.c (libcurl): http_get (one request) and
 * fetch (byte ranges of many files over a pool of connections, with the GIL released; the progress
 * callback and Ctrl-C are polled from the transfer's thread, taking the GIL for a moment). */
#include "module.h"

#include "download.h"

/* Copies a sequence of str into a NULL-free array of UTF-8 pointers that live
 * as long as *keep (a list of bytes). Returns the count, or -1 with an exception. */
static Py_ssize_t header_strings(PyObject *seq, const char ***out, PyObject **keep) {
    *out = NULL;
    *keep = PySequence_List(seq);
    if (!*keep)
        return -1;
    Py_ssize_t n = PyList_GET_SIZE(*keep);
    *out = PyMem_Calloc((size_t)n + 1, sizeof **out);
    if (!*out) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *b = PyUnicode_AsUTF8String(PyList_GET_ITEM(*keep, i));
        if (!b)
            return -1;
        PyList_SetItem(*keep, i, b); /* steals b, drops the str */
        (*out)[i] = PyBytes_AS_STRING(b);
    }
    return n;
}

PyDoc_STRVAR(http_get_doc, "http_get(url, headers, max_body) -> (status, final_url, header_bytes, body)\n\n"
                           "GETs url with redirects followed; the GIL is released. OSError on a transport error.");

static PyObject *http_get(PyObject *module, PyObject *args) {
    (void)module;
    const char *url;
    PyObject *hseq, *keep = NULL, *result = NULL;
    Py_ssize_t max_body;
    const char **hs = NULL;
    if (!PyArg_ParseTuple(args, "sOn", &url, &hseq, &max_body))
        return NULL;
    Py_ssize_t nh = header_strings(hseq, &hs, &keep);
    if (nh >= 0) {
        dn_reply reply;
        ds_error err;
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = dn_get(url, hs, (size_t)nh, (size_t)max_body, &reply, &err);
        Py_END_ALLOW_THREADS
        if (rc) {
            /* a build without libcurl is not a network failure to retry */
            PyErr_Format(err.status == DS_ERR_UNSUPPORTED ? PyExc_RuntimeError : PyExc_ConnectionError, "%s: %s", url,
                         err.msg);
        } else {
            result = Py_BuildValue("(lsy#y#)", reply.status, reply.final_url, reply.headers,
                                   (Py_ssize_t)reply.headers_len, reply.body, (Py_ssize_t)reply.body_len);
            dn_reply_free(&reply);
        }
    }
    PyMem_Free(hs);
    Py_XDECREF(keep);
    return result;
}

typedef struct {
    PyThreadState *ts;
    PyObject *progress; /* borrowed; None for none */
    const dn_job *jobs; /* the transfer's jobs: the poll runs on its thread, between its steps */
    size_t n_jobs;
    unsigned char *told; /* per job: already reported as finished */
} fetch_poll;

/* The indices of the jobs finished since the last call, as a tuple (NULL on no memory). */
static PyObject *newly_finished(fetch_poll *fp) {
    size_t k = 0;
    for (size_t j = 0; j < fp->n_jobs; j++)
        k += fp->jobs[j].state == DN_DONE && !fp->told[j];
    PyObject *t = PyTuple_New((Py_ssize_t)k);
    if (!t)
        return NULL;
    k = 0;
    for (size_t j = 0; j < fp->n_jobs; j++) {
        if (fp->jobs[j].state != DN_DONE || fp->told[j])
            continue;
        PyObject *i = PyLong_FromSize_t(j);
        if (!i) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, (Py_ssize_t)k++, i);
        fp->told[j] = 1;
    }
    return t;
}

/* Takes the GIL for a moment: Ctrl-C, then the progress callback with the bytes so far and the
 * jobs finished since the last call (so that the caller can seal a complete file while the
 * others still transfer). */
static int fetch_poll_fn(void *arg, int64_t bytes) {
    fetch_poll *fp = arg;
    PyEval_RestoreThread(fp->ts);
    int stop = PyErr_CheckSignals() != 0;
    if (!stop && fp->progress != Py_None) {
        PyObject *finished = newly_finished(fp);
        PyObject *r = finished ? PyObject_CallFunction(fp->progress, "LO", (long long)bytes, finished) : NULL;
        stop = r == NULL;
        Py_XDECREF(r);
        Py_XDECREF(finished);
    }
    fp->ts = PyEval_SaveThread();
    return stop;
}

/* Appends one (done, ok, status, ignored_range, attempts, message) per job to out. Returns 0, or -1
 * with an exception set. */
static int append_results(PyObject *out, const dn_job *jobs, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = Py_BuildValue("(LOliis)", (long long)jobs[i].done, jobs[i].state == DN_DONE ? Py_True : Py_False,
                                    jobs[i].status, jobs[i].ignored_range, jobs[i].attempts, jobs[i].msg);
        if (!t || PyList_Append(out, t)) {
            Py_XDECREF(t);
            return -1;
        }
        Py_DECREF(t);
    }
    return 0;
}

PyDoc_STRVAR(fetch_doc,
             "fetch(jobs, headers, connections, retries, stall_seconds, progress, out) -> None\n\n"
             "jobs: (url, fd, start, end, done) byte ranges [start, end) of open files (end -1: to the end of\n"
             "the body), done bytes of each already present. Runs them over `connections` connections with\n"
             "the GIL released; progress(bytes, finished) is called about every 100 ms, finished a tuple of\n"
             "the indices of the jobs done since its last call. Appends to the list out one\n"
             "(done, ok, status, ignored_range, attempts, message) per job, also when it raises: OSError when\n"
             "a write fails; the exception\n"
             "of progress or KeyboardInterrupt stops every transfer (partial bytes stay in the files).");

static PyObject *fetch(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *jseq, *hseq, *progress, *out, *keep = NULL, *jl = NULL, *result = NULL;
    int connections, retries;
    double stall;
    const char **hs = NULL;
    dn_job *jobs = NULL;
    if (!PyArg_ParseTuple(args, "OOiidOO!", &jseq, &hseq, &connections, &retries, &stall, &progress, &PyList_Type,
                          &out))
        return NULL;
    Py_ssize_t nh = header_strings(hseq, &hs, &keep);
    if (nh < 0)
        goto done;
    jl = PySequence_List(jseq);
    if (!jl)
        goto done;
    Py_ssize_t n = PyList_GET_SIZE(jl);
    jobs = PyMem_Calloc((size_t)n + 1, sizeof *jobs);
    if (!jobs) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long start, end, have;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(jl, i), "siLLL", &jobs[i].url, &jobs[i].fd, &start, &end, &have))
            goto done;
        jobs[i].start = start;
        jobs[i].end = end;
        jobs[i].done = have;
    }
    ds_error err;
    fetch_poll fp = {NULL, progress, jobs, (size_t)n, PyMem_Calloc((size_t)n + 1, 1)};
    if (!fp.told) {
        PyErr_NoMemory();
        goto done;
    }
    fp.ts = PyEval_SaveThread();
    int rc = dn_fetch(jobs, (size_t)n, hs, (size_t)nh, connections, retries, stall, fetch_poll_fn, &fp, &err);
    PyEval_RestoreThread(fp.ts);
    PyMem_Free(fp.told);
    /* The results go to `out` even when the transfers were stopped, so that the caller can record
     * how far each partial file got. A stop by the progress callback's exception (or Ctrl-C)
     * leaves that exception set: it is put aside while the results are built (no Python call may
     * run with an exception set) and raised after, winning over a failure to build them. */
    PyObject *stop = bind_error_take();
    int built = append_results(out, jobs, n);
    if (stop) {
        if (built < 0)
            PyErr_Clear();
        bind_error_give(stop);
        goto done;
    }
    if (built < 0)
        goto done;
    if (rc) {
        if (err.status == DS_ERR_INTERRUPTED) {
            if (!PyErr_Occurred())
                PyErr_SetNone(PyExc_KeyboardInterrupt);
        } else if (err.status == DS_ERR_OS) {
            PyObject *e = Py_BuildValue("(is)", err.errnum, err.msg);
            if (e) {
                PyErr_SetObject(PyExc_OSError, e);
                Py_DECREF(e);
            }
        } else {
            PyErr_SetString(err.status == DS_ERR_UNSUPPORTED ? PyExc_RuntimeError : PyExc_MemoryError, err.msg);
        }
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(jobs);
    PyMem_Free(hs);
    Py_XDECREF(jl);
    Py_XDECREF(keep);
    return result;
}

PyMethodDef bind_download_methods[] = {
    {"http_get", (PyCFunction)http_get, METH_VARARGS, http_get_doc},
    {"fetch", (PyCFunction)fetch, METH_VARARGS, fetch_doc},
    {NULL, NULL, 0, NULL},
};
