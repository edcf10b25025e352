/* module.c: diffsynth_c._core, the module definition alone: its state, its exec slot (which makes
 * the exceptions and lets each part add its types and functions) and its slots.
 *
 * The parts (module.h): the types Region (region.c), Tensor (tensor.c), TensorRef (tensorref.c)
 * and OpenFile (openfile.c); the functions of each concern in bind_load.c, bind_hash.c,
 * bind_convert.c, bind_torch.c, bind_write.c, bind_download.c, bind_cuda.c and bind_plan.c (its types
 * in bufferplan.c). Under them, plain
 * C without Python: the planner (plan.c), the writer (writer.c), the parsers and io.c.
 *
 * Interpreters. Every Python object the core keeps is in module state (multi-phase init, heap
 * types): each interpreter that imports the module gets its own. The C side has process-wide state,
 * each documented where it lives, each shared by all interpreters on purpose:
 *   cuda.c      the CUDA library, opened once with dlopen and kept for the life of the process
 *               (g_api, g_open: set by cuda_open with the GIL held, not under a lock of their own);
 *   guard.c     the SIGBUS handler and its table of guarded mappings (a signal handler is per
 *               process; the table has its own mutex); its notify callback interrupts the main
 *               interpreter only (PyErr_SetInterruptEx);
 *   lease.c     the lease-break signal handler, its pipe and table of leases (per process, mutex);
 *   download.c  libcurl's global init (once per process, pthread_once);
 *   bind_torch.c  pickle_delay_us, a test hook set with the GIL held.
 * So the module runs in several interpreters that share the main GIL, as before this slot was
 * written (Python's default), but does not claim a per-interpreter GIL: cuda_open and the test
 * hook rely on the GIL for mutual exclusion. */
#include "module.h"

#include "convert.h"
#include "cuda.h"
#include "io.h"
#include "plan.h"

static PyObject *build_info(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
#ifdef DS_NO_CURL
    const int curl = 0;
#else
    const int curl = 1;
#endif
    return Py_BuildValue("{s:s,s:s,s:i,s:N,s:N}", "version", DS_VERSION, "f16_conversion", cv_f16_impl(), "cpu_count",
                         io_cpu_count(), "cuda", PyBool_FromLong(cu_get() != NULL), "curl", PyBool_FromLong(curl));
}

static PyMethodDef module_methods[] = {
    {"build_info", (PyCFunction)build_info, METH_NOARGS, "Facts about this build: version, conversion paths."},
    {NULL, NULL, 0, NULL},
};

/* The functions of each concern, added by module_exec. */
static PyMethodDef *const part_methods[] = {
    bind_load_methods,  bind_hash_methods,     bind_convert_methods, bind_torch_methods,
    bind_write_methods, bind_download_methods, bind_cuda_methods,    bind_plan_methods,
};

/* The types, each made by its own file. */
static int (*const part_exec[])(PyObject *) = {tensorref_exec, bufferplan_exec, region_exec, tensor_exec,
                                               openfile_add_type};

static int module_exec(PyObject *m) {
    module_state *st = state_of(m);
    st->FormatError = PyErr_NewExceptionWithDoc(
        "diffsynth_c._core.FormatError",
        "A model file breaks its format (the message names the file, the tensor and what is wrong).", PyExc_ValueError,
        NULL);
    if (!st->FormatError || PyModule_AddObjectRef(m, "FormatError", st->FormatError) < 0)
        return -1;
    st->NotNativeError = PyErr_NewExceptionWithDoc(
        "diffsynth_c._core.NotNativeError",
        "A checkpoint the C reader does not represent (legacy format, constructs outside its allow-list that "
        "torch accepts): the caller may hand it to torch.load(weights_only=True).",
        st->FormatError, NULL);
    if (!st->NotNativeError || PyModule_AddObjectRef(m, "NotNativeError", st->NotNativeError) < 0)
        return -1;
    PyObject *collections = PyImport_ImportModule("collections");
    st->OrderedDict = collections ? PyObject_GetAttrString(collections, "OrderedDict") : NULL;
    Py_XDECREF(collections);
    if (!st->OrderedDict)
        return -1;
    for (size_t i = 0; i < sizeof part_exec / sizeof *part_exec; i++)
        if (part_exec[i](m) < 0)
            return -1;
    for (size_t i = 0; i < sizeof part_methods / sizeof *part_methods; i++)
        if (PyModule_AddFunctions(m, part_methods[i]) < 0)
            return -1;
    if (PyModule_AddStringConstant(m, "__version__", DS_VERSION) < 0)
        return -1;
    if (PyModule_AddIntConstant(m, "MAX_HEADER", (long)ST_MAX_HEADER) < 0 ||
        PyModule_AddIntConstant(m, "ALIGN_HOST", PLAN_ALIGN_HOST) < 0 ||
        PyModule_AddIntConstant(m, "ALIGN_TORCH", PLAN_ALIGN_TORCH) < 0)
        return -1;
    return 0;
}

static int module_traverse(PyObject *m, visitproc visit, void *arg) {
    module_state *st = state_of(m);
    Py_VISIT(st->FormatError);
    Py_VISIT(st->NotNativeError);
    Py_VISIT(st->TensorRefType);
    Py_VISIT(st->BufferPlanType);
    Py_VISIT(st->PlanBufferType);
    Py_VISIT(st->PlannedTensorType);
    Py_VISIT(st->OrderedDict);
    Py_VISIT(st->RegionType);
    Py_VISIT(st->TensorType);
    return 0;
}

static int module_clear(PyObject *m) {
    module_state *st = state_of(m);
    Py_CLEAR(st->FormatError);
    Py_CLEAR(st->NotNativeError);
    Py_CLEAR(st->TensorRefType);
    Py_CLEAR(st->BufferPlanType);
    Py_CLEAR(st->PlanBufferType);
    Py_CLEAR(st->PlannedTensorType);
    Py_CLEAR(st->OrderedDict);
    Py_CLEAR(st->RegionType);
    Py_CLEAR(st->TensorType);
    return 0;
}

static void module_free(void *m) { module_clear((PyObject *)m); }

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
#ifdef Py_mod_multiple_interpreters /* Python 3.12+; see the note at the top on why not per-interpreter GIL */
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "diffsynth_c._core",
    .m_doc = "The C core of diffsynth_c: safetensors headers, parallel loads, dtype conversion, model hashes.",
    .m_size = sizeof(module_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&module_def); }
