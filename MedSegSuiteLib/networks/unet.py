"""A plain U-Net: the baseline network and the Predictor's test network."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import BasicUNet

__all__ = ["PRESETS", "UNet"]

PRESETS = {
    "unet": {
        "paper": {"features": (32, 32, 64, 128, 256, 32)},
        "lite": {"features": (8, 8, 16, 32, 64, 8)},
    }
}


class UNet(BasicUNet):
    """MONAI's ``BasicUNet`` (Falk et al., Nat. Methods 2019) with MedSegSuite's argument names.

    Args:
        spatial_dims: 2 for slices and images, 3 for volumes.
        in_channels: image channels (1 for CT/MRI, 3 for RGB).
        out_channels: logit channels; background included for softmax outputs.
        features: six widths: the five encoder levels and the last decoder level.
        dropout: dropout probability inside the convolution blocks.

    ``forward(x[B, C, *spatial]) -> logits[B, out_channels, *spatial]``. Any spatial
    size works; sizes divisible by 16 avoid internal padding.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        dropout: float = 0.0,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError("in_channels and out_channels must be positive")
        if len(features) != 6:
            raise ValueError(f"features needs 6 widths, got {len(features)}")
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            features=tuple(features),
            dropout=dropout,
        )
