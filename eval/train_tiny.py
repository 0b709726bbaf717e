"""Train the tiny sprite model genkv ships: a Wan VAE, a UMT5 text encoder and a causal Wan transformer.

    python eval/train_tiny.py --out runs/sprites-tiny --tar runs/sprites-tiny.tar      # one GPU, ~8 minutes
    python eval/train_tiny.py --out /tmp/smoke --smoke                               # seconds on a CPU (check)
    # in two GPU runs (each under a 10-minute limit): the VAE first, then the rest on top of it
    python eval/train_tiny.py --out /tmp/vae --vae-minutes 4 --stop-after-vae --tar $OUT/vae.tar
    python eval/train_tiny.py --out /tmp/m --vae-from vae.tar --vae-minutes 0 --minutes 7 --tar $OUT/m.tar
    # more transformer steps on a saved model (its VAE and latent statistics kept)
    python eval/train_tiny.py --out /tmp/m2 --resume-from m.tar --minutes 5 --lr 3e-4 --tar $OUT/m2.tar
    # longer clips (105 frames = 9 chunks, the pool's default is 45): the decoder repaired on them alone, then the
    # transformer with up to 8 context chunks (eval/vae_drift.py shows where a VAE trained on 45 frames drifts)
    python eval/train_tiny.py --out /tmp/d --resume-from m.tar --minutes 0 --decoder-minutes 6 --clip-frames 105 \
        --sprite-weight 10 --vae-batch 8 --tar $OUT/d.tar
    # the same repair on a CPU, the decoder trained chunk by chunk as it streams: eval/tune_decoder.py

Data: procedural sprite videos (``genkv.data``), 64x64, by default one or two sprites on a plain background, a
pool generated up front by all CPU cores. Phase 1 trains the VAE (``AutoencoderKLWan``, base_dim 32, 4x spatial
/ 4x temporal, 16 latent channels) as an autoencoder (L1 + MSE + a light KL), on short clips and whole ones in
turn (a causal VAE must also learn to run from a warm temporal cache, as it does streaming a long video);
``--decoder-minutes`` then trains the decoder alone on whole clips (the repair of a model whose VAE saw short
clips only). Phase 2 encodes the pool once
(posterior means), normalises latents per channel (the statistics go into the VAE config, where
``SelfForcingPipeline`` reads them) and trains the text encoder and the transformer jointly by flow matching
with teacher forcing, chunk by chunk: a sequence holds ``n`` clean context chunks (timestep 0, as the cache's
clean pass) and one noisy target chunk, under a block-causal mask (a chunk sees itself and the chunks before
it), with RoPE positions continuing across chunks exactly as in the cached rollout. The loss is on the target
chunk only. Noise levels are uniform in s warped by the sampler's shift (as the sampler visits them); context
latents get a little noise so the model tolerates its own imperfect past; a tenth of the prompts are dropped
(empty) so classifier-free guidance has an unconditional model. The learning rate warms up, then decays
linearly to a tenth by the end of the time budget, and the weights sampled and saved are an exponential moving
average (decay 0.999). Phase 3 tries Euler samplers (step counts) and guidance scales on four one-colour prompts
(three seeds each) and saves the best (see :func:`sample_check`) as the pipeline's scheduler and default guidance.

Everything is seeded. Writes the pipeline folder (fp16 safetensors), ``training_log.json``, ``loss.png`` and
``samples/``; ``--tar PATH`` also writes one tar of the folder (a GPU run returns a few files only: send the
tar).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CHUNK = 3  # latent frames per chunk, as the pipeline
AUTOCAST = torch.cuda.is_available() or os.environ.get("GENKV_TRAIN_AUTOCAST") == "1"  # bf16 autocast
SIGMAS = (1.0, 0.9375, 0.8333333, 0.625)  # SelfForcingScheduler's warped steps
# The sprite model's clips (the generator's own defaults are all three backgrounds, radius 0.09-0.16): the evals
# that compare against the model's data (vae_drift, prompt_following, tune_decoder) draw theirs the same way.
TRAINING_BACKGROUNDS = ("plain",)
TRAINING_RADIUS = (0.13, 0.21)


def _clip(args: tuple[int, int, int, tuple[str, ...], tuple[float, float], int]) -> tuple[np.ndarray, str]:
    from genkv.data import make_video

    seed, frames, max_objects, backgrounds, radius, room_frames = args
    video = make_video(seed, frames, max_objects=max_objects, backgrounds=backgrounds, radius=radius,
                       room_frames=room_frames)
    return video.frames, video.prompt


def make_pool(n: int, frames: int, seed: int, workers: int, max_objects: int = 3,
              backgrounds: tuple[str, ...] = ("plain", "checker", "stripes"),
              radius: tuple[float, float] = (0.09, 0.16), room_frames: int = 0) -> tuple[np.ndarray, list[str]]:
    jobs = [(seed * 1_000_003 + i, frames, max_objects, tuple(backgrounds), tuple(radius), room_frames)
            for i in range(n)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            out = list(pool.map(_clip, jobs, chunksize=32))
    else:
        out = [_clip(j) for j in jobs]
    return np.stack([o[0] for o in out]), [o[1] for o in out]


def build_tokenizer():
    """A word-level tokenizer over the sprite grammar (saved with the pipeline; no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from genkv.data import vocabulary

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_models(vocab_size: int, small: bool, spatial: int = 4, layers: int = 8):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    text_dim = 64
    # 4x spatial (16x16 latents at 64x64, 12x compression) trains to a sharp reconstruction in minutes; the
    # first run's 8x VAE (48x compression) reached only 18 dB with washed-out colours.
    levels = {4: ([1, 2, 2], [True, True]), 8: ([1, 2, 2, 2], [False, True, True])}
    if spatial not in levels:
        raise ValueError(f"--spatial must be 4 or 8, got {spatial}")
    dim_mult, temporal = levels[spatial]
    vae = AutoencoderKLWan(base_dim=8 if small else 32, z_dim=16, dim_mult=dim_mult, num_res_blocks=1,
                           temperal_downsample=temporal, scale_factor_spatial=spatial)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size, d_model=text_dim, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0))
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2 if small else 4, attention_head_dim=16 if small else 48,
        in_channels=16, out_channels=16, text_dim=text_dim, freq_dim=256, ffn_dim=64 if small else 768,
        num_layers=2 if small else layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024)
    return vae, text_encoder, transformer


def to_video_tensor(frames: np.ndarray, device) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 → (B, 3, T, H, W) in [-1, 1]."""
    x = torch.from_numpy(frames).to(device, non_blocking=True).permute(0, 4, 1, 2, 3).float()
    return x / 127.5 - 1.0


class BlockCausalSelfAttn:
    """Wraps the stock Wan processor and hands it the block-causal mask of the current training sequence."""

    def __init__(self, inner, holder: dict) -> None:
        self.inner, self.holder = inner, holder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, self.holder["mask"], rotary_emb)


def train_vae(vae, pool: np.ndarray, args, device, log: list) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    deadline = time.time() + args.vae_minutes * 60
    step = 0
    vae.train()
    while time.time() < deadline and (args.max_steps is None or step < args.max_steps):
        idx = rng.integers(0, len(pool), args.vae_batch)
        # Short clips train fast (the first run's 17-frame clips took 0.4 s a step), but a causal VAE trained
        # only on 9-frame clips never decodes from a warm temporal cache and drifts on long videos (runs 3-5:
        # 13 dB by frame 45). Every other step takes a whole clip, from its first frame, as the stream runs.
        if step % 2 and args.vae_clip_frames < pool.shape[1]:
            start = int(rng.integers(0, pool.shape[1] - args.vae_clip_frames + 1))
            x = to_video_tensor(pool[idx, start : start + args.vae_clip_frames], device)
        else:
            x = to_video_tensor(pool[idx[: max(1, args.vae_batch // 3)]], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=AUTOCAST):
            posterior = vae.encode(x).latent_dist
            z = posterior.sample()
            recon = vae.decode(z).sample
        recon = recon.float()
        kl = posterior.kl().mean() / x[0].numel()
        loss = reconstruction_loss(recon, x, args.sprite_weight) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            psnr = 10 * math.log10(4.0 / max(F.mse_loss(recon.detach(), x).item(), 1e-12))
            log.append({"phase": "vae", "step": step, "time": time.time(), "loss": loss.item(), "psnr": psnr})
            print(f"vae step {step:5d} loss {loss.item():.4f} recon PSNR {psnr:.2f} dB", flush=True)
        step += 1
    vae.eval()


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, sprite_weight: float = 1.0,
                        edge_weight: float = 0.0) -> torch.Tensor:
    """L1 + MSE, with the sprites' pixels weighted ``sprite_weight`` times the background's, plus ``edge_weight``
    times :func:`edge_loss`.

    Why: sprites cover ~5% of a frame, so a plain mean lets the decoder trade their colour for the dark background.
    The shipped VAE (runs 5-6) reached 20 dB yet decoded a green sprite (40, 200, 60) as (48, 110, 52) over the
    first frames and (47, 38, 45) by frame 40 (blue and yellow faded too): the prompt-following measure could not
    see green even in the data's own round trip. The latents do carry the colour (a decoder fine-tune alone brings
    it back), so the decoder can be repaired without retraining the transformer. A sprite pixel is one whose
    brightest channel is above 0.2 (153 of 255): backgrounds are dark (every channel below 80), sprites are not.
    """
    if sprite_weight == 1.0:
        loss = (recon - x).abs().mean() + F.mse_loss(recon, x)
    else:
        weight = 1.0 + (sprite_weight - 1.0) * sprite_pixels(x).unsqueeze(1).to(x.dtype)
        weight = weight / weight.mean()  # the loss keeps its scale: a re-weighting, not a larger learning rate
        loss = ((recon - x).abs() * weight).mean() + ((recon - x).square() * weight).mean()
    return loss + edge_weight * edge_loss(recon, x) if edge_weight else loss


def edge_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean |difference| of the horizontal and vertical pixel steps of ``recon`` and ``x`` (B, 3, T, H, W), per
    colour channel.

    Why: L1 and MSE on pixels are met best, where the decoder is unsure of an edge's place, by a ramp across it,
    so the shipped VAE round-trips its training clips at edge energy 96 against their 207 (BENCHMARKS,
    twenty-first). A ramp's steps are small where the clip's one step is large, so matching the steps themselves
    pays for the edge; per channel, so a red core with green fringes (a yellow sprite's R and G misplaced) costs
    on both channels. Measured (BENCHMARKS, twenty-fourth: two 4.5-minute decoder fine-tunes of v6's VAE side by
    side, weight 1 against 0): it did not raise edge energy (round trip 106 against 110, renders 142 against 148)
    but lowered stray green and blue; v7 ships the decoder trained without it. Default 0.

    Example:
        >>> import torch
        >>> x = torch.zeros(1, 3, 1, 4, 4); x[..., 2:] = 1.0                  # a vertical edge
        >>> ramp = torch.zeros(1, 3, 1, 4, 4); ramp[..., 1:] = torch.tensor([1 / 3, 2 / 3, 1.0])
        >>> edge_loss(x, x).item(), round(edge_loss(ramp, x).item(), 4)
        (0.0, 0.2222)
    """
    dx = (recon.diff(dim=-1) - x.diff(dim=-1)).abs().mean()
    dy = (recon.diff(dim=-2) - x.diff(dim=-2)).abs().mean()
    return (dx + dy) / 2


def sprite_pixels(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W) mask of the sprites' pixels in videos ``x`` (B, 3, T, H, W) in [-1, 1] (see reconstruction_loss)."""
    return x.amax(dim=1) > 0.2


def sprite_rgb_error(recon: torch.Tensor, x: torch.Tensor) -> float | None:
    """Mean |dR| + |dG| + |dB| (0-255 levels) of ``recon`` against ``x`` (B, 3, T, H, W in [-1, 1]) over the
    sprites' pixels; None where ``x`` has none."""
    sprite = sprite_pixels(x)
    if not sprite.any():
        return None
    return (recon.detach() - x).abs().sum(1)[sprite].mean().item() * 127.5


def finetune_decoder(vae, pool: np.ndarray, args, device, log: list) -> None:
    """Train the decoder alone on whole clips, the encoder frozen.

    Why: until run 5 the VAE phase trained on 9-frame clips only, so the causal decoder only ever decoded from a
    cold temporal cache; streaming a long video it runs warm, and it drifted (reconstruction of a 45-frame clip
    fell from 25 dB over the first 9 frames to 13 dB at frame 45: a blue cast, washed colours). The encoder is
    left as it is, so the latents a transformer was trained on keep their meaning and a trained model can be
    repaired in minutes.
    """
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed + 1)
    deadline = time.time() + args.decoder_minutes * 60
    step = 0
    vae.train()
    while time.time() < deadline and (args.max_steps is None or step < args.max_steps):
        x = to_video_tensor(pool[rng.integers(0, len(pool), args.vae_batch)], device)  # whole clips
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=AUTOCAST):
            with torch.no_grad():
                # Sampled (noise 1), as in the VAE phase: slack for generated latents. The posterior's std is as
                # large as the means' own spread in some channels (sprites-vae-v3), so --decoder-noise below 1
                # trains nearer the means the transformer learned (a short CPU A/B of 0 vs 1 in tune_decoder.py:
                # no consistent difference yet).
                posterior = vae.encode(x).latent_dist
                z = posterior.mean + args.decoder_noise * posterior.std * torch.randn_like(posterior.std)
            recon = vae.decode(z).sample
        recon = recon.float()
        loss = reconstruction_loss(recon, x, args.sprite_weight, args.edge_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0:
            err = (recon.detach() - x).pow(2).mean(dim=(0, 1, 3, 4))  # per frame
            psnr = [10 * math.log10(4.0 / max(e, 1e-12)) for e in err.tolist()]
            sprite_err = sprite_rgb_error(recon, x) or 0.0
            log.append({"phase": "decoder", "step": step, "time": time.time(), "loss": loss.item(),
                        "psnr_first9": sum(psnr[:9]) / 9, "psnr_last9": sum(psnr[-9:]) / 9,
                        "sprite_rgb_error": sprite_err})
            print(f"decoder step {step:5d} loss {loss.item():.4f} PSNR frames 0-8 {log[-1]['psnr_first9']:.2f} dB, "
                  f"last 9 {log[-1]['psnr_last9']:.2f} dB, sprite |dR|+|dG|+|dB| {sprite_err:.1f}", flush=True)
        step += 1
    vae.eval()


@torch.no_grad()
def encode_pool(vae, pool: np.ndarray, device, batch: int = 64) -> torch.Tensor:
    latents = []
    for i in range(0, len(pool), batch):
        x = to_video_tensor(pool[i : i + batch], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=AUTOCAST):
            latents.append(vae.encode(x).latent_dist.mean.float())
    return torch.cat(latents)


def train_transformer(transformer, text_encoder, tokenizer, latents, prompts, args, device, log: list) -> None:
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    holder: dict = {"mask": None}
    for block in transformer.blocks:
        block.attn1.set_processor(BlockCausalSelfAttn(WanAttnProcessor(), holder))
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    tokens = tokenizer(prompts, padding="max_length", max_length=args.max_text, truncation=True,
                       return_attention_mask=True, return_tensors="pt")
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    # Classifier-free guidance needs the unconditional model too: the empty prompt, a tenth of the time.
    empty = tokenizer([""], padding="max_length", max_length=args.max_text, return_attention_mask=True,
                      return_tensors="pt")
    empty_ids, empty_mask = empty.input_ids.to(device), empty.attention_mask.to(device)
    g = torch.Generator(device="cpu").manual_seed(args.seed)  # small draws (chunk count, clip indices)
    # Noise is drawn where it is used: on the host, 1.5-6M normals a step and the copy over took longer than
    # the forward and backward of this small model (the first runs managed ~8 steps/s on an H200).
    noise_gen = torch.Generator(device=device).manual_seed(args.seed)
    latents = latents.to(device)
    # An exponential moving average of the weights is what gets sampled and saved: in a run of a few thousand
    # steps the raw weights still carry the last steps' noise (murky backgrounds, sprites that come and go).
    averaged = [p.detach().float().clone() for p in params] if args.ema else None
    tpf = (latents.shape[3] // 2) * (latents.shape[4] // 2)
    deadline = time.time() + args.minutes * 60
    step = 0
    transformer.train()
    text_encoder.train()
    start_time = time.time()
    while time.time() < deadline and (args.max_steps is None or step < args.max_steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * learning_rate_factor(step, time.time() - start_time, args)
        # Image-to-video sequences (a share ``--image-blocks`` of the steps): the clip's first latent frame, which the
        # causal VAE encodes from the first video frame alone, is a block of its own at position 0, and 3-frame
        # chunks follow from latent 1, as ``SelfForcingPipeline(image=...)`` commits an image. Without these a model
        # trained on 3-frame blocks only loses the image's sprite a few chunks on (it never saw a 1-frame block).
        lead, n_ctx = sample_context(latents.shape[2], args, g)
        idx = torch.randint(0, len(latents), (args.batch,), generator=g).to(device)
        x0 = latents[idx, :, : lead + (n_ctx + 1) * CHUNK]
        b = x0.shape[0]
        # Noise levels as the sampler visits them: uniform in s, warped by the sampling shift.
        u = torch.rand(b, generator=g).clamp(min=0.01)
        sigma = (args.sample_shift * u / (1 + (args.sample_shift - 1) * u)).to(device)
        noise = torch.randn(x0[:, :, -CHUNK:].shape, generator=noise_gen, device=device)
        target = x0[:, :, -CHUNK:]
        s = sigma.view(b, 1, 1, 1, 1)
        noisy = (1 - s) * target + s * noise
        context = x0[:, :, :-CHUNK]
        if context.shape[2]:
            aug = torch.rand(b, 1, 1, 1, 1, generator=noise_gen, device=device) * args.context_noise
            context = context + aug * torch.randn(context.shape, generator=noise_gen, device=device)
        x = torch.cat([context, noisy], dim=2)
        frames = x.shape[2]
        chunk_of_token = block_of_frame(frames, lead).to(device).repeat_interleave(tpf)
        holder["mask"] = (chunk_of_token[None, :] <= chunk_of_token[:, None])[None, None]
        timestep = torch.zeros(b, frames * tpf, device=device)
        timestep[:, (frames - CHUNK) * tpf :] = sigma.view(b, 1) * 1000
        drop = (torch.rand(b, generator=g) < args.prompt_dropout).to(device).view(b, 1)
        batch_ids = torch.where(drop, empty_ids, ids[idx])
        batch_mask = torch.where(drop, empty_mask, mask[idx])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=AUTOCAST):
            embeds = text_encoder(batch_ids, batch_mask).last_hidden_state
            embeds = embeds * batch_mask.unsqueeze(-1).to(embeds.dtype)
            flow = transformer(x, timestep, embeds, return_dict=False)[0]
        loss = F.mse_loss(flow[:, :, -CHUNK:].float(), noise - target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if averaged is not None:
            decay = min(args.ema, (1 + step) / (10 + step))  # short memory at first: no pull to the init
            torch._foreach_lerp_(averaged, [p.detach().float() for p in params], 1 - decay)
        if step % 50 == 0:
            log.append({"phase": "transformer", "step": step, "time": time.time(), "loss": loss.item(),
                        "context_chunks": n_ctx, "image_block": bool(lead), "lr": opt.param_groups[0]["lr"]})
            print(f"transformer step {step:6d} loss {loss.item():.4f} (context chunks {n_ctx})", flush=True)
        step += 1
    seconds = time.time() - start_time
    log.append({"phase": "transformer_done", "steps": step, "seconds": seconds,
                "clips_per_second": step * args.batch / max(seconds, 1e-9)})
    print(f"transformer: {step} steps in {seconds:.0f} s ({step * args.batch / max(seconds, 1e-9):.0f} clips/s)",
          flush=True)
    end_training(transformer, params, averaged)
    holder["mask"] = None
    text_encoder.eval()


def end_training(transformer, params: list, averaged: list | None) -> None:
    """The averaged weights (EMA) into ``params``, the stock attention processors back, eval mode."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    if averaged is not None:
        with torch.no_grad():
            for p, a in zip(params, averaged):
                p.copy_(a.to(p.dtype))
    for block in transformer.blocks:
        block.attn1.set_processor(WanAttnProcessor())
    transformer.eval()


def block_of_frame(frames: int, lead: int) -> torch.Tensor:
    """Block index of each latent frame of a training sequence, as the pipeline commits them: after a 1-frame image
    block (``lead=1``) 0, 1, 1, 1, 2, 2, 2, ...; without one 0, 0, 0, 1, 1, 1, ... (3-frame chunks)."""
    return (torch.arange(frames) + (CHUNK - 1) * lead) // CHUNK


def sample_context(latent_frames: int, args, g: torch.Generator) -> tuple[int, int]:
    """A step's sequence: ``(lead, n_ctx)``, a 1-latent image block or not (``--image-blocks``) and the number of
    clean context chunks before the one being denoised. ``--first-chunk-share`` S: a share S of the steps denoise
    the first chunk (no context), the rest draw ``n_ctx`` uniformly as before; unset, every chunk is equally
    likely. Only the first chunk learns a sprite's direction from the prompt alone (later ones see its motion in
    the context), and uniform draws give it a quarter of the steps at 45-frame clips.

    Example:
        >>> from types import SimpleNamespace
        >>> args = SimpleNamespace(image_blocks=0.0, first_chunk_share=1.0)
        >>> sample_context(12, args, torch.Generator().manual_seed(0))
        (0, 0)
    """
    lead = 0
    if args.image_blocks > 0 and float(torch.rand(1, generator=g)) < args.image_blocks:
        lead = 1
    chunks = (latent_frames - lead) // CHUNK
    share = getattr(args, "first_chunk_share", None)
    if share is not None and float(torch.rand(1, generator=g)) < share:
        return lead, 0
    return lead, int(torch.randint(0, chunks, (1,), generator=g))


def learning_rate_factor(step: int, elapsed: float, args) -> float:
    """Linear warm-up over 200 steps, then a linear decay to ``args.lr_final`` of the peak at the end of the run
    (the end is ``--max-steps`` when given, else the time budget: training is time-boxed)."""
    warm = min(1.0, (step + 1) / 200)
    if args.max_steps is not None:
        progress = step / max(1, args.max_steps)
    else:
        progress = elapsed / max(1e-9, args.minutes * 60)
    return warm * (1.0 - (1.0 - args.lr_final) * min(1.0, progress))


CHECK_PROMPTS = (("a red circle moving left", "red"), ("a blue square moving down", "blue"),
                 ("a yellow triangle moving right", "yellow"), ("a green circle moving up", "green"))


@torch.no_grad()
def sample_check(pipe, device, guidance_scale: float, frames_out: Path | None = None, seeds: int = 3) -> dict:
    """Does sampling follow the prompt? For each check prompt (one colour each), the share of pixels near each
    check colour over 48 frames, averaged over ``seeds`` seeds (one seed per prompt told two samplers apart by
    luck). A sprite of radius 6-10 px covers 3-8% of a 64x64 frame. A prompt's margin is the share of its colour
    minus the most that colour shows in a video that asked for another: gray mush scores 0, and so does noise full
    of every colour. The score is the mean margin (the second run's samplers all failed on yellow, so the worst
    margin could not tell them apart); ``worst`` is the smallest."""
    from genkv.data import COLORS
    from genkv.metrics.persistence import colour_tracks

    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    colours = [c for _, c in CHECK_PROMPTS]
    shares = {}
    for prompt, colour in CHECK_PROMPTS:
        shares[colour] = dict.fromkeys(colours, 0.0)
        strips = []
        for seed in range(seeds):
            video = pipe(prompt=prompt, num_frames=48, output_type="np", guidance_scale=guidance_scale,
                         generator=torch.Generator(device=device).manual_seed(seed)).frames[0]
            frames = (np.asarray(video) * 255).round().clip(0, 255).astype(np.uint8)
            tracks = colour_tracks(frames, {c: COLORS[c] for c in colours})
            for c in colours:
                shares[colour][c] += float(tracks[c]["area"].mean() / (frames.shape[1] * frames.shape[2])) / seeds
            strips.append(np.concatenate(list(frames[::6]), axis=1))  # every 6th frame
        if frames_out is not None:  # one row per seed, for the model card
            frames_out.mkdir(parents=True, exist_ok=True)
            import imageio.v3 as iio

            iio.imwrite(frames_out / f"{colour}.png", np.concatenate(strips, axis=0))
    margins = {c: shares[c][c] - max(shares[o][c] for o in colours if o != c) for c in colours}
    return {"shares": shares, "margins": margins, "score": sum(margins.values()) / len(margins),
            "worst": min(margins.values())}


def plot_loss(log: list, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, phase, key in ((axes[0], "vae", "psnr"), (axes[1], "transformer", "loss")):
        rows = [r for r in log if r["phase"] == phase]
        ax.plot([r["step"] for r in rows], [r[key] for r in rows])
        ax.set_title(f"{phase}: {'reconstruction PSNR (dB)' if key == 'psnr' else 'flow-matching loss'}")
        ax.set_xlabel("step")
        if key == "loss":
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=4.0, help="transformer training time")
    parser.add_argument("--vae-minutes", type=float, default=2.0)
    parser.add_argument("--pool", type=int, default=3072, help="sprite clips generated up front")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--vae-batch", type=int, default=24)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--lr-final", type=float, default=0.1, help="learning rate at the end, as a share of --lr")
    parser.add_argument("--ema", type=float, default=0.999, help="weight averaging decay (0: none)")
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-clip-frames", type=int, default=9, help="short VAE clips (every other step)")
    parser.add_argument("--clip-frames", type=int, default=45,
                        help="frames of each pool clip (12k - 3: 45 = 4 chunks, 105 = 9 chunks): the VAE's whole-clip "
                        "steps, the decoder repair and the transformer's longest context run this long")
    parser.add_argument("--decoder-minutes", type=float, default=0.0,
                        help="then train the VAE decoder alone on whole clips (encoder frozen; see finetune_decoder)")
    parser.add_argument("--decoder-lr", type=float, default=3e-4)
    parser.add_argument("--decoder-noise", type=float, default=1.0,
                        help="posterior noise in the decoder phase's latents, as a share of its std (1: samples, "
                        "0: the means, as the transformer learned them)")
    parser.add_argument("--sprite-weight", type=float, default=1.0,
                        help="weight of sprite pixels against the background in the VAE / decoder loss")
    parser.add_argument("--edge-weight", type=float, default=0.0,
                        help="weight of the pixel-step (edge) term in the decoder fine-tune's loss (edge_loss)")
    parser.add_argument("--context-noise", type=float, default=0.1)
    parser.add_argument("--image-blocks", type=float, default=0.0,
                        help="share of steps whose sequence starts with a 1-latent image block (image-to-video)")
    parser.add_argument("--first-chunk-share", type=float, default=None,
                        help="share of steps that denoise a clip's first chunk, from the prompt alone (default: "
                        "every chunk equally often)")
    parser.add_argument("--max-text", type=int, default=32)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler-steps", type=int, nargs="+", default=[32],
                        help="Euler step counts tried after training; the best (by the sample check) is saved")
    parser.add_argument("--guidance", type=float, nargs="+", default=[2.0, 3.0, 4.5],
                        help="guidance scales tried after training; the best is saved as the model's default")
    parser.add_argument("--sample-shift", type=float, default=2.0,
                        help="noise-level warp shared by training and the saved sampler")
    parser.add_argument("--prompt-dropout", type=float, default=0.1)
    parser.add_argument("--spatial", type=int, default=4, help="VAE spatial factor: 4 or 8")
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks")
    parser.add_argument("--max-objects", type=int, default=2)
    parser.add_argument("--backgrounds", nargs="+", default=list(TRAINING_BACKGROUNDS), help="plain, checker, stripes")
    # Larger sprites than genkv.data's default (0.09-0.16): a sprite's colour is what the prompt decides, and at
    # 3-8% of the pixels it weighed too little in the loss (runs 3-4 drew the asked colour in few samples).
    parser.add_argument("--radius", type=float, nargs=2, default=list(TRAINING_RADIUS), metavar=("LOW", "HIGH"),
                        help="sprite radius range as fractions of the frame")
    # A clip's prompt says "moving left"; a sprite drawn at uniform positions starts near the wall it heads for
    # often enough that the training data's own first second moves the asked way in only 0.70 of its sprites
    # (eval/prompt_following.py's data column): three sprites in ten move against their prompt there.
    parser.add_argument("--room-frames", type=int, default=0,
                        help="clips start where each sprite travels this many frames the asked way before a wall "
                             "(genkv.data.sample_scene's room_frames; 0: uniform starts, as v1-v4 were trained)")
    parser.add_argument("--smoke", action="store_true", help="tiny models and pool, a few steps (CPU check)")
    parser.add_argument("--tar", type=Path, default=None, help="also write the folder as one tar here")
    parser.add_argument("--vae-from", type=Path, default=None,
                        help="start from this trained VAE (a folder or tar holding vae/); --vae-minutes 0 keeps it")
    parser.add_argument("--stop-after-vae", action="store_true", help="save the VAE (out/vae) and stop")
    parser.add_argument("--resume-from", type=Path, default=None,
                        help="continue training a model this script saved (folder or tar); its VAE is kept")
    parser.add_argument("--check-seeds", type=int, default=3, help="seeds per prompt in the sample check")
    args = parser.parse_args(argv)
    if args.room_frames < 0:
        parser.error(f"--room-frames {args.room_frames}: frames of travel before a wall must be >= 0")
    if args.clip_frames < 9 or (args.clip_frames + 3) % (4 * CHUNK):
        parser.error(f"--clip-frames {args.clip_frames}: a clip must be whole chunks of {CHUNK} latent frames, "
                     f"12k - 3 video frames (9, 21, 45, 105, ...)")
    if args.first_chunk_share is not None and not 0 <= args.first_chunk_share <= 1:
        parser.error(f"--first-chunk-share {args.first_chunk_share}: a share of the steps, between 0 and 1")
    if args.smoke:
        args.pool, args.batch, args.vae_batch, args.check_seeds = 16, 4, 2, 1
        args.max_steps = args.max_steps or 3
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    t0 = time.time()
    # Forked workers first, before anything touches CUDA.
    pool, prompts = make_pool(args.pool, args.clip_frames, args.seed, workers=min(16, os.cpu_count() or 1),
                              max_objects=args.max_objects, backgrounds=tuple(args.backgrounds),
                              radius=tuple(args.radius), room_frames=args.room_frames)
    print(f"pool: {pool.shape} in {time.time() - t0:.1f} s", flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    from genkv.pipelines import SelfForcingPipeline, SelfForcingScheduler
    from genkv.pipelines.self_forcing.numerics import apply_self_forcing_numerics

    if args.resume_from is not None:  # continue a saved model: its VAE and latent statistics stay as they are
        tokenizer, text_encoder, transformer, vae = load_pipeline_parts(args.resume_from)
        args.vae_minutes = 0
    else:
        tokenizer = build_tokenizer()
        vae, text_encoder, transformer = build_models(len(tokenizer), args.smoke, args.spatial, args.layers)
    apply_self_forcing_numerics(transformer)  # train with the numerics the pipeline samples with
    if args.vae_from is not None:
        vae = load_vae(args.vae_from)
    vae.to(device)
    log: list = []
    train_vae(vae, pool, args, device, log)
    if args.decoder_minutes > 0:
        finetune_decoder(vae, pool, args, device, log)
    if args.stop_after_vae:
        vae.to("cpu").save_pretrained(args.out / "vae", safe_serialization=True)
        finish(args, log, t0, device)
        return 0
    if args.resume_from is not None and args.minutes == 0:  # a VAE-only repair of a saved model
        del pool
        text_encoder.to(device)
        transformer.to(device)
    else:
        latents = encode_pool(vae, pool, device)
        if args.resume_from is not None:
            mean, std = (torch.tensor(vae.config[k], device=latents.device) for k in ("latents_mean", "latents_std"))
        else:
            mean = latents.mean(dim=(0, 2, 3, 4))
            std = latents.std(dim=(0, 2, 3, 4)).clamp(min=1e-4)
            vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
        latents = (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)  # stays on the device
        print(f"latents: {tuple(latents.shape)}, {time.time() - t0:.1f} s", flush=True)
        log.append({"phase": "latents", "clips": latents.shape[0], "clip_frames": args.clip_frames,
                    "latent_frames": latents.shape[2], "chunks": latents.shape[2] // CHUNK})
        del pool
        text_encoder.to(device)
        transformer.to(device)
        train_transformer(transformer, text_encoder, tokenizer, latents, prompts, args, device, log)

    # Save first (the default sampler: the first --scheduler-steps and the middle --guidance), so that a run cut
    # short by a device's time limit during the sample check still returns the weights (run 4 lost its model).
    def make_pipe(steps: int, guidance: float):
        step_list = tuple(round(1000 - i * 1000 / steps) for i in range(steps))
        scheduler = SelfForcingScheduler(denoising_step_list=step_list, shift=args.sample_shift, sampler="euler")
        return SelfForcingPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                                   vae=vae, scheduler=scheduler, default_height=64, default_width=64,
                                   max_sequence_length=args.max_text, default_guidance_scale=guidance)

    chosen = (args.scheduler_steps[0], args.guidance[len(args.guidance) // 2])
    save_pipeline(make_pipe(*chosen), args)
    finish(args, log, t0, device)
    # Pick the sampler by the sample check: Euler steps x guidance scale, the best mean colour margin.
    best = None
    for steps in args.scheduler_steps:
        for guidance in args.guidance:
            pipe = make_pipe(steps, guidance)
            check = sample_check(pipe, device, guidance, seeds=args.check_seeds,
                                 frames_out=args.out / "samples" / f"steps{steps}-guidance{guidance:g}")
            log.append({"phase": "check", "steps": steps, "guidance": guidance, **check})
            print(f"sample check: {log[-1]}", flush=True)
            if best is None or check["score"] > best[0]:
                best = (check["score"], steps, guidance)
    chosen = best[1:]
    log.append({"phase": "chosen", "steps": chosen[0], "guidance": chosen[1]})
    save_pipeline(make_pipe(*chosen), args)
    finish(args, log, t0, device)
    return 0


def save_pipeline(pipe, args) -> None:
    """The pipeline folder: fp16 weights on the CPU (the text encoder stays float32: tiny, and exact on a CPU)."""
    device = pipe.transformer.device
    pipe.to("cpu", torch.float16)
    pipe.text_encoder.to(torch.float32)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    pipe.to(device, torch.float32)  # the sample check goes on in float32 under autocast, as before


def unpack(source: Path, marker: str, flag: str) -> Path:
    """The folder holding ``marker`` inside ``source`` (a folder, or a tar that is extracted to a temporary
    folder): how the device's single-archive outputs come back in."""
    if source.is_file() and tarfile.is_tarfile(source):
        import tempfile

        target = Path(tempfile.mkdtemp(prefix="genkv-train-"))
        with tarfile.open(source) as tar:
            tar.extractall(target, filter="data")
        found = sorted(target.rglob(marker), key=lambda p: len(p.parts))
        if not found:
            raise SystemExit(f"{flag} {source}: the tar holds no {marker}")
        return found[0].parent.parent if "/" in marker else found[0].parent
    return source


def load_vae(source: Path):
    """A trained ``AutoencoderKLWan`` from a folder holding ``vae/`` (or the VAE folder itself), or a tar of one."""
    from diffusers import AutoencoderKLWan

    source = unpack(source, "vae/config.json", "--vae-from")
    folder = source / "vae" if (source / "vae" / "config.json").is_file() else source
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--vae-from {source}: no vae/config.json there; pass the output of --stop-after-vae")
    return AutoencoderKLWan.from_pretrained(folder, torch_dtype=torch.float32)


def load_pipeline_parts(source: Path):
    """Tokenizer, text encoder, transformer and VAE of a saved model (``--resume-from``), in float32."""
    from genkv.pipelines import SelfForcingPipeline
    from genkv.pipelines.self_forcing.fused_block import remove_fused_blocks

    folder = unpack(source, "model_index.json", "--resume-from")
    if not (folder / "model_index.json").is_file():
        raise SystemExit(f"--resume-from {source}: no model_index.json there; pass a folder this script saved")
    pipe = SelfForcingPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    # The pipeline patches its blocks with the fused inference kernels (CUDA, half precision: under training's
    # autocast too), which have no backward: training needs diffusers' own forward back.
    remove_fused_blocks(pipe.transformer)
    return pipe.tokenizer, pipe.text_encoder, pipe.transformer, pipe.vae


def finish(args, log: list, t0: float, device) -> None:
    """Training log, loss plot and (with ``--tar``) one tar of the output folder."""
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"seconds": time.time() - t0, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}, "log": log}
    (args.out / "training_log.json").write_text(json.dumps(summary, indent=1))
    plot_loss(log, args.out / "loss.png")
    if args.tar is not None:
        args.tar.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.tar, "w") as tar:
            tar.add(args.out, arcname=args.out.name)
    print(f"saved {args.out}{f' and {args.tar}' if args.tar else ''} in {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
