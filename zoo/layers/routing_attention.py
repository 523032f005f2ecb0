"""BiFormer's bi-level routing attention (BRA) on NHWC maps: region-to-region routing, then token attention
inside the top-k routed regions, in three executions of one algorithm (``attn_impl``):

- ``"gather"``: the official gather of the routed key/value regions (k-fold copies), then dense attention per region;
- ``"masked"``: dense SDPA over every token with the routing as a boolean mask (no copies; wins where routing keeps
  many regions, so "gather" switches to it from ``MASKED_FROM`` of the regions);
- ``"flex"``: FlexAttention with a block mask of the routed regions (compiled; on CPU inference only).

All three give the same outputs and gradients (tested); the model is :mod:`zoo.models.biformer`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

def region_valid_tokens(h: int, w: int, hp: int, wp: int, n_win: int, device: torch.device) -> torch.Tensor:
    """Bool ``[n_win**2, rh * rw]``: which tokens of each region lie inside the unpadded ``h x w`` map."""
    rh, rw = hp // n_win, wp // n_win
    valid = (torch.arange(hp, device=device) < h)[:, None] & (torch.arange(wp, device=device) < w)[None, :]
    return valid.view(n_win, rh, n_win, rw).permute(0, 2, 1, 3).reshape(n_win * n_win, rh * rw)


ATTN_IMPLS = ("gather", "masked", "flex")
# "gather" runs a layer as "masked" when routing keeps at least this fraction of the regions (BiFormer-T/S: stage 3,
# 16 of 49): there the k-fold copy of k and v costs more than the dense scores it avoids (results/biformer.md)
MASKED_FROM = 0.25


def _flex_block_multiple(device: torch.device) -> int:
    """Region token counts are padded to a multiple of this for FlexAttention: the CUDA (Triton) kernel's
    tiles are at least 16 wide; the CPU kernel takes any block size, so CPU pads nothing."""
    return 16 if device.type == "cuda" else 1


_FLEX = None


def _flex(*args, **kwargs) -> torch.Tensor:
    """``torch.compile(flex_attention)``, made on first use. Compiled is the only sparse path: eager
    flex_attention materialises every score and applies the mask_mod to all of them. torch 2.14 on CPU:
    inference only (torch refuses inputs that require grad)."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX(*args, **kwargs)


def _routing_block_mask(idx: torch.Tensor, tp: int, keep: torch.Tensor | None):
    """BlockMask for BRA: query block (region) i of image b reads key blocks ``idx[b, i]``, blocks of ``tp``
    tokens. ``keep`` (``[S2 * tp]`` bool, or None when every key exists) masks padded keys inside blocks."""
    from torch.nn.attention.flex_attention import BlockMask
    n, s2, k = idx.shape
    routed = torch.zeros(n, s2, s2, dtype=torch.bool, device=idx.device).scatter_(2, idx, True)

    # the mask_mod must say everything: eager flex_attention ignores the block structure and uses it alone
    def mask_mod(b, h, q_idx, kv_idx):
        hit = routed[b, q_idx // tp, kv_idx // tp]
        return hit if keep is None else hit & keep[kv_idx]

    # kv_indices must span all S2 key blocks; columns past k are unused by the kernel (filled with idx[..., :1])
    cols = torch.cat([idx, idx[..., :1].expand(n, s2, s2 - k)], -1).int()[:, None]
    num = torch.full((n, 1, s2), k, dtype=torch.int32, device=idx.device)
    return BlockMask.from_kv_blocks(num, cols, BLOCK_SIZE=tp, mask_mod=mask_mod, seq_lengths=(s2 * tp, s2 * tp))


class BiLevelRoutingAttention(nn.Module):
    """BRA on NHWC maps (official ``ops/bra_legacy.BiLevelRoutingAttention`` with the released settings:
    ``param_attention='qkvo'``, ``kv_downsample_mode='identity'``, no routing params, no soft routing)."""

    def __init__(self, *, dim: int, num_heads: int, n_win: int, topk: int, qk_scale: float | None = None,
                 side_dwconv: int = 5, attn_impl: str = "gather"):
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.attn_impl = attn_impl  # not a parameter or buffer: the state-dict keys do not depend on it
        self.auto_masked = True  # "gather" may run as "masked" (below); off: the routed algorithm as written
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        if not 0 < topk <= n_win * n_win:
            raise ValueError(f"topk must be in 1..n_win**2 = {n_win * n_win}, got {topk} (n_win={n_win})")
        self.dim, self.num_heads, self.n_win, self.topk = dim, num_heads, n_win, topk
        self.scale = qk_scale or dim ** -0.5  # official: full width qk_dim ** -0.5, not per head
        self.qkv = nn.Linear(dim, 3 * dim)  # official attn.qkv.qkv: [q | k | v]
        self.proj = nn.Linear(dim, dim)  # official attn.wo
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)  # LCE on v

    def _project(self, x: torch.Tensor):
        """q, k, v by region + routing. Returns (q, k, v each ``[N*S2, T, heads, hd]``, lepe NHWC,
        idx ``[N, S2, k]``, key-valid mask ``[S2, T]`` or None, padded size)."""
        n, h, w, c = x.shape
        s, heads = self.n_win, self.num_heads
        # three F.linear on row blocks of the official fused weight: same maths, but each output is its own
        # tensor, so backward never zero-fills and slices a 3c-wide gradient
        wq, wk, wv = self.qkv.weight.chunk(3, 0)
        bq, bk, bv = self.qkv.bias.chunk(3, 0)
        q_img, k_img, v_img = F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)
        lepe = self.lepe(v_img.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # LCE on the unpadded v
        ph, pw = (-h) % s, (-w) % s
        hp, wp = h + ph, w + pw
        rh, rw = hp // s, wp // s

        def regions(t: torch.Tensor) -> torch.Tensor:  # (n, hp, wp, c) -> (n*S2, rh*rw, heads, hd): one copy
            if ph or pw:
                t = F.pad(t, (0, 0, 0, pw, 0, ph))
            t = t.view(n, s, rh, s, rw, c).transpose(2, 3)
            return t.reshape(n * s * s, rh * rw, heads, c // heads)

        q, k, v = regions(q_img), regions(k_img), regions(v_img)
        valid = region_valid_tokens(h, w, hp, wp, s, x.device) if (ph or pw) else None
        with torch.no_grad():  # diff_routing=False: q and k are detached for routing
            if valid is None:
                q_r, k_r = q.mean(1), k.mean(1)
            else:  # mean over real tokens only
                m = valid.to(q.dtype).repeat(n, 1)[..., None, None]
                cnt = m.sum(1).clamp_min(1)
                q_r, k_r = (q * m).sum(1) / cnt, (k * m).sum(1) / cnt
            q_r, k_r = q_r.view(n, s * s, c), k_r.view(n, s * s, c)
            logits = (q_r * self.scale) @ k_r.transpose(-1, -2)  # (n, S2, S2)
            if valid is not None:
                logits = logits.masked_fill(~valid.any(1), float("-inf"))  # empty regions are never routed to
            idx = torch.topk(logits, k=self.topk, dim=-1).indices  # routing weights: unused (mul_weight='none')
        return q, k, v, lepe, idx, valid, (hp, wp)

    def execution(self) -> str:
        """What ``forward`` runs: ``attn_impl``, except that "gather" becomes "masked" where routing keeps at
        least ``MASKED_FROM`` of the regions."""
        if self.attn_impl == "gather" and self.auto_masked and self.topk >= MASKED_FROM * self.n_win ** 2:
            return "masked"
        return self.attn_impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = self.execution()
        if impl == "flex":
            return self._forward_flex(x)
        if impl == "masked":
            return self._forward_masked(x)
        n, h, w, c = x.shape
        s, k, heads = self.n_win, self.topk, self.num_heads
        q, kk, v, lepe, idx, valid, (hp, wp) = self._project(x)
        t = q.shape[1]
        flat = (idx + torch.arange(n, device=x.device).view(n, 1, 1) * (s * s)).reshape(-1)
        # the routed regions' keys and values: the one k-fold copy the algorithm needs, as strided views
        # (rows flattened to 2-D: index_select and its index_add_ backward are several times faster so on CPU)
        ks = kk.view(n * s * s, -1).index_select(0, flat).view(n * s * s, k * t, heads, c // heads).transpose(1, 2)
        vs = v.view(n * s * s, -1).index_select(0, flat).view(n * s * s, k * t, heads, c // heads).transpose(1, 2)
        mask = None
        if valid is not None:  # padded keys take no part in attention
            mask = valid[idx].view(n * s * s, 1, 1, k * t)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), ks, vs, attn_mask=mask, scale=self.scale)
        # (n*S2, heads, t, hd) -> (n, s, rh, s, rw, heads, hd): a view; the image layout is made by the add
        return self._out(out.view(n, s, s, heads, hp // s, wp // s, c // heads).permute(0, 1, 4, 2, 5, 3, 6), lepe)

    def _out(self, out: torch.Tensor, lepe: torch.Tensor) -> torch.Tensor:
        """``proj(out + lepe)`` for the attention output in region layout ``(n, s, rh, s, rw, heads, hd)`` (a
        strided view) and ``lepe`` (NHWC, unpadded). Without padding the add itself writes the image layout
        (it follows ``lepe``'s strides, the first operand): no separate re-layout copy."""
        n, s, rh, _, rw, heads, hd = out.shape
        h, w, c = lepe.shape[1:]
        if (s * rh, s * rw) == (h, w):
            return self.proj((lepe.view(n, s, rh, s, rw, heads, hd) + out).view(n, h, w, c))
        return self.proj(out.reshape(n, s * rh, s * rw, c)[:, :h, :w] + lepe)

    def _forward_masked(self, x: torch.Tensor) -> torch.Tensor:
        """Same maths as :meth:`forward`, dense: per image, every query against every key in one
        ``F.scaled_dot_product_attention`` call, keys outside the query region's routed regions (and padded
        keys) masked by a float ``-inf`` bias (exactly zero weight, as if absent). ``S2 / topk`` times the score
        work of the gather, but no k-fold copy of k and v, and the mask needs no gradient (CPU: fused forward and
        backward)."""
        n, h, w, c = x.shape
        s, heads = self.n_win, self.num_heads
        q, kk, v, lepe, idx, valid, (hp, wp) = self._project(x)
        t, s2 = q.shape[1], s * s
        routed = torch.zeros(n, s2, s2, dtype=torch.bool, device=x.device).scatter_(2, idx, True)
        keep = routed[:, :, None, :, None].expand(n, s2, t, s2, t)  # [image, q region, q token, k region, k token]
        if valid is not None:
            keep = keep & valid.view(1, 1, 1, s2, t)
        bias = torch.zeros(keep.shape, dtype=q.dtype, device=x.device).masked_fill_(~keep, float("-inf"))

        def img(z: torch.Tensor) -> torch.Tensor:  # (n*S2, t, heads, hd) -> (n, heads, S2*t, hd): a view
            return z.view(n, s2 * t, heads, c // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(img(q), img(kk), img(v), attn_mask=bias.view(n, 1, s2 * t, s2 * t),
                                             scale=self.scale)
        # (n, heads, S2*t, hd) -> (n, s, rh, s, rw, heads, hd): a view
        return self._out(out.view(n, heads, s, s, hp // s, wp // s, c // heads).permute(0, 2, 4, 3, 5, 1, 6), lepe)

    def _forward_flex(self, x: torch.Tensor) -> torch.Tensor:
        """Same maths as :meth:`forward`, block-sparse: one FlexAttention call per image over all its regions'
        tokens (region-major, each region padded to ``tp`` tokens), one block per region, the block mask
        listing the routed regions. No k-fold copy of k and v is made."""
        n, h, w, c = x.shape
        s, heads = self.n_win, self.num_heads
        q, kk, v, lepe, idx, valid, (hp, wp) = self._project(x)
        t, s2 = q.shape[1], s * s
        tp = -(-t // _flex_block_multiple(x.device)) * _flex_block_multiple(x.device)

        def seq(z: torch.Tensor) -> torch.Tensor:  # (n*S2, t, heads, hd) -> (n, heads, S2*tp, hd)
            z = z.view(n, s2, t, heads, c // heads)
            if tp > t:
                z = F.pad(z, (0, 0, 0, 0, 0, tp - t))
            return z.reshape(n, s2 * tp, heads, c // heads).transpose(1, 2)

        keep = None  # (S2*tp,) keys that exist: inside the image and not block padding
        if valid is not None or tp > t:
            keep = valid if valid is not None else torch.ones(s2, t, dtype=torch.bool, device=x.device)
            keep = F.pad(keep, (0, tp - t)).reshape(-1)
        out = _flex(seq(q), seq(kk), seq(v), block_mask=_routing_block_mask(idx, tp, keep), scale=self.scale)
        # (n, heads, S2*tp, hd) -> (n, hp, wp, c)
        out = out.view(n, heads, s, s, tp, c // heads)[:, :, :, :, :t]
        out = out.reshape(n, heads, s, s, hp // s, wp // s, c // heads).permute(0, 2, 4, 3, 5, 1, 6)
        out = out.reshape(n, hp, wp, c)[:, :h, :w]
        return self.proj(out + lepe)

    @torch.no_grad()
    def routing_and_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """For explanation: routed region indices ``[N, S2, k]`` and the token attention probabilities
        ``[N, S2, heads, T, k*T]`` (queries of each region over its routed tokens), with the padded size."""
        n, h, w, c = x.shape
        s, heads = self.n_win, self.num_heads
        q, kk, _, _, idx, valid, padded = self._project(x)
        t = q.shape[1]
        q = q.transpose(1, 2)
        kk = kk.view(n, s * s, t, heads, c // heads)
        kk = kk[torch.arange(n, device=x.device)[:, None, None], idx]  # (n, S2, k, t, heads, hd)
        kk = kk.reshape(n * s * s, -1, heads, c // heads).transpose(1, 2)
        logits = (q * self.scale) @ kk.transpose(-1, -2)
        if valid is not None:
            logits = logits.masked_fill(~valid[idx].view(n * s * s, 1, 1, -1), float("-inf"))
        return idx, logits.softmax(-1).view(n, s * s, heads, t, -1), padded
