"""Downloads against the local hub (tests/hub.py): both protocols, every fault of issue 7, resume,
no needless requests. Each test ends with the right bytes or the right exception, and never a
corrupt file at the final path."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from diffsynth_c import DownloadError, ModelConfig, _core
from diffsynth_c.hub import transfer
from diffsynth_c.loader import config as cfg
from tests.hub import Hub, fake_bytes

BIG = 40 << 20  # over two ranges: split into three


@pytest.fixture(scope="module")
def hub():
    h = Hub()
    h.add_repo(
        "org/model",
        {
            "model.safetensors": fake_bytes("big", BIG),
            "text_encoder/model-00001.safetensors": fake_bytes("te1", 300_000),
            "text_encoder/config.json": b'{"a": 1}',
            "README.md": b"# hi\n",
            "empty.txt": b"",
        },
    )
    h.start()
    yield h
    h.stop()


@pytest.fixture(params=["modelscope", "huggingface"])
def env(request, hub, monkeypatch, tmp_path):
    hub.faults.clear()
    hub.rate = None
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("DIFFSYNTH_DOWNLOAD_SOURCE", request.param)
    monkeypatch.delenv("DIFFSYNTH_SKIP_DOWNLOAD", raising=False)
    monkeypatch.delenv("DIFFSYNTH_MODEL_BASE_PATH", raising=False)
    monkeypatch.setenv("DIFFSYNTH_C_DOWNLOAD_RETRIES", "5")
    return tmp_path


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def fetch_one(hub, base, pattern="model.safetensors"):
    c = ModelConfig(model_id="org/model", origin_file_pattern=pattern, local_model_path=str(base))
    c.download_if_necessary()
    return c


def check_big(hub, base):
    path = base / "org/model/model.safetensors"
    assert sha(path.read_bytes()) == sha(hub.repos["org/model"]["model.safetensors"])


def test_download_and_no_second_request(hub, env):
    c = fetch_one(hub, env)
    assert c.path == str(env / "org/model/model.safetensors")
    check_big(hub, env)
    n = len(hub.requests)
    fetch_one(hub, env)
    assert len(hub.requests) == n  # complete and verified: no request at all


def test_folder_pattern_and_all(hub, env):
    c = fetch_one(hub, env, "text_encoder/")
    assert c.path == str(env / "org/model/text_encoder") + "/"
    for name in ("model-00001.safetensors", "config.json"):
        assert (env / "org/model/text_encoder" / name).read_bytes() == hub.repos["org/model"][f"text_encoder/{name}"]
    c = fetch_one(hub, env, "")
    assert c.path == str(env / "org/model")
    assert (env / "org/model/empty.txt").read_bytes() == b""


@pytest.mark.parametrize(
    "fault", ["reset", "500", "429", "wrong", "short", "redirect", "ignore_range", "long", "extra"]
)
def test_fault_recovers(hub, env, fault, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret")  # the redirect to another host must drop it
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "secret")
    hub.fault("model.safetensors", fault, fault)
    fetch_one(hub, env)
    check_big(hub, env)


def test_trickle_recovers(hub, env):
    hub.fault("text_encoder/model-00001.safetensors", "trickle")
    fetch_one(hub, env, "text_encoder/model-00001.safetensors")
    assert (env / "org/model/text_encoder/model-00001.safetensors").read_bytes() == hub.repos["org/model"][
        "text_encoder/model-00001.safetensors"
    ]


def test_persistent_hash_mismatch(hub, env):
    """README.md is kept in git on Hugging Face (no lfs.oid): its git blob id is what is checked."""
    hub.fault("README.md", *["wrong"] * 20)
    kind = "SHA-256" if os.environ["DIFFSYNTH_DOWNLOAD_SOURCE"] == "modelscope" else "git blob id"
    with pytest.raises(DownloadError, match=rf"org/model.*README.md: {kind} [0-9a-f]+ does not match the hub's"):
        fetch_one(hub, env, "README.md")
    assert not (env / "org/model/README.md").exists()


def test_files_kept_in_git_are_verified_by_their_blob_id(hub, env):
    """config.json has no lfs.oid on Hugging Face: wrong bytes are caught by the blob id, fetched
    again, and a corrupt copy already in place is repaired."""
    rel = "text_encoder/config.json"
    want = hub.repos["org/model"][rel]
    hub.fault(rel, "wrong", "wrong")
    fetch_one(hub, env, rel)
    assert (env / "org/model" / rel).read_bytes() == want
    (env / "org/model" / rel).write_bytes(bytes(b ^ 1 for b in want))  # same size, other bytes
    manifest = env / "org/model" / cfg.MANIFEST
    manifest.unlink()  # no record of the last check: the file is hashed again
    fetch_one(hub, env, rel)
    assert (env / "org/model" / rel).read_bytes() == want


def test_persistent_server_error(hub, env, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_C_DOWNLOAD_RETRIES", "1")
    hub.fault("README.md", *["500"] * 20)
    with pytest.raises(DownloadError, match=r"org/model.*README.md.*HTTP 500"):
        fetch_one(hub, env, "README.md")
    assert not (env / "org/model/README.md").exists()


def test_corrupt_present_file_is_repaired(hub, env):
    fetch_one(hub, env)
    path = env / "org/model/model.safetensors"
    data = bytearray(path.read_bytes())
    data[1000] ^= 1
    path.write_bytes(bytes(data))  # same size, other bytes, new mtime
    fetch_one(hub, env)
    check_big(hub, env)
    fetch_one(hub, env, "README.md")
    with open(path, "ab") as f:  # wrong size
        f.write(b"x")
    fetch_one(hub, env)
    check_big(hub, env)


def test_files_already_complete_are_untouched(hub, env):
    fetch_one(hub, env, "README.md")
    before = os.stat(env / "org/model/README.md")
    fetch_one(hub, env, "*.md")
    fetch_one(hub, env, "")
    after = os.stat(env / "org/model/README.md")
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_interrupt_keeps_partial_and_resumes(hub, env, monkeypatch):
    hub.rate = 4 << 20
    calls = []

    def stop(done):
        calls.append(done)
        if done > 2 << 20:
            raise KeyboardInterrupt

    monkeypatch.setattr(transfer, "_Progress", lambda total, label: _Stop(stop))
    with pytest.raises(KeyboardInterrupt):
        fetch_one(hub, env)
    assert not (env / "org/model/model.safetensors").exists()
    part = env / "org/model" / cfg.PARTIAL / "model.safetensors.incomplete"
    assert part.exists() and os.path.exists(str(part) + ".json")  # the partial file and its record of ranges
    hub.rate = None
    monkeypatch.undo()
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("DIFFSYNTH_DOWNLOAD_SOURCE", os.environ.get("DIFFSYNTH_DOWNLOAD_SOURCE", "modelscope"))
    fetch_one(hub, env)
    check_big(hub, env)
    assert not part.exists()


class _Stop:
    def __init__(self, fn):
        self.fn, self.base, self.on_finished = fn, 0, None

    def __call__(self, done, finished=()):
        self.fn(done)

    def close(self):
        pass


def test_fetch_resumes_with_range(hub, tmp_path):
    """The C primitive: a job with bytes already present asks only for the rest."""
    data = hub.repos["org/model"]["text_encoder/model-00001.safetensors"]
    path = tmp_path / "f"
    path.write_bytes(data[:1000])
    fd = os.open(path, os.O_WRONLY)
    out = []
    url = f"{hub.url}/api/v1/models/org/model/repo?Revision=master&FilePath=text_encoder%2Fmodel-00001.safetensors"
    try:
        _core.fetch([(url, fd, 0, len(data), 1000)], [], 2, 2, 30.0, None, out)
    finally:
        os.close(fd)
    assert out[0][:2] == (len(data), True) and out[0][2] == 206
    assert path.read_bytes() == data


def test_unknown_model_pattern_and_revision(hub, env):
    c = ModelConfig(model_id="org/nothing", origin_file_pattern="x", local_model_path=str(env))
    with pytest.raises(DownloadError, match="org/nothing.*not found"):
        c.download_if_necessary()
    with pytest.raises(DownloadError, match=r"org/model.*no file of the repo matches 'nope\*'"):
        fetch_one(hub, env, "nope*")
    hubc = cfg.ModelScope() if os.environ["DIFFSYNTH_DOWNLOAD_SOURCE"] == "modelscope" else cfg.HuggingFace()
    with pytest.raises(DownloadError, match="org/model.*revision"):
        hubc.listing("org/model", "no-such-revision")


def test_unwritable_base_path(hub, env):
    blocker = env / "file"
    blocker.write_bytes(b"")
    c = ModelConfig(model_id="org/model", origin_file_pattern="README.md", local_model_path=str(blocker))
    with pytest.raises(DownloadError, match="org/model.*cannot"):
        c.download_if_necessary()


def test_skip_download_makes_no_request(hub, env, monkeypatch):
    n = len(hub.requests)
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")
    c = fetch_one(hub, env, "*.safetensors")
    assert c.path == [] and len(hub.requests) == n
    monkeypatch.delenv("DIFFSYNTH_SKIP_DOWNLOAD")
    c = ModelConfig(model_id="org/model", origin_file_pattern="x", local_model_path=str(env), skip_download=True)
    c.download_if_necessary()
    assert len(hub.requests) == n


def test_full_disk(hub, env, tmp_path_factory):
    mnt = tmp_path_factory.mktemp("small")
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, check=False
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        c = ModelConfig(model_id="org/model", origin_file_pattern="*", local_model_path=str(mnt))
        with pytest.raises(DownloadError, match="org/model.*model.safetensors.*No space"):
            c.download_if_necessary()
        assert not (mnt / "org/model/model.safetensors").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_benchmark_runs_from_anywhere(tmp_path):
    """benchmarks/download.py as the README runs it, tiny and with ours and curl only."""
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DIFFSYNTH_C_BENCH_DIR"] = str(tmp_path)
    r = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "download.py"), "--size-mib", "6", "--clients", "ours,curl"],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "unshaped" in r.stdout and "ours" in r.stdout


def test_the_bar_keeps_files_landed_in_earlier_rounds(hub, env, monkeypatch):
    """A hash mismatch sends one file round again; the bar's floor for that round is what already
    landed, so the count never falls back below finished files."""
    bars = []

    class Recorder(_Stop):
        def __init__(self, total, label):
            super().__init__(lambda done: None)
            bars.append(self)

    monkeypatch.setattr(transfer, "_Progress", Recorder)
    hub.fault("text_encoder/config.json", "wrong")
    before = len(hub.requests)
    fetch_one(hub, env, "text_encoder/")
    assert sum("config.json" in r for r in hub.requests[before:]) == 2  # a second round did happen
    repo = hub.repos["org/model"]
    assert bars[0].base == len(repo["text_encoder/model-00001.safetensors"]) + len(repo["text_encoder/config.json"])


def test_files_complete_early_are_sealed_while_others_transfer(hub, env, monkeypatch):
    """A file whose ranges have all arrived is made durable and hashed during the transfer of the
    others, not after all of them; every file still lands verified."""
    hub.rate = 8 << 20  # the big file's ranges take about two seconds; the small files, none
    in_fetch, sealed_during = [False], []
    real_fetch, real_seal = _core.fetch, transfer._seal

    def fetch(*args):
        in_fetch[0] = True
        try:
            return real_fetch(*args)
        finally:
            in_fetch[0] = False

    def seal(fd, part, f):
        sealed_during.append((os.path.basename(part), in_fetch[0]))
        return real_seal(fd, part, f)

    monkeypatch.setattr(transfer._core, "fetch", fetch)
    monkeypatch.setattr(transfer, "_seal", seal)
    fetch_one(hub, env, "")
    for rel, data in hub.repos["org/model"].items():
        assert (env / "org/model" / rel).read_bytes() == data
    during = {name for name, busy in sealed_during if busy}
    assert "model-00001.safetensors.incomplete" in during, sealed_during  # done long before the big one
    assert sorted(name for name, _ in sealed_during) == sorted(
        f"{os.path.basename(r)}.incomplete" for r in hub.repos["org/model"]
    )


CONCURRENT = """
import hashlib, sys
from diffsynth_c import ModelConfig
c = ModelConfig(model_id="org/model", origin_file_pattern="model.safetensors", local_model_path=sys.argv[1])
c.download_if_necessary()
print(hashlib.sha256(open(c.path, "rb").read()).hexdigest())
"""


def file_gets(hub, since: int) -> int:
    return sum(r.endswith("model.safetensors") and "text_encoder" not in r for r in hub.requests[since:])


@pytest.mark.parametrize("how", ["processes", "threads"])
def test_two_downloads_of_one_file_into_one_folder(hub, env, how):
    """Both succeed with the right bytes: the second waits for the first's lock, then takes its
    verified file instead of writing into the same partial file."""
    import sys
    import threading

    before = len(hub.requests)
    fetch_one(hub, env / "solo")
    solo = file_gets(hub, before)
    before = len(hub.requests)
    hub.rate = 8 << 20  # the transfer takes about two seconds: the two overlap
    base = env / "shared"
    want = sha(hub.repos["org/model"]["model.safetensors"])
    if how == "processes":
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        children = [
            subprocess.Popen(
                [sys.executable, "-c", CONCURRENT, str(base)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=root,
                env=dict(os.environ, PYTHONPATH=root),
            )
            for _ in range(2)
        ]
        outs = [c.communicate(timeout=120) for c in children]
        assert [c.returncode for c in children] == [0, 0], [err[-2000:] for _, err in outs]
        # the last line: DiffSynth's download-source box comes first on stdout, as DiffSynth prints it
        assert [out.strip().splitlines()[-1] for out, _ in outs] == [want, want]
    else:
        errors = []

        def run():
            try:
                fetch_one(hub, base)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
    check_big(hub, base)
    assert file_gets(hub, before) == solo  # the file's bytes were fetched once
    assert not os.listdir(base / "org/model" / cfg.PARTIAL)
