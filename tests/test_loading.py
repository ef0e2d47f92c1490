"""Checkpoint reading and model loading: file formats, containers, EMA selection, and the errors of each failure."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
import torch
from conftest import save_lightning_ckpt
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import cq.models
from cq.errors import CheckpointFormatError, CheckpointKeyMismatchError, ConfigError, UnsafeCheckpointError
from cq.models import PRESETS, build, load, load_weights
from cq.models.checkpoint import extract_state_dict, read_state_dict
from cq.models.convert import ddpm_to_diffusers
from cq.sampling.noise import NoiseSchedule


# A small preset, loaded here only with an explicit path= (its embedded weights are not under test).
SMALL = "demo"

# google/ddpm-style tiny UNet2DModel (ecosystem.md B); attention_head_dim=None is the DDPM's single head
TINY_DIFFUSERS = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    norm_eps=1e-6,
    norm_num_groups=32,
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
    attention_head_dim=None,
    mid_block_scale_factor=1,
)
# fp32: the DDPM and diffusers timestep embeddings differ in op order (up to ~3e-5 at t=999) and diffusers' SDPA
# reorders the attention reductions
PARITY_ATOL = 1e-4


@pytest.fixture(scope="module")
def source() -> nn.Module:
    """A random model of the small preset whose weights the files below carry."""
    return build(SMALL, seed=123)


@pytest.fixture(scope="module")
def source_state(source) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in source.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _assert_same_outputs(a: nn.Module, b: nn.Module) -> None:
    x = torch.randn(2, *a.sample_shape)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        assert torch.equal(a(x, t), b(x, t))


def _tensor_dict(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(4, 3, generator=g), "layer.bias": torch.randn(4, generator=g)}


# ----------------------------------------------------------------------------------------------------------------
# Round trips through each file format


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".pth", ".bin", ".safetensors"])
def test_original_keys_round_trip(tmp_path, source, source_state, suffix):
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(source_state, path)
    else:
        torch.save(source_state, path)
    _assert_same_state(read_state_dict(path), source_state)
    unet = load(SMALL, path=path)
    assert not unet.training
    assert unet.preset.name == SMALL
    assert unet is not source and unet.state_dict()["conv_in.weight"] is not source_state["conv_in.weight"]
    _assert_same_state(unet.state_dict(), source_state)
    _assert_same_outputs(unet, source)


@pytest.mark.parametrize("fmt", ["auto", "diffusers"])
def test_diffusers_keys_safetensors_round_trip(tmp_path, source, source_state, fmt):
    path = tmp_path / "diffusers_keys.safetensors"
    save_file(ddpm_to_diffusers(source_state, len(source.config.ch_mult)), path)
    assert any(k.startswith("down_blocks.") for k in read_state_dict(path))
    unet = load(SMALL, path=path, format=fmt)
    _assert_same_state(unet.state_dict(), source_state)
    _assert_same_outputs(unet, source)


def test_diffusers_keys_with_format_original_are_a_mismatch(tmp_path, source, source_state):
    path = tmp_path / "diffusers_keys.safetensors"
    save_file(ddpm_to_diffusers(source_state, len(source.config.ch_mult)), path)
    with pytest.raises(CheckpointKeyMismatchError) as info:
        load(SMALL, path=path, format="original")
    assert "conv_in.weight" not in info.value.missing  # same name in both layouts
    assert "temb.dense.0.weight" in info.value.missing
    assert "time_embedding.linear_1.weight" in info.value.unexpected


def _tiny_diffusers(seed: int) -> nn.Module:
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(**TINY_DIFFUSERS).eval()


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_diffusers_folder(tmp_path, safe_serialization):
    ref = _tiny_diffusers(seed=5)
    folder = tmp_path / "tiny-ddpm"
    ref.save_pretrained(folder, safe_serialization=safe_serialization)
    weights = "diffusion_pytorch_model." + ("safetensors" if safe_serialization else "bin")
    assert (folder / weights).exists()

    unet = load(folder)
    assert isinstance(unet, cq.models.DDPMUNet) and not unet.training
    assert unet.preset.name == "tiny-ddpm"
    assert unet.noise_schedule == NoiseSchedule()  # no scheduler config next to it: the DDPM default
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999])
    with torch.no_grad():
        out, expected = unet(x, t), ref(x, t).sample
    assert expected.abs().max() > 0.1
    assert (out - expected).abs().max() <= PARITY_ATOL

    # the same folder as the weights of a preset-less path: read_state_dict gives diffusers keys
    _assert_same_state(read_state_dict(folder), ref.state_dict())


def test_diffusers_pipeline_folder_with_scheduler(tmp_path):
    ref = _tiny_diffusers(seed=6)
    pipe = tmp_path / "pipe"
    ref.save_pretrained(pipe / "unet")
    (pipe / "scheduler").mkdir()
    scheduler = {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "num_train_timesteps": 500,
    }
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    unet = load(pipe)
    assert unet.noise_schedule == NoiseSchedule(
        kind="scaled_linear", beta_start=0.00085, beta_end=0.012, num_timesteps=500
    )
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([250])
    with torch.no_grad():
        assert (unet(x, t) - ref(x, t).sample).abs().max() <= PARITY_ATOL


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointFormatError, match="config.json"):
        read_state_dict(tmp_path / "empty")
    with pytest.raises(CheckpointFormatError, match="config.json"):
        load(tmp_path / "empty")


@pytest.mark.parametrize(
    "config",
    ["[]", "{}", "{not json", json.dumps({"block_out_channels": "wide", "layers_per_block": 2}), '"text"'],
)
def test_malformed_config_json_is_a_format_error(tmp_path, config):
    folder = tmp_path / "bad"
    _tiny_diffusers(seed=7).save_pretrained(folder)
    (folder / "config.json").write_text(config)
    with pytest.raises(CheckpointFormatError, match="config.json"):
        load(folder)


@pytest.mark.parametrize(
    "scheduler",
    [
        "[]",
        "{oops",
        json.dumps({"beta_start": "small"}),
        json.dumps({"beta_start": 0.5, "beta_end": 0.1}),
        json.dumps({"num_train_timesteps": 10.5}),
    ],
)
def test_malformed_scheduler_config_is_a_format_error(tmp_path, scheduler):
    pipe = tmp_path / "pipe"
    _tiny_diffusers(seed=8).save_pretrained(pipe / "unet")
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(scheduler)
    with pytest.raises(CheckpointFormatError, match="scheduler_config.json"):
        load(pipe)


def test_folder_without_weights(tmp_path):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(CheckpointFormatError, match="diffusion_pytorch_model"):
        read_state_dict(folder)


# ----------------------------------------------------------------------------------------------------------------
# Containers and EMA selection


def test_ddim_training_list_selects_ema(tmp_path):
    model_sd, ema_sd = _tensor_dict(1), _tensor_dict(2)
    param = nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([param])
    (param**2).sum().backward()
    opt.step()
    path = tmp_path / "ckpt.pth"
    torch.save([model_sd, opt.state_dict(), 7, 1234, ema_sd], path)  # ddim: [model, optimizer, epoch, step, ema]
    _assert_same_state(read_state_dict(path, ema=True), ema_sd)
    _assert_same_state(read_state_dict(path), ema_sd)  # ema is the default
    _assert_same_state(read_state_dict(path, ema=False), model_sd)


def test_training_list_without_ema(tmp_path):
    model_sd = _tensor_dict(1)
    path = tmp_path / "ckpt.pth"
    torch.save([model_sd, {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}, 7, 1234], path)
    _assert_same_state(read_state_dict(path, ema=True), model_sd)


def test_ema_and_model_dict(tmp_path):
    model_sd, ema_sd = _tensor_dict(1), _tensor_dict(2)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model_sd, "ema": ema_sd, "step": 10}, path)
    _assert_same_state(read_state_dict(path, ema=True), ema_sd)
    _assert_same_state(read_state_dict(path, ema=False), model_sd)


def test_lightning_dict(tmp_path):
    sd = _tensor_dict(3)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 100, "optimizer_states": [], "lr_schedulers": []}, path)
    _assert_same_state(read_state_dict(path), sd)
    _assert_same_state(read_state_dict(path, ema=False), sd)


def test_lightning_model_checkpoint_callback_is_allowed(tmp_path, monkeypatch):
    """Old Lightning .ckpt files pickle a ModelCheckpoint callback object; it must load without running its code."""
    sd = _tensor_dict(4)
    path = tmp_path / "lightning.ckpt"
    ran = save_lightning_ckpt(path, {"state_dict": sd}, monkeypatch)

    with pytest.raises(Exception, match="ModelCheckpoint"):  # control: plain weights_only loading refuses it
        torch.load(path, weights_only=True)
    _assert_same_state(read_state_dict(path), sd)
    assert ran == []


def test_module_prefix_is_stripped(tmp_path, source, source_state):
    path = tmp_path / "dataparallel.pt"
    torch.save({f"module.{k}": v for k, v in source_state.items()}, path)
    _assert_same_state(read_state_dict(path), source_state)
    _assert_same_outputs(load(SMALL, path=path), source)


def test_partial_module_prefix_is_kept():
    state = {"module.a": torch.zeros(1), "b": torch.ones(1)}
    assert extract_state_dict(state).keys() == state.keys()


def test_non_tensor_entries_of_a_nested_state_dict_are_dropped():
    sd = _tensor_dict(1)
    _assert_same_state(extract_state_dict({"state_dict": {**sd, "step": 3, "note": "x"}, "epoch": 1}), sd)


def test_non_tensor_entries_of_a_flat_state_dict_are_dropped():
    sd = _tensor_dict(1)
    _assert_same_state(extract_state_dict({**sd, "step": 3}), sd)


@pytest.mark.parametrize(
    "obj",
    [{"epoch": 3, "global_step": 5}, [1, 2, 3], {}, {"state_dict": {"step": 1}}, "weights"],
    ids=["no-state-dict", "list-without-dict", "empty", "no-tensors", "string"],
)
def test_container_without_state_dict(tmp_path, obj):
    path = tmp_path / "bad.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointFormatError):
        read_state_dict(path)


# ----------------------------------------------------------------------------------------------------------------
# Key mismatches


def test_key_mismatch_lists_the_keys(source, source_state):
    unet = build(SMALL, seed=9)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    state = dict(source_state)
    del state["conv_out.bias"], state["mid.attn_1.q.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["conv_in.weight"] = torch.zeros(7, 1, 3, 3)
    with pytest.raises(CheckpointKeyMismatchError) as info:
        load_weights(unet, state)
    err = info.value
    assert err.missing == ["conv_out.bias", "mid.attn_1.q.weight"]
    assert err.unexpected == ["extra.weight"]
    assert err.shape_mismatch == [("conv_in.weight", (7, 1, 3, 3), tuple(source_state["conv_in.weight"].shape))]
    message = str(err)
    for key in ("conv_out.bias", "mid.attn_1.q.weight", "extra.weight", "conv_in.weight", "(7, 1, 3, 3)"):
        assert key in message
    assert isinstance(err, KeyError)
    _assert_same_state(unet.state_dict(), before)  # nothing was copied


@given(data=st.data())
def test_key_mismatch_reports_exactly_the_differences(source, source_state, data):
    keys = sorted(source_state)
    dropped = data.draw(st.sets(st.sampled_from(keys), max_size=4), label="dropped")
    extra = data.draw(st.sets(st.from_regex(r"[a-z]{1,6}\.(weight|bias)", fullmatch=True), max_size=3), label="extra")
    extra -= set(keys)
    reshaped = data.draw(st.sets(st.sampled_from(keys), max_size=3), label="reshaped") - dropped
    state = {k: v for k, v in source_state.items() if k not in dropped}
    state |= {k: torch.zeros(1) for k in extra}
    state |= {k: torch.zeros(*source_state[k].shape, 2) for k in reshaped}
    if not (dropped or extra or reshaped):
        load_weights(source, state)  # the same weights: a no-op
        return
    with pytest.raises(CheckpointKeyMismatchError) as info:
        load_weights(source, state)
    assert info.value.missing == sorted(dropped)
    assert info.value.unexpected == sorted(extra)
    assert [k for k, _, _ in info.value.shape_mismatch] == sorted(reshaped)


def test_key_mismatch_from_a_file_names_the_preset(tmp_path, source_state):
    path = tmp_path / "short.safetensors"
    save_file({k: v for k, v in source_state.items() if not k.startswith("up.")}, path)
    with pytest.raises(CheckpointKeyMismatchError, match=SMALL) as info:
        load(SMALL, path=path)
    assert info.value.missing == sorted(k for k in source_state if k.startswith("up."))
    assert info.value.unexpected == [] and info.value.shape_mismatch == []


def test_unknown_key_format(source, source_state):
    with pytest.raises(ConfigError, match="format"):
        load_weights(source, source_state, format="ldm")


# ----------------------------------------------------------------------------------------------------------------
# Unsafe pickles


class _RunsShell:
    """Unpickling this runs a shell command (touches the file) - the classic malicious checkpoint."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.flag))}",))


class _WritesOnLoad:
    """A plain object whose unpickling (__setstate__) writes the flag file."""

    def __init__(self, flag: Path):
        self.flag = str(flag)

    def __setstate__(self, state):
        Path(state["flag"]).write_text("ran")
        self.__dict__.update(state)


@pytest.mark.parametrize("payload", [_RunsShell, _WritesOnLoad])
def test_pickle_with_code_is_refused(tmp_path, source_state, payload):
    flag = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": source_state, "callback": payload(flag)}, path)
    assert not flag.exists()
    with pytest.raises(UnsafeCheckpointError, match="trust_pickle"):
        read_state_dict(path)
    with pytest.raises(UnsafeCheckpointError):
        load(SMALL, path=path)
    assert not flag.exists()


def test_trust_pickle_runs_the_code(tmp_path, source_state):
    """Control for the test above: the flag does detect unpickling code, once the caller opts in."""
    flag = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": source_state, "callback": _WritesOnLoad(flag)}, path)
    _assert_same_state(read_state_dict(path, trust_pickle=True), source_state)
    assert flag.read_text() == "ran"


def test_unsafe_pickle_error_names_the_global(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "extra": _RunsShell(tmp_path / "flag")}, path)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        read_state_dict(path)


class _Evals:
    def __reduce__(self):
        return (eval, ("1 + 1",))


class _Execs:
    def __reduce__(self):
        return (exec, ("x = 1",))


@pytest.mark.parametrize(("payload", "name"), [(_Evals, "builtins.eval"), (_Execs, "builtins.exec")])
def test_refused_builtins_say_why_and_never_advise_weights_only_false(tmp_path, payload, name):
    """A builtin pickled by bare name ("GLOBAL eval") is a refused payload, not a truncated file; torch's advice
    to re-run with weights_only=False (or to allow-list the global) is not passed on."""
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "extra": payload()}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert f"`{name}`" in message and "run code" in message
    assert "truncated" not in message and "weights_only=False" not in message and "add_safe_globals" not in message


# ----------------------------------------------------------------------------------------------------------------
# Unreadable files


@pytest.fixture(scope="module")
def small_files(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("small")
    sd = _tensor_dict(0)
    torch.save(sd, folder / "a.pt")
    torch.save(sd, folder / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(sd, folder / "a.safetensors")
    return {name: (folder / name).read_bytes() for name in ("a.pt", "legacy.pt", "a.safetensors")}


def test_every_truncation_of_a_safetensors_file(tmp_path, small_files):
    data = small_files["a.safetensors"]
    path = tmp_path / "cut.safetensors"
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointFormatError, match="truncated"):
            read_state_dict(path)


def test_every_truncation_of_a_pt_file(tmp_path, small_files):
    data = small_files["a.pt"]
    assert data[:4] == b"PK\x03\x04"  # torch's zip format
    path = tmp_path / "cut.pt"
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointFormatError):
            read_state_dict(path)


def test_pt_file_cut_inside_the_magic(tmp_path, small_files):
    path = tmp_path / "cut.pt"
    path.write_bytes(small_files["a.pt"][:2])
    with pytest.raises(CheckpointFormatError):
        read_state_dict(path)


def test_every_truncation_of_a_legacy_pt_file(tmp_path, small_files):
    data = small_files["legacy.pt"]
    path = tmp_path / "cut.pt"
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointFormatError):
            read_state_dict(path)


def test_legacy_pt_file_reads(tmp_path, small_files):
    path = tmp_path / "legacy.pt"
    path.write_bytes(small_files["legacy.pt"])
    _assert_same_state(read_state_dict(path), _tensor_dict(0))


def test_truncated_model_file(tmp_path, source_state):
    for suffix in (".pt", ".safetensors"):
        full, cut = tmp_path / f"full{suffix}", tmp_path / f"cut{suffix}"
        if suffix == ".safetensors":
            save_file(source_state, full)
        else:
            torch.save(source_state, full)
        data = full.read_bytes()
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointFormatError):
            load(SMALL, path=cut)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointFormatError, match="not found"):
        read_state_dict(tmp_path / "nope.pt")
    with pytest.raises(CheckpointFormatError, match="not found"):
        load(SMALL, path=tmp_path / "nope.safetensors")


@pytest.mark.parametrize("name", ["weights.npz", "weights.txt", "weights"])
def test_unknown_suffix(tmp_path, source_state, name):
    path = tmp_path / name
    torch.save(source_state, path)  # readable by torch, but the suffix says nothing about it
    with pytest.raises(CheckpointFormatError, match=r"\.safetensors"):
        read_state_dict(path)


# ----------------------------------------------------------------------------------------------------------------
# load() arguments


def test_preset_without_weights_needs_a_path():
    assert PRESETS["cifar10"].embedded is None
    with pytest.raises(ConfigError, match=r"build\('cifar10'\)") as info:
        load("cifar10")
    assert "path=" in str(info.value)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError) as info:
        cq.models.get_preset("cifar100")
    assert all(name in str(info.value) for name in PRESETS)
    with pytest.raises(ConfigError) as info:
        load("cifar100")
    assert all(name in str(info.value) for name in PRESETS)


def test_weights_file_as_first_argument(tmp_path, source_state):
    path = tmp_path / "model.safetensors"
    save_file(source_state, path)
    with pytest.raises(ConfigError, match="path=") as info:
        load(path)
    assert all(name in str(info.value) for name in PRESETS)
