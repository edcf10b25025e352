"""More real DiffSynth pipeline classes end to end, beside the Wan one of ``test_pipeline_e2e.py``:
``FluxImagePipeline`` (FLUX.1) with the LoRA patcher of LoRAFusion (``flux_lora_patcher``, 2736
tensors, LoraMerger/LayerNorm layers) and ``Flux2ImagePipeline`` with the small-decoder FLUX.2 VAE
(``flux2_vae``: convolutions, group norms, attention linear layers, a latent batch norm), each at its
real shapes (the file's hash is the one in DiffSynth's MODEL_CONFIGS) with random values stored in
fp8, so the files stay at 27 MB and 62 MB.

As for Wan, one script runs in three fresh interpreters (one per order, both pipelines in each, as
importing the pipelines is most of the time): DiffSynth plain, patched before the pipeline imports,
patched after them. Each loads both pipelines under the VRAM configurations DiffSynth's guide
documents (none, fp8 storage, disk offload, bf16 storage with fp32 computation) and with
``quantize=`` through the CPU backend of ``quant_cpu_backend`` (registered with DiffSynth's own
``register_quant_backend``), checks the pipeline picked the model up, and records its parameters
(dtype, device, shape, bytes) and the output of a forward on a tiny input. All three must agree.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

import diffsynth_c

from .conftest import run_python, same_tensor

SCRIPT = r"""
import hashlib, torch
ORDER = ORDER_
if ORDER == "before":
    import diffsynth_c
    diffsynth_c.patch_diffsynth()
from diffsynth.pipelines.flux_image import FluxImagePipeline, ModelConfig
from diffsynth.pipelines.flux2_image import Flux2ImagePipeline
from tests.vram_configs import BF16, configs
if ORDER == "after":
    import diffsynth_c
    diffsynth_c.patch_diffsynth()

def lora_merge(model, step, dtype):  # one LoraMerger: a base output and two LoRA outputs
    x = torch.linspace(-2, 2, 3 * 3072).reshape(3, 1, 3072).roll(step, -1).to(dtype)
    return model.model_dict["blocks___0___attn___a_to_out"](x[:1], x[1:])
def vae_encode(model, step, dtype):  # a 16x16 image to its 1x1 latent
    return model.encode(torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16).roll(step, -1).to(dtype))
CASES = {  # pipeline, its arguments that skip the tokenizers, the model it fetched, a forward, layers not quantised
    "flux_lora_patcher": (FluxImagePipeline, dict(tokenizer_1_config=None, tokenizer_2_config=None),
                          lambda pipe: pipe.lora_patcher, lora_merge, []),
    "flux2_vae": (Flux2ImagePipeline, dict(tokenizer_config=None), lambda pipe: pipe.vae, vae_encode,
                  ["encoder.mid_block.attentions.0.to_out.0"]),
}
results = {}
for case, path in PATHS_.items():
    pipeline, kwargs, fetched, forward, exclude = CASES[case]
    for name, kw in configs(exclude).items():
        pipe = pipeline.from_pretrained(torch_dtype=BF16, device="cpu", model_configs=[ModelConfig(path=path, **kw)], **kwargs)
        model = fetched(pipe)
        assert model is not None, f"{pipeline.__name__} did not pick {case} up"
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
            with torch.no_grad():
                outs.append(forward(model, step, dtype))
        kinds = sorted({type(m).__name__ for m in model.modules()})
        results[case, name] = {"params": params, "outs": outs, "kinds": kinds,
                               "vram": bool(getattr(pipe, "vram_management_enabled", False)),
                               "layers_from": sorted({type(m).__module__.split(".")[0] for m in model.modules() if hasattr(m, "state")})}
torch.save(results, OUT_)
"""

MODELS = ("flux_lora_patcher", "flux2_vae")


def _model(name):
    from diffsynth.models.flux2_vae import Flux2VAE
    from diffsynth.models.flux_lora_patcher import FluxLoraPatcher

    if name == "flux_lora_patcher":
        return FluxLoraPatcher()
    return Flux2VAE(decoder_block_out_channels=[96, 192, 384, 384])  # the FLUX.2 small-decoder VAE


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """Each model's real-shape file of random fp8 values; its hash is the one MODEL_CONFIGS gives it."""
    from diffsynth.configs import MODEL_CONFIGS

    paths = {}
    for name in MODELS:
        with diffsynth_c.skip_model_initialization():
            state = {k: (v.shape, v.dtype) for k, v in _model(name).state_dict().items()}
        g = torch.Generator().manual_seed(0)
        tensors = {}
        for k, (shape, dtype) in state.items():
            if not dtype.is_floating_point:  # the latent norm's num_batches_tracked
                tensors[k] = torch.zeros(shape, dtype=dtype)
                continue
            t = torch.randn(shape, generator=g) * 0.05
            if k.endswith("running_var"):  # a variance: the VAE takes its square root
                t = t.abs() + 0.5
            tensors[k] = t.to(torch.float8_e4m3fn)
        path = str(tmp_path_factory.mktemp(name) / f"{name}.safetensors")
        safetensors.torch.save_file(tensors, path)
        # flux2_vae has two entries: the FLUX.2-dev VAE and the small-decoder one built here
        assert diffsynth_c.hash_model_file(path) in [c["model_hash"] for c in MODEL_CONFIGS if c["model_name"] == name]
        paths[name] = path
    return paths


def test_pipelines_plain_and_patched_before_and_after_the_imports(model_files, tmp_path):
    results = {}
    for order in ("plain", "before", "after"):
        out = str(tmp_path / f"{order}.pt")
        code = SCRIPT.replace("ORDER_", repr(order)).replace("PATHS_", repr(model_files)).replace("OUT_", repr(out))
        r = run_python(code, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        results[order] = torch.load(out)
    plain = results["plain"]
    assert len(plain) == 2 * 6
    for order in ("before", "after"):
        assert list(results[order]) == list(plain)
        for key, theirs in plain.items():
            ours = results[order][key]
            assert ours["params"] == theirs["params"], (order, key)
            assert len(ours["outs"]) == len(theirs["outs"]) == 2
            for a, b in zip(theirs["outs"], ours["outs"]):
                assert same_tensor(a, b), (order, key, a, b)
            assert ours["kinds"] == theirs["kinds"] and ours["vram"] == theirs["vram"], (order, key)
            # the VRAM-managed layers are DiffSynth's plain, ours patched
            assert theirs["layers_from"] in ([], ["diffsynth"]), theirs["layers_from"]
            assert ours["layers_from"] == (["diffsynth_c"] if theirs["layers_from"] else []), (order, key)
    for key, theirs in plain.items():  # each forward computed something, and the two inputs differ
        assert all(torch.isfinite(o.float()).all() and o.float().abs().sum() > 0 for o in theirs["outs"]), key
        assert not torch.equal(theirs["outs"][0], theirs["outs"][1]), key
    for name in MODELS:
        assert plain[name, "fp8_storage"]["layers_from"] == ["diffsynth"]
    # the VAE's attention layers are quantised (the patcher has no linear layer)
    assert "Int8Linear" in plain["flux2_vae", "quantize"]["kinds"]
    assert "AutoWrappedQuantizedModule" in plain["flux2_vae", "quantize_cpu_offload"]["kinds"]
