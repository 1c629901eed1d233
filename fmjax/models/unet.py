"""Time-conditioned UNet velocity field for images (Flax NNX), channels last: x of shape [batch, H, W, C]."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fmjax._checks import check_int
from fmjax.models.condition import Condition, check_condition_sizes
from fmjax.models.mlp import _rngs, check_cond_given

__all__ = ["UNet", "timestep_embedding"]


def timestep_embedding(t: jax.Array, dim: int, *, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal features of t in [0, 1] (scaled by 1000, as in DDPM), shape [batch, dim]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = 1000.0 * t[:, None].astype(jnp.float32) * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim - 2 * half)))


def _group_norm(c: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """GroupNorm over ``c`` channels in min(groups, c) groups, which must divide ``c``."""
    if c % min(groups, c):
        raise ValueError(
            f"groups={groups} must divide the channels of every GroupNorm, but one has {c} channels "
            "(make channels * channel_mults multiples of groups, or choose another groups)"
        )
    return nnx.GroupNorm(c, num_groups=min(groups, c), rngs=rngs)


class _ResBlock(nnx.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, rngs: nnx.Rngs):
        self.norm1 = _group_norm(c_in, groups, rngs)
        self.conv1 = nnx.Conv(c_in, c_out, (3, 3), rngs=rngs)
        self.emb = nnx.Linear(emb_dim, c_out, rngs=rngs)
        self.norm2 = _group_norm(c_out, groups, rngs)
        self.conv2 = nnx.Conv(c_out, c_out, (3, 3), rngs=rngs)
        self.skip = nnx.Conv(c_in, c_out, (1, 1), rngs=rngs) if c_in != c_out else None

    def __call__(self, x, emb):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.emb(jax.nn.silu(emb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


class UNet(nnx.Module):
    """A UNet v_theta(t, x) for images of shape [batch, H, W, in_channels].

    Each resolution level has ``num_res_blocks`` residual blocks (GroupNorm, SiLU, 3x3 convolutions,
    the time embedding added in between) at ``channels * channel_mults[level]`` channels; levels are
    joined by stride-2 convolutions down and nearest-neighbour upsampling up, with skip connections.
    H and W must be divisible by 2 ** (len(channel_mults) - 1): (1, 2) suits 8x8 digits, (1, 2, 2)
    28x28 MNIST and (1, 2, 2, 2) 32x32 CIFAR-10.

    Conditional (``num_classes`` and/or ``cond_dim`` given): v_theta(t, x, cond), with the condition's
    embedding (``fmjax.models.condition.Condition``: a table of num_classes + 1 rows, the last, id
    ``num_classes``, being the null class; a linear map of the features, or a learned null vector where
    ``cond["mask"]`` is 0) added to the time embedding that every residual block receives.
    ``null_cond()`` is one sample's null condition. Without either, parameters and outputs are those
    of the unconditional UNet.

    Args:
      in_channels: image channels.
      channels: channels of the first level.
      channel_mults: channel multiplier per level.
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      groups: GroupNorm groups (capped at the channel count).
      num_classes: number of classes K of a class condition (ids 0..K-1; K is the null class).
      cond_dim: size of a continuous condition (features of shape [batch, cond_dim]).
      seed: seed for the initial weights (or pass ``rngs``).
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        channels: int = 32,
        channel_mults: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 1,
        groups: int = 8,
        num_classes: int | None = None,
        cond_dim: int | None = None,
        seed: int = 0,
        rngs: nnx.Rngs | None = None,
    ):
        in_channels = check_int("in_channels", in_channels, low=1)
        num_classes, cond_dim = check_condition_sizes(num_classes, cond_dim)
        channels = check_int("channels", channels, low=1)
        num_res_blocks = check_int("num_res_blocks", num_res_blocks, low=1)
        groups = check_int("groups", groups, low=1)
        if isinstance(channel_mults, str) or not isinstance(channel_mults, tuple | list) or not channel_mults:
            raise ValueError(f"channel_mults must be a non-empty tuple of ints >= 1; got {channel_mults!r}")
        channel_mults = tuple(check_int(f"channel_mults[{k}]", m, low=1) for k, m in enumerate(channel_mults))
        rngs = _rngs(rngs, seed)
        self.levels = len(channel_mults)
        self.emb_dim = 4 * channels
        self.time_in = nnx.Linear(channels, self.emb_dim, rngs=rngs)
        self.time_out = nnx.Linear(self.emb_dim, self.emb_dim, rngs=rngs)
        self.stem = nnx.Conv(in_channels, channels, (3, 3), rngs=rngs)
        self.channels = channels

        widths = [channels * m for m in channel_mults]
        down, downsample, skip_widths = [], [], [channels]
        c = channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                down.append(_ResBlock(c, width, self.emb_dim, groups, rngs))
                c = width
                skip_widths.append(c)
            if level < self.levels - 1:
                downsample.append(nnx.Conv(c, c, (3, 3), strides=(2, 2), rngs=rngs))
                skip_widths.append(c)
        self.down = nnx.List(down)
        self.downsample = nnx.List(downsample)
        self.middle = nnx.List(
            [_ResBlock(c, c, self.emb_dim, groups, rngs), _ResBlock(c, c, self.emb_dim, groups, rngs)]
        )
        up, upsample = [], []
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                up.append(_ResBlock(c + skip_widths.pop(), width, self.emb_dim, groups, rngs))
                c = width
            if level > 0:
                upsample.append(nnx.Conv(c, c, (3, 3), rngs=rngs))
        self.up = nnx.List(up)
        self.upsample = nnx.List(upsample)
        self.num_res_blocks = num_res_blocks
        self.out_norm = _group_norm(c, groups, rngs)
        self.out = nnx.Conv(c, in_channels, (3, 3), rngs=rngs)
        self.num_classes, self.cond_dim = num_classes, cond_dim
        # built after the layers above, so their weights are those of the unconditional UNet
        self.condition = (
            Condition(num_classes=num_classes, cond_dim=cond_dim, features=self.emb_dim, rngs=rngs)
            if self.conditional
            else None
        )

    @property
    def conditional(self) -> bool:
        """Whether the model takes a condition (``num_classes`` or ``cond_dim`` was given)."""
        return self.num_classes is not None or self.cond_dim is not None

    def null_cond(self) -> Any:
        """One sample's null condition (no batch axis): the class id ``num_classes``, and/or zero
        features with mask 0; None for an unconditional model."""
        return self.condition.null() if self.conditional else None

    def __call__(self, t: jax.Array, x: jax.Array, cond: Any = None) -> jax.Array:
        """Velocity at times t (shape [batch] or scalar) and images x (shape [batch, H, W, C]), given
        ``cond`` (batch-leading) for a conditional model."""
        if x.ndim != 4:
            raise ValueError(f"x must have shape [batch, H, W, C]; got {x.shape}")
        check_cond_given(self, cond)
        factor = 2 ** (self.levels - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"image size {x.shape[1]}x{x.shape[2]} must be divisible by {factor} for {self.levels} levels"
            )
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        emb = self.time_out(jax.nn.silu(self.time_in(timestep_embedding(t, self.channels).astype(x.dtype))))
        if self.conditional:
            emb = emb + self.condition(cond, x.shape[0], emb.dtype)
        h = self.stem(x)
        skips = [h]
        blocks = iter(self.down)
        for level in range(self.levels):
            for _ in range(self.num_res_blocks):
                h = next(blocks)(h, emb)
                skips.append(h)
            if level < self.levels - 1:
                h = self.downsample[level](h)
                skips.append(h)
        for block in self.middle:
            h = block(h, emb)
        blocks = iter(self.up)
        ups = iter(self.upsample)
        for level in reversed(range(self.levels)):
            for _ in range(self.num_res_blocks + 1):
                h = next(blocks)(jnp.concatenate([h, skips.pop()], axis=-1), emb)
            if level > 0:
                b, hh, ww, c = h.shape
                h = next(ups)(jax.image.resize(h, (b, 2 * hh, 2 * ww, c), "nearest"))
        return self.out(jax.nn.silu(self.out_norm(h)))
