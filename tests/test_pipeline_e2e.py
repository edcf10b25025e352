"""A real DiffSynth pipeline class end to end: ``WanVideoPipeline.from_pretrained`` with its smallest
model, the Wan motion controller, at its real shapes (its hash is the one in DiffSynth's
MODEL_CONFIGS; stored in fp8 to keep the file at 17 MB of random values).

The same script runs in three fresh interpreters: DiffSynth plain, patched before the pipeline
import, patched after it. Each loads the pipeline under the VRAM configurations DiffSynth's guide
documents (none, fp8 storage, disk offload, bf16 storage with fp32 computation) and with
``quantize=`` through a CPU backend registered with DiffSynth's ``register_quant_backend``, and
records the parameters and the model's output. All three must agree exactly.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

import diffsynth_c

from .conftest import run_python

SCRIPT = r"""
import hashlib, sys, torch
ORDER = ORDER_
if ORDER == "before":
    import diffsynth_c
    diffsynth_c.patch_diffsynth()
from diffsynth.pipelines.wan_video import WanVideoPipeline, ModelConfig
from diffsynth.models.wan_video_dit import sinusoidal_embedding_1d
from tests.vram_configs import BF16, configs
if ORDER == "after":
    import diffsynth_c
    diffsynth_c.patch_diffsynth()

CONFIGS = configs(exclude=["linear.4"])
results = {}
for name, kw in CONFIGS.items():
    pipe = WanVideoPipeline.from_pretrained(torch_dtype=BF16, device="cpu", tokenizer_config=None,
                                            model_configs=[ModelConfig(path=PATH_, **kw)])
    model = pipe.motion_controller
    params = {}
    for k, v in model.state_dict().items():
        data = b"" if v.is_meta else v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        params[k] = (str(v.dtype), str(v.device), tuple(v.shape), hashlib.md5(data).hexdigest())
    dtype = kw.get("computation_dtype") or BF16
    outs = []
    for step in range(2):
        for m in model.modules():
            if m is not model and hasattr(m, "onload"):
                m.offload(); m.onload()
        emb = sinusoidal_embedding_1d(model.freq_dim, torch.tensor([3.0 + step]) * 10).to(dtype)
        with torch.no_grad():
            outs.append(model.linear(emb))
    kinds = sorted({type(m).__name__ for m in model.modules()})
    results[name] = {"params": params, "outs": outs, "kinds": kinds,
                     "vram": bool(getattr(pipe, "vram_management_enabled", False)),
                     "layers_from": sorted({type(m).__module__.split(".")[0] for m in model.modules() if hasattr(m, "state")})}
torch.save(results, OUT_)
"""


@pytest.fixture(scope="module")
def motion_controller_file(tmp_path_factory):
    from diffsynth.configs import MODEL_CONFIGS
    from diffsynth.models.wan_video_motion_controller import WanMotionControllerModel

    with diffsynth_c.skip_model_initialization():
        shapes = {k: v.shape for k, v in WanMotionControllerModel().state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=g) * 0.05).to(torch.float8_e4m3fn) for k, s in shapes.items()}
    path = str(tmp_path_factory.mktemp("wan") / "motion_controller.safetensors")
    safetensors.torch.save_file(tensors, path)
    want = next(c for c in MODEL_CONFIGS if c["model_name"] == "wan_video_motion_controller")["model_hash"]
    assert diffsynth_c.hash_model_file(path) == want
    return path


def test_wan_pipeline_plain_and_patched_before_and_after_the_imports(motion_controller_file, tmp_path):
    results = {}
    for order in ("plain", "before", "after"):
        out = str(tmp_path / f"{order}.pt")
        code = (
            SCRIPT.replace("ORDER_", repr(order))
            .replace("PATH_", repr(motion_controller_file))
            .replace("OUT_", repr(out))
        )
        r = run_python(code, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        results[order] = torch.load(out)
    plain = results["plain"]
    for order in ("before", "after"):
        for name, theirs in plain.items():
            ours = results[order][name]
            assert ours["params"] == theirs["params"], (order, name)
            assert all(torch.equal(a, b) for a, b in zip(theirs["outs"], ours["outs"])), (order, name)
            assert ours["kinds"] == theirs["kinds"] and ours["vram"] == theirs["vram"], (order, name)
            # the VRAM-managed layers are DiffSynth's plain, ours patched
            assert theirs["layers_from"] in ([], ["diffsynth"]), theirs["layers_from"]
            assert ours["layers_from"] == (["diffsynth_c"] if theirs["layers_from"] else []), (order, name)
    assert plain["fp8_storage"]["layers_from"] == ["diffsynth"]
    assert "Int8Linear" in plain["quantize"]["kinds"]
    assert "AutoWrappedQuantizedModule" in plain["quantize_cpu_offload"]["kinds"]
