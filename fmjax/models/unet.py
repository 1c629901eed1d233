"""Time-conditioned UNet velocity field for images (Flax NNX), channels last: x of shape [batch, H, W, C].

Optionally with ADM's self-attention blocks (Dhariwal & Nichol's guided-diffusion UNet, as in TorchCFM's
CIFAR-10 recipe) and dropout inside the residual blocks, applied only when a ``dropout_key`` is given.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fmjax._checks import check_int, check_key, check_real
from fmjax.models.condition import Conditioned, check_condition_sizes
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


def _dropout(key: jax.Array, h: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout: each unit of ``h`` kept with probability 1 - rate and scaled by 1 / (1 - rate),
    so E[out] = h; the keep mask ~ Bernoulli(1 - rate) has ``h``'s shape, drawn from ``key``."""
    keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
    return jnp.where(keep, h / (1.0 - rate), jnp.zeros_like(h))


class _ResBlock(nnx.Module):
    """h = conv1(SiLU(norm1(x))) + Linear(SiLU(emb)); out = skip(x) + conv2(Dropout(SiLU(norm2(h)))).

    Dropout (ADM's place for it: after the second norm and SiLU, before the second convolution) acts
    only when the call is given a ``dropout_key`` and ``dropout`` > 0.
    """

    def __init__(
        self, c_in: int, c_out: int, emb_dim: int, groups: int, rngs: nnx.Rngs, dropout: float = 0.0
    ):
        self.norm1 = _group_norm(c_in, groups, rngs)
        self.conv1 = nnx.Conv(c_in, c_out, (3, 3), rngs=rngs)
        self.emb = nnx.Linear(emb_dim, c_out, rngs=rngs)
        self.norm2 = _group_norm(c_out, groups, rngs)
        self.conv2 = nnx.Conv(c_out, c_out, (3, 3), rngs=rngs)
        self.skip = nnx.Conv(c_in, c_out, (1, 1), rngs=rngs) if c_in != c_out else None
        self.dropout = dropout

    def __call__(self, x, emb, dropout_key=None):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.emb(jax.nn.silu(emb))[:, None, None, :]
        h = jax.nn.silu(self.norm2(h))
        if dropout_key is not None and self.dropout > 0:
            h = _dropout(dropout_key, h, self.dropout)
        h = self.conv2(h)
        return h + (x if self.skip is None else self.skip(x))


class _AttentionBlock(nnx.Module):
    """ADM's AttentionBlock: multi-head self-attention over the H * W positions, with a residual.

    For x of shape [batch, H, W, C], n = H * W positions and heads of d = C / num_heads channels:
    [q | k | v] = GroupNorm(x) W_qkv + b_qkv (a 1x1 projection to 3C channels, q, k and v each split
    into num_heads blocks of d channels), per head a = softmax(q k^T / sqrt(d)) v over the n positions,
    and out = x + concat_heads(a) W_o + b_o. W_o and b_o start at zero (ADM's ``zero_module``), so the
    block starts as the identity. ``jax.nn.dot_product_attention`` computes q k^T and the softmax in
    float32 also for bfloat16 activations (as ADM's softmax in float).
    """

    def __init__(self, c: int, num_heads: int, groups: int, rngs: nnx.Rngs):
        self.norm = _group_norm(c, groups, rngs)
        self.qkv = nnx.Linear(c, 3 * c, rngs=rngs)
        self.proj = nnx.Linear(c, c, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
        self.num_heads = num_heads

    def __call__(self, x):
        b, height, width, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, height * width, 3, self.num_heads, c // self.num_heads)
        a = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # [b, n, heads, d]
        return x + self.proj(a.reshape(b, height, width, c))


class UNet(Conditioned, nnx.Module):
    """A UNet v_theta(t, x) for images of shape [batch, H, W, in_channels].

    Each resolution level has ``num_res_blocks`` residual blocks (GroupNorm, SiLU, 3x3 convolutions,
    the time embedding added in between) at ``channels * channel_mults[level]`` channels; levels are
    joined by stride-2 convolutions down and nearest-neighbour upsampling up, with skip connections.
    H and W must be divisible by 2 ** (len(channel_mults) - 1): (1, 2) suits 8x8 digits, (1, 2, 2)
    28x28 MNIST and (1, 2, 2, 2) 32x32 CIFAR-10.

    Self-attention (``attention_resolutions``, as in ADM / TorchCFM's UNetModel): an attention block
    (GroupNorm, 1x1 projection to q, k, v, multi-head softmax(q k^T / sqrt(d)) v over the H * W
    positions, a zero-initialised 1x1 output projection, a residual) after every residual block of
    each level whose image side is listed, on the way down and up, and one between the two middle
    residual blocks. The side of level l is image_size / 2 ** l, so for ``image_size=32`` the
    resolution 16 is the second level; the model then takes image_size x image_size images only.
    Heads: ``C // num_head_channels`` of ``num_head_channels`` channels each when that is given (as
    ADM, which then ignores ``num_heads``), else ``num_heads`` heads of C // num_heads channels.

    Dropout (``dropout`` = p > 0): in every residual block, between the second GroupNorm + SiLU and
    the second convolution, each unit is zeroed with probability p and the others scaled by 1 / (1 - p).
    It acts only in calls given a ``dropout_key`` (training: ``make_train_step`` passes one per step);
    without one (sampling, likelihoods, evaluation) the model is deterministic. Dropout has no
    parameters, and the defaults (no attention, dropout 0) give the parameters and outputs of the
    UNet without either.

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
      image_size: side of the square images the model is built for; needed with
        ``attention_resolutions``, and then checked at each call.
      attention_resolutions: image sides (of the levels' feature maps) that get self-attention,
        e.g. (16,) with ``image_size=32``; each must be image_size / 2 ** l for a level l.
      num_heads: attention heads (when ``num_head_channels`` is None); must divide the channels of
        each attention block.
      num_head_channels: channels per attention head (overrides ``num_heads``); must divide the
        channels of each attention block.
      dropout: dropout rate p in [0, 1) of the residual blocks.
      num_classes: number of classes K of a class condition (ids 0..K-1; K is the null class).
      cond_dim: size of a continuous condition (features of shape [batch, cond_dim]).
      seed: seed for the initial weights (or pass ``rngs``).

    >>> import jax, jax.numpy as jnp
    >>> model = UNet(channels=4, groups=2, image_size=8, attention_resolutions=(4,), num_head_channels=4,
    ...              dropout=0.1)
    >>> x, t = jnp.ones((2, 8, 8, 1)), jnp.full(2, 0.5)
    >>> model(t, x).shape
    (2, 8, 8, 1)
    >>> bool((model(t, x) == model(t, x)).all())  # no dropout_key: deterministic
    True
    >>> bool((model(t, x, dropout_key=jax.random.key(0)) == model(t, x)).all())  # dropout on
    False
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        channels: int = 32,
        channel_mults: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 1,
        groups: int = 8,
        image_size: int | None = None,
        attention_resolutions: tuple[int, ...] = (),
        num_heads: int = 4,
        num_head_channels: int | None = None,
        dropout: float = 0.0,
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
        self.levels = len(channel_mults)
        dropout = check_real("dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
        attention_levels = _attention_levels(image_size, attention_resolutions, self.levels)
        self.image_size = None if image_size is None else int(image_size)
        num_heads = check_int("num_heads", num_heads, low=1)
        if num_head_channels is not None:
            num_head_channels = check_int("num_head_channels", num_head_channels, low=1)
        rngs = _rngs(rngs, seed)
        self.emb_dim = 4 * channels
        self.time_in = nnx.Linear(channels, self.emb_dim, rngs=rngs)
        self.time_out = nnx.Linear(self.emb_dim, self.emb_dim, rngs=rngs)
        self.stem = nnx.Conv(in_channels, channels, (3, 3), rngs=rngs)
        self.channels = channels
        self.dropout = dropout

        def attention(c: int, level: int | None) -> _AttentionBlock:
            where = "the middle" if level is None else f"resolution {self.image_size >> level}"
            if num_head_channels is not None:
                if c % num_head_channels:
                    raise ValueError(
                        f"num_head_channels={num_head_channels} must divide the channels of every attention "
                        f"block, but the one at {where} has {c} channels"
                    )
                heads = c // num_head_channels
            else:
                if c % num_heads:
                    raise ValueError(
                        f"num_heads={num_heads} must divide the channels of every attention block, but the "
                        f"one at {where} has {c} channels"
                    )
                heads = num_heads
            return _AttentionBlock(c, heads, groups, rngs)

        def res_block(c_in: int, c_out: int) -> _ResBlock:
            return _ResBlock(c_in, c_out, self.emb_dim, groups, rngs, dropout)

        widths = [channels * m for m in channel_mults]
        down, down_attention, downsample, skip_widths = [], [], [], [channels]
        c = channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                down.append(res_block(c, width))
                c = width
                down_attention.append(attention(c, level) if level in attention_levels else None)
                skip_widths.append(c)
            if level < self.levels - 1:
                downsample.append(nnx.Conv(c, c, (3, 3), strides=(2, 2), rngs=rngs))
                skip_widths.append(c)
        self.down = nnx.List(down)
        self.downsample = nnx.List(downsample)
        middle = [res_block(c, c)]
        # ADM's middle block, res-attention-res, whenever the model has attention at all
        self.middle_attention = attention(c, None) if attention_levels else None
        self.middle = nnx.List([*middle, res_block(c, c)])
        up, up_attention, upsample = [], [], []
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                up.append(res_block(c + skip_widths.pop(), width))
                c = width
                up_attention.append(attention(c, level) if level in attention_levels else None)
            if level > 0:
                upsample.append(nnx.Conv(c, c, (3, 3), rngs=rngs))
        self.up = nnx.List(up)
        self.upsample = nnx.List(upsample)
        # present only with attention, so that the default model's graph and parameters are unchanged
        self.down_attention = nnx.List(down_attention) if attention_levels else None
        self.up_attention = nnx.List(up_attention) if attention_levels else None
        self.num_res_blocks = num_res_blocks
        self.out_norm = _group_norm(c, groups, rngs)
        self.out = nnx.Conv(c, in_channels, (3, 3), rngs=rngs)
        # built after the layers above, so their weights are those of the unconditional UNet
        self._add_condition(num_classes, cond_dim, self.emb_dim, rngs)

    def __call__(
        self, t: jax.Array, x: jax.Array, cond: Any = None, *, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """Velocity at times t (shape [batch] or scalar) and images x (shape [batch, H, W, C]), given
        ``cond`` (batch-leading) for a conditional model. With ``dropout_key`` (one PRNG key) and
        ``dropout`` > 0 the residual blocks apply dropout, each block with its own key split from it;
        without it the call is deterministic."""
        if x.ndim != 4:
            raise ValueError(f"x must have shape [batch, H, W, C]; got {x.shape}")
        check_cond_given(self, cond)
        factor = 2 ** (self.levels - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"image size {x.shape[1]}x{x.shape[2]} must be divisible by {factor} for {self.levels} levels"
            )
        if self.image_size is not None and x.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"this UNet was built for image_size={self.image_size} (its attention_resolutions are sides "
                f"of those images); got images of {x.shape[1]}x{x.shape[2]}"
            )
        blocks_in_order = [*self.down, *self.middle, *self.up]
        if dropout_key is not None and self.dropout > 0:
            check_key("dropout_key", dropout_key)
            keys = iter(jax.random.split(dropout_key, len(blocks_in_order)))
        else:
            keys = iter([None] * len(blocks_in_order))
        down_attention = self.down_attention or [None] * len(self.down)
        up_attention = self.up_attention or [None] * len(self.up)

        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        emb = self.time_out(jax.nn.silu(self.time_in(timestep_embedding(t, self.channels).astype(x.dtype))))
        if self.conditional:
            emb = emb + self.condition(cond, x.shape[0], emb.dtype)
        h = self.stem(x)
        skips = [h]
        blocks = iter(zip(self.down, down_attention, strict=True))
        for level in range(self.levels):
            for _ in range(self.num_res_blocks):
                block, attention = next(blocks)
                h = block(h, emb, next(keys))
                if attention is not None:
                    h = attention(h)
                skips.append(h)
            if level < self.levels - 1:
                h = self.downsample[level](h)
                skips.append(h)
        first, second = self.middle
        h = first(h, emb, next(keys))
        if self.middle_attention is not None:
            h = self.middle_attention(h)
        h = second(h, emb, next(keys))
        blocks = iter(zip(self.up, up_attention, strict=True))
        ups = iter(self.upsample)
        for level in reversed(range(self.levels)):
            for _ in range(self.num_res_blocks + 1):
                block, attention = next(blocks)
                h = block(jnp.concatenate([h, skips.pop()], axis=-1), emb, next(keys))
                if attention is not None:
                    h = attention(h)
            if level > 0:
                b, hh, ww, c = h.shape
                h = next(ups)(jax.image.resize(h, (b, 2 * hh, 2 * ww, c), "nearest"))
        return self.out(jax.nn.silu(self.out_norm(h)))


def _attention_levels(image_size: Any, attention_resolutions: Any, levels: int) -> frozenset[int]:
    """The levels l whose side image_size / 2 ** l is in ``attention_resolutions``, checking both."""
    if isinstance(attention_resolutions, str) or not isinstance(attention_resolutions, tuple | list):
        raise TypeError(
            f"attention_resolutions must be a tuple of image sides, e.g. (16,); got {attention_resolutions!r}"
        )
    resolutions = [
        check_int(f"attention_resolutions[{k}]", r, low=1) for k, r in enumerate(attention_resolutions)
    ]
    if image_size is None:
        if resolutions:
            raise ValueError(
                f"attention_resolutions={tuple(resolutions)} needs image_size, the side of the square images "
                "the UNet is built for (e.g. image_size=32 for CIFAR-10)"
            )
        return frozenset()
    image_size = check_int("image_size", image_size, low=1)
    factor = 2 ** (levels - 1)
    if image_size % factor:
        raise ValueError(f"image_size={image_size} must be divisible by {factor} for {levels} levels")
    sides = [image_size >> level for level in range(levels)]
    for k, r in enumerate(resolutions):
        if r not in sides:
            raise ValueError(
                f"attention_resolutions[{k}]={r} is not the side of any level's feature maps; for "
                f"image_size={image_size} and {levels} levels they are {sides}"
            )
    return frozenset(sides.index(r) for r in resolutions)
