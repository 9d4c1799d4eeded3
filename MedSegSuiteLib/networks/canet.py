"""CANet ("CA-Net"): a V-Net with a transformer bottleneck and an SDF head, plus its discriminator.

Zhao, Xiang, Wang, Cai, Shen, Zhou, Zhao, Su, Guo, Li, "Context-aware network fusing transformer and
V-Net for semi-supervised segmentation of 3D left atrium", Expert Systems with Applications (2023),
doi:10.1016/j.eswa.2022.119105.

The segmenter is the UA-MT/SASSNet V-Net (3^3 conv blocks without residuals, 2^3 stride-2
down/up-sampling, additive skips) whose 1/16-resolution features are replaced by the output of a
12-layer pre-norm transformer over one token per voxel ("Trans-V"). It has two 1x1 heads: a tanh
signed-distance map and a segmentation logit. The discriminator looks at (SDF map, image) pairs and
tells labelled from unlabelled samples. Attribute names follow the authors' code, so a state_dict in
their layout loads with ``strict=True``.

Volumes run in channels-last memory order; in eval mode every BatchNorm is folded into its
convolution, the stride-2 transposed convolutions run as one matrix product each, and the two 1x1
heads as one. These are exact rewrites: outputs match the layer-by-layer formulation to float32
rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dnet import _batchnorm_affine, _conv3x3, _fold_batchnorm, _upsample2

__all__ = ["PRESETS", "CANet", "CANetDiscriminator", "ConvStack", "TransformerLayer"]

PRESETS = {
    "canet": {
        # 24.49 M parameters; the token grid 7x7x5 (245 tokens) follows from the 112x112x80 patch.
        "paper": {"in_channels": 1, "num_classes": 1},
        # Half the filters and a 96-wide, 4-layer transformer with a 4x MLP: 3.18 M parameters, about a
        # quarter of the paper FLOPs, same 112x112x80 patch (override patch_size for smaller ROIs).
        "lite": {
            "in_channels": 1,
            "num_classes": 1,
            "base_filters": 8,
            "hidden_size": 96,
            "num_layers": 4,
            "num_heads": 8,
            "mlp_dim": 384,
        },
    },
    "canet_discriminator": {
        # 11.02 M parameters (SE off, as the released code effectively runs).
        "paper": {},
        # 0.69 M parameters: 16 first filters instead of 64.
        "lite": {"base": 16},
    },
}

_LAST = torch.channels_last_3d


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous(memory_format=_LAST) else x.contiguous(memory_format=_LAST)


class ConvStack(nn.Module):
    """``n`` rounds of [3^3 conv (bias), BatchNorm, ReLU] without a residual (UA-MT ``ConvBlock``).

    Args:
        rounds: number of conv/BN/ReLU rounds.
        in_channels: input channels of the first round.
        channels: output channels of every round.

    ``forward(x[B, in_channels, *S]) -> [B, channels, *S]``.
    """

    def __init__(self, rounds: int, in_channels: int, channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(rounds):
            layers += [
                nn.Conv3d(in_channels if i == 0 else channels, channels, 3, padding=1),
                nn.BatchNorm3d(channels),
                nn.ReLU(inplace=True),
            ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.conv(x)
        for i in range(0, len(self.conv), 3):  # eval: BatchNorm folded into each convolution
            weight, bias = _fold_batchnorm(self.conv[i].weight, self.conv[i].bias, self.conv[i + 1])
            x = F.relu_(_conv3x3(x, weight, bias))
        return x


class _Resample(nn.Module):
    """2^3 stride-2 (transposed) convolution, BatchNorm, ReLU (UA-MT down/up-sampling block)."""

    def __init__(self, in_channels: int, channels: int, up: bool) -> None:
        super().__init__()
        conv = nn.ConvTranspose3d if up else nn.Conv3d
        self.conv = nn.Sequential(conv(in_channels, channels, 2, stride=2), nn.BatchNorm3d(channels), nn.ReLU(True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.conv(x)
        conv, bn = self.conv[0], self.conv[1]
        if isinstance(conv, nn.ConvTranspose3d):  # eval: BatchNorm folded, upsampling as one matrix product
            scale, shift = _batchnorm_affine(bn)
            weight = conv.weight * scale.view(1, -1, 1, 1, 1)
            return F.relu_(_channels_last(_upsample2(x, weight, conv.bias * scale + shift)))
        weight, bias = _fold_batchnorm(conv.weight, conv.bias, bn)
        return F.relu_(_channels_last(F.conv3d(_channels_last(x), weight, bias, stride=2)))


class _Embeddings(nn.Module):
    """1x1x1 projection of every voxel to a token, plus a learnable position table (zero init), then dropout."""

    def __init__(self, channels: int, hidden_size: int, num_tokens: int, dropout: float) -> None:
        super().__init__()
        self.patch_embeddings = nn.Conv3d(channels, hidden_size, 1)
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_tokens, hidden_size))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embeddings(x).flatten(2).transpose(1, 2)
        return self.dropout(tokens + self.position_embeddings)


class _Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out linear layers (all with bias)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout
        self.proj_dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        p = self.dropout if self.training else 0.0
        context = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.proj_dropout(self.out(context.transpose(1, 2).reshape(b, n, c)))


class _FeedForward(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout (Xavier-uniform weights, N(0, 1e-6) biases)."""

    def __init__(self, hidden_size: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, hidden_size)
        self.dropout = nn.Dropout(dropout)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: ``x + Attn(LN(x))`` then ``+ MLP(LN(.))`` (LayerNorm eps 1e-6).

    Args:
        hidden_size: token width.
        num_heads: attention heads (must divide ``hidden_size``).
        mlp_dim: hidden width of the MLP.
        dropout: dropout after GELU and after the MLP.
        attn_dropout: dropout on the attention weights and after the output projection.

    ``forward(x[B, N, hidden_size]) -> [B, N, hidden_size]``.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_dim: int, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.ffn = _FeedForward(hidden_size, mlp_dim, dropout)
        self.attn = _Attention(hidden_size, num_heads, attn_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attention_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class _Transformer(nn.Module):
    def __init__(self, num_layers: int, hidden_size: int, num_heads: int, mlp_dim: int, dropout: float, attn_dropout):
        super().__init__()
        self.layer = nn.ModuleList(
            [TransformerLayer(hidden_size, num_heads, mlp_dim, dropout, attn_dropout) for _ in range(num_layers)]
        )
        self.encoder_norm = nn.LayerNorm(hidden_size, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return self.encoder_norm(x)


class _Detransformer(nn.Module):
    """Tokens back to a [B, hidden, *grid] volume, then 3^3 conv (no bias) -> BN -> ReLU to ``channels``."""

    def __init__(self, hidden_size: int, channels: int) -> None:
        super().__init__()
        self.conv_more = nn.Sequential(
            nn.Conv3d(hidden_size, channels, 3, padding=1, bias=False), nn.BatchNorm3d(channels), nn.ReLU(True)
        )

    def forward(self, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        b, _, c = tokens.shape
        x = _channels_last(tokens.transpose(1, 2).reshape(b, c, *grid))
        if self.training:
            return self.conv_more(x)
        scale, shift = _batchnorm_affine(self.conv_more[1])
        weight = self.conv_more[0].weight * scale.view(-1, 1, 1, 1, 1)
        return F.relu_(_conv3x3(x, weight, shift))


class CANet(nn.Module):
    """CA-Net segmenter, "Trans-V" V-Net (Zhao et al., Expert Syst. Appl. 2023).

    Args:
        in_channels: image channels. Default 1.
        num_classes: channels of each head; 1 for the published binary task (sigmoid in the losses).
            Default 1.
        base_filters: f, the V-Net widths are f, 2f, 4f, 8f, 16f. Default 16.
        patch_size: the (D, H, W) input size the network is built for; each must be a multiple of 16.
            The token grid is ``patch_size // 16`` (7x7x5 = 245 tokens for the default) and fixes the
            size of the position table, so inputs must have exactly this size. Default (112, 112, 80).
        hidden_size: token width. Default 168.
        num_layers: transformer layers. Default 12.
        num_heads: attention heads, must divide ``hidden_size``. Default 12.
        mlp_dim: transformer MLP width. Default 3072.
        dropout: dropout of the token embedding and the transformer MLPs (train mode only). Default 0.1.
        attn_dropout: dropout of the attention weights and attention output (train mode only). Default 0.
        train_dropout: the published ``has_dropout``: Dropout3d(0.5) on the 1/16 features (before the
            transformer) and on the last decoder features, in train mode only. Default True.

    ``forward(x[B, in_channels, *patch_size], turnoff_drop=False) -> (sdf, logits)``, both
    [B, num_classes, *patch_size]; ``sdf`` is tanh-activated (in [-1, 1]), ``logits`` has no activation.
    ``turnoff_drop=True`` skips the two Dropout3d layers for that call. ``predict_logits(x)`` returns
    only the segmentation logits (the Predictor's contract).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        base_filters: int = 16,
        patch_size: Sequence[int] = (112, 112, 80),
        hidden_size: int = 168,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        train_dropout: bool = True,
    ) -> None:
        super().__init__()
        patch_size = tuple(int(s) for s in patch_size)
        self._validate(in_channels, num_classes, base_filters, patch_size, hidden_size, num_layers, num_heads, mlp_dim)
        for name, value in (("dropout", dropout), ("attn_dropout", attn_dropout)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.grid = tuple(s // 16 for s in patch_size)
        self.has_dropout = bool(train_dropout)
        f = base_filters
        self._build_encoder(in_channels, f)
        num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.embeddings = _Embeddings(16 * f, hidden_size, num_tokens, dropout)
        self.transformer = _Transformer(num_layers, hidden_size, num_heads, mlp_dim, dropout, attn_dropout)
        self.detransformer = _Detransformer(hidden_size, 16 * f)
        self._build_decoder(f, num_classes)

    @staticmethod
    def _validate(in_channels, num_classes, base_filters, patch_size, hidden_size, num_layers, num_heads, mlp_dim):
        if min(in_channels, num_classes, base_filters, hidden_size, num_layers, num_heads, mlp_dim) < 1:
            raise ValueError("channel counts, widths, layer and head counts must be positive")
        if len(patch_size) != 3 or any(s < 16 or s % 16 for s in patch_size):
            raise ValueError(f"patch_size needs three multiples of 16 (four stride-2 stages), got {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide hidden_size ({hidden_size})")

    def _build_encoder(self, cin: int, f: int) -> None:
        self.block_one = ConvStack(1, cin, f)
        self.block_one_dw = _Resample(f, 2 * f, up=False)
        self.block_two = ConvStack(2, 2 * f, 2 * f)
        self.block_two_dw = _Resample(2 * f, 4 * f, up=False)
        self.block_three = ConvStack(3, 4 * f, 4 * f)
        self.block_three_dw = _Resample(4 * f, 8 * f, up=False)
        self.block_four = ConvStack(3, 8 * f, 8 * f)
        self.block_four_dw = _Resample(8 * f, 16 * f, up=False)
        self.block_five = ConvStack(3, 16 * f, 16 * f)

    def _build_decoder(self, f: int, num_classes: int) -> None:
        self.block_five_up = _Resample(16 * f, 8 * f, up=True)
        self.block_six = ConvStack(3, 8 * f, 8 * f)
        self.block_six_up = _Resample(8 * f, 4 * f, up=True)
        self.block_seven = ConvStack(3, 4 * f, 4 * f)
        self.block_seven_up = _Resample(4 * f, 2 * f, up=True)
        self.block_eight = ConvStack(2, 2 * f, 2 * f)
        self.block_eight_up = _Resample(2 * f, f, up=True)
        self.block_nine = ConvStack(1, f, f)
        self.out_conv = nn.Conv3d(f, num_classes, 1)
        self.out_conv2 = nn.Conv3d(f, num_classes, 1)
        self.dropout = nn.Dropout3d(0.5)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.patch_size:
            raise ValueError(
                f"CANet was built for inputs [B, {self.in_channels}, {', '.join(map(str, self.patch_size))}] "
                f"(its position table fixes the size); got {tuple(x.shape)}"
            )

    def _features(self, x: torch.Tensor, drop: bool) -> torch.Tensor:
        self._check_input(x)
        x1 = self.block_one(_channels_last(x))
        x2 = self.block_two(self.block_one_dw(x1))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.block_four(self.block_three_dw(x3))
        x5 = self.block_five(self.block_four_dw(x4))
        if drop:
            x5 = self.dropout(x5)
        tokens = self.transformer(self.embeddings(x5))
        x5 = self.detransformer(tokens, self.grid)
        x = self.block_six(self.block_five_up(x5) + x4)
        x = self.block_seven(self.block_six_up(x) + x3)
        x = self.block_eight(self.block_seven_up(x) + x2)
        x = self.block_nine(self.block_eight_up(x) + x1)
        if drop:
            x = self.dropout(x)
        return x

    def forward(self, x: torch.Tensor, turnoff_drop: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(tanh SDF map, segmentation logits), each [B, num_classes, *patch_size]."""
        features = self._features(x, self.has_dropout and not turnoff_drop)
        weight = torch.cat([self.out_conv.weight, self.out_conv2.weight]).flatten(1)
        heads = F.linear(features.permute(0, 2, 3, 4, 1), weight, torch.cat([self.out_conv.bias, self.out_conv2.bias]))
        heads = heads.permute(0, 4, 1, 2, 3)
        k = self.num_classes
        return torch.tanh(heads[:, :k]).contiguous(), heads[:, k:].contiguous()

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits [B, num_classes, *patch_size] (Dropout3d skipped)."""
        features = self._features(x, False)
        logits = F.linear(features.permute(0, 2, 3, 4, 1), self.out_conv2.weight.flatten(1), self.out_conv2.bias)
        return logits.permute(0, 4, 1, 2, 3).contiguous()


class CANetDiscriminator(nn.Module):
    """The CA-Net discriminator ("DAM"): labelled-vs-unlabelled classifier of (SDF map, image) pairs.

    ``conv0(map) + conv1(image)`` (4^3, stride 2), then LeakyReLU(0.2) and Dropout3d(0.5); conv2, conv3
    likewise; conv4 and LeakyReLU; optional SE channel attention; global average pool; one linear
    layer to 2 logits (class 1 = labelled, class 0 = unlabelled).

    The released code builds its SE block inside ``forward`` with fresh random weights on every call
    and then discards its output, so the released model effectively has **no** SE; ``use_se=False``
    (the default) reproduces that behaviour and the released state_dict layout. ``use_se=True`` adds
    the SE block the paper describes as a registered, trainable submodule ``se`` (keys
    ``se.fc.0.weight``, ``se.fc.2.weight``) whose output is pooled.

    Args:
        map_channels: channels of the SDF map input. Default 1.
        image_channels: channels of the image input. Default 1.
        base: filters of the first convolutions (ndf); later ones use 2x, 4x, 8x. Default 64.
        use_se: add the SE attention after conv4. Default False.
        se_reduction: SE bottleneck reduction factor. Default 8.
        dropout: Dropout3d rate after the first three stages (train mode only). Default 0.5.

    ``forward(sdf_map[B, map_channels, *S], image[B, image_channels, *S]) -> logits[B, 2]``; every
    spatial size must be at least 16. At 112x112x80 the pooled grid is 7x7x5, as published.
    """

    def __init__(
        self,
        map_channels: int = 1,
        image_channels: int = 1,
        base: int = 64,
        use_se: bool = False,
        se_reduction: int = 8,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if min(map_channels, image_channels, base, se_reduction) < 1:
            raise ValueError("channel counts, base and se_reduction must be positive")
        if use_se and (8 * base) % se_reduction:
            raise ValueError(f"se_reduction ({se_reduction}) must divide 8*base ({8 * base})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.use_se = bool(use_se)
        self.conv0 = nn.Conv3d(map_channels, base, 4, stride=2, padding=1)
        self.conv1 = nn.Conv3d(image_channels, base, 4, stride=2, padding=1)
        self.conv2 = nn.Conv3d(base, 2 * base, 4, stride=2, padding=1)
        self.conv3 = nn.Conv3d(2 * base, 4 * base, 4, stride=2, padding=1)
        self.conv4 = nn.Conv3d(4 * base, 8 * base, 4, stride=2, padding=1)
        if self.use_se:
            self.se = self._build_se(8 * base, se_reduction)
        self.classifier = nn.Linear(8 * base, 2)
        self.dropout = nn.Dropout3d(dropout)

    @staticmethod
    def _build_se(channels: int, reduction: int) -> nn.Module:
        module = nn.Module()
        module.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=False),
            nn.Sigmoid(),
        )
        return module

    def forward(self, sdf_map: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Logits [B, 2] (class 1 = labelled)."""
        if sdf_map.shape[0] != image.shape[0] or sdf_map.shape[2:] != image.shape[2:]:
            raise ValueError(f"map {tuple(sdf_map.shape)} and image {tuple(image.shape)} must share B and size")
        if sdf_map.ndim != 5 or min(sdf_map.shape[2:]) < 16:
            raise ValueError(f"inputs must be [B, C, D, H, W] with every size >= 16, got {tuple(sdf_map.shape)}")
        x = self.conv0(sdf_map) + self.conv1(image)
        x = self.dropout(F.leaky_relu(x, 0.2))
        x = self.dropout(F.leaky_relu(self.conv2(x), 0.2))
        x = self.dropout(F.leaky_relu(self.conv3(x), 0.2))
        x = F.leaky_relu(self.conv4(x), 0.2)
        pooled = x.mean((2, 3, 4))
        if self.use_se:
            # SE rescales every channel by a constant, so pooling after it equals rescaling the pooled vector
            pooled = pooled * self.se.fc(pooled)
        return self.classifier(pooled)
