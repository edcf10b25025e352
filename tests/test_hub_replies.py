"""The hubs' listing replies are untrusted input: whatever JSON comes back, a listing either gives
files whose paths stay inside the model folder, or raises DownloadError naming the model."""

from __future__ import annotations

import copy
import random

import pytest

from diffsynth_c import DownloadError
from diffsynth_c.hub import hubs
from diffsynth_c.loader import config as cfg

SHA = "ab" * 32


def modelscope_replies():
    revisions = {"Code": 200, "Data": {"RevisionMap": {"Branches": [{"Revision": "master"}], "Tags": []}}}
    files = {
        "Code": 200,
        "Data": {
            "Files": [
                {
                    "Path": "model.safetensors",
                    "Name": "model.safetensors",
                    "Type": "blob",
                    "Size": 10,
                    "Sha256": SHA,
                    "Revision": "c0ffee",
                },
                {"Path": "text_encoder", "Type": "tree", "Size": 0},
                {"Path": "text_encoder/config.json", "Type": "blob", "Size": "7", "Sha256": SHA.upper()},
            ]
        },
    }
    return [revisions, files]


def huggingface_replies():
    revision = {"sha": "c0ffee" * 6 + "abcd"}
    tree = [
        {"type": "file", "path": "model.safetensors", "size": 10, "oid": "1" * 40, "lfs": {"oid": SHA, "size": 10}},
        {"type": "directory", "path": "text_encoder"},
        {"type": "file", "path": "text_encoder/config.json", "size": 7, "oid": "2" * 40},
    ]
    return [revision, tree]


HUBS = {"modelscope": (cfg.ModelScope, modelscope_replies), "huggingface": (cfg.HuggingFace, huggingface_replies)}


def listing(monkeypatch, source, replies):
    queue = list(replies)

    def fake_get_json(url, headers, what):
        if not queue:
            raise AssertionError(f"unexpected request {url}")
        return queue.pop(0), b""

    monkeypatch.setattr(hubs, "_get_json", fake_get_json)
    hub_class, _ = HUBS[source]
    return hub_class().listing("org/model")


@pytest.mark.parametrize("source", HUBS)
def test_a_good_listing(monkeypatch, source):
    commit, files = listing(monkeypatch, source, HUBS[source][1]())
    assert [f.path for f in files] == ["model.safetensors", "text_encoder/config.json"]
    assert [f.size for f in files] == [10, 7]
    assert files[0].sha256 == SHA
    assert commit


def set_first_path(source, replies, path):
    if source == "modelscope":
        replies[1]["Data"]["Files"][0]["Path"] = path
    else:
        replies[1][0]["path"] = path


@pytest.mark.parametrize("source", HUBS)
@pytest.mark.parametrize(
    "path", ["../evil", "a/../../evil", "/etc/evil", "a//b", "./a", "a\\..\\b", "a\0b", "", None, 7]
)
def test_a_path_outside_the_model_folder_is_refused(monkeypatch, source, path):
    replies = HUBS[source][1]()
    set_first_path(source, replies, path)
    with pytest.raises(DownloadError, match="org/model"):
        listing(monkeypatch, source, replies)


@pytest.mark.parametrize("source", HUBS)
def test_bad_sizes_and_hashes_are_refused(monkeypatch, source):
    for field, value in (
        ("size", -1),
        ("size", "ten"),
        ("size", None),
        ("size", True),
        ("hash", "abc"),
        ("hash", "z" * 64),
        ("hash", 12),
    ):
        replies = HUBS[source][1]()
        entry = replies[1]["Data"]["Files"][0] if source == "modelscope" else replies[1][0]
        if field == "size":
            entry["Size" if source == "modelscope" else "size"] = value
        elif source == "modelscope":
            entry["Sha256"] = value
        else:
            entry["lfs"]["oid"] = value
        with pytest.raises(DownloadError, match="model.safetensors"):
            listing(monkeypatch, source, replies)


JUNK = [None, True, 0, -5, 2**70, 1.5, "", "x", "../x", [], [1], {}, {"a": 1}, [{}], [None]]


def mutate(obj, rng):
    """One random change somewhere in a JSON value: replace, delete, or retype a node."""
    if isinstance(obj, dict) and obj and rng.random() < 0.8:
        key = rng.choice(list(obj))
        roll = rng.random()
        if roll < 0.2:
            del obj[key]
        elif roll < 0.5:
            obj[key] = rng.choice(JUNK)
        else:
            obj[key] = mutate(obj[key], rng)
        return obj
    if isinstance(obj, list) and obj and rng.random() < 0.8:
        i = rng.randrange(len(obj))
        obj[i] = mutate(obj[i], rng) if rng.random() < 0.6 else rng.choice(JUNK)
        return obj
    return copy.deepcopy(rng.choice(JUNK))


@pytest.mark.parametrize("source", HUBS)
def test_mutated_replies_give_safe_files_or_a_download_error(monkeypatch, source):
    rng = random.Random(source)
    outcomes = {"files": 0, "error": 0}
    for _ in range(3000):
        replies = HUBS[source][1]()
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(replies))
            replies[i] = mutate(replies[i], rng)
        try:
            _, files = listing(monkeypatch, source, replies)
        except DownloadError as e:
            assert "org/model" in str(e)
            outcomes["error"] += 1
            continue
        for f in files:
            assert isinstance(f.path, str) and f.path and not f.path.startswith("/")
            assert ".." not in f.path.split("/") and "\\" not in f.path
            assert isinstance(f.size, int) and f.size >= 0
            assert f.sha256 is None or len(f.sha256) == 64
        outcomes["files"] += 1
    assert outcomes["files"] > 100 and outcomes["error"] > 100, outcomes
