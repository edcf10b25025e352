/* tensorref.c: the TensorRef type: a tensor of a torch.save checkpoint as data.pkl describes it
 * (a struct sequence; torch_read in bind_torch.c fills it, Python builds the torch tensor). */
#include "module.h"

static PyStructSequence_Field tensor_ref_fields[] = {
    {"storage", "index into the storages list"},
    {"dtype", "safetensors dtype name of the elements"},
    {"offset", "storage offset, in elements"},
    {"shape", "tuple of sizes"},
    {"stride", "tuple of strides, in elements"},
    {"requires_grad", "as saved"},
    {"parameter", "saved as an nn.Parameter"},
    {"metadata", "the tensor's saved metadata (e.g. {'conj': True}, {'neg': True}), or None"},
    {"state", "the Python attributes saved with an nn.Parameter (a dict), or None"},
    {NULL, NULL},
};

static PyStructSequence_Desc tensor_ref_desc = {
    "diffsynth_c._core.TensorRef",
    "A tensor of a checkpoint as data.pkl describes it: a view into one of its storages.",
    tensor_ref_fields,
    9,
};

/* Creates the TensorRef type and adds it to the module. Returns 0, or -1 with an exception set. */
int tensorref_exec(PyObject *module) {
    module_state *st = state_of(module);
    st->TensorRefType = PyStructSequence_NewType(&tensor_ref_desc);
    if (!st->TensorRefType || PyModule_AddType(module, st->TensorRefType) < 0)
        return -1;
    return 0;
}
