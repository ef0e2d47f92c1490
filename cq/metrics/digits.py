"""Distribution-level metrics for the demo model: a small digits classifier trained by cq, and what it measures.

The demo model generates 16x16 digits (`cq.models.train.digits_dataset`). Per-sample PSNR against full precision says
how far each compressed sample moved; it does not say whether the *set* of samples is still distributed like
the data. For that, FID's recipe with a feature extractor that fits the domain (Inception does not: it has
never seen a 16x16 digit): `DigitsClassifier`, a CNN trained on scikit-learn's digits, gives

- a **digits FID**: the Fréchet distance (`cq.metrics.frechet`) between Gaussians fitted to its penultimate
  features of two sample sets (compressed vs data, full precision vs data);
- **class coverage**: the fraction of the 10 classes predicted for at least ``min_share`` of the samples;
- an **Inception-score analogue**: ``exp(E_x KL(p(y|x) || p(y)))`` in [1, 10].

The weights ship with cq (``cq/models/weights/digits_classifier.safetensors``, ~0.3 MB) and are reproduced by
``cq train-classifier`` (seeded, CPU, under a minute). Its split: a seeded 80/20 permutation of the 1797 digits;
the test accuracy is stored in the file's metadata.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import ConfigError, InputShapeError
from .frechet import GaussianStats, frechet_distance, gaussian_stats


__all__ = [
    "DigitsClassifier",
    "DigitsScorer",
    "digits_split",
    "load_digits_classifier",
    "train_digits_classifier",
    "inception_score",
    "class_coverage",
    "EMBEDDED_CLASSIFIER",
]

EMBEDDED_CLASSIFIER = Path(__file__).resolve().parent.parent / "models" / "weights" / "digits_classifier.safetensors"


class DigitsClassifier(nn.Module):
    """A small CNN for ``[B, 1, 16, 16]`` digits in [-1, 1]: three conv stages, a 64-d feature layer, 10 logits."""

    feature_dim = 64

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),  # 8x8
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),  # 4x4
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        """``[B, 64]`` penultimate features (the digits-FID space)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 16, 16):
            raise InputShapeError(f"the digits classifier takes [B, 1, 16, 16] images, got {tuple(x.shape)}")
        return self.body(x.float())

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_x, train_y, test_x, test_y)``: the 16x16 digits of `cq.models.train.digits_dataset`, seeded split."""
    from sklearn.datasets import load_digits

    from ..models.train import digits_dataset

    images = digits_dataset(16)
    labels = torch.from_numpy(load_digits().target).long()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(images)))
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random shifts of up to one pixel and a little Gaussian noise (samples are never pixel-perfect)."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return x + 0.05 * torch.randn(x.shape, generator=gen)


@torch.no_grad()
def _accuracy(model: DigitsClassifier, x: Tensor, y: Tensor) -> float:
    return float((model(x).argmax(1) == y).double().mean())


def train_digits_classifier(
    out: str | Path, *, seed: int = 0, epochs: int = 30, batch_size: int = 64, progress: bool = True
) -> tuple[Path, float]:
    """Train the classifier on the seeded 80% split and write ``out`` (safetensors, atomic).

    Returns ``(out, test accuracy)``; the accuracy, seed and epochs go into the file's metadata."""
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    from ..io import save_safetensors

    train_x, train_y, test_x, test_y = digits_split(seed)
    torch.manual_seed(seed)
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc="train-classifier", unit="epoch", disable=not progress)
    for _ in bar:
        model.train()
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(_augment(train_x[idx], gen)), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        bar.set_postfix(test_acc=f"{_accuracy(model, test_x, test_y):.4f}")
    model.eval()
    accuracy = _accuracy(model, test_x, test_y)
    meta = {
        "cq_digits_classifier": json.dumps({"seed": seed, "epochs": epochs, "batch_size": batch_size}),
        "test_accuracy": f"{accuracy:.4f}",
        "train_seconds": f"{time.perf_counter() - start:.0f}",
    }
    from ..models.train import digits_dataset

    with torch.no_grad():
        data = gaussian_stats(model.features(digits_dataset(16)))
    tensors = {**model.state_dict(), "data_stats.mean": data.mean, "data_stats.cov": data.cov}
    meta["data_count"] = str(data.count)
    out = Path(out)
    save_safetensors(tensors, out, metadata=meta)
    return out, accuracy


def load_digits_classifier(path: str | Path | None = None) -> tuple[DigitsClassifier, GaussianStats]:
    """The embedded classifier (or one written by `train_digits_classifier` at ``path``), in eval mode, and the
    Gaussian statistics of its features on the 1797 real digits (stored with it: scoring needs no scikit-learn)."""
    from safetensors import safe_open

    path = Path(path) if path is not None else EMBEDDED_CLASSIFIER
    if not path.exists():
        raise ConfigError(f"no digits classifier at {path}; write one with `cq train-classifier -o {path}`")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        count = int((f.metadata() or {}).get("data_count", "0"))
    try:
        data = GaussianStats(mean=tensors.pop("data_stats.mean"), cov=tensors.pop("data_stats.cov"), count=count)
    except KeyError:
        raise ConfigError(f"{path} is not a cq digits classifier (no data statistics)") from None
    model = DigitsClassifier()
    model.load_state_dict(tensors)
    return model.eval(), data


def inception_score(probs: Tensor) -> float:
    """``exp(E_x KL(p(y|x) || p(y)))`` of ``[N, K]`` class probabilities (1 = one class or uniform noise; K = every
    sample confident and the classes balanced)."""
    p = probs.double().clamp_min(1e-12)
    marginal = p.mean(0, keepdim=True)
    return float(torch.exp((p * (p.log() - marginal.log())).sum(1).mean()))


def class_coverage(probs: Tensor, min_share: float = 0.02) -> float:
    """Fraction of the K classes that are the argmax of at least ``min_share`` of the samples."""
    counts = torch.bincount(probs.argmax(1), minlength=probs.shape[1]).double()
    return float((counts >= min_share * probs.shape[0]).double().mean())


@dataclass
class DigitsScorer:
    """Digits FID, coverage and IS of sample sets (a `cq.metrics.evaluate.Scorer` for the demo model).

    ``score(samples, reference)`` returns ``digits_fid`` (samples vs the 1797 real digits), ``digits_fid_fp``
    (the full-precision reference vs real digits: what the compressed figure is to be read against),
    ``digits_fid_vs_fp``, ``coverage``, ``coverage_fp``, ``is`` and ``is_fp``.
    """

    classifier: DigitsClassifier
    data_stats: GaussianStats
    batch_size: int = 512

    @classmethod
    def embedded(cls) -> DigitsScorer:
        """The scorer with the classifier that ships with cq."""
        return cls(*load_digits_classifier())

    @torch.no_grad()
    def features_and_probs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[N, 64]`` features and ``[N, 10]`` class probabilities (samples clamped to [-1, 1], as saved images)."""
        feats, probs = [], []
        for i in range(0, x.shape[0], self.batch_size):
            f = self.classifier.features(x[i : i + self.batch_size].clamp(-1, 1))
            feats.append(f)
            probs.append(self.classifier.head(f).softmax(1))
        return torch.cat(feats), torch.cat(probs)

    def features(self, x: Tensor) -> Tensor:
        """``[N, 64]`` digits-FID features of ``x`` (for `cq.metrics.paired.compare`)."""
        return self.features_and_probs(x)[0]

    def fid(self, samples: Tensor, other: Tensor | None = None) -> float:
        """Digits FID of ``samples`` against ``other`` (default: the real digits)."""
        stats = gaussian_stats(self.features_and_probs(samples)[0])
        ref = self.data_stats if other is None else gaussian_stats(self.features_and_probs(other)[0])
        return frechet_distance(stats, ref)

    def score(self, samples: Tensor, reference: Tensor) -> dict[str, float]:
        f_s, p_s = self.features_and_probs(samples)
        f_r, p_r = self.features_and_probs(reference)
        s, r = gaussian_stats(f_s), gaussian_stats(f_r)
        return {
            "digits_fid": frechet_distance(s, self.data_stats),
            "digits_fid_fp": frechet_distance(r, self.data_stats),
            "digits_fid_vs_fp": frechet_distance(s, r),
            "coverage": class_coverage(p_s),
            "coverage_fp": class_coverage(p_r),
            "is": inception_score(p_s),
            "is_fp": inception_score(p_r),
        }
