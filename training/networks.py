"""Networks: an EDM/DDPM++-style U-Net (`SongUNet`) for images and a small MLP for 2-D data.

Written in the style of NVlabs/edm `training/networks.py`: small modules, explicit init,
no magic. Module names inside `SongUNet` (`map_noise`, `map_label`, `map_layer0/1`,
`enc[...]`, `dec[...]`, `norm0`, `conv0`, `affine`, `norm1`, `conv1`, `skip`, `norm2`,
`qkv`, `proj`) follow EDM, so the parameter layout of an EDM / CUD SongUNet is the same.

Both nets share one calling convention:

    net(x, t, s=None, class_labels=None, return_features=False, heads=False)

* `t` [B] float: the noise-conditioning input. The net embeds whatever it gets
  (positional embedding, max_positions=10000, as DDPM++); any transform (EDM's
  ln(sigma)/4, a flow's t or 1000*t, ...) is the caller's job.
* `s` [B] float: a second time (CTM's target time), only when built with `two_times=True`.
  It has its own mapping MLP; `s_embedding='per-block'` (sony/ctm) feeds it to every block
  through the block's own `affine_s`, 'shared' adds it to the embedding of `t`.
* `class_labels`: int64 [B] class indices (one-hot inside), or a float [B, label_dim]
  one-hot / soft label, or None (= all-zero label, the "null" class that label dropout
  produces). Ignored when label_dim == 0.
* Returns the main output; with `heads=True` the list [main, head_1, ..., head_k];
  with `return_features=True` the pair (output, features), output being the tensor or the
  list, features the last decoder feature map (last hidden features for the MLP) before
  the output layer.
"""

import math

import numpy as np
import torch
from torch import nn
from torch.nn.functional import silu

# ----------------------------------------------------------------------------
# Initialization shared by all layers (same formulas as EDM).


def weight_init(shape, mode, fan_in, fan_out):
    if mode == 'xavier_uniform':
        return np.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return np.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return np.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return np.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'invalid init mode {mode!r}')


# Init presets used by SongUNet (as in EDM's DDPM++): xavier everywhere, ~0 for the last
# conv of each residual branch, sqrt(0.2) for the attention qkv projection.
INIT = dict(init_mode='xavier_uniform')
INIT_ZERO = dict(init_mode='xavier_uniform', init_weight=1e-5)
INIT_ATTN = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))


class Linear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1.0, init_bias=0.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        kw = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **kw) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **kw) * init_bias) if bias else None

    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """Conv with optional 2x up/down-sampling by a separable FIR filter (EDM's non-fused path).

    kernel=0 makes a pure resampling layer without weights. With resample_filter=(1,1),
    down is 2x2 average pooling and up is nearest-neighbour upsampling.
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=(1, 1), init_mode='kaiming_normal', init_weight=1.0, init_bias=0.0):
        assert not (up and down)
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        kw = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **kw) * init_weight) if kernel else None
        self.bias = nn.Parameter(weight_init([out_channels], **kw) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f).unsqueeze(0).unsqueeze(1) / f.sum().square()
        self.register_buffer('resample_filter', f if up or down else None)

    def forward(self, x):
        f = self.resample_filter
        if f is not None:
            f = f.to(x.dtype)
            f_pad = (f.shape[-1] - 1) // 2
            c = x.shape[1]
            if self.up:
                x = nn.functional.conv_transpose2d(x, (f * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=f_pad)
            if self.down:
                x = nn.functional.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2, padding=f_pad)
        if self.weight is not None:
            w = self.weight.to(x.dtype)
            x = nn.functional.conv2d(x, w, padding=w.shape[-1] // 2)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """GroupNorm with min(32, C // 4) groups (at least 1), so small channel counts work."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return nn.functional.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


# ----------------------------------------------------------------------------
# Time embedding.


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a [B] float tensor -> [B, num_channels] (DDPM++ / EDM).

    Frequencies run from 1 down to 1/max_positions; output is [sin, cos] (EDM computes
    [cos, sin] and then swaps the halves for DDPM++ compatibility; same result).
    """

    def __init__(self, num_channels, max_positions=10000, endpoint=True):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.to(torch.float32)[:, None] * freqs[None, :]
        return torch.cat([x.sin(), x.cos()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features (NCSN++)."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.to(torch.float32)[:, None] * (2 * np.pi * self.freqs)[None, :]
        return torch.cat([x.cos(), x.sin()], dim=1)


def _time_vector(t, batch, device):
    """Accept a [B] tensor, a scalar tensor or a Python number; return float32 [B]."""
    t = torch.as_tensor(t, device=device).to(torch.float32).reshape(-1)
    if t.shape[0] == 1 and batch != 1:
        t = t.expand(batch)
    return t


def _label_vector(class_labels, label_dim, batch, device):
    """int64 [B] -> one-hot float [B, label_dim]; float [B, label_dim] as is; None -> zeros."""
    if class_labels is None:
        return torch.zeros(batch, label_dim, device=device)
    if class_labels.is_floating_point():
        return class_labels.to(torch.float32).reshape(batch, label_dim)
    classes = torch.arange(label_dim, device=device)
    return (class_labels.reshape(-1, 1) == classes[None, :]).to(torch.float32)


# ----------------------------------------------------------------------------
# U-Net block: GroupNorm-SiLU-conv, embedding injection, dropout, conv, residual, optional
# self-attention; the union of DDPM++ features as in EDM's UNetBlock.


class UNetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0.0, skip_scale=1.0, eps=1e-5,
                 resample_filter=(1, 1), resample_proj=False, adaptive_scale=True,
                 init=INIT, init_zero=INIT_ZERO, init_attn=None, s_affine=False):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else max(1, out_channels // channels_per_head)
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        # CTM's s input, per block (sony/ctm `affine_s`): its own projection of the s embedding
        self.affine_s = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init) if s_affine else None
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb, emb_s=None):
        orig = x
        x = self.conv0(silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.affine_s is not None:
            params = params + self.affine_s(emb_s).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x + params))

        x = self.conv1(nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            b, c, h, w = x.shape
            # EDM's channel layout: qkv channel index = channel * 3 + {0: q, 1: k, 2: v}.
            q, k, v = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
            logits = torch.einsum('ncq,nck->nqk', q.to(torch.float32), k.to(torch.float32)) / math.sqrt(k.shape[1])
            weights = logits.softmax(dim=2).to(q.dtype)
            a = torch.einsum('nqk,nck->ncq', weights, v)
            x = self.proj(a.reshape(b, c, h, w)) + x
            x = x * self.skip_scale
        return x


# ----------------------------------------------------------------------------
# DDPM++ U-Net (Song et al., as re-implemented in EDM), standard encoder and decoder,
# with the options this project needs: a second time input (CTM), extra output heads,
# features for auxiliary losses, and CUD's prior shakedrop.


class TimeLabelEmbedding:
    """The embedding both nets share: t (and s for two-time nets) and an optional class label.

    `init_embedding` builds the modules (map_noise, map_label, map_layer0/1 and, for two-time
    nets, map_layer0_s/1_s) that `embed` uses. How s enters (`s_embedding`):
      'per-block' (sony/ctm): s has its own embedding vector emb_s, which every block projects
                  with its own `affine_s` and adds to its affine(emb) (label added to both);
      'shared'    (fewstep's first CTM): silu(map_layer1_s(...)) added to the t embedding.
    """
    S_EMBEDDINGS = ('shared', 'per-block')

    def init_embedding(self, map_noise, noise_channels, emb_channels, label_dim=0, label_dropout=0.0,
                       two_times=False, s_embedding='shared'):
        """Build the embedding's modules, in this order (it fixes the initial weights drawn)."""
        if s_embedding not in self.S_EMBEDDINGS:
            raise ValueError(f's_embedding must be one of {self.S_EMBEDDINGS}, got {s_embedding!r}')
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        self.two_times = two_times
        self.s_per_block = bool(two_times) and s_embedding == 'per-block'
        self.map_noise = map_noise
        self.map_label = Linear(label_dim, noise_channels, **INIT) if label_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **INIT)
        self.map_layer1 = Linear(emb_channels, emb_channels, **INIT)
        if two_times:
            # s gets its own mapping (as in CTM), so the embedding is not symmetric in (t, s).
            self.map_layer0_s = Linear(noise_channels, emb_channels, **INIT)
            self.map_layer1_s = Linear(emb_channels, emb_channels, **INIT)

    def embed(self, t, s, class_labels, batch, device):
        """(emb [B, emb_channels], emb_s or None) from t, optional s and labels; emb_s is the
        per-block s embedding (None for one-time and 'shared' nets)."""
        emb = self.map_noise(t)
        label = None
        if self.map_label is not None:
            y = _label_vector(class_labels, self.label_dim, batch, device)
            if self.training and self.label_dropout:
                y = y * (torch.rand([batch, 1], device=device) >= self.label_dropout).to(y.dtype)
            label = self.map_label(y * np.sqrt(self.label_dim))
            emb = emb + label
        emb = silu(self.map_layer0(emb))
        emb = silu(self.map_layer1(emb))
        if not self.two_times:
            return emb, None
        if s is None:
            raise ValueError('this net was built with two_times=True: pass s')
        emb_s = self.map_noise(_time_vector(s, batch, device))
        if self.s_per_block:
            if label is not None:
                emb_s = emb_s + label
            return emb, silu(self.map_layer1_s(silu(self.map_layer0_s(emb_s))))
        emb_s = silu(self.map_layer0_s(emb_s))
        return emb + silu(self.map_layer1_s(emb_s)), None


class SongUNet(TimeLabelEmbedding, nn.Module):
    def __init__(self,
        img_resolution=32,              # Image resolution at input/output.
        in_channels=3,                  # Channels at input.
        out_channels=3,                 # Channels at output.
        label_dim=0,                    # Number of classes, 0 = unconditional.
        model_channels=128,             # Base multiplier for the number of channels.
        channel_mult=(2, 2, 2),         # Per-resolution multipliers; len = number of resolutions.
        num_blocks=4,                   # Residual blocks per resolution.
        attn_resolutions=(16,),         # Resolutions with self-attention (the lowest-resolution
                                        # 'in0' decoder block always has attention, as in EDM).
        dropout=0.10,                   # Dropout probability inside the blocks.
        label_dropout=0.0,              # Probability of zeroing the label in training (CFG).
        embedding_type='positional',    # 'positional' (DDPM++) or 'fourier' (NCSN++).
        channel_mult_noise=1,           # Time embedding size = model_channels * this.
        resample_filter=(1, 1),         # (1,1) for DDPM++, (1,3,3,1) for NCSN++.
        two_times=False,                # Second time input s (CTM), embedded like t.
        s_embedding='shared',           # How s enters: 'per-block' (sony/ctm) or 'shared' (added to t's).
        extra_heads=0,                  # Extra output heads on the last decoder features.
        prior_shakedrop=False,          # CUD's prior shakedrop on decoder skip concatenations.
        shakedrop_phi=0.75,             # Its phi: skips weigh 2*phi at t=1 and 2*(1-phi) at t=0.
        channel_mult_emb=4,             # Embedding vector size = model_channels * this.
        out_init_weight=1e-5,           # Init scale of the main output conv (EDM and the CUD authors: 1e-5).
    ):
        assert embedding_type in ('positional', 'fourier')
        super().__init__()
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.extra_heads = extra_heads
        self.prior_shakedrop = prior_shakedrop
        if not 0.0 <= float(shakedrop_phi) <= 1.0:
            raise ValueError(f'shakedrop_phi must be in [0, 1], got {shakedrop_phi!r}')
        self.shakedrop_phi = float(shakedrop_phi)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=INIT, init_zero=INIT_ZERO, init_attn=INIT_ATTN,
            s_affine=bool(two_times) and s_embedding == 'per-block',
        )

        # Mapping: time (and label) -> embedding vector fed to every block.
        map_noise = (PositionalEmbedding(noise_channels, max_positions=10000, endpoint=True)
                     if embedding_type == 'positional' else FourierEmbedding(noise_channels))
        self.init_embedding(map_noise, noise_channels, emb_channels, label_dim, label_dropout, two_times,
                            s_embedding)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **INIT)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder: blocks named 'block{idx}' take the next skip connection.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = (idx == num_blocks and res in attn_resolutions)
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
        assert not skips
        self.feature_channels = cout

        # Output layer(s): GroupNorm -> SiLU -> 3x3 conv on the last decoder features.
        res = img_resolution
        self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(cout, eps=1e-6)
        self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3, init_mode='xavier_uniform', init_weight=out_init_weight)
        self.heads = nn.ModuleList()
        for _ in range(extra_heads):
            self.heads.append(nn.Sequential(
                GroupNorm(cout, eps=1e-6), nn.SiLU(), Conv2d(cout, out_channels, kernel=3, **INIT_ZERO)))

    def forward(self, x, t, s=None, class_labels=None, return_features=False, heads=False):
        batch = x.shape[0]
        t = _time_vector(t, batch, x.device)
        emb, emb_s = self.embed(t, s, class_labels, batch, x.device)
        emb = emb.to(x.dtype)
        emb_s = None if emb_s is None else emb_s.to(x.dtype)

        # Encoder.
        skips = []
        for block in self.enc.values():
            x = block(x, emb, emb_s) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        # Prior shakedrop (CUD): decoder concatenations become
        # [h * 2*phi(t), skip * 2*(1 - phi(t))], phi(t) = phi + t*(1 - 2*phi).
        # Assumes t is the raw flow time in [0, 1] (t=1 noise, t=0 data), as in CUD's code,
        # which feeds t to the net unscaled. phi=0.75: at t=1 the skips weigh 1.5 and h 0.5,
        # at t=0 the reverse; phi=0.25 (the authors' training default) mirrors that.
        if self.prior_shakedrop:
            phi = self.shakedrop_phi + t * (1 - 2 * self.shakedrop_phi)
            pos = (2 * phi).to(x.dtype).reshape(-1, 1, 1, 1)
            neg = (2 * (1 - phi)).to(x.dtype).reshape(-1, 1, 1, 1)

        # Decoder.
        out = None
        for name, block in self.dec.items():
            if name.endswith('aux_norm'):
                features = x
                out = block(x)
            elif name.endswith('aux_conv'):
                out = block(silu(out))
            else:
                if '_block' in name:
                    h, skip = x, skips.pop()
                    if self.prior_shakedrop:
                        h, skip = h * pos, skip * neg
                    x = torch.cat([h, skip], dim=1)
                x = block(x, emb, emb_s)

        if heads:
            out = [out] + [head(features) for head in self.heads]
        if return_features:
            return out, features
        return out


# ----------------------------------------------------------------------------
# MLP for 2-D data, with the same calling convention as SongUNet.


class MLPBlock(nn.Module):
    """Pre-norm residual block: h + fc1(SiLU(fc0(SiLU(LN(h))) + affine(emb)))."""

    def __init__(self, hidden, emb_channels, norm=True, s_affine=False):
        super().__init__()
        self.norm = nn.LayerNorm(hidden) if norm else nn.Identity()
        self.fc0 = Linear(hidden, hidden, **INIT)
        self.affine = Linear(emb_channels, hidden, **INIT)
        self.fc1 = Linear(hidden, hidden, **INIT_ZERO)
        self.affine_s = Linear(emb_channels, hidden, **INIT) if s_affine else None

    def forward(self, h, emb, emb_s=None):
        x = self.fc0(silu(self.norm(h))) + self.affine(emb)
        if self.affine_s is not None:
            x = x + self.affine_s(emb_s)
        return h + self.fc1(silu(x))


class MLP(TimeLabelEmbedding, nn.Module):
    def __init__(self, dim=2, hidden=256, depth=4, label_dim=0, two_times=False, extra_heads=0,
                 emb_dim=64, label_dropout=0.0, norm=True, out_init_weight=1.0, prior_shakedrop=False,
                 s_embedding='shared'):
        # prior_shakedrop is accepted so one method config (CUD's) serves both nets: an MLP has
        # no skip concatenations, so there is nothing for it to scale.
        super().__init__()
        self.dim = dim
        self.extra_heads = extra_heads
        self.feature_channels = hidden

        # Same time embedding as SongUNet (positional, max_positions=10000).
        self.init_embedding(PositionalEmbedding(emb_dim, max_positions=10000, endpoint=True), emb_dim, hidden,
                            label_dim, label_dropout, two_times, s_embedding)

        self.inp = Linear(dim, hidden, **INIT)
        self.blocks = nn.ModuleList([MLPBlock(hidden, hidden, norm=norm, s_affine=self.s_per_block)
                                     for _ in range(depth)])
        self.out_norm = nn.LayerNorm(hidden) if norm else nn.Identity()
        self.out = Linear(hidden, dim, init_mode='xavier_uniform', init_weight=out_init_weight)
        self.heads = nn.ModuleList()
        for _ in range(extra_heads):
            self.heads.append(nn.Sequential(
                nn.LayerNorm(hidden) if norm else nn.Identity(), nn.SiLU(), Linear(hidden, dim, **INIT_ZERO)))

    def forward(self, x, t, s=None, class_labels=None, return_features=False, heads=False):
        batch = x.shape[0]
        t = _time_vector(t, batch, x.device)
        emb, emb_s = self.embed(t, s, class_labels, batch, x.device)
        emb = emb.to(x.dtype)
        emb_s = None if emb_s is None else emb_s.to(x.dtype)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb, emb_s)
        features = h
        out = self.out(silu(self.out_norm(h)))
        if heads:
            out = [out] + [head(features) for head in self.heads]
        if return_features:
            return out, features
        return out


# ----------------------------------------------------------------------------
# Helpers and presets.


def count_params(module):
    """Number of parameters (all of them, trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def build_net(cfg):
    """cfg = {"arch": "unet" | "mlp", **kwargs}. The dict passed in is not modified.

    For "unet" the kwargs are SongUNet's (img_resolution, in_channels, out_channels and
    label_dim come from the data); for "mlp" they are MLP's (dim, label_dim, ...).
    """
    cfg = dict(cfg)
    arch = cfg.pop('arch')
    if arch == 'unet':
        return SongUNet(**cfg)
    if arch == 'mlp':
        return MLP(**cfg)
    raise ValueError(f'unknown arch {arch!r}; expected "unet" or "mlp"')


# Network part of each preset. img_resolution/in_channels/out_channels/label_dim (or the
# MLP's dim/label_dim) are added at build time from the data.
PRESETS_NET = {
    # ~0.19M params at 1x28x28: for tests.
    'tiny': dict(arch='unet', model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=()),
    # 0.48M params at 1x28x28 (24, 24, 48 channels at 28, 14, 7): what a 2-core CPU trains in
    # an hour (~90 img/s per core for forward+backward at batch 64). No dropout: a run of a
    # few epochs does not overfit, and dropout costs ~8% of the step on a CPU.
    'fmnist-cpu': dict(arch='unet', model_channels=24, channel_mult=(1, 1, 2), num_blocks=1,
                       attn_resolutions=(), dropout=0.0),
    # The Catch-Up Distillation authors' MNIST net (configs/mnist_de.json): 2.155201M params.
    'fmnist': dict(arch='unet', model_channels=32, channel_mult=(2, 2, 2), num_blocks=2,
                   attn_resolutions=(), dropout=0.13),
    # DDPM++ as in EDM's CIFAR-10 config: 55.73M params at 3x32x32.
    'cifar10': dict(arch='unet', model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
                    attn_resolutions=(16,), dropout=0.13),
    # The 2-D track's MLP (~60k params): trains in minutes on a CPU.
    'mlp': dict(arch='mlp', hidden=128, depth=3),
}
