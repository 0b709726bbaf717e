"""Tiny random-weight models for tests, docs and smoke runs on a CPU (untrained: their videos are noise).

Example:
    >>> from genkv.testing import tiny_self_forcing_pipeline
    >>> pipe = tiny_self_forcing_pipeline(seed=0)
    >>> pipe(prompt="a red circle", num_frames=9, output_type="uint8").frames.shape
    (1, 9, 64, 64, 3)
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

TINY_TEXT_DIM = 32
TINY_HEIGHT = TINY_WIDTH = 64


def tiny_wan_transformer(seed: int = 0, **overrides) -> WanTransformer3DModel:
    """A 2-layer Wan transformer (2 heads x 12 dims, text_dim 32) with the real RoPE table length."""
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=TINY_TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**config)
    # Random init leaves the output projection's scale tiny; widen it so tests see real signal in the output.
    with torch.no_grad():
        model.proj_out.weight.mul_(4.0)
    return model.eval()


def tiny_wan_vae(seed: int = 0) -> AutoencoderKLWan:
    """A Wan VAE with base_dim 3 (8x spatial, 4x temporal, 16 latent channels)."""
    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()


def tiny_tokenizer():
    """A byte-level tokenizer built in code (no files, no download), UMT5-style special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_text_encoder(seed: int = 0, vocab_size: int = 259):
    """A 1-layer UMT5 encoder with d_model = the tiny transformer's text_dim."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TINY_TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
    )
    return UMT5EncoderModel(config).eval()


def tiny_self_forcing_pipeline(seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A complete random-weight ``SelfForcingPipeline`` (64x64 video) that runs in seconds on a CPU."""
    from genkv.pipelines import SelfForcingPipeline, SelfForcingScheduler

    pipe = SelfForcingPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_text_encoder(seed),
        transformer=tiny_wan_transformer(seed),
        vae=tiny_wan_vae(seed),
        scheduler=SelfForcingScheduler(),
        default_height=TINY_HEIGHT,
        default_width=TINY_WIDTH,
        max_sequence_length=64,
    )
    pipe.to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    return pipe


def tiny_var_pipeline(seed: int = 0, depth: int = 3):
    """A random-weight VAR (``depth`` blocks, 2 heads x 16, 10 classes, vocabulary 32, scales 1-2-3-4, 16x16
    images) that samples in well under a second on a CPU."""
    from genkv.pipelines.var import MultiScaleVQVAE, VARConfig, VARPipeline, VARTransformer

    g = torch.Generator().manual_seed(seed)
    config = VARConfig(depth=depth, num_classes=10, vocab_size=32, z_channels=8, patch_nums=(1, 2, 3, 4), width=32,
                       head_dim=16)
    transformer = VARTransformer(config).init_random(g, std=0.3)
    torch.manual_seed(seed)
    vqvae = MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1,
                            patch_nums=config.patch_nums, share_quant_resi=2)
    return VARPipeline(transformer.eval(), vqvae.eval())


def tiny_infinity_pipeline(seed: int = 0, depth: int = 2, pn: str = "0.06M"):
    """A random-weight Infinity (``depth`` blocks in 2 chunks, 2 heads x 32, 8 bits per token, a 1-layer T5 of
    width 128 and the byte-level :func:`tiny_tokenizer`, the official 256px schedule: 7 scales up to 16 x 16
    tokens, 32x32 images) that samples in about a second on a CPU."""
    from transformers import T5Config, T5EncoderModel

    from genkv.pipelines.infinity import BitwiseDecoder, InfinityConfig, InfinityPipeline, InfinityTransformer

    g = torch.Generator().manual_seed(seed)
    config = InfinityConfig(depth=depth, embed_dim=64, num_heads=2, text_channels=128, text_maxlen=64, bits=8,
                            mlp_hidden=128, block_chunks=2 if depth % 2 == 0 else 1)
    transformer = InfinityTransformer(config).init_random(g, std=0.1)
    torch.manual_seed(seed)
    vae = BitwiseDecoder(bits=8, ch=32, ch_mult=(1, 1), num_res_blocks=1, upsample=(1,))
    t5 = T5EncoderModel(T5Config(vocab_size=259, d_model=128, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8, dropout_rate=0.0))
    return InfinityPipeline(transformer.eval(), vae.eval(), tiny_tokenizer(), t5.eval(), pn=pn, max_length=64)
