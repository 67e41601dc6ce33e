"""Checks of the shipped weights: pretraining accuracy, and a linear probe on frozen features vs random init.

The task (sklearn's 8x8 handwritten digits, upscaled to 32x32 RGB) is not in the pretraining data, so a pretrained
backbone beating the same architecture at random init shows that pretraining learnt features that transfer.
Needs scikit-learn (``pip install scikit-learn``), which restune itself does not depend on. Run::

    python -m restune.pretraining.probe
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from restune.optional import require
from restune.pretraining.model import MODEL_NAME
from restune.pretraining.train import PretrainConfig, evaluate

__all__ = ["digits_data", "class_token_features", "linear_probe", "main"]

PURPOSE = "the pretraining probe"  # scikit-learn's digits and logistic regression: the ``suite`` extra


def digits_data(seed: int = 0) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
    """The sklearn digits as normalised 32x32 RGB tensors, split half/half (stratified, fixed seed)."""
    digits = require("sklearn.datasets", "suite", PURPOSE).load_digits()
    train_test_split = require("sklearn.model_selection", "suite", PURPOSE).train_test_split
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    images = (images.repeat(1, 3, 1, 1) - 0.5) / 0.5
    index = np.arange(len(images))
    train, test = train_test_split(index, test_size=0.5, random_state=seed, stratify=digits.target)
    return images[train], digits.target[train], images[test], digits.target[test]


@torch.no_grad()
def class_token_features(model: nn.Module, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    """The pre-logits class-token features (after the final norm), computed in eval mode in chunks."""
    model.eval()
    parts = [
        model.forward_head(model.forward_features(images[i : i + batch]), pre_logits=True)
        for i in range(0, len(images), batch)
    ]
    return torch.cat(parts).numpy()


def linear_probe(model: nn.Module, data: tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]) -> float:
    """Test accuracy of a logistic regression on standardised frozen features."""
    preprocessing = require("sklearn.preprocessing", "suite", PURPOSE)
    linear_model = require("sklearn.linear_model", "suite", PURPOSE)
    pipeline = require("sklearn.pipeline", "suite", PURPOSE)
    x_train, y_train, x_test, y_test = data
    probe = pipeline.make_pipeline(preprocessing.StandardScaler(), linear_model.LogisticRegression(max_iter=3000))
    probe.fit(class_token_features(model, x_train), y_train)
    return float(probe.score(class_token_features(model, x_test), y_test))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Print (and return) the probe accuracy of the shipped weights and of random initialisations."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random-init seeds to average")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-batches", type=int, default=32, help="128-image batches for pretraining accuracy")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shipped = timm.create_model(MODEL_NAME, pretrained=True)
    accuracy = evaluate(shipped, None, PretrainConfig(output="", eval_batches=args.eval_batches))
    accuracy.pop("config")
    data = digits_data()
    pretrained = linear_probe(timm.create_model(MODEL_NAME, pretrained=True, num_classes=10), data)
    random = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        random.append(linear_probe(timm.create_model(MODEL_NAME, pretrained=False, num_classes=10), data))
    result = dict(
        pretraining_accuracy=accuracy,
        task="sklearn digits 32x32 RGB, 50/50 split, logistic regression on frozen class token",
        train=len(data[1]),
        test=len(data[3]),
        pretrained=pretrained,
        random_init=random,
        random_init_mean=float(np.mean(random)),
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
