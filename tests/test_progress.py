"""Progress bars (diffsynth_c/progress.py) of loads, saves, conversions and downloads: drawn on stderr
when forced or when someone watches (a terminal, a Jupyter kernel), never otherwise, with tqdm or
the plain line without it; and the results are the same with a bar as without."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import types

import pytest
import torch
from diffsynth.core.loader.file import load_state_dict as ds_load_state_dict

import diffsynth_c
from diffsynth_c import progress
from diffsynth_c.hub import transfer

from .conftest import assert_same_state_dict


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def unforced(monkeypatch):
    """No DIFFSYNTH_C_PROGRESS, and no size floor or delay, so that only the stream decides."""
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setattr(progress, "LOAD_MIN_BYTES", 0)
    monkeypatch.setattr(progress, "DELAY_S", 0.0)


def _no_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    monkeypatch.setitem(sys.modules, "tqdm.notebook", None)
    with pytest.raises(ImportError):
        import tqdm  # noqa: F401


def test_forced_load_draws_a_tqdm_bar_and_returns_the_same_tensors(model_files, monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "1")
    sd = diffsynth_c.load_state_dict(model_files)
    err = capsys.readouterr().err
    assert "Loading 2 files" in err and "100%" in err, err
    assert_same_state_dict(sd, ds_load_state_dict(model_files))


def test_forced_load_of_one_file_returns_its_own_dict(model_files, monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "1")
    sd = diffsynth_c.load_state_dict(model_files[1], torch_dtype=torch.float32)
    assert f"Loading {os.path.basename(model_files[1])}" in capsys.readouterr().err
    assert_same_state_dict(sd, ds_load_state_dict(model_files[1], torch_dtype=torch.float32))


def test_forced_save_draws_a_bar_and_writes_the_same_bytes(model_files, monkeypatch, capsys, tmp_path):
    sd = {k: v for k, v in diffsynth_c.load_state_dict(model_files).items()}
    monkeypatch.setenv(progress.ENV, "0")
    quiet = diffsynth_c.save_state_dict(sd, tmp_path / "quiet", max_shard_size="20KB")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(progress.ENV, "1")
    shown = diffsynth_c.save_state_dict(sd, tmp_path / "shown", max_shard_size="20KB")
    err = capsys.readouterr().err
    assert "Saving shown" in err and "100%" in err, err
    assert len(quiet) == len(shown) > 2
    for a, b in zip(quiet, shown):
        assert os.path.basename(a) == os.path.basename(b)
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read()


def test_convert_shows_bars_only_when_forced(tmp_path):
    src = str(tmp_path / "m.bin")
    torch.save({"a": torch.randn(64, 64), "b": torch.arange(10)}, src)

    def convert(out: str, flag: str | None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != progress.ENV}
        if flag is not None:
            env[progress.ENV] = flag
        return subprocess.run(
            [sys.executable, "-m", "diffsynth_c", "convert", src, str(tmp_path / out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )

    shown = convert("shown", "1")
    assert shown.returncode == 0, shown.stderr
    assert "Loading m.bin" in shown.stderr and "Saving shown" in shown.stderr, shown.stderr
    quiet = convert("quiet", None)  # stderr is a pipe: no bar
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert [os.path.basename(p) for p in quiet.stdout.split()] == [os.path.basename(p) for p in shown.stdout.split()]
    assert diffsynth_c.hash_model_file(str(tmp_path / "shown")) == diffsynth_c.hash_model_file(src)


def test_off_by_default_when_stderr_is_not_a_terminal(model_files, unforced, monkeypatch):
    for stream, expect_bar in ((io.StringIO(), False), (_Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        sd = diffsynth_c.load_state_dict(model_files)
        diffsynth_c.save_state_dict(sd, os.path.join(os.path.dirname(model_files[0]), "out-" + str(expect_bar)))
        err = stream.getvalue()
        assert ("Loading 2 files" in err and "Saving out-True" in err) == expect_bar, err
        assert (err == "") != expect_bar


def test_zero_turns_bars_off_even_on_a_terminal(model_files, unforced, monkeypatch):
    monkeypatch.setenv(progress.ENV, "0")
    monkeypatch.setattr(sys, "stderr", _Terminal())
    diffsynth_c.load_state_dict(model_files)
    assert sys.stderr.getvalue() == ""


def test_small_loads_and_quick_ones_draw_nothing_on_a_terminal(model_files, monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    diffsynth_c.load_state_dict(model_files)  # a few KiB: under LOAD_MIN_BYTES
    monkeypatch.setattr(progress, "LOAD_MIN_BYTES", 0)
    diffsynth_c.load_state_dict(model_files)  # over the floor, but done before DELAY_S
    assert sys.stderr.getvalue() == ""


def test_a_jupyter_kernel_counts_as_someone_watching(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    assert not progress.wanted(1 << 30, stream=io.StringIO())
    shell = type("ZMQInteractiveShell", (), {})()
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    assert progress.wanted(1 << 30, stream=io.StringIO())
    assert not progress.wanted(1, min_total=2, stream=io.StringIO())
    terminal = type("TerminalInteractiveShell", (), {})()  # plain IPython in a terminal: the tty decides
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: terminal))
    assert not progress.wanted(1 << 30, stream=io.StringIO())


def test_without_tqdm_a_forced_bar_is_the_plain_line(model_files, monkeypatch, capsys):
    _no_tqdm(monkeypatch)
    monkeypatch.setenv(progress.ENV, "1")
    sd = diffsynth_c.load_state_dict(model_files)
    err = capsys.readouterr().err
    assert err.startswith("\rLoading 2 files: ") and " MiB/s  ETA " in err and err.endswith("\n"), err
    assert "%|" not in err  # not tqdm's bar
    assert_same_state_dict(sd, ds_load_state_dict(model_files))


def test_without_tqdm_unforced_and_unwatched_is_silent(model_files, unforced, monkeypatch, capsys):
    _no_tqdm(monkeypatch)
    sd = diffsynth_c.load_state_dict(model_files)
    assert capsys.readouterr().err == ""
    assert_same_state_dict(sd, ds_load_state_dict(model_files))


@pytest.mark.parametrize("with_tqdm", [True, False])
def test_download_bar_counts_resumed_bytes_and_closes(monkeypatch, capsys, with_tqdm):
    if not with_tqdm:
        _no_tqdm(monkeypatch)
    monkeypatch.setenv(progress.ENV, "1")
    bar = transfer._Progress(64 << 20, "org/model")
    bar.base = 16 << 20  # already on disk from an earlier, interrupted download
    for done in (0, 16 << 20, 48 << 20):
        bar(done)
    assert bar.bar.done == 64 << 20
    bar.close()
    err = capsys.readouterr().err
    assert "org/model" in err
    assert ("100%" in err) if with_tqdm else ("64/64 MiB" in err), err


def test_download_bar_follows_the_old_rules(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    transfer._Progress(1 << 20, "small").close()  # under 8 MiB: no bar, even on a terminal
    monkeypatch.setenv(progress.ENV, "0")
    transfer._Progress(1 << 30, "off").close()
    assert sys.stderr.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setenv(progress.ENV, "1")
    transfer._Progress(1, "forced")(1)
    assert "forced" in sys.stderr.getvalue()


def test_verbose_lines_are_diffsynths_with_a_bar_too(model_files, monkeypatch, capsys):
    ds_load_state_dict(model_files, verbose=1)
    ref = capsys.readouterr().out
    monkeypatch.setenv(progress.ENV, "1")
    diffsynth_c.load_state_dict(model_files, verbose=1)
    out = capsys.readouterr()
    assert out.out == ref and "Loading 2 files" in out.err
