"""patch_diffsynth() routes the DiffSynth files that read weights themselves (torch.load in
wan_video_image_encoder, fid and the ace_step pipeline; safe_open in yue2_vae) through our readers,
with results identical to the originals, torch.load's own behaviour for what we do not take, and
everything put back by unpatch_diffsynth(). Each case runs in a fresh process (the patch is global)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffsynth")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMON = """
import collections, io, os, sys, types
import torch
from safetensors.torch import save_file

def same(a, b):
    if isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b), (type(a), type(b))
        for k in a:
            same(a[k], b[k])
        return
    assert type(a) is type(b), (type(a), type(b))
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)
    assert a.requires_grad == b.requires_grad

tmp = sys.argv[1]
g = torch.Generator().manual_seed(0)
sd = collections.OrderedDict(w=torch.randn(4, 3, generator=g), b=torch.randn(3, generator=g).half())
sd["tied"] = sd["w"][1:]  # shares the storage
ckpt = os.path.join(tmp, "m.pth"); torch.save(sd, ckpt)
latent = os.path.join(tmp, "silence.pt"); torch.save(torch.randn(1, 8, 2, generator=g), latent)
st = os.path.join(tmp, "vae.safetensors"); save_file({"decoder.w": torch.randn(5, 2, generator=g)}, st, metadata={"k": "v"})
junk = os.path.join(tmp, "junk.pth"); open(junk, "wb").write(b"not a checkpoint at all")

import diffsynth_c
from diffsynth_c.loader import torchfile
calls = []
real_load_tree = torchfile.load_tree
def counting_load_tree(*a, **k):
    calls.append(a[0]); return real_load_tree(*a, **k)
torchfile.load_tree = counting_load_tree

def yue2_safe_open(module, *args, **kw):
    # a function that lives in yue2_vae's namespace and imports safe_open when it runs, as
    # YuE2VAE.from_pretrained does
    code = compile("def f(args, kw):\\n    from safetensors import safe_open\\n    return safe_open(*args, **kw)\\n", module.__file__, "exec")
    ns = {}
    exec(code, module.__dict__, ns)
    f = types.FunctionType(ns["f"].__code__, module.__dict__)
    return f(args, kw)
"""

ROUTES = (
    COMMON
    + """
import diffsynth.models.wan_video_image_encoder as wan, diffsynth.models.fid as fid
import diffsynth.pipelines.ace_step as ace, diffsynth.models.yue2_vae as yue
import safetensors
original_safe_open = safetensors.safe_open
users = [wan, fid, ace]
assert all(m.torch is torch for m in users)

before = {
    "wan": wan.torch.load(ckpt, map_location="cpu"),
    "fid": fid.torch.load(ckpt, map_location="cpu"),
    "ace": ace.torch.load(latent, weights_only=True),
}
with yue2_safe_open(yue, st, framework="pt", device="cpu") as h:
    assert type(h) is original_safe_open
    yue_before = {k: h.get_tensor(k) for k in h.keys()}, h.metadata()

assert diffsynth_c.patch_diffsynth() > 0
for m in users:
    assert m.torch is not torch and m.torch.load.__wrapped__ is torch.load, m.__name__
    assert m.torch.Tensor is torch.Tensor and m.torch.nn is torch.nn and m.torch.float16 is torch.float16
after = {
    "wan": wan.torch.load(ckpt, map_location="cpu"),
    "fid": fid.torch.load(ckpt, map_location="cpu"),
    "ace": ace.torch.load(latent, weights_only=True),
}
assert calls == [ckpt, ckpt, latent], calls
for k in before:
    same(before[k], after[k])
assert after["wan"]["tied"].untyped_storage().data_ptr() == after["wan"]["w"].untyped_storage().data_ptr()

# what the C reader does not take goes to torch.load, whose answers and errors stay torch's
calls.clear()
same(fid.torch.load(ckpt, map_location="cpu", weights_only=False), before["fid"])
same(fid.torch.load(io.BytesIO(open(ckpt, "rb").read()), map_location="cpu"), before["fid"])
same(fid.torch.load(ckpt, map_location="cpu", mmap=True), before["fid"])
assert calls == [], calls
errors = []
for load in (torch.load, fid.torch.load):
    try:
        load(junk, map_location="cpu")
    except Exception as e:
        errors.append(type(e))
assert len(errors) == 2 and errors[0] is errors[1], errors

with yue2_safe_open(yue, st, framework="pt", device="cpu") as h:
    assert type(h) is diffsynth_c.safe_open, type(h)
    got = {k: h.get_tensor(k) for k in h.keys()}, h.metadata()
same(got[0], yue_before[0]); assert got[1] == yue_before[1]
# any other caller of safetensors keeps safetensors' own safe_open
with safetensors.safe_open(st, framework="pt") as h:
    assert type(h) is original_safe_open
with yue2_safe_open(yue, st, framework="np") as h:
    assert type(h) is original_safe_open

assert diffsynth_c.unpatch_diffsynth() > 0
assert all(m.torch is torch for m in users) and safetensors.safe_open is original_safe_open
with yue2_safe_open(yue, st, framework="pt") as h:
    assert type(h) is original_safe_open
print("ROUTED")
"""
)

IMPORTED_AFTER = (
    COMMON
    + """
import diffsynth
assert "diffsynth.pipelines.ace_step" not in sys.modules
diffsynth_c.patch_diffsynth()
import diffsynth.pipelines.ace_step as ace
assert ace.torch is not torch and ace.torch.load.__wrapped__ is torch.load
same(ace.torch.load(latent, weights_only=True), torch.load(latent, weights_only=True))
assert calls == [latent]
diffsynth_c.unpatch_diffsynth()
assert ace.torch is torch
print("ROUTED")
"""
)


YUE2_FROM_PRETRAINED = """
import os, sys, torch
tmp = sys.argv[1]
from diffsynth.models.yue2_vae import YuE2VAE, YuE2VAEConfig
enc = dict(in_channels=2, channels=4, c_mults=[1, 2], strides=[2, 2], latent_dim=8, use_snake=True)
dec = dict(out_channels=2, channels=4, c_mults=[1, 2], strides=[2, 2], latent_dim=4, use_snake=True)
torch.manual_seed(0)
YuE2VAE(YuE2VAEConfig(encoder_config=enc, decoder_config=dec, latent_dim=4, downsampling_ratio=4)).save_pretrained(
    os.path.join(tmp, "vae"))
theirs = YuE2VAE.from_pretrained(os.path.join(tmp, "vae")).state_dict()
import diffsynth_c
from diffsynth_c.loader import safetensors_file
opened = []
class Counting(safetensors_file.safe_open):
    def __init__(self, *a, **k):
        opened.append(os.fspath(a[0]))
        super().__init__(*a, **k)
safetensors_file.safe_open = Counting
diffsynth_c.patch_diffsynth()
ours = YuE2VAE.from_pretrained(os.path.join(tmp, "vae")).state_dict()
assert opened == [os.path.join(tmp, "vae", "model.safetensors")], opened
assert list(ours) == list(theirs)
for k in theirs:
    assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
print("ROUTED")
"""


@pytest.mark.parametrize(
    "script",
    [ROUTES, IMPORTED_AFTER, YUE2_FROM_PRETRAINED],
    ids=["loaded-before-patch", "imported-after-patch", "yue2-from-pretrained"],
)
def test_routes(tmp_path, script):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "ROUTED" in out.stdout
