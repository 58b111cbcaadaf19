"""Diffusion Transformer expert (residual): the site's output delta of one token is an "image" of P patches that a
small DiT (adaLN-Zero blocks, Peebles & Xie) denoises in K deterministic DDIM steps, conditioned on the site input x.
Attention runs among the patches of one token only, so causality, the KV cache and batch invariance hold."""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .base import EXPERTS, Expert

EPS_X0_CLIP = 5.0  # eps-prediction: bound on x0 estimates, in units of y_scale (the RMS of the deltas)


class DitOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    patches: int = Field(4, ge=1, description="P: patches (DiT tokens) the delta of one token is cut into")
    width: int = Field(64, ge=4, description="hidden width of the DiT")
    depth: int = Field(2, ge=1, description="adaLN-Zero transformer blocks")
    heads: int = Field(4, ge=1, description="attention heads (among the patches of one token)")
    sample_steps: int = Field(4, ge=1, description="K: DDIM steps per forward (all are paid for, every token)")
    timesteps: int = Field(1000, ge=2, description="diffusion timesteps of training (cosine schedule)")
    prediction: Literal["v", "eps"] = Field("v", description="what the network predicts: v (velocity) or eps (noise)")

    @model_validator(mode="after")
    def _check(self) -> "DitOptions":
        if self.width % self.heads:
            raise ValueError(f"dit width {self.width} is not divisible by heads {self.heads}; e.g. width "
                             f"{self.heads * max(1, round(self.width / self.heads))}")
        if self.sample_steps > self.timesteps:
            raise ValueError(f"dit sample_steps {self.sample_steps} exceeds timesteps {self.timesteps}; lower it")
        return self


def cosine_alphas(n: int, s: float = 0.008) -> torch.Tensor:
    """alpha-bar_t of the cosine schedule (Nichol & Dhariwal), t = 0..n-1, betas clipped at 0.999. -> [n] float32"""
    steps = torch.arange(n + 1, dtype=torch.float64) / n
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0).float()


def trailing_steps(n: int, k: int) -> list[int]:
    """K sampling timesteps, descending from n-1 ("trailing" spacing: the first step starts at pure noise)."""
    return [round(n - 1 - i * n / k) for i in range(k)]


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of timesteps t [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # [N, half]
    out = torch.cat([angles.cos(), angles.sin()], dim=-1)
    return F.pad(out, (0, dim - out.shape[-1]))


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: h [T,P,w], shift/scale [T,w] -> [T,P,w]."""
    return h * (1 + scale[:, None]) + shift[:, None]


class PatchAttention(nn.Module):
    """Multi-head self-attention among the P patches of each token (explicit matmuls, so FLOPs are countable)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # h: [T,P,w] -> [T,P,w]
        n_tok, n_patch, width = h.shape
        qkv = self.qkv(h).view(n_tok, n_patch, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)  # [3,T,H,P,hd]
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # [T,H,P,P]
        y = (att @ v).transpose(1, 2).reshape(n_tok, n_patch, width)  # [T,P,w]
        return self.out(y)


class DitBlock(nn.Module):
    """adaLN-Zero block: shift/scale/gate of attention and MLP come from the condition c; the gates start at 0."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = PatchAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, width))
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # h: [T,P,w], c: [T,w]
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)  # each [T,w]
        width = h.shape[-1]
        h = h + gate1[:, None] * self.attn(modulate(F.layer_norm(h, (width,)), shift1, scale1))
        return h + gate2[:, None] * self.mlp(modulate(F.layer_norm(h, (width,)), shift2, scale2))


@EXPERTS.register("dit")
class DitExpert(Expert):
    """delta(x) = y_scale * DDIM_K(x): K denoising steps from y_T = 0 (deterministic), v- or eps-prediction.

    A fresh expert adds exactly 0 (adaLN-Zero and a zero output layer: the first prediction is 0, so is every
    later one). `y_scale` (a saved buffer) is the RMS of the deltas it was distilled from, so the diffusion works
    on unit-scale data.
    """

    mode = "residual"
    Options = DitOptions

    def __init__(self, *, site, options):
        super().__init__(site=site, options=options)
        o = self.options
        self.px, self.py = -(-self.d_in // o.patches), -(-self.d_out // o.patches)  # patch sizes (zero-padded)
        self.cond = nn.Linear(self.d_in, o.width)  # x -> c, the adaLN condition
        self.x_embed = nn.Linear(self.px, o.width)  # x's patches, added to the patch tokens (in-context condition)
        self.y_embed = nn.Linear(self.py, o.width)  # the noisy delta's patches
        self.pos = nn.Parameter(torch.randn(o.patches, o.width) * 0.02)  # [P,w]
        self.t_mlp = nn.Sequential(nn.Linear(o.width, o.width), nn.SiLU(), nn.Linear(o.width, o.width))
        self.blocks = nn.ModuleList([DitBlock(o.width, o.heads) for _ in range(o.depth)])
        self.final_ada = nn.Linear(o.width, 2 * o.width)
        self.final = nn.Linear(o.width, self.py)
        for layer in (self.final_ada, self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.register_buffer("y_scale", torch.ones(1))  # saved: the RMS of the distilled deltas
        self.register_buffer("alphas", cosine_alphas(o.timesteps), persistent=False)  # [N]: alpha-bar_t
        self.sample_t = trailing_steps(o.timesteps, o.sample_steps)

    def _apply(self, fn, recurse=True):
        """As nn.Module's, but the noise schedule stays float32 in a half-precision expert (alpha-bar near 1 would
        round to 1 in bfloat16)."""
        out = super()._apply(fn, recurse)
        if self.alphas.dtype != torch.float32:
            self.alphas = cosine_alphas(self.options.timesteps).to(self.alphas.device)
        return out

    # ------------------------------------------------------------------ the network
    def embed_condition(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T,d_in] -> (patch tokens of x + positions [T,P,w], adaLN condition [T,w]); once per forward."""
        xp = F.pad(x, (0, self.px * self.options.patches - self.d_in)).view(x.shape[0], self.options.patches, self.px)
        return self.x_embed(xp) + self.pos, self.cond(x)

    def net(self, y_t: torch.Tensor, t: torch.Tensor, x_tok: torch.Tensor, c_x: torch.Tensor) -> torch.Tensor:
        """The prediction (v or eps) for noisy patches y_t [T,P,py] at timesteps t [T] or [1] -> [T,P,py]."""
        c = F.silu(c_x + self.t_mlp(timestep_features(t, self.options.width).to(c_x.dtype)))  # [T,w]
        h = self.y_embed(y_t) + x_tok  # [T,P,w]
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)  # [T,w] each
        return self.final(modulate(F.layer_norm(h, (h.shape[-1],)), shift, scale))

    def split(self, y_t: torch.Tensor, out: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) estimates from the network output at alpha-bar a (broadcastable to y_t)."""
        if self.options.prediction == "v":
            return a.sqrt() * y_t - (1 - a).sqrt() * out, (1 - a).sqrt() * y_t + a.sqrt() * out
        # eps: x0 = (y_t - sqrt(1-a) eps) / sqrt(a) divides by ~5e-5 at t = T; clipped as DDPM samplers do
        return ((y_t - (1 - a).sqrt() * out) / a.sqrt()).clamp(-EPS_X0_CLIP, EPS_X0_CLIP), out

    # ------------------------------------------------------------------ sampling (the expert's forward)
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, d_in] -> [T, d_out]
        x_tok, c_x = self.embed_condition(x)
        y = x.new_zeros(x.shape[0], self.options.patches, self.py)  # y_T = 0: deterministic, batch-independent
        for i, t in enumerate(self.sample_t):
            a = self.alphas[t]
            a_prev = self.alphas[self.sample_t[i + 1]] if i + 1 < len(self.sample_t) else a.new_ones(())
            x0, eps = self.split(y, self.net(y, torch.tensor([t], device=x.device), x_tok, c_x), a)
            y = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps  # DDIM (eta = 0); the last step returns x0
        return y.reshape(x.shape[0], -1)[:, : self.d_out] * self.y_scale.to(y.dtype)

    # ------------------------------------------------------------------ training by denoising
    def distill_loss(self, x: torch.Tensor, delta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """DDPM loss on targets `delta` [N,d_out] (a teacher's output delta) given site inputs x [N,d_in]:
        random timesteps and noise, MSE of the v (or eps) prediction."""
        n = x.shape[0]
        y0 = F.pad(delta / self.y_scale, (0, self.py * self.options.patches - self.d_out)).view(n, self.options.patches, self.py)
        where = generator.device if generator is not None else x.device  # draw where the generator lives
        t = torch.randint(0, self.options.timesteps, (n,), generator=generator, device=where).to(x.device)
        noise = torch.randn(y0.shape, generator=generator, device=where).to(device=x.device, dtype=y0.dtype)
        a = self.alphas[t].view(n, 1, 1)
        y_t = a.sqrt() * y0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * y0 if self.options.prediction == "v" else noise
        return F.mse_loss(self.net(y_t, t, *self.embed_condition(x)), target)

    def set_scale(self, delta: torch.Tensor) -> None:
        """Set y_scale to the RMS of target deltas [N,d_out] before distilling."""
        self.y_scale.fill_(float(delta.float().pow(2).mean().sqrt().clamp(min=1e-6)))

    # ------------------------------------------------------------------ cost
    def flops_per_token(self) -> int:
        """Multiply-adds x2 of one token through all K steps (embeddings of x once, the DiT K times)."""
        o, w, p = self.options, self.options.width, self.options.patches
        once = self.d_in * w + p * self.px * w  # cond(x), x_embed
        block = w * 6 * w + p * (3 * w * w + w * w + 8 * w * w) + 2 * p * p * w  # ada, qkv+out, mlp, scores+mix
        step = 2 * w * w + p * self.py * w + o.depth * block + w * 2 * w + p * w * self.py  # t_mlp, y_embed, final
        return 2 * (once + o.sample_steps * step)
