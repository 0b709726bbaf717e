"""diffusers attention processors that read and write the genkv cache.

They are plain objects (not ``nn.Module``: nothing enters ``state_dict``) with the ``_attention_backend`` and
``_parallel_config`` attributes diffusers writes through ``set_attention_backend`` / ``enable_parallelism``.
Each owns nothing but its layer index, a reference to the store and the method's readers.

Outside a rollout (``store.active`` false) they compute exactly what ``WanAttnProcessor`` computes, so a
patched model is a drop-in replacement.
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING, Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import _get_qkv_projections

from .rope import apply_rotary_emb
from .switches import env_flag, optional_kernel

if TYPE_CHECKING:  # pragma: no cover
    from diffusers.models.transformers.transformer_wan import WanAttention

    from .cache import KVCacheStore


# -- the cache-reading islands as opaque ops --------------------------------------------------------------
# Cache bookkeeping is Python state (lengths, dicts) that changes every chunk, so `torch.compile` must not trace
# it. As graph breaks, the two islands split a Wan block into seven compiled regions, each with its own guards
# and wrapper (more host time per block than the eager block takes at negligible compute). As custom ops they
# are opaque calls inside *one* compiled graph per block. Which processor a call belongs to travels as a small
# CPU tensor (``ident``), an input of the graph rather than a constant baked into it, so the 30 blocks still
# share one compiled graph.
_PROCESSORS: dict[int, "weakref.ref[_GenKVProcessorBase]"] = {}
_IDENTS = itertools.count()


def _processor(ident: torch.Tensor) -> "_GenKVProcessorBase":
    processor = _PROCESSORS[ident.item()]()
    if processor is None:  # pragma: no cover - a graph outliving its model
        raise RuntimeError("genkv: the attention processor of this compiled graph no longer exists")
    return processor


@torch.library.custom_op("genkv::cached_self_attention", mutates_args=())
def _cached_self_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ident: torch.Tensor
                              ) -> torch.Tensor:
    return _processor(ident)._attend_cached(query, key, value).contiguous()


@_cached_self_attention_op.register_fake
def _(query, key, value, ident):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


@torch.library.custom_op("genkv::cached_prompt_attention", mutates_args=())
def _cached_prompt_attention_op(query: torch.Tensor, encoder_hidden_states: torch.Tensor, ident: torch.Tensor
                                ) -> torch.Tensor:
    processor = _processor(ident)
    return processor._attend_prompt(processor.attn(), query, encoder_hidden_states).contiguous()


@_cached_prompt_attention_op.register_fake
def _(query, encoder_hidden_states, ident):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


# ``genkv.kernels.qk_norm_rope`` (which registers ``genkv::qk_norm_rope``), or None without Triton or when
# ``GENKV_FUSED_NORM_ROPE=0``
_NORM_ROPE = optional_kernel("qk_norm_rope") if env_flag("GENKV_FUSED_NORM_ROPE", True) else None


def _upcast_rms_norm() -> type:
    from genkv.pipelines.self_forcing.numerics import UpcastRMSNorm  # upstream Self-Forcing's numerics

    return UpcastRMSNorm


def _fused_norm_rope_applies(attn: "WanAttention", query: torch.Tensor,
                             rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether a self-attention's q/k RMSNorm + RoPE run as one kernel (``genkv::qk_norm_rope``): on CUDA, in
    half precision (float32 keeps the module path, the one checked against upstream), with Wan's norms (RMSNorm
    across heads, affine, one eps; q's and k's both torch's ``RMSNorm`` or both upstream's ``UpcastRMSNorm``) and
    tables the kernel takes."""
    norms = (attn.norm_q, attn.norm_k)
    kinds = {type(n) for n in norms}
    return (_NORM_ROPE is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and len(kinds) == 1 and kinds <= {torch.nn.RMSNorm, _upcast_rms_norm()}
            and all(n.weight is not None
                    and tuple(n.normalized_shape) == (query.shape[-1],) for n in norms)
            and attn.norm_q.eps == attn.norm_k.eps
            and _NORM_ROPE.qk_norm_rope_applies(query, rotary_emb[0], rotary_emb[1], attn.heads))


class _GenKVProcessorBase:
    _attention_backend: Any = None
    _parallel_config: Any = None

    def __init__(self, store: "KVCacheStore", layer_index: int, reader: Any, attn: Any = None) -> None:
        self.store = store
        self.layer_index = layer_index
        self.reader = reader
        self.attn = weakref.ref(attn) if attn is not None else (lambda: None)  # the module it is installed on
        number = next(_IDENTS)
        _PROCESSORS[number] = weakref.ref(self, lambda _, number=number: _PROCESSORS.pop(number, None))
        self.ident = torch.tensor([number], dtype=torch.int64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer_index}, method={self.store.keeper.method_name!r})"


class GenKVSelfAttnProcessor(_GenKVProcessorBase):
    """Self-attention of a Wan block over ``cache history + current chunk``."""

    def __call__(
        self,
        attn: "WanAttention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None and _fused_norm_rope_applies(attn, query, rotary_emb):
            eps = attn.norm_q.eps if attn.norm_q.eps is not None else torch.finfo(query.dtype).eps
            upcast = type(attn.norm_q) is not torch.nn.RMSNorm  # upstream's norm: rounded before the weight
            query, key = torch.ops.genkv.qk_norm_rope(query, key, attn.norm_q.weight, attn.norm_k.weight, eps,
                                                      *rotary_emb, attn.heads, upcast)
        else:
            query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
            key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
            if rotary_emb is not None:
                query = apply_rotary_emb(query, *rotary_emb)
                key = apply_rotary_emb(key, *rotary_emb)

        if self.store.active:
            if attention_mask is not None:
                raise ValueError("genkv processors take no attention_mask during a cached rollout")
            out = torch.ops.genkv.cached_self_attention(query, key, value, self.ident)
        else:
            out = dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                dropout_p=0.0,
                is_causal=False,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def _attend_cached(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        cache = self.store.layer(self.layer_index)
        key, value, key_bias = cache.stage(key, value)
        # A quantized cache hands the reader its history as codes (key/value: the chunk alone); bf16: nothing
        # extra, so readers that know no quantized history keep working unchanged.
        history = cache.quantized_history()
        extra = {} if history is None else {"history": history}
        return self.reader.attend(
            query,
            key,
            value,
            key_bias,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
            layer_index=self.layer_index,
            store=self.store,
            **extra,
        )


class GenKVCrossAttnProcessor(_GenKVProcessorBase):
    """Text cross-attention; during a rollout the prompt's K/V are projected once per prompt and reused."""

    def __call__(
        self,
        attn: "WanAttention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if attn.add_k_proj is not None:
            raise NotImplementedError("genkv cross-attention does not handle image-conditioned (I2V) Wan yet")
        if self.store.active and attention_mask is None:
            query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # q is never fused with k/v
            out = torch.ops.genkv.cached_prompt_attention(query, encoder_hidden_states, self.ident)
        else:
            query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
            query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
            key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
            value = value.unflatten(2, (attn.heads, -1))
            out = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, backend=self._attention_backend, parallel_config=None
            )
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def _attend_prompt(
        self, attn: "WanAttention", query: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        key, value = self._prompt_kv(attn, encoder_hidden_states)
        return self.reader.attend(
            query, key, value, backend=self._attention_backend, layer_index=self.layer_index, store=self.store
        )

    def _prompt_kv(self, attn: "WanAttention", encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's K/V, projected on the first call of a prompt and reused for every later chunk/step."""
        cached = self.store.cross_kv(self.layer_index)
        if cached is not None:
            return cached
        if attn.fused_projections:
            key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        else:
            key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        self.store.store_cross_kv(self.layer_index, key, value)
        return key, value
