/* bufferplan.c: the types of a buffer plan (_core.plan_buffers, bind_plan.c): BufferPlan, and its
 * PlanBuffer and PlannedTensor entries. Struct sequences, as TensorRef: named fields that also
 * unpack as tuples, so an entry goes back into read_into or cuda_upload as it came out. */
#include "module.h"

static PyStructSequence_Field buffer_plan_fields[] = {
    {"buffers", "list of PlanBuffer: the buffers to allocate"},
    {"tensors", "list of PlannedTensor: merged, the merged dict's keys in order; else file by file, in header order"},
    {NULL, NULL},
};

static PyStructSequence_Field plan_buffer_fields[] = {
    {"nbytes", "bytes the buffer must hold (a multiple of the alignment; 0 when empty)"},
    {"reader", "split='buckets': the reader that fills it; else 0"},
    {"file", "the file it belongs to, or -1 for a bucket (which may span files)"},
    {NULL, NULL},
};

static PyStructSequence_Field planned_tensor_fields[] = {
    {"key", "the tensor's name"},
    {"file", "index into paths"},
    {"offset", "absolute file offset of its bytes"},
    {"nbytes", "bytes to read"},
    {"dtype", "safetensors dtype in the file"},
    {"out_dtype", "safetensors dtype written (dtype: copied as it is)"},
    {"shape", "tuple of sizes"},
    {"buffer", "index into buffers"},
    {"buffer_offset", "offset in its buffer (a multiple of the alignment)"},
    {"out_nbytes", "bytes written into the buffer"},
    {NULL, NULL},
};

static PyStructSequence_Desc buffer_plan_desc = {
    "diffsynth_c._core.BufferPlan",
    "The buffers a load fills and, per tensor, where its bytes come from and go (_core.plan_buffers).",
    buffer_plan_fields,
    2,
};

static PyStructSequence_Desc plan_buffer_desc = {
    "diffsynth_c._core.PlanBuffer",
    "One buffer of a BufferPlan.",
    plan_buffer_fields,
    3,
};

static PyStructSequence_Desc planned_tensor_desc = {
    "diffsynth_c._core.PlannedTensor",
    "One tensor of a BufferPlan; also an item of read_into and cuda_upload.",
    planned_tensor_fields,
    10,
};

/* Creates the three types and adds them to the module. Returns 0, or -1 with an exception set. */
int bufferplan_exec(PyObject *module) {
    module_state *st = state_of(module);
    st->BufferPlanType = PyStructSequence_NewType(&buffer_plan_desc);
    if (!st->BufferPlanType || PyModule_AddType(module, st->BufferPlanType) < 0)
        return -1;
    st->PlanBufferType = PyStructSequence_NewType(&plan_buffer_desc);
    if (!st->PlanBufferType || PyModule_AddType(module, st->PlanBufferType) < 0)
        return -1;
    st->PlannedTensorType = PyStructSequence_NewType(&planned_tensor_desc);
    if (!st->PlannedTensorType || PyModule_AddType(module, st->PlannedTensorType) < 0)
        return -1;
    return 0;
}
