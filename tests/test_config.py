"""ModelConfig against DiffSynth's: fields, environment variables, pattern semantics, and the
resulting path for the same repo listing."""

from __future__ import annotations

import dataclasses
import fnmatch
import os

import pytest
from diffsynth.core.loader.config import ModelConfig as DiffSynthModelConfig

from diffsynth_c import ModelConfig
from diffsynth_c.loader.config import matches
from tests.hub import Hub

PATHS = [
    "model.safetensors",
    "model-00001-of-00002.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/sub/deep.bin",
    "vae/diffusion_pytorch_model.safetensors",
    "config.json",
    "a[1].txt",
    ".hidden",
]
PATTERNS = [
    "*",
    "*.safetensors",
    "text_encoder/",
    "text_encoder/*",
    "*/model.safetensors",
    "model-*",
    "?onfig.json",
    "vae/",
    "a[[]1].txt",
    "*.bin",
    "nothing",
    ".*",
]


def test_fields_match_diffsynth():
    ours = [(f.name, f.default) for f in dataclasses.fields(ModelConfig)]
    theirs = [(f.name, f.default) for f in dataclasses.fields(DiffSynthModelConfig)]
    assert ours == theirs
    kw = {
        k: f"v{i}"
        for i, k in enumerate(
            [
                "offload_device",
                "offload_dtype",
                "onload_device",
                "onload_dtype",
                "preparing_device",
                "preparing_dtype",
                "computation_device",
                "computation_dtype",
            ]
        )
    }
    assert ModelConfig(**kw).vram_config() == DiffSynthModelConfig(**kw).vram_config()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_pattern_semantics_are_fnmatch(pattern):
    full = pattern + "*" if pattern.endswith("/") else pattern
    for path in PATHS:
        assert matches(path, pattern) == fnmatch.fnmatchcase(path, full), (path, pattern)
    assert matches("text_encoder/sub/deep.bin", "*.bin")  # * crosses /


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"DIFFSYNTH_DOWNLOAD_SOURCE": "HuggingFace"},
        {"DIFFSYNTH_SKIP_DOWNLOAD": "TRUE"},
        {"DIFFSYNTH_SKIP_DOWNLOAD": "false"},
        {"DIFFSYNTH_SKIP_DOWNLOAD": "maybe"},
    ],
)
def test_environment_parsing(env, monkeypatch):
    for k in ("DIFFSYNTH_DOWNLOAD_SOURCE", "DIFFSYNTH_SKIP_DOWNLOAD", "DIFFSYNTH_MODEL_BASE_PATH"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for kw in ({}, {"skip_download": False}, {"download_source": "ModelScope"}, {"origin_file_pattern": "x/"}):
        a, b = ModelConfig(model_id="o/m", **kw), DiffSynthModelConfig(model_id="o/m", **kw)
        assert a.parse_download_source() == b.parse_download_source()
        assert a.parse_skip_download() == b.parse_skip_download()
        assert a.require_downloading() == b.require_downloading()
        assert a.parse_original_file_pattern() == b.parse_original_file_pattern()
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", "/base")
    a, b = ModelConfig(model_id="o/m", local_model_path="x"), DiffSynthModelConfig(model_id="o/m", local_model_path="x")
    a.reset_local_model_path(), b.reset_local_model_path()
    assert a.local_model_path == b.local_model_path == "/base"


def test_missing_input_raises_like_diffsynth():
    with pytest.raises(ValueError) as ours:
        ModelConfig().download_if_necessary()
    with pytest.raises(ValueError) as theirs:
        DiffSynthModelConfig().download_if_necessary()
    assert str(ours.value) == str(theirs.value)


@pytest.fixture(scope="module")
def hub():
    h = Hub()
    h.add_repo("org/layout", {p: p.encode() * 3 for p in PATHS if not p.startswith(".")})
    h.start()
    yield h
    h.stop()


@pytest.mark.parametrize("source", ["modelscope", "huggingface"])
@pytest.mark.parametrize(
    "pattern",
    ["", "./", "*.safetensors", "text_encoder/", "text_encoder/*", "config.json", "*/model.safetensors", "vae/"],
)
def test_path_and_layout_equal_diffsynth(hub, source, pattern, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("DIFFSYNTH_MODEL_BASE_PATH", raising=False)
    monkeypatch.delenv("DIFFSYNTH_SKIP_DOWNLOAD", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    import huggingface_hub.constants as hf_constants  # reads HF_ENDPOINT once, at import

    monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
    template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    ours = ModelConfig(
        model_id="org/layout",
        origin_file_pattern=pattern,
        local_model_path=str(tmp_path / "ours"),
        download_source=source,
    )
    ours.download_if_necessary()
    # DiffSynth's own download_if_necessary, its hub client pointed at the same local hub.
    theirs = DiffSynthModelConfig(
        model_id="org/layout",
        origin_file_pattern=pattern,
        local_model_path=str(tmp_path / "theirs"),
        download_source=source,
    )
    theirs.download_if_necessary()

    def relative(path, base):
        if isinstance(path, list):
            return sorted(relative(p, base) for p in path)
        return path.replace(str(tmp_path / base), "BASE", 1)

    assert type(ours.path) is type(theirs.path)
    assert relative(ours.path, "ours") == relative(theirs.path, "theirs")
    assert layout(tmp_path / "ours/org/layout") == layout(tmp_path / "theirs/org/layout")
    for p in layout(tmp_path / "ours/org/layout"):
        assert (tmp_path / "ours/org/layout" / p).read_bytes() == hub.repos["org/layout"][p]


def layout(folder) -> set:
    """The files under folder, clients' own .cache folders left out."""
    got = set()
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != ".cache"]
        got |= {os.path.relpath(os.path.join(root, f), folder) for f in files}
    return got
