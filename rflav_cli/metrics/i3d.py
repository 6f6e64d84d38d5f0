"""Inception-v1 I3D (Kinetics-400), the video feature network of the FVD/KVD protocol.

Layer names, parameter layout and numerics follow the PyTorch port used by VideoGPT and
MM-Diffusion (file ``i3d_pretrained_400.pt``): every convolution and max-pool pads its input
like TensorFlow's "SAME" (computed from the input size, zeros, the odd pixel at the back),
BatchNorm uses eps 1e-5 and running statistics, and the output is the 400 pre-softmax logits
averaged over the remaining time steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .weights import check_weights, read_tensor_file

__all__ = ["I3D_INPUT_SIZE", "InceptionI3d", "load_i3d", "preprocess_for_i3d"]

I3D_INPUT_SIZE = 224
NUM_CLASSES = 400
_BN_EPS = 1e-5
_BN_MOMENTUM = 0.001

Triple = tuple[int, int, int]


def _same_padding(size: Sequence[int], kernel: Triple, stride: Triple) -> list[int]:
    """F.pad amounts (last dim first) for TF "SAME" padding of a (T, H, W) input."""
    pads: list[int] = []
    for n, k, s in zip(reversed(size), reversed(kernel), reversed(stride)):
        total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
        pads += [total // 2, total - total // 2]
    return pads


class Unit3d(nn.Module):
    """SAME-padded Conv3d, then optional BatchNorm and ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Triple = (1, 1, 1),
        stride: Triple = (1, 1, 1),
        *,
        norm: bool = True,
        relu: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(out_channels, eps=_BN_EPS, momentum=_BN_MOMENTUM) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv3d(F.pad(x, _same_padding(x.shape[2:], self.kernel, self.stride)))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class SameMaxPool3d(nn.Module):
    """Max-pool over a zero-padded ("SAME") input, as in the TensorFlow original."""

    def __init__(self, kernel: Triple, stride: Triple) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, _same_padding(x.shape[2:], self.kernel, self.stride))
        return F.max_pool3d(x, self.kernel, self.stride)


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1; 1x1-3x3; 1x1-3x3; pool-1x1) concatenated on channels."""

    def __init__(self, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3 = widths
        self.b0 = Unit3d(in_channels, w0)
        self.b1a = Unit3d(in_channels, w1a)
        self.b1b = Unit3d(w1a, w1b, (3, 3, 3))
        self.b2a = Unit3d(in_channels, w2a)
        self.b2b = Unit3d(w2a, w2b, (3, 3, 3))
        self.b3a = SameMaxPool3d((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3d(in_channels, w3)
        self.out_channels = w0 + w1b + w2b + w3

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1
        )


# (name, kind, arguments) of the trunk in execution order; "conv": (out, kernel, stride),
# "pool": (kernel, stride), "mixed": branch widths.
_TRUNK: tuple[tuple[str, str, tuple], ...] = (
    ("Conv3d_1a_7x7", "conv", (64, (7, 7, 7), (2, 2, 2))),
    ("MaxPool3d_2a_3x3", "pool", ((1, 3, 3), (1, 2, 2))),
    ("Conv3d_2b_1x1", "conv", (64, (1, 1, 1), (1, 1, 1))),
    ("Conv3d_2c_3x3", "conv", (192, (3, 3, 3), (1, 1, 1))),
    ("MaxPool3d_3a_3x3", "pool", ((1, 3, 3), (1, 2, 2))),
    ("Mixed_3b", "mixed", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", "mixed", (128, 128, 192, 32, 96, 64)),
    ("MaxPool3d_4a_3x3", "pool", ((3, 3, 3), (2, 2, 2))),
    ("Mixed_4b", "mixed", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", "mixed", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", "mixed", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", "mixed", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", "mixed", (256, 160, 320, 32, 128, 128)),
    ("MaxPool3d_5a_2x2", "pool", ((2, 2, 2), (2, 2, 2))),
    ("Mixed_5b", "mixed", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", "mixed", (384, 192, 384, 48, 128, 128)),
)
_FEATURE_CHANNELS = 1024
_POOL_KERNEL = (2, 7, 7)


class InceptionI3d(nn.Module):
    """I3D classifier. ``forward`` maps (B, 3, T, 224, 224) video in [-1, 1] to (B, 400) logits.

    The state dict matches ``i3d_pretrained_400.pt``: ``logits.conv3d.*`` first, then the trunk
    (``Conv3d_1a_7x7`` ... ``Mixed_5c``), each unit holding ``conv3d.weight`` and ``bn.*``.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 3) -> None:
        super().__init__()
        # Registered first so that the state dict starts with it, like the checkpoint.
        self.logits = Unit3d(_FEATURE_CHANNELS, num_classes, norm=False, relu=False, bias=True)
        self.trunk_names: list[str] = []
        channels = in_channels
        for name, kind, args in _TRUNK:
            if kind == "conv":
                out, kernel, stride = args
                layer: nn.Module = Unit3d(channels, out, kernel, stride)
                channels = out
            elif kind == "pool":
                layer = SameMaxPool3d(*args)
            else:
                layer = InceptionBlock(channels, args)
                channels = layer.out_channels
            self.add_module(name, layer)
            self.trunk_names.append(name)
        assert channels == _FEATURE_CHANNELS

    def pooled_features(self, video: Tensor) -> Tensor:
        """Trunk output average-pooled over 2x7x7 windows: (B, 1024, T', H', W'), 1x1 spatially at 224²."""
        if video.dim() != 5:
            raise ValueError(f"I3D expects video of shape (B, C, T, H, W), got {tuple(video.shape)}")
        x = video
        for name in self.trunk_names:
            x = self.get_submodule(name)(x)
        return F.avg_pool3d(x, _POOL_KERNEL, stride=1)

    def forward(self, video: Tensor) -> Tensor:
        """(B, 3, T, 224, 224) in [-1, 1] -> (B, 400) logits averaged over time."""
        x = self.logits(self.pooled_features(video))
        return x.squeeze(3).squeeze(3).mean(dim=2)


def preprocess_for_i3d(video: Tensor, size: int = I3D_INPUT_SIZE) -> Tensor:
    """uint8 clips (B, T, C, H, W) -> float32 (B, C, T, size, size) in [-1, 1].

    Bilinear resize (align_corners=False) of the shorter side to `size` (the other side rounded
    up), centre crop, then x/255 mapped to [-1, 1]: the preprocessing of the FVD protocol.
    """
    if video.dim() != 5 or video.dtype != torch.uint8:
        raise ValueError(f"expected uint8 clips (B, T, C, H, W), got {video.dtype} {tuple(video.shape)}")
    b, t, c, h, w = video.shape
    frames = video.reshape(b * t, c, h, w).float() / 255.0
    scale = size / min(h, w)
    target = (size, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), size)
    frames = F.interpolate(frames, size=target, mode="bilinear", align_corners=False)
    top, left = (target[0] - size) // 2, (target[1] - size) // 2
    frames = frames[:, :, top : top + size, left : left + size]
    clips = frames.reshape(b, t, c, size, size).permute(0, 2, 1, 3, 4)
    return (clips - 0.5) * 2


def load_i3d(path: str | Path) -> InceptionI3d:
    """Build I3D from ``i3d_pretrained_400.pt`` (a plain state dict), in eval mode, frozen.

    ``*.num_batches_tracked`` entries may be absent (they do not affect the output); any other
    missing, unexpected or mis-shaped entry is refused.
    """
    path = Path(path)
    state = read_tensor_file(path, "I3D weights")
    model = InceptionI3d()
    check_weights(
        model,
        state,
        path,
        "Kinetics-400 I3D weights in the i3d_pretrained_400.pt layout",
        optional=lambda key: key.endswith(".num_batches_tracked"),
    )
    model.load_state_dict(state, strict=False)
    return model.eval().requires_grad_(False)
