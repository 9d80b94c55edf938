"""The DDPM U-Net (Ho et al. 2020, Appendix B; the original `diffusion_tf/models/unet.py`).

A PixelCNN++-style U-Net with GroupNorm, a sinusoidal timestep embedding added in every residual
block, and self-attention at the listed resolutions and in the middle. Parameter names mirror
the original variable scopes (`down_0/block_1` becomes `down_0_block_1`, `temb/dense0` becomes
`temb_dense0`, ...) so original weights can be ported. The CIFAR10 model has 35,746,307
parameters and the 256x256 model 113,673,219, exactly as in the original.
"""

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax import options
from diffusion_jax.models import layers


class UNet(nn.Module):
    """The DDPM noise-prediction network eps_theta(x_t, t).

    Attributes:
        ch: base channel count (the timestep MLP is 4 * ch wide).
        out_ch: output channels (C, or 2C when the variance is learned).
        ch_mult: channel multiplier per resolution level.
        num_res_blocks: residual blocks per level on the down path (+1 on the up path).
        attn_resolutions: feature-map sizes (H) that get a self-attention block.
        dropout: dropout rate inside the residual blocks.
        resamp_with_conv: 3x3 conv in down/upsampling (else average pooling / plain nearest).
        num_groups: GroupNorm groups.
        norm_epsilon: GroupNorm epsilon (the original's 1e-6; PyTorch's default 1e-5).
        num_heads: attention heads per attention block (the original has one).
        num_head_channels: > 0: heads of this many channels each (C / num_head_channels heads),
            instead of num_heads.
        scale_shift_norm: the timestep embedding scales and shifts the second GroupNorm of each
            residual block (Improved DDPM's use_scale_shift_norm) instead of being added.
        time_embedding: 'ddpm' or 'iddpm' sinusoidal embedding (`layers.get_timestep_embedding`).
        downsample_padding: 'same' (TF, the original's) or 'symmetric' (PyTorch's) stride-2 conv.
        conv_impl: how every 3x3 conv is computed: 'xla', 'im2col', 'shifted' or 'winograd'
            (`layers.conv3x3`); the same parameters and function.
        upsample_impl: how each Upsample's nearest-neighbour x2 and conv are computed:
            'repeat' or 'subpixel' (`layers.Upsample`); the same parameters and function.
        nin_impl: how the 1x1 layers (residual shortcuts, attention's q, k, v and proj_out)
            are computed: 'dense' or 'conv' (`layers.nin`); the same parameters and function.
        conv_vjp: how the convolutions' gradients are computed: 'jax' or 'nhwc'
            (`models.conv.conv2d`); the same function.
        dtype: compute dtype; the output is float32 whatever it is.
        param_dtype: parameter storage dtype.
        cudnn_max_head_dim: `layers.cudnn_max_head_dim()` of the machine, which `get_model`
            decides once; None (the default) makes every attention block use XLA's attention.
        remat: recompute each residual and attention block, Downsample, Upsample and the
            output head in the backward pass instead of storing their activations (`nn.remat`):
            less memory, the same parameters and outputs. The up path's [h, skip]
            concatenation then happens inside each block (`layers.concat_channels`).
        timestep_scale: the network embeds t * timestep_scale (1000 / T for Improved DDPM's
            `rescale_timesteps`); 1.0 embeds t itself.
        num_classes: K > 0 makes the network class-conditional: a learned embedding of the label
            y in [0, K] (K is the "null" label of the unconditional branch) is added to the
            timestep embedding, as Improved DDPM's `label_emb`. 0: unconditional, no such
            parameters.
    """

    ch: int
    out_ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    resamp_with_conv: bool = True
    num_groups: int = 32
    norm_epsilon: float = layers.GROUP_NORM_EPSILON
    num_heads: int = 1
    num_head_channels: int = 0
    scale_shift_norm: bool = False
    time_embedding: str = 'ddpm'
    downsample_padding: str = 'same'
    conv_impl: str = 'xla'
    upsample_impl: str = 'repeat'
    nin_impl: str = 'dense'
    conv_vjp: str = 'jax'
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    cudnn_max_head_dim: int | None = None
    remat: bool = False
    timestep_scale: float = 1.0
    num_classes: int = 0

    def _resnet_block(self, out_ch: int | None, name: str) -> layers.ResnetBlock:
        cls = layers.RematResnetBlock if self.remat else layers.ResnetBlock
        return cls(
            out_ch=out_ch,
            dropout=self.dropout,
            num_groups=self.num_groups,
            epsilon=self.norm_epsilon,
            scale_shift=self.scale_shift_norm,
            conv_impl=self.conv_impl,
            nin_impl=self.nin_impl,
            conv_vjp=self.conv_vjp,
            separate_skip_gradients=self.remat,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _attn_block(self, channels: int, name: str) -> layers.AttnBlock:
        cls = layers.RematAttnBlock if self.remat else layers.AttnBlock
        heads = channels // self.num_head_channels if self.num_head_channels else self.num_heads
        return cls(
            num_heads=heads,
            num_groups=self.num_groups,
            epsilon=self.norm_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            cudnn_max_head_dim=self.cudnn_max_head_dim,
            nin_impl=self.nin_impl,
            conv_vjp=self.conv_vjp,
            name=name,
        )

    def _conv3x3(self, features: int, init_scale: float, name: str) -> nn.Module:
        return layers.conv3x3(
            features,
            init_scale=init_scale,
            name=name,
            impl=self.conv_impl,
            vjp=self.conv_vjp,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def _resample(self, cls: type[nn.Module], name: str, **kwargs: Any) -> nn.Module:
        cls = nn.remat(cls) if self.remat else cls
        return cls(
            with_conv=self.resamp_with_conv,
            conv_impl=self.conv_impl,
            conv_vjp=self.conv_vjp,
            **kwargs,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _timestep_mlp(self, t: jax.Array) -> jax.Array:
        """Dense(4ch)(emb(t)) -> swish -> Dense(4ch): [B] -> [B, 4 ch]."""
        dtypes = {'dtype': self.dtype, 'param_dtype': self.param_dtype}
        if self.timestep_scale != 1.0:
            t = t.astype(jnp.float32) * self.timestep_scale
        temb = layers.get_timestep_embedding(t, self.ch, self.time_embedding)
        temb = nn.Dense(
            4 * self.ch, kernel_init=layers.default_init(), name='temb_dense0', **dtypes
        )(temb)
        return nn.Dense(
            4 * self.ch, kernel_init=layers.default_init(), name='temb_dense1', **dtypes
        )(nn.swish(temb))

    def _down_path(self, x: jax.Array, temb: jax.Array, train: bool) -> list[jax.Array]:
        """conv_in, then per level ResnetBlocks (+ attention) and a Downsample: all the skips."""
        hs = [self._conv3x3(self.ch, 1.0, 'conv_in')(x)]
        for i_level, mult in enumerate(self.ch_mult):
            for i_block in range(self.num_res_blocks):
                block = self._resnet_block(self.ch * mult, f'down_{i_level}_block_{i_block}')
                h = block(hs[-1], temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = self._attn_block(h.shape[-1], f'down_{i_level}_attn_{i_block}')(h)
                hs.append(h)
            if i_level != len(self.ch_mult) - 1:
                down = self._resample(
                    layers.Downsample,
                    f'down_{i_level}_downsample',
                    padding=self.downsample_padding,
                )
                hs.append(down(hs[-1]))
        return hs

    def _up_path(
        self, h: jax.Array, hs: list[jax.Array], temb: jax.Array, train: bool
    ) -> jax.Array:
        """Per level (coarsest first) ResnetBlocks on [h, skip] (+ attention) and an Upsample.

        Pops every skip from `hs`.
        """
        for i_level in reversed(range(len(self.ch_mult))):
            # One block more than on the way down: it takes the Downsample's (or conv_in's) skip.
            for i_block in range(self.num_res_blocks + 1):
                block = self._resnet_block(
                    self.ch * self.ch_mult[i_level], f'up_{i_level}_block_{i_block}'
                )
                h = block(h, temb, train, hs.pop())  # on concat([h, skip])
                if h.shape[1] in self.attn_resolutions:
                    h = self._attn_block(h.shape[-1], f'up_{i_level}_attn_{i_block}')(h)
            if i_level != 0:
                upsample = self._resample(
                    layers.Upsample, f'up_{i_level}_upsample', impl=self.upsample_impl
                )
                h = upsample(h)
        assert not hs, 'every skip connection must be consumed'
        return h

    def _output_head(self, h: jax.Array) -> jax.Array:
        """GroupNorm, swish, conv3x3 to out_ch: [B, H, W, ch] -> [B, H, W, out_ch]."""
        h = nn.GroupNorm(
            num_groups=self.num_groups,
            epsilon=self.norm_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name='norm_out',
        )(h)
        return self._conv3x3(self.out_ch, 0.0, 'conv_out')(nn.swish(h))

    def _label_embedding(self, y: jax.Array | None, batch: int) -> jax.Array | None:
        """[B] labels -> [B, 4 ch] (None for an unconditional network); checks y is given."""
        if not self.num_classes:
            if y is not None:
                raise ValueError('labels y given to an unconditional network (num_classes=0)')
            return None
        if y is None:
            raise ValueError(
                f'this network is class-conditional ({self.num_classes} classes): pass labels y '
                f'[B] in [0, {self.num_classes}], {self.num_classes} being the null label'
            )
        chex.assert_shape(y, (batch,))
        return nn.Embed(
            self.num_classes + 1,
            4 * self.ch,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name='label_emb',
        )(y)

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool
    ) -> jax.Array:
        """Predicts the output for a batch of noisy images.

        Args:
            x: [B, H, W, C] float images (x_t), H = W divisible by 2^(len(ch_mult) - 1).
            t: [B] integer timesteps, 0-indexed.
            y: [B] integer class labels in [0, num_classes] (num_classes: the null label) for a
                class-conditional network; None for an unconditional one.
            train: enables dropout (rng collection 'dropout').

        Returns:
            [B, H, W, out_ch] float32.
        """
        chex.assert_rank(x, 4)
        batch, height, width, _ = x.shape
        chex.assert_shape(t, (batch,))
        factor = options.downsampling_factor(self.ch_mult)
        if height != width or height % factor:
            raise ValueError(
                f'images must be square with a size divisible by {factor} for '
                f'ch_mult={self.ch_mult}; got {height}x{width}'
            )
        temb = self._timestep_mlp(t)
        label_emb = self._label_embedding(y, batch)
        if label_emb is not None:
            temb = temb + label_emb
        hs = self._down_path(x, temb, train)

        h = self._resnet_block(None, 'mid_block_1')(hs[-1], temb, train)
        h = self._attn_block(h.shape[-1], 'mid_attn_1')(h)
        h = self._resnet_block(None, 'mid_block_2')(h, temb, train)

        h = self._up_path(h, hs, temb, train)
        head = nn.remat(UNet._output_head) if self.remat else UNet._output_head
        h = head(self, h)
        chex.assert_shape(h, (batch, height, width, self.out_ch))
        return h.astype(jnp.float32)
