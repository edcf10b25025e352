/* bind_convert.c: dtype conversion of Python buffers with the loader's CPU path (convert.c):
 * convert (tests, small arrays) and convert_into (the CPU cast of the VRAM-managed layers, on
 * worker threads with the GIL released). */
#include "module.h"

#include <string.h>

#include "convert.h"
#include "plan.h"

PyDoc_STRVAR(convert_doc, "convert(src_dtype, dst_dtype, data, *, portable=False, rules=None) -> bytes\n\n"
                          "Converts the elements in a bytes-like object between F32, F16, BF16, F8_E4M3 and\n"
                          "F8_E5M2 with the CPU path of the loader; portable=True avoids the F16C instructions\n"
                          "so that tests can check the shared helpers of kernels/dtype.h. rules=(nan, saturate)\n"
                          "runs those helpers element by element with the CUDA kernels' rules instead.");

static PyObject *convert(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"src_dtype", "dst_dtype", "data", "portable", "rules", NULL};
    (void)module;
    PyObject *src_obj, *dst_obj, *data, *rules = Py_None;
    st_dtype src, dst;
    int portable = 0, nan = 0, saturate = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "UUO|$pO:convert", kwlist, &src_obj, &dst_obj, &data, &portable,
                                     &rules))
        return NULL;
    if (rules != Py_None && !PyArg_ParseTuple(rules, "ii:rules", &nan, &saturate))
        return NULL;
    if (dtype_from_name(src_obj, &src) < 0 || dtype_from_name(dst_obj, &dst) < 0)
        return NULL;
    if (!cv_supported(src, dst)) {
        PyErr_Format(PyExc_ValueError, "no conversion from %s to %s", st_dtype_name(src), st_dtype_name(dst));
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    size_t in_size = st_dtype_bits(src) / 8, out_size = st_dtype_bits(dst) / 8;
    if ((size_t)view.len % in_size) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "%zd bytes is not a whole number of %s elements", view.len, st_dtype_name(src));
        return NULL;
    }
    size_t n = (size_t)view.len / in_size;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * out_size));
    if (out) {
        char *o = PyBytes_AS_STRING(out);
        int by_rules = rules != Py_None;
        Py_BEGIN_ALLOW_THREADS
        if (by_rules)
            cv_run_rules(src, dst, view.buf, o, n, nan, saturate);
        else if (portable)
            cv_run_with(src, dst, view.buf, o, n, 0);
        else
            cv_run(src, dst, view.buf, o, n);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&view);
    return out;
}

PyDoc_STRVAR(convert_into_doc, "convert_into(src_dtype, dst_dtype, src, dst, threads=1) -> None\n\n"
                               "Converts the elements of the buffer src into the writable buffer dst (same\n"
                               "element count, no overlap) on `threads` threads, with the GIL released: the\n"
                               "CPU cast of the VRAM-managed layers (fp8 storage, bf16 computation).");

typedef struct {
    st_dtype src, dst;
    const char *in;
    char *out;
    size_t n, in_size, out_size;
} convert_job;

static int convert_task(void *ctx, size_t task, ds_error *err) {
    (void)err;
    const convert_job *j = ctx;
    size_t begin = task * PLAN_CONVERT_CHUNK, k = j->n - begin < PLAN_CONVERT_CHUNK ? j->n - begin : PLAN_CONVERT_CHUNK;
    cv_run(j->src, j->dst, j->in + begin * j->in_size, j->out + begin * j->out_size, k);
    return 0;
}

static PyObject *convert_into(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"src_dtype", "dst_dtype", "src", "dst", "threads", NULL};
    (void)module;
    PyObject *src_obj, *dst_obj, *src, *dst, *result = NULL;
    int threads = 1;
    convert_job job;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "UUOO|i:convert_into", kwlist, &src_obj, &dst_obj, &src, &dst,
                                     &threads))
        return NULL;
    if (dtype_from_name(src_obj, &job.src) < 0 || dtype_from_name(dst_obj, &job.dst) < 0)
        return NULL;
    if (!cv_supported(job.src, job.dst))
        return PyErr_Format(PyExc_ValueError, "no conversion from %s to %s", st_dtype_name(job.src),
                            st_dtype_name(job.dst));
    Py_buffer in, out;
    if (PyObject_GetBuffer(src, &in, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(dst, &out, PyBUF_SIMPLE | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&in);
        return NULL;
    }
    job.in_size = st_dtype_bits(job.src) / 8;
    job.out_size = st_dtype_bits(job.dst) / 8;
    job.n = (size_t)in.len / job.in_size;
    job.in = in.buf;
    job.out = out.buf;
    const char *in_end = job.in + in.len, *out_end = job.out + out.len;
    if ((size_t)in.len % job.in_size) {
        PyErr_Format(PyExc_ValueError, "convert_into: %zd bytes is not a whole number of %s elements", in.len,
                     st_dtype_name(job.src));
    } else if ((size_t)out.len != job.n * job.out_size) {
        PyErr_Format(PyExc_ValueError, "convert_into: %zu %s elements need %zu bytes, dst has %zd", job.n,
                     st_dtype_name(job.dst), job.n * job.out_size, out.len);
    } else if (job.n && job.in < out_end && job.out < in_end) {
        PyErr_SetString(PyExc_ValueError, "convert_into: src and dst overlap");
    } else {
        ds_error err;
        memset(&err, 0, sizeof err);
        size_t n_tasks = (job.n + PLAN_CONVERT_CHUNK - 1) / PLAN_CONVERT_CHUNK;
        Py_BEGIN_ALLOW_THREADS
        io_run(n_tasks, threads < 1 ? 1 : threads, convert_task, &job, NULL, NULL, &err);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&out);
    PyBuffer_Release(&in);
    return result;
}

PyMethodDef bind_convert_methods[] = {
    {"convert", (PyCFunction)(void (*)(void))convert, METH_VARARGS | METH_KEYWORDS, convert_doc},
    {"convert_into", (PyCFunction)(void (*)(void))convert_into, METH_VARARGS | METH_KEYWORDS, convert_into_doc},
    {NULL, NULL, 0, NULL},
};
