"""Mirrors ``diffsynth.core.loader.config``: ``ModelConfig`` and model downloads.

Same fields, environment variables, local layout (``{base}/{model_id}/{path in repo}``), pattern
semantics and resulting ``path`` as DiffSynth's class. The downloads are ours: the listing and
every byte go through libcurl in the C core (``_core.http_get``, ``_core.fetch``), several files
and several ranges of a large file at once, resumed from partial files, SHA-256 and size checked
before a file is renamed into place. A small manifest (``.cache/diffsynth_c/manifest.json`` in
the model folder) records what was verified, so a model that is complete costs no request.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any

from ..core.vram_state import MODEL_CONFIG_KEYS

# The download engine lives in diffsynth_c.hub; its names stay importable from here, where they were.
from ..hub.hubs import DownloadError, HuggingFace, ModelScope, RemoteFile, matches  # noqa: F401  RemoteFile: old path
from ..hub.manifest import (  # noqa: F401  LOCK, MANIFEST: old paths
    LOCK,
    MANIFEST,
    file_stamp,
    folder_lock,
    is_present,
    manifest_entry,
    read_manifest,
    write_manifest,
)
from ..hub.transfer import HASH_RETRIES, PARTIAL, RANGE_MAX, RANGE_MIN, download_files, range_size  # noqa: F401  old paths


def _env_true(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {"true": True, "false": False}.get(value.lower())


# ---- ModelConfig ---------------------------------------------------------------------------

# The download-source box DiffSynth prints before its first download: the four behaviours, the one
# in effect ticked. The same lines as DiffSynth's, with the shell syntax of the platform.
_SOURCES = (
    ("Download from https://modelscope.cn/", "(default behavior)"),
    ("Download from https://modelscope.ai/", "MODELSCOPE_ENDPOINT", "https://modelscope.ai"),
    ("Download from https://huggingface.co/", "DIFFSYNTH_DOWNLOAD_SOURCE", "HuggingFace"),
    ("Skip download and load only pre-downloaded model files", "DIFFSYNTH_SKIP_DOWNLOAD", "True"),
)


def _downloading_tips(windows: bool) -> str:
    lines = ["DiffSynth-Studio Model Downloader Configuration:", ""]
    for i, (what, *how) in enumerate(_SOURCES):
        lines.append(f"[{i}] {what}")
        if len(how) == 1:
            lines.append(f"    {how[0]}")
        elif windows:
            lines.append(f'    (enabled via `$env:{how[0]}="{how[1]}"`)')
        else:
            lines.append(f"    (enabled via `export {how[0]}={how[1]}`)")
    width = max(len(line) for line in lines)
    body = "\n".join(f"\u2502 {line:<{width}} \u2502" for line in lines)
    return f"\u250c{chr(0x2500) * (width + 2)}\u2510\n{body}\n\u2514{chr(0x2500) * (width + 2)}\u2518"


DOWNLOADING_TIPS = _downloading_tips(__import__("sys").platform.startswith("win"))
_download_tips_printed = False


@dataclass
class ModelConfig:
    """Where a model's files are, or which hub files to download (DiffSynth's fields)."""

    path: str | list | None = None
    model_id: str | None = None
    origin_file_pattern: str | list | None = None
    download_source: str | None = None
    local_model_path: str | None = None
    skip_download: bool | None = None
    offload_device: Any = None
    offload_dtype: Any = None
    onload_device: Any = None
    onload_dtype: Any = None
    preparing_device: Any = None
    preparing_dtype: Any = None
    computation_device: Any = None
    computation_dtype: Any = None
    clear_parameters: bool = False
    state_dict: dict[str, Any] | None = None
    quantize: Any = None

    def check_input(self) -> None:
        """Raises ValueError when neither path nor model_id is given."""
        if self.path is None and self.model_id is None:
            raise ValueError(
                'No valid model files. Please use `ModelConfig(path="xxx")` or '
                '`ModelConfig(model_id="xxx/yyy", origin_file_pattern="zzz")`. '
                "`skip_download=True` only supports the first one."
            )

    def parse_original_file_pattern(self) -> str:
        """The pattern to match: everything for None, "" or "./", a trailing "/" gets "*"."""
        if self.origin_file_pattern in (None, "", "./"):
            return "*"
        if self.origin_file_pattern.endswith("/"):
            return self.origin_file_pattern + "*"
        return self.origin_file_pattern

    def parse_download_source(self) -> str:
        """download_source, else DIFFSYNTH_DOWNLOAD_SOURCE, else "modelscope" (lower case)."""
        if self.download_source is not None:
            return self.download_source.lower()
        return os.environ.get("DIFFSYNTH_DOWNLOAD_SOURCE", "modelscope").lower()

    def parse_skip_download(self) -> bool | None:
        """skip_download, else DIFFSYNTH_SKIP_DOWNLOAD ("true"/"false"), else False."""
        if self.skip_download is not None:
            return self.skip_download
        if os.environ.get("DIFFSYNTH_SKIP_DOWNLOAD") is None:
            return False
        return _env_true("DIFFSYNTH_SKIP_DOWNLOAD")

    def require_downloading(self) -> bool:
        """Whether download_if_necessary goes to the hub (no path given, downloads not skipped)."""
        if self.path is not None:
            return False
        return not self.parse_skip_download()

    def reset_local_model_path(self) -> None:
        """DIFFSYNTH_MODEL_BASE_PATH overrides local_model_path; the default is ./models."""
        if os.environ.get("DIFFSYNTH_MODEL_BASE_PATH") is not None:
            self.local_model_path = os.environ.get("DIFFSYNTH_MODEL_BASE_PATH")
        elif self.local_model_path is None:
            self.local_model_path = "./models"

    def download(self) -> None:
        """Brings the matching files of the repo into {local_model_path}/{model_id}; no request
        when the manifest shows every matching file present and unchanged."""
        pattern = self.parse_original_file_pattern()
        source = self.parse_download_source()
        if source == "modelscope":
            hub: ModelScope | HuggingFace = ModelScope()
        elif source == "huggingface":
            hub = HuggingFace()
        else:
            raise ValueError("`download_source` should be `modelscope` or `huggingface`.")
        folder = os.path.join(self.local_model_path, self.model_id)
        what = f"model {self.model_id!r}"
        manifest = read_manifest(folder)
        key = f"{source} {getattr(hub, 'endpoint', '')}"
        listing = manifest.get("listings", {}).get(key)
        seen = manifest.setdefault("files", {})
        if listing:
            wanted = {p: f for p, f in listing["files"].items() if matches(p, pattern)}
            if wanted and all(is_present(folder, f, p, seen) for p, f in wanted.items()):
                try:
                    write_manifest(folder, manifest)  # a re-hashed file gets its new stamp
                except OSError:
                    pass
                return
        commit, remote = hub.listing(self.model_id)
        wanted_files = [f for f in remote if matches(f.path, pattern)]
        if not wanted_files:
            raise DownloadError(f"{what}: no file of the repo matches {pattern!r}")
        entries = {f.path: manifest_entry(f) for f in remote}
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise DownloadError(f"{what}: cannot create {folder}: {e.strerror}") from e
        # Another process (or thread) downloading into this folder holds the lock: wait for it, then
        # take what it landed and recorded, and download only what is still missing.
        with folder_lock(folder, what):
            manifest = read_manifest(folder)
            seen = manifest.setdefault("files", {})
            missing = [f for f in wanted_files if not is_present(folder, entries[f.path], f.path, seen)]
            download_files(folder, missing, hub.headers, what)
            for f in missing:
                seen[f.path] = {**manifest_entry(f), "stamp": file_stamp(os.path.join(folder, f.path))}
            manifest.setdefault("listings", {})[key] = {"commit": commit, "files": entries}
            try:
                write_manifest(folder, manifest)
            except OSError:
                pass

    def check_download_source(self) -> None:
        """Prints DiffSynth's download-source box (the behaviour in effect ticked: ModelScope,
        ModelScope's .ai endpoint, Hugging Face, or no download), once per process and on the main
        rank only, as DiffSynth does."""
        global _download_tips_printed
        source = self.parse_download_source().lower()
        if os.environ.get("DIFFSYNTH_SKIP_DOWNLOAD", "").lower() == "true":
            behavior = 3
        elif source == "modelscope":
            ai = "modelscope.ai" in os.environ.get("MODELSCOPE_ENDPOINT", "") or "modelscope.ai" in os.environ.get(
                "MODELSCOPE_DOMAIN", ""
            )
            behavior = 1 if ai else 0
        else:
            behavior = 2
        tips = DOWNLOADING_TIPS
        for i in range(4):
            tips = tips.replace(f"[{i}]", "[\u221a]" if i == behavior else "[ ]")
        if _download_tips_printed:
            return
        import sys

        dist = getattr(sys.modules.get("torch"), "distributed", None)
        if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        print(tips)
        _download_tips_printed = True

    def download_if_necessary(self) -> None:
        """Downloads when needed, then sets path: one file as a string, several as a list, the
        model folder for an empty pattern. Prints DiffSynth's download-source box first."""
        self.check_download_source()
        self.check_input()
        self.reset_local_model_path()
        if self.require_downloading():
            self.download()
        if self.path is None:
            if self.origin_file_pattern in (None, "", "./"):
                self.path = os.path.join(self.local_model_path, self.model_id)
            else:
                self.path = glob.glob(os.path.join(self.local_model_path, self.model_id, self.origin_file_pattern))
        if isinstance(self.path, list) and len(self.path) == 1:
            self.path = self.path[0]

    def vram_config(self) -> dict:
        """The eight offload/onload/preparing/computation device and dtype fields."""
        return {k: getattr(self, k) for k in MODEL_CONFIG_KEYS}
