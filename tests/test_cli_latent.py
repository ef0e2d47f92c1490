"""`cq fit / sample / report` on latent models: a text model (diffusers' tiny SD test pipeline, saved as a
folder) with prompts and guidance, a class-conditional LDM (tiny-ldm-cin as a CompVis checkpoint) with labels,
and every misuse refused as one line with exit status 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers_test_sd import save_tiny_sd_pipeline
from safetensors.torch import save_file

import cq
from cq.cli import main
from cq.models import LatentDiffusion


FIT = ["--recipe", "cachequant", "--interval", "2", "--steps", "4", "--samples", "2"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-sd") / "pipe"
    save_tiny_sd_pipeline(folder)
    return folder


@pytest.fixture(scope="module")
def sd_fitted(sd_folder, tmp_path_factory):
    """A cachequant fit of the tiny SD folder on two prompts (one given inline, one from a file), guidance 5."""
    root = tmp_path_factory.mktemp("cli-sd-fit")
    prompts = root / "prompts.txt"
    prompts.write_text("a red car\n\n")
    out = root / "sd.cq"
    argv = ["fit", "--model", str(sd_folder), *FIT, "--prompt", "a cat", "--prompts", str(prompts)]
    assert main([*argv, "--guidance", "5", "--batch-size", "1", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def cin_weights(tmp_path_factory):
    """tiny-ldm-cin (random weights) written as a CompVis checkpoint: UNet, VQ first stage, class embedder."""
    pipe = LatentDiffusion.build("tiny-ldm-cin", seed=0)
    state = {f"model.diffusion_model.{k}": v for k, v in pipe.unet.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in pipe.first_stage.state_dict().items()}
    state |= {f"cond_stage_model.{k}": v for k, v in pipe.conditioner.state_dict().items()}
    path = tmp_path_factory.mktemp("cli-cin") / "cin.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def cin_fitted(cin_weights):
    out = cin_weights.parent / "cin.cq"
    argv = ["fit", "--model", "tiny-ldm-cin", "--weights", str(cin_weights), *FIT, "--class-labels", "1,2"]
    assert main([*argv, "-o", str(out)]) == 0
    return out


def test_fit_on_a_text_model_records_prompts_guidance_and_the_presets_sampler(sd_fitted, capsys):
    model = cq.load(sd_fitted)
    assert model.calibration_guidance == 5.0
    assert model.sampler_settings.sampler == "plms" and model.num_steps == 5  # the folder's SD defaults; 4 + 1
    assert model.calibration_seeds == (10_000, 10_001)


def test_sample_decodes_through_the_first_stage_with_the_fitted_guidance(sd_folder, sd_fitted, tmp_path, capsys):
    """The CLI's images are the pipeline's own decode of the compressed model's guided samples (guidance 5: the
    fitted scale, not the preset's 7.5), batch by batch."""
    grid, npz = tmp_path / "grid.png", tmp_path / "images.npz"
    argv = ["sample", str(sd_fitted), "--weights", str(sd_folder), "--prompt", "a bowl of fruit", "--num", "3"]
    assert main([*argv, "--batch-size", "2", "--npz", str(npz), "-o", str(grid)]) == 0
    assert grid.read_bytes()[:4] == b"\x89PNG"
    saved = np.load(npz)
    assert saved["arr_0"].shape == (3, 64, 64, 3) and saved["arr_0"].dtype == np.uint8  # 32x32 latents, VAE f2
    assert list(saved["prompts"]) == ["a bowl of fruit"] * 3
    pipe = LatentDiffusion.from_pretrained(sd_folder)
    with torch.no_grad():
        images = pipe.sample(cond=["a bowl of fruit"] * 3, model=cq.load(sd_fitted), guidance_scale=5.0, steps=4)
    expected = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    # batches of 2 + 1 vs 3: float sums differ in the last bit (how much depends on the CPU's kernels), which can
    # flip activation codes near rounding boundaries; measured up to 4 levels on a few % of pixels, never the image
    diff = np.abs(saved["arr_0"].astype(int) - expected.astype(int))
    assert diff.max() <= 8 and float(diff.mean()) < 0.5, (diff.max(), float(diff.mean()))
    assert "guidance 5" in capsys.readouterr().out


def test_report_on_a_text_model_runs_teacher_forced_and_held_out(sd_folder, sd_fitted, capsys):
    argv = ["report", str(sd_fitted), "--weights", str(sd_folder), "--prompt", "a bowl of fruit"]
    assert main([*argv, "--samples", "2", "--eval", "2", "--steps-table"]) == 0
    text = capsys.readouterr().out
    assert "teacher-forced per-step SQNR" in text and "held-out evaluation: 2 seeds (30000..30001)" in text
    assert "guidance 5" in text and "over the latents" in text
    assert text.count("| cached |") + text.count("| full |") == 5


def test_label_model_fit_sample_report(cin_weights, cin_fitted, tmp_path, capsys):
    model = cq.load(cin_fitted)
    assert model.calibration_guidance == 1.5  # the preset's LDM-ImageNet default
    # the quantized copy of the UNet still names its preset in the file, so `sample` needs no --model
    assert model.unet.preset == cq.models.get_preset("tiny-ldm-cin")
    labels = tmp_path / "labels.txt"
    labels.write_text("3\n4\n")
    npz = tmp_path / "c.npz"
    argv = ["sample", str(cin_fitted), "--weights", str(cin_weights), "--class-labels", str(labels)]
    assert main([*argv, "--npz", str(npz), "-o", str(tmp_path / "c.png")]) == 0
    saved = np.load(npz)
    assert saved["arr_0"].shape == (2, 16, 16, 3) and saved["arr_1"].tolist() == [3, 4]  # one per label
    argv = ["report", str(cin_fitted), "--weights", str(cin_weights), "--class-labels", "5,6"]
    assert main([*argv, "--samples", "2", "--eval", "2"]) == 0
    text = capsys.readouterr().out
    assert "held-out evaluation: 2 seeds" in text and "teacher-forced" in text


def test_an_unconditional_latent_preset_needs_no_conditions(tmp_path, capsys):
    pipe = LatentDiffusion.build("tiny-ldm-bedroom", seed=0)
    state = {f"model.diffusion_model.{k}": v for k, v in pipe.unet.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in pipe.first_stage.state_dict().items()}
    weights = tmp_path / "bed.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    out = tmp_path / "bed.cq"
    assert main(["fit", "--model", "tiny-ldm-bedroom", "--weights", str(weights), *FIT, "-o", str(out)]) == 0
    assert cq.load(out).calibration_guidance == 1.0
    npz = tmp_path / "bed.npz"
    argv = ["sample", str(out), "--weights", str(weights), "--num", "2", "--npz", str(npz)]
    assert main([*argv, "-o", str(tmp_path / "bed.png")]) == 0
    assert np.load(npz)["arr_0"].shape == (2, 16, 16, 3)
    assert main(["sample", str(out), "--weights", str(weights), "--prompt", "a bed", "-o", str(npz)]) == 2
    assert "unconditional model: drop --prompt" in capsys.readouterr().err


MISUSE = [
    # (argv, with {sd}, {sd_cq}, {cin}, {cin_cq}, {tmp} filled in; what the one-line error must say)
    (["fit", "--model", "{sd}", *FIT, "-o", "{tmp}/x.cq"], "is text-conditioned: pass --prompt TEXT"),
    (["fit", "--model", "{sd}", "--class-labels", "3", "-o", "{tmp}/x.cq"], "class labels are for label models"),
    (["fit", "--model", "demo", "--prompt", "a cat", "-o", "{tmp}/x.cq"], "unconditional model: drop --prompt"),
    (["fit", "--model", "demo", "--guidance", "3", "-o", "{tmp}/x.cq"], "--guidance does not apply"),
    (["sample", "{sd_cq}", "--weights", "{sd}"], "is text-conditioned: pass --prompt"),
    (
        ["fit", "--model", "tiny-ldm-cin", "--weights", "{cin}", "--class-labels", "1,1000", "-o", "{tmp}/x.cq"],
        "[1000] out of range; tiny-ldm-cin has classes 0..999 (1000 is the unconditional class)",
    ),
    (["sample", "{cin_cq}", "--weights", "{cin}", "--class-labels", "-4"], "[-4] out of range"),
    (
        ["fit", "--model", "tiny-ldm-cin", "--weights", "{cin}", "--class-labels", "1,x", "-o", "{tmp}/x.cq"],
        "neither a comma-separated list of integers",
    ),
    (
        ["fit", "--model", "tiny-ldm-cin", "--weights", "{cin}", "--prompt", "a cat", "-o", "{tmp}/x.cq"],
        "is class-conditional: pass --class-labels",
    ),
    (["fit", "--model", "sd-v1", "--prompt", "a cat", "-o", "{tmp}/x.cq"], "sd-v1 ships no weights: pass --weights"),
    (["fit", "--model", "tiny-sd", "--prompt", "a cat", "-o", "{tmp}/x.cq"], "tiny-sd ships no weights"),
    (["fit", "--model", "sd-v1", "--weights", "{cin}", "--prompt", "a", "-o", "{tmp}/x.cq"], "pass --tokenizer"),
    (["fit", "--model", "tiny-ldm-cin", "--weights", "{tmp}/none.ckpt", "-o", "{tmp}/x.cq"], "no such file"),
    (
        ["fit", "--model", "{sd}", "--prompts", "{tmp}/none.txt", "-o", "{tmp}/x.cq"],
        "--prompts {tmp}/none.txt: cannot read it",
    ),
    (["fit", "--model", "{sd}", "--prompts", "{tmp}", "-o", "{tmp}/x.cq"], "one prompt per line"),
    (["fit", "--model", "demo", "--device", "gpu0", "-o", "{tmp}/x.cq"], "not a device; use cpu, cuda"),
    (["fit", "--model", "demo", "--device", "cuda:99", "-o", "{tmp}/x.cq"], "cuda"),
    (["sample", "{cin_cq}", "--class-labels", "1"], "pass --weights"),
    (["sample", "{sd_cq}", "--weights", "{cin}", "--prompt", "a"], "not a preset"),
    (["report", "{sd_cq}", "--prompt", "a cat"], "pass --weights"),
    (["fit", "--model", "{cin}", "-o", "{tmp}/x.cq"], "is a file; name the preset it holds: --model <preset>"),
]


@pytest.mark.parametrize(("argv", "message"), MISUSE, ids=[" ".join(a[:4]) for a, _ in MISUSE])
def test_misuse_is_one_line_and_exit_2(argv, message, sd_folder, sd_fitted, cin_weights, cin_fitted, tmp_path, capsys):
    names = {"sd": sd_folder, "sd_cq": sd_fitted, "cin": cin_weights, "cin_cq": cin_fitted, "tmp": tmp_path}
    argv = [a.format(**names) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"cq {argv[0]}: error:"), err
    assert message.format(**names) in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "x.cq").exists()
