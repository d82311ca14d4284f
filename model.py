"""Models: torchvision's ResNet-18 (or DenseNet-121) with a one-channel stem, for log-mel input.

    model = build_model("resnet18", num_classes=5)                  # from scratch
    model = build_model("resnet18", num_classes=50, pretrained=True)  # ImageNet init

With `pretrained=True` the ImageNet weights come from torchvision's download cache
(`$TORCH_HOME/hub/checkpoints/`); the stem's three RGB filters are summed into one, which
gives the response to a grey image of the same intensity.
"""
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

MODELS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "densenet121": (torchvision.models.densenet121, torchvision.models.DenseNet121_Weights.IMAGENET1K_V1),
}


def _imagenet_state(weights) -> dict:
    """The ImageNet state dict from torch hub's cache, downloading it when it is missing."""
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # no network, blocked host, broken file
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise RuntimeError(f"could not load the ImageNet weights ({e}). Download {weights.url} by hand "
                           f"and place it at {path}, or train from scratch (pretrained=False).") from None


class DropoutLinear(nn.Linear):
    """nn.Linear with dropout on its input while training; the same parameters and state-dict
    keys as nn.Linear, so checkpoints load with or without it."""

    def __init__(self, in_features: int, out_features: int, p: float = 0.0):
        super().__init__(in_features, out_features)
        self.p = p

    def forward(self, x):
        return super().forward(F.dropout(x, self.p, self.training))


class MeanMaxPool(nn.Module):
    """(B, C, F, T) -> (B, C, 1, 1): the mean over frequency, then the max plus the mean over time
    (the PANNs pooling), so a short sound weighs as much in a whole 5-s clip as in a 2.5-s crop."""

    def forward(self, x):
        x = x.mean(2, keepdim=True)
        return x.amax(-1, keepdim=True) + x.mean(-1, keepdim=True)


POOLS = ("avg", "meanmax")


def build_model(name: str = "resnet18", num_classes: int = 5, pretrained: bool = False,
                dropout: float = 0.0, pool: str = "avg", stem_pool: bool = True) -> nn.Module:
    """A torchvision classifier taking (B, 1, n_mels, frames) and returning logits (B, num_classes);
    `dropout` drops pooled features before the classifier while training; `pool` is how the last
    feature map becomes one vector: "avg" (torchvision's global average) or "meanmax" (MeanMaxPool);
    `stem_pool=False` drops the stem's stride-2 max-pool, so every later layer sees twice the
    time and frequency resolution (about 3x the compute)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; choose one of {list(POOLS)}")
    make, weights = MODELS[name]
    model = make(weights=None)
    if pretrained:
        model.load_state_dict(_imagenet_state(weights))
    # the stem: the one conv layer that sees the input, and the stride-2 max-pool after it
    parent, attr, pool_attr = (model, "conv1", "maxpool") if name == "resnet18" else (model.features, "conv0", "pool0")
    rgb = getattr(parent, attr)
    stem = nn.Conv2d(1, rgb.out_channels, rgb.kernel_size, rgb.stride, rgb.padding, bias=False)
    if pretrained:
        stem.weight.data.copy_(rgb.weight.data.sum(dim=1, keepdim=True))
    setattr(parent, attr, stem)
    if not stem_pool:
        setattr(parent, pool_attr, nn.Identity())
    head = "fc" if name == "resnet18" else "classifier"
    setattr(model, head, DropoutLinear(getattr(model, head).in_features, num_classes, dropout))
    if pool == "meanmax" and name == "resnet18":
        model.avgpool = MeanMaxPool()
    elif pool == "meanmax":  # DenseNet pools relu(features) to 1x1 in forward(): pool before it
        model.features.add_module("meanmax", nn.Sequential(nn.ReLU(), MeanMaxPool()))
    return model
