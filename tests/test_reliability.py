"""What cq refuses, and with which error (docs/reliability.md): bad scalars and tensors at the model and sampler
entries, malformed or unsafe checkpoint files, failed writes, and files shared between processes."""

from __future__ import annotations

import collections
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

import cq
from cq.artifact import _checksum
from cq.errors import (
    CheckpointFormatError,
    CheckpointValueError,
    ConfigError,
    InputShapeError,
    InputValueError,
    StrategyNotRegisteredError,
    UnsafeCheckpointError,
)
from cq.io import read_safetensors
from cq.models import LDMUNet, LDMUNetConfig
from cq.models.checkpoint import read_state_dict
from cq.models.loading import load, load_weights
from cq.sampling import ClassifierFreeGuidance, FullPrecision, NoiseSchedule, ddim, dpm_solver, plms


ROOT = Path(__file__).resolve().parents[1]
T = 1000  # NoiseSchedule()'s training timesteps


def _tiny_ldm() -> LDMUNet:
    config = LDMUNetConfig(
        image_size=8,
        in_channels=3,
        out_channels=3,
        model_channels=32,
        channel_mult=(1,),
        attention_resolutions=(1,),
        num_head_channels=8,
    )
    return LDMUNet(config, noise_schedule=NoiseSchedule()).eval()


@pytest.fixture(scope="module")
def ldm():
    return _tiny_ldm()


@pytest.fixture(scope="module")
def fitted(unet):
    trace = cq.trace(unet, steps=4, num_samples=2, points=[unet.default_cache_point()], progress=False)
    return cq.naive(interval=2).fit(unet, trace, progress=False)


def _x(model, batch: int = 1, **kwargs) -> torch.Tensor:
    return torch.randn((batch, *model.sample_shape), **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# The base UNets check t at their own entry (they returned finite-looking output for t = 5000 or NaN)


_timesteps = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
)


def _legal(t: float) -> bool:
    return math.isfinite(t) and 0 <= t < T


@given(t=_timesteps)
def test_base_unets_refuse_timesteps_outside_the_schedule(unet, ldm, t):
    for model in (unet, ldm):
        tensor = torch.tensor([t], dtype=torch.float32 if isinstance(t, float) else torch.long)
        if _legal(float(tensor)):
            assert torch.isfinite(model(_x(model), tensor)).all()
        else:
            with pytest.raises(InputValueError, match=r"NaN or inf|\[0, 1000\)"):
                model(_x(model), tensor)


def test_base_unet_timestep_check_can_be_switched_off(unet):
    """``check_inputs = False`` skips the reduction (for callers that check upstream); compiled graphs skip it too."""
    try:
        unet.check_inputs = False
        unet(_x(unet), torch.tensor([5000]))
    finally:
        del unet.check_inputs
    with pytest.raises(InputValueError):
        unet(_x(unet), torch.tensor([5000]))


def test_compressed_unet_and_base_unets_share_one_check(fitted):
    """`CompressedUNet` says the same as the UNet it wraps (one shared check, `check_model_inputs`)."""
    with pytest.raises(InputValueError, match=r"\[0, 1000\)") as compressed:
        fitted(_x(fitted), torch.tensor([5000]), step=0)
    with pytest.raises(InputValueError) as base:
        fitted.unet(_x(fitted), torch.tensor([5000]))
    assert str(compressed.value) == str(base.value)


@given(dtype=st.sampled_from([torch.float64, torch.float16, torch.bfloat16]))
def test_input_of_another_dtype_is_refused_with_the_fix(unet, dtype):
    """A float32 model given float64 / float16 input raised torch's raw conv dtype error."""
    with pytest.raises(InputShapeError, match=r"x is torch\.\w+, the model's weights are torch\.float32") as info:
        unet(_x(unet, dtype=dtype), torch.tensor([3]))
    assert ".to(torch.float32)" in str(info.value)


@given(dtype=st.sampled_from([torch.float64, torch.bfloat16]))
def test_input_in_the_models_dtype_runs(dtype):
    """The legitimate uses: a model converted to the input's dtype, and float32 input under autocast."""
    from conftest import tiny_unet

    model = tiny_unet().to(dtype)
    out = model(_x(model, dtype=dtype), torch.tensor([3]))
    assert out.dtype == dtype and torch.isfinite(out.float()).all()


def test_autocast_takes_a_float32_model_with_bfloat16_input(unet):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(_x(unet, dtype=torch.bfloat16), torch.tensor([3]))
    assert torch.isfinite(out.float()).all()


def test_meta_input_is_refused(unet, fitted):
    for model, kwargs in ((unet, {}), (fitted, {"step": 0})):
        with pytest.raises(InputShapeError, match="meta"):
            model(_x(unet, device="meta"), torch.tensor([3]), **kwargs)
    with pytest.raises(InputShapeError, match="meta"):
        unet(_x(unet), torch.tensor([3], device="meta"))


def test_a_meta_model_still_runs_on_meta_input():
    """Counting shapes / MACs without data: a meta model with meta input passes (no values to check)."""
    from conftest import tiny_unet

    model = tiny_unet().to("meta")
    assert model(_x(model, device="meta"), torch.tensor([3], device="meta")).device.type == "meta"


# ----------------------------------------------------------------------------------------------------------------
# Samplers: scalar arguments and the initial noise, checked once


@given(eta=st.floats(allow_nan=True, allow_infinity=True))
def test_ddim_refuses_a_non_finite_or_negative_eta(unet, eta):
    model, x = FullPrecision(unet), _x(unet)
    if math.isfinite(eta) and eta >= 0:
        assert torch.isfinite(ddim(model, x, steps=2, eta=min(eta, 1.0))).all()
    else:
        with pytest.raises(ConfigError, match="eta must be a finite number >= 0"):
            ddim(model, x, steps=2, eta=eta)


@pytest.mark.parametrize("sampler", [ddim, plms, dpm_solver])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_samplers_refuse_non_finite_initial_noise(unet, sampler, value):
    x = _x(unet, batch=2)
    x[1, 0, 3, 4] = value  # one pixel of one sample
    with pytest.raises(InputValueError, match="initial noise"):
        sampler(FullPrecision(unet), x, steps=2)


@given(scale=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["7.5", None, True])))
def test_guidance_refuses_a_scale_that_is_not_a_finite_number(unet, scale):
    """An infinite scale passed (only NaN was refused) and made every guided sample NaN."""
    if isinstance(scale, float) and math.isfinite(scale):
        assert ClassifierFreeGuidance(FullPrecision(unet), scale, torch.zeros(1)).scale == scale
        return
    with pytest.raises(ConfigError, match="guidance_scale must be a number"):
        ClassifierFreeGuidance(FullPrecision(unet), scale, torch.zeros(1))
    with pytest.raises(ConfigError, match="guidance_scale must be a number"):
        cq.trace(unet, steps=2, num_samples=1, guidance_scale=scale, progress=False)


_bad_steps = st.one_of(
    st.integers(max_value=0),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(["5", None]),
)


@given(steps=_bad_steps, sampler=st.sampled_from([ddim, plms, dpm_solver]))
def test_samplers_refuse_a_step_count_that_is_not_a_positive_int(unet, steps, sampler):
    with pytest.raises(ConfigError, match="steps"):
        sampler(FullPrecision(unet), _x(unet), steps=steps)


@given(steps=_bad_steps)
def test_trace_refuses_a_step_count_that_is_not_a_positive_int(unet, steps):
    with pytest.raises(ConfigError, match="steps"):
        cq.trace(unet, steps=steps, num_samples=1, progress=False)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: non-float parameters and non-finite weights


def test_integer_weights_are_refused_by_name(unet):
    """They were cast to float silently."""
    from conftest import tiny_unet

    state = {k: v.clone() for k, v in unet.state_dict().items()}
    state["conv_in.weight"] = state["conv_in.weight"].round().long()
    with pytest.raises(CheckpointValueError, match=r"conv_in\.weight \(torch\.int64\)"):
        load_weights(tiny_unet(seed=1), state)


def test_non_finite_weights_are_reported_at_load_unless_allowed(tmp_path):
    source = cq.models.build("demo", seed=1)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    key = next(iter(state))
    state[key].view(-1)[0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointValueError, match=f"NaN or inf: {key}.*check_finite=False"):
        load("demo", path=path)
    loaded = load("demo", path=path, check_finite=False)
    assert torch.isnan(loaded.state_dict()[key]).any()


# ----------------------------------------------------------------------------------------------------------------
# Raw exceptions that are cq errors now


@pytest.mark.parametrize("bits", [8, 8.0, ("w8", "a8"), None])
def test_bits_must_be_a_format_string(bits):
    with pytest.raises(ConfigError, match="'w8a8'"):
        cq.cachequant(bits=bits)


def test_fitting_a_trace_that_kept_no_trajectory_says_keep(unet):
    trace = cq.trace(unet, steps=4, num_samples=2, keep=0, points=[unet.default_cache_point()], progress=False)
    with pytest.raises(ConfigError, match="keep=0.*keep >= 1"):
        cq.cachequant(interval=2).fit(unet, trace, progress=False)


def _pickle_with_foreign_class(path: Path, monkeypatch) -> None:
    """A checkpoint pickling an instance of ``not_installed_pkg.Callback`` (a module faked for the save only)."""
    module = types.ModuleType("not_installed_pkg")

    class Callback:
        pass

    Callback.__module__, Callback.__qualname__ = "not_installed_pkg", "Callback"
    module.Callback = Callback
    monkeypatch.setitem(sys.modules, "not_installed_pkg", module)
    torch.save({"w": torch.zeros(2), "callback": Callback()}, path)
    monkeypatch.delitem(sys.modules, "not_installed_pkg")


def test_a_pickled_class_of_a_missing_module_is_named_not_called_truncated(tmp_path, monkeypatch):
    path = tmp_path / "foreign.ckpt"
    _pickle_with_foreign_class(path, monkeypatch)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "`not_installed_pkg.Callback`" in message and "not installed" in message
    assert "truncated" not in message


class _BadArguments:
    """Pickles as ``OrderedDict(1)``: an allow-listed callable with arguments it does not take."""

    def __reduce__(self):
        return (collections.OrderedDict, (1,))


def test_weights_only_type_error_is_a_format_error(tmp_path):
    path = tmp_path / "damaged.pt"
    torch.save({"w": torch.zeros(2), "extra": _BadArguments()}, path)
    with pytest.raises(CheckpointFormatError, match="not a readable PyTorch checkpoint"):
        read_state_dict(path)


@pytest.mark.parametrize("value", [128, "128,256", None, [], [32, "64"], [32, True]])
def test_diffusers_config_with_malformed_block_out_channels(tmp_path, value):
    folder = tmp_path / "unet"
    folder.mkdir()
    config = {
        "_class_name": "UNet2DModel",
        "sample_size": 16,
        "block_out_channels": value,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "flip_sin_to_cos": False,
        "freq_shift": 1,
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"w": torch.zeros(1)}, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ConfigError, match="block_out_channels must be a list of positive ints"):
        load(folder)


def test_resuming_from_a_truncated_training_state_says_delete_it(tmp_path):
    pytest.importorskip("sklearn")
    from cq.models.train import TrainConfig, train

    out = tmp_path / "model.safetensors"
    state = out.with_suffix(".state.pt")
    torch.save({"model": {"w": torch.zeros(1000)}}, state)
    state.write_bytes(state.read_bytes()[:-300])
    with pytest.raises(CheckpointFormatError, match="cannot resume from .*Delete it"):
        train(TrainConfig(steps=2, batch_size=2, save_every=1, warmup=1), out, progress=False)


_LIMITED_WRITE = """
import resource, signal, sys
sys.path.insert(0, {tests!r})
import torch, cq
from cq.errors import CheckpointWriteError
from conftest import tiny_unet
unet = tiny_unet()
trace = cq.trace(unet, steps=4, num_samples=2, points=[unet.default_cache_point()], progress=False)
model = cq.naive(interval=2).fit(unet, trace, progress=False)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    cq.save(model, {target!r})
except CheckpointWriteError as e:
    print("errno", e.errno, isinstance(e, OSError), str(e))
"""


def test_a_failed_write_is_an_os_error_keeping_its_errno(tmp_path):
    """A disk that takes no more bytes (here: a file-size limit, EFBIG; a full disk is ENOSPC) made safetensors
    raise its own SafetensorError, which no `except OSError` catches."""
    target = tmp_path / "m.cq"
    script = _LIMITED_WRITE.format(tests=str(ROOT / "tests"), target=str(target))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=_env(), check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"errno {errno.EFBIG} True" in result.stdout, result.stdout + result.stderr[-2000:]
    assert "ulimit" in result.stdout
    assert not target.exists() and list(tmp_path.iterdir()) == []  # no partial file, no temporary left


# ----------------------------------------------------------------------------------------------------------------
# Errors keep their class through cq.load


def test_an_unregistered_strategy_in_a_file_is_still_a_strategy_error(fitted, tmp_path):
    saved = cq.save(fitted, tmp_path / "m.cq")
    tensors, meta = read_safetensors(saved)
    recipe = json.loads(meta["recipe"])
    recipe["cacher"]["schedule"]["type"] = "from_a_plugin"
    meta["recipe"] = json.dumps(recipe, sort_keys=True)
    meta["checksum"] = _checksum(tensors, meta)
    save_file(tensors, str(saved), metadata=meta)
    with pytest.raises(StrategyNotRegisteredError, match="--plugin") as info:
        cq.load(saved)
    assert isinstance(info.value, CheckpointFormatError) and str(saved) in str(info.value)


def test_an_invalid_description_in_a_file_is_still_a_config_error(fitted, tmp_path):
    saved = cq.save(fitted, tmp_path / "m.cq")
    tensors, meta = read_safetensors(saved)
    recipe = json.loads(meta["recipe"])
    recipe["cacher"]["schedule"]["interval"] = 0
    meta["recipe"] = json.dumps(recipe, sort_keys=True)
    meta["checksum"] = _checksum(tensors, meta)
    save_file(tensors, str(saved), metadata=meta)
    with pytest.raises(ConfigError) as info:
        cq.load(saved)
    assert isinstance(info.value, CheckpointFormatError)


# ----------------------------------------------------------------------------------------------------------------
# Files shared between processes: concurrent saves and loads, writers killed mid-save


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


_WRITER = """
import os, cq
model = cq.load({source!r})
while not os.path.exists({stop!r}):
    cq.save(model, {target!r})
"""


@pytest.fixture(scope="module")
def two_files(unet, tmp_path_factory):
    """Two saved models that differ (other schedule, other calibration)."""
    folder = tmp_path_factory.mktemp("two")
    files = []
    for i, interval in enumerate((2, 3)):
        trace = cq.trace(unet, steps=5, num_samples=2, seed=i, points=[unet.default_cache_point()], progress=False)
        files.append(cq.save(cq.naive(interval=interval).fit(unet, trace, progress=False), folder / f"{i}.cq"))
    return files


def test_a_load_during_concurrent_saves_gets_one_whole_file(two_files, tmp_path):
    """Two processes keep saving different models to one path; every load in a third gets one of them whole
    (120 loads, or 30 seconds of them)."""
    target, stop = tmp_path / "shared.cq", tmp_path / "stop"
    cq.save(cq.load(two_files[0]), target)
    expected = {read_safetensors(f)[1]["checksum"] for f in two_files}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER.format(source=str(f), target=str(target), stop=str(stop))], env=_env()
        )
        for f in two_files
    ]
    loads, seen = 0, set()
    deadline = time.monotonic() + 30
    try:
        while loads < 120 and time.monotonic() < deadline:
            model = cq.load(target)  # raised "checksum mismatch" when header and bytes came from two files
            seen.add(json.dumps(model.refresh_mask()))
            loads += 1
    finally:
        stop.touch()
        for w in writers:
            w.wait(timeout=120)
    assert all(w.returncode == 0 for w in writers)
    assert loads >= 10 and len(seen) == 2, f"{loads} loads saw {len(seen)} of the two models"
    assert read_safetensors(target)[1]["checksum"] in expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.cq", "stop"]  # no temporary left


def test_a_file_replaced_after_the_loader_opened_it_is_read_whole(two_files, tmp_path, monkeypatch):
    """Header and tensors come from the one descriptor the loader opened: a save renamed over the path right
    after that open does not reach the bytes it reads (the first fstat of the open file triggers the rename)."""
    target = tmp_path / "m.cq"
    target.write_bytes(two_files[0].read_bytes())
    real_fstat, replaced = os.fstat, []

    def fstat_then_replace(fd):
        if not replaced:
            replaced.append(True)
            (tmp_path / "new").write_bytes(two_files[1].read_bytes())
            os.replace(tmp_path / "new", target)
        return real_fstat(fd)

    monkeypatch.setattr(os, "fstat", fstat_then_replace)
    model = cq.load(target)
    monkeypatch.undo()
    assert replaced and model.refresh_mask() == cq.load(two_files[0]).refresh_mask()
    assert cq.load(target).refresh_mask() == cq.load(two_files[1]).refresh_mask()


_KILLED_WRITER = """
import time, cq, cq.io
model = cq.load({source!r})
sort = cq.io._sort_metadata_in_place
def written_then_stall(path):
    sort(path)
    print("written", flush=True)
    time.sleep(120)  # killed here: the temporary holds the whole file, the rename never happens
cq.io._sort_metadata_in_place = written_then_stall
cq.save(model, {target!r})
"""


def _kill_mid_save(source: Path, target: Path) -> list[Path]:
    """Run a save of ``source`` over ``target`` and ``kill -9`` it once its temporary is written; the leftovers."""
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER.format(source=str(source), target=str(target))],
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "written"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    return [p for p in target.parent.iterdir() if p != target]


def test_kill_9_leftovers_are_removed_by_the_next_load(two_files, tmp_path):
    target = tmp_path / "m.cq"
    cq.save(cq.load(two_files[0]), target)
    leftovers = _kill_mid_save(two_files[1], target)
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".m.cq.") and leftovers[0].stat().st_size > 0
    deadline = time.monotonic() + 10
    while any(p.exists() for p in leftovers) and time.monotonic() < deadline:  # the killed pid is reaped
        cq.load(target)
    assert not any(p.exists() for p in leftovers)
    assert read_safetensors(target)[1]["checksum"] == read_safetensors(two_files[0])[1]["checksum"]  # old file


def test_kill_9_leftovers_are_removed_by_the_next_save(two_files, tmp_path):
    target = tmp_path / "m.cq"
    leftovers = _kill_mid_save(two_files[1], target)
    assert len(leftovers) == 1 and not target.exists()
    cq.save(cq.load(two_files[0]), target)
    assert sorted(tmp_path.iterdir()) == [target]
