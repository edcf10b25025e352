"""A whole DiffSynth pipeline, loaded as a new user loads it: plain DiffSynth against
``diffsynth_c.patch_diffsynth()``.

    python benchmarks/pipeline.py [--pipeline wan-t2v-1.3b] [--without text_encoder] [--source published|bf16]
        [--vram none,disk] [--cache cold,warm] [--repeat 3] [--limited] [--keep] [--json FILE]

1. Generates (once per DIFFSYNTH_C_BENCH_DIR; see --keep) random-weight files at the real names and
   shapes of a complete published pipeline, sharded and typed as published (``--source bf16``
   writes every file in bf16). The shapes come from DiffSynth's own model classes built on the meta
   device; each file's hash must equal its MODEL_CONFIGS entry, so DiffSynth's detection runs.
2. Runs the unchanged pipeline script (``Pipeline.from_pretrained(model_configs=[...])``, torch_dtype
   bf16, on the CPU) in fresh processes, plain and patched in alternating order, with the page
   cache of the files dropped (cold) or filled (warm), with and without one of DiffSynth's
   documented VRAM configs (fp8 storage, CPU offload, disk offload). Each run reports the time
   until from_pretrained returns, the time until every page of every weight has been read (a
   load that maps its files lazily pays for the rest there), the first text-encoder call (its user
   CPU time and page faults), one denoising step of the DiT at a tiny resolution, peak RSS, and a
   fingerprint of every parameter: plain and patched must agree bit for bit.
3. ``--limited`` runs the disk-offload case again in a memory cgroup (cgroup v1, set to half the
   pipeline's weight bytes): does it finish, its peak RSS, and its seconds per step against
   (bytes read per step) / (the cold read ceiling measured in the same run).

The generated files are removed at the end unless DIFFSYNTH_C_BENCH_DIR is set or --keep is given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (
    CGROUP_V1,
    GIB,
    ROOT,
    BenchError,
    drop_cache,
    machine,
    make_cgroup,
    pread_ceiling,
    remove_cgroup,
    table,
    table_record,
    warm_cache,
    write_json,
)

NOISY = 1.25  # slowest / fastest run of one case beyond this: the table says the run was noisy


# ---- the pipelines -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFiles:
    """One model of a pipeline as it is published: its MODEL_CONFIGS hash, the files (a list of
    shards, or one file), their format and dtype, and the role the pipeline gives it."""

    role: str  # the pipeline's attribute: dit, text_encoder, vae
    model_hash: str
    folder: str
    files: tuple[str, ...]
    dtype: str  # as published: float32 or bfloat16
    strip_prefix: str = ""  # the state-dict converter adds it; the file has the keys without it
    # the safetensors copy from_pretrained fetches instead of a .pth (its redirect_common_files)
    redirected: str = ""


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    pipeline_class: str
    models: tuple[ModelFiles, ...]
    note: str


def _shards(stem: str, n: int) -> tuple[str, ...]:
    return tuple(f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n))


PIPELINES = {
    "wan-t2v-1.3b": PipelineSpec(
        "wan-t2v-1.3b",
        "diffsynth.pipelines.wan_video.WanVideoPipeline",
        (
            ModelFiles(
                "dit",
                "9269f8db9040a9d860eaca435be61814",
                "Wan2.1-T2V-1.3B",
                ("diffusion_pytorch_model.safetensors",),
                "float32",
            ),
            ModelFiles(
                "text_encoder",
                "9c8818c2cbea55eca56c7b447df170da",
                "Wan2.1-T2V-1.3B",
                ("models_t5_umt5-xxl-enc-bf16.pth",),
                "bfloat16",
                redirected="models_t5_umt5-xxl-enc-bf16.safetensors",
            ),
            ModelFiles(
                "vae",
                "ccc42284ea13e1ad04693284c7a09be6",
                "Wan2.1-T2V-1.3B",
                ("Wan2.1_VAE.pth",),
                "float32",
                "model.",
                redirected="Wan2.1_VAE.safetensors",
            ),
        ),
        "Wan-AI/Wan2.1-T2V-1.3B: DiT fp32 5.7 GB, umt5-xxl text encoder bf16 11.4 GB, VAE fp32 0.5 GB (both .pth as "
        "published, safetensors as from_pretrained(model_id=...) fetches them)",
    ),
    "z-image-turbo": PipelineSpec(
        "z-image-turbo",
        "diffsynth.pipelines.z_image.ZImagePipeline",
        (
            ModelFiles(
                "dit",
                "fc3a8a1247fe185ce116ccbe0e426c28",
                "Z-Image-Turbo/transformer",
                _shards("diffusion_pytorch_model", 3),
                "bfloat16",
            ),
            ModelFiles(
                "text_encoder",
                "0f050f62a88876fea6eae0a18dac5a2e",
                "Z-Image-Turbo/text_encoder",
                _shards("model", 3),
                "bfloat16",
            ),
        ),
        "Tongyi-MAI/Z-Image-Turbo: DiT bf16 12.3 GB (3 shards), Qwen3-4B text encoder bf16 8.0 GB (3 shards); "
        "its VAE (diffusers layout, converted by DiffSynth) is not generated",
    ),
}


def model_class(spec: ModelFiles):
    """DiffSynth's class and keyword arguments for the model that spec's hash names."""
    import importlib

    from diffsynth.configs.model_configs import MODEL_CONFIGS

    cfg = next(c for c in MODEL_CONFIGS if c["model_hash"] == spec.model_hash)
    module, name = cfg["model_class"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name), cfg.get("extra_kwargs", {})


def model_layout(spec: ModelFiles) -> list[tuple[str, tuple[int, ...]]]:
    """(key as the published file names it, shape) of every tensor, from the model built on the meta device."""
    from diffsynth.core import skip_model_initialization

    cls, kwargs = model_class(spec)
    with skip_model_initialization():
        model = cls(**kwargs)
    out = []
    for k, v in model.state_dict().items():
        if spec.strip_prefix and k.startswith(spec.strip_prefix):
            k = k[len(spec.strip_prefix) :]
        out.append((k, tuple(v.shape)))
    return out


def file_bytes(spec: ModelFiles, dtype: str) -> int:
    size = 4 if dtype == "float32" else 2
    return sum(math.prod(s) for _, s in model_layout(spec)) * size


# ---- generating the files ------------------------------------------------------------------


class ValuePool:
    """Small normal values (finite, as a denoising step needs), sliced at varying offsets of one
    pool: fast to make, not all alike."""

    def __init__(self, dtype):
        import torch

        g = torch.Generator().manual_seed(0)
        self.pool = (torch.randn(1 << 25, generator=g) * 0.02).to(dtype)
        self.i = 0

    def take(self, n: int):
        """A 1-D tensor of n values (a view of the pool when it fits: the caller copies it out)."""
        import torch

        p = self.pool
        self.i += 1
        start = (self.i * 7919) % (p.numel() // 2)
        if n <= p.numel() - start:
            return p[start : start + n]
        return torch.cat([p] * (n // p.numel() + 1))[:n]


def write_safetensors_streamed(
    path: str, layout: list[tuple[str, tuple[int, ...]]], dtype_name: str, sparse: bool = False
) -> None:
    """Writes a safetensors file tensor by tensor (never the whole file in memory): the header as
    safetensors writes it (keys sorted, offsets in that order, padded to 8 bytes), then the data
    (sparse: a hole of the data's size, enough for a hash, which reads headers only)."""
    import torch

    dtype = getattr(torch, dtype_name)
    tag = {"float32": "F32", "bfloat16": "BF16"}[dtype_name]
    size = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    items = sorted(layout)
    for key, shape in items:
        n = math.prod(shape) * size
        header[key] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path + ".part", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        if sparse:
            f.truncate(8 + len(raw) + offset)
            items = []
        pool = ValuePool(dtype) if items else None
        for _, shape in items:
            f.write(pool.take(math.prod(shape)).contiguous().view(torch.uint8).numpy().tobytes())
    os.replace(path + ".part", path)


def write_torch_file(path: str, layout: list[tuple[str, tuple[int, ...]]], dtype_name: str) -> None:
    """torch.save of a state dict (torch.save needs the whole dict in memory)."""
    import torch

    pool = ValuePool(getattr(torch, dtype_name))
    sd = {k: pool.take(math.prod(s)).clone().reshape(s) for k, s in layout}
    torch.save(sd, path + ".part")
    del sd
    os.replace(path + ".part", path)


def split_layout(layout, n: int) -> list[list]:
    """Shards of about equal bytes, in key order (as diffusers splits a state dict)."""
    total = sum(math.prod(s) for _, s in layout)
    out, cur, acc = [[] for _ in range(n)], 0, 0
    for k, s in layout:
        if acc >= total * (cur + 1) / n and cur < n - 1:
            cur += 1
        out[cur].append((k, s))
        acc += math.prod(s)
    return out


def check_space(folder: str, need: int) -> None:
    """Raises BenchError when the folder's file system has less room than need (plus 1 GiB)."""
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "."
    free = shutil.disk_usage(probe).free
    if free < need + GIB:
        raise BenchError(
            f"not enough space in {probe}: the generated files need {need / GIB:.1f} GiB and "
            f"{free / GIB:.1f} GiB are free; set DIFFSYNTH_C_BENCH_DIR to a folder with room, or "
            "pass --without text_encoder for a smaller pipeline"
        )


def model_paths(root: str, spec: ModelFiles, source: str, pth: bool) -> list[str]:
    """The files of one model: as published (pth=True), or as from_pretrained(model_id=...) fetches
    them (DiffSynth redirects the Wan .pth files to safetensors copies)."""
    dtype = spec.dtype if source == "published" else "bfloat16"
    files = spec.files if pth or not spec.redirected else (spec.redirected,)
    return [os.path.join(root, f"{spec.folder}-{dtype}", f) for f in files]


def generate(root: str, pipe: PipelineSpec, roles: list[str], source: str, pth: bool) -> dict[str, list[str]]:
    """Writes the files of each model of the pipeline (once: a folder with .complete is reused),
    checks their hashes against MODEL_CONFIGS, and returns {role: paths}."""
    import diffsynth_c

    todo = [m for m in pipe.models if m.role in roles]
    need = 0
    for m in todo:
        if not os.path.exists(model_paths(root, m, source, pth)[0] + ".complete"):
            need += file_bytes(m, m.dtype if source == "published" else "bfloat16")
    if need:
        check_space(root, need)
    out = {}
    for m in todo:
        paths = model_paths(root, m, source, pth)
        folder = os.path.dirname(paths[0])
        done = paths[0] + ".complete"
        if not os.path.exists(done):
            os.makedirs(folder, exist_ok=True)
            dtype = m.dtype if source == "published" else "bfloat16"
            t = time.perf_counter()
            layout = model_layout(m)
            if paths[0].endswith(".safetensors"):
                for path, part in zip(paths, split_layout(layout, len(paths))):
                    write_safetensors_streamed(path, part, dtype)
            else:
                write_torch_file(paths[0], layout, dtype)
            got = diffsynth_c.hash_model_file(paths if len(paths) > 1 else paths[0])
            if got != m.model_hash:
                raise BenchError(f"{folder}: generated {m.role} hashes to {got}, MODEL_CONFIGS has {m.model_hash}")
            open(done, "w").close()
            print(
                f"generated {m.role}: {sum(os.path.getsize(p) for p in paths) / GIB:.2f} GiB in "
                f"{time.perf_counter() - t:.0f} s ({folder})",
                flush=True,
            )
        out[m.role] = paths
    return out


# ---- one run in a fresh process ------------------------------------------------------------


VRAM_CASES = ("none", "fp8", "cpu_offload", "disk")


def vram_kwargs(case: str) -> dict:
    """ModelConfig keyword arguments of DiffSynth's documented VRAM configs, on the CPU."""
    import torch

    bf16, f8 = torch.bfloat16, torch.float8_e4m3fn
    states = ("offload", "onload", "preparing", "computation")
    pairs = {
        "none": None,
        "fp8": ((f8, "cpu"), (f8, "cpu"), (f8, "cpu"), (bf16, "cpu")),
        "cpu_offload": ((bf16, "cpu"), (bf16, "cpu"), (bf16, "cpu"), (bf16, "cpu")),
        "disk": (("disk", "disk"), ("disk", "disk"), (bf16, "cpu"), (bf16, "cpu")),
    }[case]
    out = {}
    for state, (dtype, device) in zip(states, pairs or ()):
        out[state + "_dtype"], out[state + "_device"] = dtype, device
    return out


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _fingerprint(model) -> str:
    """md5 over (name, dtype, shape, 64-bit sum and xor of the bytes) of every parameter and buffer:
    any changed bit changes it, at memory speed."""
    import numpy as np
    import torch

    h = hashlib.md5()
    for k, v in list(model.named_parameters()) + list(model.named_buffers()):
        if v.is_meta or v.numel() == 0:
            h.update(f"{k}:{v.dtype}:{tuple(v.shape)}:meta".encode())
            continue
        b = v.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
        n8 = len(b) // 8 * 8
        w = b[:n8].view(np.uint64)
        s = int(np.add.reduce(w, dtype=np.uint64)) if n8 else 0
        x = int(np.bitwise_xor.reduce(w)) if n8 else 0
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}:{s}:{x}:{b[n8:].tobytes().hex()}".encode())
    return h.hexdigest()


def _usage(r0, r1, wall: float) -> dict:
    """Wall time, CPU time and page faults between two getrusage readings."""
    return {
        "s": wall,
        "user_s": r1.ru_utime - r0.ru_utime,
        "sys_s": r1.ru_stime - r0.ru_stime,
        "minflt": r1.ru_minflt - r0.ru_minflt,
        "majflt": r1.ru_majflt - r0.ru_majflt,
    }


def onload(model) -> None:
    """What the pipeline's load_models_to_device does for one model (that method calls
    torch.cpu.empty_cache, which torch lacks, so on the CPU it fails with VRAM management on)."""
    if getattr(model, "vram_management_enabled", False):
        for m in model.modules():
            if hasattr(m, "onload"):
                m.onload()


def child(job: dict) -> dict:
    """One load of the pipeline, as a user script does it; the figures as a dict."""
    import resource

    if job["patched"]:
        import diffsynth_c

        diffsynth_c.patch_diffsynth()
    import importlib

    import torch
    from diffsynth.core.loader.config import ModelConfig

    module, name = job["pipeline_class"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    kw = vram_kwargs(job["vram"])
    configs = [ModelConfig(path=p if len(p) > 1 else p[0], **kw) for p in job["paths"].values()]
    base = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM restarts here: the peak is the load's own
    except OSError:
        pass
    t0 = time.perf_counter()
    device = job.get("device", "cpu")
    pipe = cls.from_pretrained(torch_dtype=torch.bfloat16, device=device, model_configs=configs, tokenizer_config=None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    call_s = time.perf_counter() - t0
    models = {role: getattr(pipe, role) for role in job["paths"]}
    r0, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    touched = 0
    for m in models.values():
        for v in list(m.parameters()) + list(m.buffers()):
            if v.is_meta or v.numel() == 0:
                continue
            b = v.detach().reshape(-1).view(torch.uint8) if v.is_contiguous() else v.detach().contiguous().view(-1)
            touched += int(b.view(torch.uint8)[::4096].sum())
    total_s = time.perf_counter() - t0
    out = {"call_s": call_s, "total_s": total_s, "load_peak_mib": _status("VmHWM") - base}
    out["touch"] = _usage(r0, resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t1)
    torch.manual_seed(0)
    with torch.no_grad():
        if "text_encoder" in models and job["pipeline_class"].endswith("WanVideoPipeline"):
            onload(models["text_encoder"])
            ids = torch.randint(0, 1000, (1, 16))
            r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            models["text_encoder"](ids, torch.ones_like(ids))
            out["te_call"] = _usage(r0, resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t)
            r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            models["text_encoder"](ids, torch.ones_like(ids))  # the same call again: what the first one paid extra
            out["te_call_2"] = _usage(r0, resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t)
        if "dit" in models and job["pipeline_class"].endswith("WanVideoPipeline"):
            from diffsynth.pipelines.wan_video import model_fn_wan_video  # what the denoising loop calls

            onload(models["dit"])
            x = torch.randn(1, 16, 1, 8, 8, dtype=torch.bfloat16).to(device)  # 1 frame of 64x64 pixels
            ctx = torch.randn(1, 16, 4096, dtype=torch.bfloat16).to(device)
            ts = torch.tensor([500.0], dtype=torch.bfloat16).to(device)  # the pipeline passes it in torch_dtype
            steps = []
            for _ in range(job["steps"]):
                t = time.perf_counter()
                model_fn_wan_video(dit=models["dit"], latents=x, timestep=ts, context=ctx)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                steps.append(time.perf_counter() - t)
            out["step_s"] = steps
    out["peak_mib"] = _status("VmHWM") - base
    if job["verify"]:
        out["fingerprint"] = {role: _fingerprint(m) for role, m in models.items()}
    return out


def cgroup_preexec(cgroup: str | None):
    if not cgroup:
        return None

    def enter():
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    return enter


def run_child(job: dict, cgroup: str | None = None, timeout: int = 3600) -> dict:
    """Runs one job in a fresh interpreter (inside cgroup when given); {'error': ...} when it failed."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)]
    r = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False, preexec_fn=cgroup_preexec(cgroup)
    )
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines or not lines[-1].startswith("{"):
        why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        if r.returncode in (-9, 137):
            why = "killed (out of memory in its cgroup?)"
        return {"error": why[:200], "returncode": r.returncode}
    return json.loads(lines[-1])


# ---- the memory cgroup ---------------------------------------------------------------------


# ---- the runs and the tables ---------------------------------------------------------------


def spread(xs: list[float]) -> float:
    xs = [x for x in xs if x]
    return max(xs) / min(xs) if len(xs) > 1 else 1.0


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def fmt_cell(runs: list[dict], key: str, digits: int = 2) -> str:
    xs = [r[key] for r in runs if key in r]
    if not xs:
        return "-"
    s = spread(xs)
    return f"{median(xs):.{digits}f}" + (f" (±{(s - 1) * 100:.0f}%)" if len(xs) > 1 else "")


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    step = [median(r["step_s"]) for r in ok if r.get("step_s")]
    te = [r["te_call"] for r in ok if "te_call" in r]
    return {
        "runs": len(runs),
        "failed": [r["error"] for r in runs if "error" in r],
        "call_s": [r["call_s"] for r in ok],
        "total_s": [r["total_s"] for r in ok],
        "step_s": step,
        "te_call_s": [x["s"] for x in te],
        "te_user_s": [x["user_s"] for x in te],
        "te_minflt": [x["minflt"] for x in te],
        "te_majflt": [x["majflt"] for x in te],
        "te_call_2_s": [r["te_call_2"]["s"] for r in ok if "te_call_2" in r],
        "touch": [r["touch"] for r in ok if "touch" in r],
        "peak_mib": [r["peak_mib"] for r in ok],
        "load_peak_mib": [r["load_peak_mib"] for r in ok],
    }


def case_row(cache: str, vram: str, plain: list[dict], ours: list[dict]) -> list[str]:
    """One row of the table: plain / patched medians (with spread) and their ratios."""
    ok_p = [r for r in plain if "error" not in r]
    ok_o = [r for r in ours if "error" not in r]

    def both(fn) -> str:
        return " / ".join(fn(ok) if ok else f"failed ({rs[0]['error']})" for ok, rs in ((ok_p, plain), (ok_o, ours)))

    def ratio(key: str) -> str:
        a, b = median([r[key] for r in ok_p]), median([r[key] for r in ok_o])
        return f"{a / b:.2f}x" if a and b else "-"

    def step(rs):
        xs = [median(r["step_s"]) for r in rs if r.get("step_s")]
        return f"{median(xs):.2f}" if xs else "-"

    def te(rs):
        xs = [r["te_call"] for r in rs if "te_call" in r]
        return f"{median([x['s'] for x in xs]):.2f} ({median([x['user_s'] for x in xs]):.2f})" if xs else "-"

    def peak(rs):
        return f"{max(r['peak_mib'] for r in rs) / 1024:.1f}"

    failed = sum("error" in r for r in plain + ours)
    return [
        cache,
        vram,
        both(lambda rs: fmt_cell(rs, "call_s")) + (f" ({failed} runs failed)" if failed else ""),
        ratio("call_s"),
        both(lambda rs: fmt_cell(rs, "total_s")),
        ratio("total_s"),
        both(te),
        both(step),
        both(peak),
    ]


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default="wan-t2v-1.3b", choices=sorted(PIPELINES))
    ap.add_argument("--without", default="", help="roles to leave out, comma-separated (e.g. text_encoder)")
    ap.add_argument("--source", default="published", choices=["published", "bf16"])
    ap.add_argument("--pth", action="store_true", help="the Wan text encoder and VAE as .pth, as Wan-AI publishes them")
    ap.add_argument("--vram", default="none,disk", help=f"comma-separated of {', '.join(VRAM_CASES)}")
    ap.add_argument("--cache", default="cold,warm", help="comma-separated of cold, warm")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="DiT calls per run (the first pays for first touches)")
    ap.add_argument("--limited", action="store_true", help="also disk offload in a cgroup of half the weight bytes")
    ap.add_argument(
        "--keep", action="store_true", help="keep the generated files (DIFFSYNTH_C_BENCH_DIR keeps them too)"
    )
    ap.add_argument(
        "--device", default="cpu", help="from_pretrained's device (cuda: the pipeline-to-GPU figure; --vram none only)"
    )
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for case in args.vram.split(","):
        if case not in VRAM_CASES:
            ap.error(f"--vram: unknown case {case!r}; known: {', '.join(VRAM_CASES)}")
    for c in args.cache.split(","):
        if c not in ("cold", "warm"):
            ap.error(f"--cache: unknown {c!r}; known: cold, warm")
    roles = [m.role for m in PIPELINES[args.pipeline].models]
    for r in filter(None, args.without.split(",")):
        if r not in roles:
            ap.error(f"--without: {args.pipeline} has no {r!r}; its models: {', '.join(roles)}")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.device != "cpu" and (args.vram != "none" or args.limited):
        ap.error("--device: the VRAM configs here compute on the CPU; use --vram none (and no --limited) on a GPU")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    try:
        return bench(args)
    except BenchError as e:
        print(f"pipeline.py: {e}", file=sys.stderr)
        return 2


def bench(args) -> int:
    pipe = PIPELINES[args.pipeline]
    roles = [m.role for m in pipe.models if m.role not in args.without.split(",")]
    keep = args.keep or bool(os.environ.get("DIFFSYNTH_C_BENCH_DIR"))
    root = os.environ.get("DIFFSYNTH_C_BENCH_DIR") or tempfile.mkdtemp(prefix="diffsynth_c_pipeline.")
    root = os.path.join(root, "pipeline")
    try:
        os.makedirs(root, exist_ok=True)
        if args.limited and not os.path.isdir(CGROUP_V1):
            make_cgroup(0, "--limited")  # raises the message before any file is generated
        print(f"machine: {machine()}")
        print(f"pipeline: {pipe.note}; models: {', '.join(roles)}; files: {args.source}{', .pth' if args.pth else ''}")
        paths = generate(root, pipe, roles, args.source, args.pth)
        every = [p for ps in paths.values() for p in ps]
        weight_bytes = sum(os.path.getsize(p) for p in every)
        print(f"files: {weight_bytes / GIB:.2f} GiB in {root}", flush=True)
        base = {"pipeline_class": pipe.pipeline_class, "paths": paths, "steps": args.steps, "device": args.device}
        cases = [(c, v) for v in args.vram.split(",") for c in args.cache.split(",")]
        runs: dict[tuple, list[dict]] = {}
        fingerprints: dict[tuple, set] = {}
        for rep in range(args.repeat):
            for cache, vram in cases:
                order = (False, True) if rep % 2 == 0 else (True, False)
                for patched in order:
                    if cache == "cold":
                        drop_cache(every)
                    else:
                        warm_cache(every)
                    job = dict(base, patched=patched, vram=vram, verify=True)
                    r = run_child(job)
                    runs.setdefault((cache, vram, patched), []).append(r)
                    if "fingerprint" in r:
                        fingerprints.setdefault((vram,), set()).add(json.dumps(r["fingerprint"], sort_keys=True))
                    label = "patched" if patched else "plain"
                    print(
                        f"  run {rep + 1}/{args.repeat} {cache:4} vram={vram:11} {label:7} "
                        + (
                            f"failed: {r['error']}"
                            if "error" in r
                            else f"ready {r['call_s']:.2f} s, all pages {r['total_s']:.2f} s"
                        ),
                        flush=True,
                    )
        identical = all(len(v) == 1 for v in fingerprints.values()) and bool(fingerprints)
        figures = {f"{c}/{v}/{'patched' if p else 'plain'}": summarize(rs) for (c, v, p), rs in runs.items()}
        rows, noisy = [], []
        for cache, vram in cases:
            plain, ours = runs[(cache, vram, False)], runs[(cache, vram, True)]
            for name, rs in (("plain", plain), ("patched", ours)):
                for key in ("call_s", "total_s"):
                    if spread([r[key] for r in rs if key in r]) > NOISY:
                        noisy.append(f"{cache}/{vram}/{name} {key}")
            rows.append(case_row(cache, vram, plain, ours))
        header = [
            "cache",
            "VRAM config",
            "from_pretrained s, plain / patched",
            "speed-up",
            "until every page read, s",
            "speed-up",
            "1st text-encoder call s (user CPU s)",
            "DiT step s",
            "peak RSS added GiB",
        ]
        title = (
            f"{pipe.name} ({', '.join(roles)}; {weight_bytes / GIB:.2f} GiB, {args.source} files) -> torch_dtype bf16 "
            f"on the CPU, median of {args.repeat} fresh processes (± spread: slowest/fastest - 1), plain and patched alternating"
        )
        print("\n" + title + "\n")
        print(table(rows, header))
        print(
            "\nparameters bit-identical, plain and patched, in every run: "
            + ("yes" if identical else "NO (or nothing verified)")
        )
        if noisy:
            print(
                f"NOISY: runs of one case spread beyond {NOISY:.2f}x ({'; '.join(noisy)}): a shared CPU or disk; "
                "read the ratios, measured alternating in the same run"
            )
        tables = [table_record(title, header, rows)]
        limited = None
        if args.limited:
            limited = run_limited(args, base, every, weight_bytes, paths)
            tables.append(limited["table"])
        write_json(
            args.json,
            "pipeline",
            {
                "pipeline": pipe.name,
                "roles": roles,
                "source": args.source,
                "weight_bytes": weight_bytes,
                "repeat": args.repeat,
                "figures": figures,
                "identical": identical,
                "noisy": noisy,
                "limited": limited,
                "tables": tables,
            },
        )
        return 0 if identical else 1
    finally:
        if keep:
            print(f"kept the generated files in {root}")
        else:  # a folder of our own (mkdtemp): all of it goes
            shutil.rmtree(os.path.dirname(root), ignore_errors=True)
            print(f"removed the generated files ({root}); --keep or DIFFSYNTH_C_BENCH_DIR keeps them")


def run_limited(args, base: dict, every: list[str], weight_bytes: int, paths: dict) -> dict:
    """Disk offload in a cgroup of half the weight bytes, cold, plain and patched alternating."""
    limit = weight_bytes // 2
    drop_cache(every)
    # the ceiling on the DiT's files alone: pread_ceiling reads into one buffer of the files' size
    dit = paths.get("dit") or every[:1]
    ceiling = pread_ceiling(dit, threads=4, prefault=False)
    drop_cache(every)
    dit_bytes = sum(os.path.getsize(p) for p in paths.get("dit", []))
    expect = dit_bytes / (ceiling * 1e9) if ceiling else 0.0
    cgroup = make_cgroup(limit, "--limited")
    runs: dict[bool, list[dict]] = {False: [], True: []}
    try:
        for rep in range(args.repeat):
            for patched in (False, True) if rep % 2 == 0 else (True, False):
                drop_cache(every)
                r = run_child(dict(base, patched=patched, vram="disk", verify=False), cgroup=cgroup)
                runs[patched].append(r)
                print(
                    f"  limited run {rep + 1} {'patched' if patched else 'plain'}: "
                    + (r["error"] if "error" in r else f"step {median(r.get('step_s') or [0]):.2f} s"),
                    flush=True,
                )
    finally:
        remove_cgroup(cgroup)
    rows = []
    for patched in (False, True):
        rs = runs[patched]
        ok = [r for r in rs if "error" not in r]
        steps = [median(r["step_s"][1:] or r["step_s"]) for r in ok if r.get("step_s")]
        rows.append(
            [
                "patched" if patched else "plain",
                f"{len(ok)}/{len(rs)}",
                f"{max((r['peak_mib'] for r in ok), default=0) / 1024:.2f}",
                f"{median(steps):.2f}" if steps else "-",
                f"{median(steps) / expect:.2f}" if steps and expect else "-",
            ]
        )
    header = [
        "loader",
        "finished",
        "peak RSS added GiB",
        "s/step (after the first)",
        "s/step / (DiT bytes / cold read)",
    ]
    title = (
        f"Disk offload in a memory cgroup of {limit / GIB:.1f} GiB (half the weights), cold; cold read ceiling "
        f"{ceiling:.2f} GB/s, so reading the DiT's {dit_bytes / GIB:.2f} GiB takes {expect:.2f} s"
    )
    print("\n" + title + "\n")
    print(table(rows, header))
    return {
        "limit_bytes": limit,
        "cold_read_gbps": ceiling,
        "dit_bytes": dit_bytes,
        "runs": {("patched" if k else "plain"): [summarize(v)] for k, v in runs.items()},
        "table": table_record(title, header, rows),
    }


if __name__ == "__main__":
    sys.exit(main())
