"""Tiny pipelines of other model families, built in code from diffusers' and transformers'
configs with random weights and saved as diffusers folders, so tests can serve them with
`--model PATH`: an SDXL-style one (two CLIP text encoders, a UNet with SDXL's added time
embedding) and an SD3-style one (an MMDiT transformer and flow matching; SD3 runs without its
optional T5 encoder, so no sentencepiece tokenizer is needed)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from meltguard.inference.loading import untyped_diffusers
from meltguard.inference.tiny import (
    TINY_TEXT_LENGTH,
    _write_tokenizer_files,
    build_tiny_pipeline,
    tiny_vocab,
)

CLIP_WIDTH = 32


def _tokenizer() -> Any:
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        _write_tokenizer_files(Path(folder), tiny_vocab())
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _clip_config() -> Any:
    from transformers import CLIPTextConfig

    vocab = tiny_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=CLIP_WIDTH, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, projection_dim=CLIP_WIDTH,
        max_position_embeddings=TINY_TEXT_LENGTH, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    )


def _vae(diffusers: Any, latent_channels: int = 4, **extra: Any) -> Any:
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, sample_size=64,
        block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=32,
        **extra,
    ).eval()


def build_sdxl(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    diffusers = untyped_diffusers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        time_dim = 8
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=time_dim, transformer_layers_per_block=(1, 1),
            # Six time ids (original size, crop, target size) and the pooled text embedding.
            projection_class_embeddings_input_dim=6 * time_dim + CLIP_WIDTH,
            cross_attention_dim=2 * CLIP_WIDTH, norm_num_groups=32,
        ).eval()
        pipeline = diffusers.StableDiffusionXLPipeline(
            vae=_vae(diffusers), text_encoder=CLIPTextModel(_clip_config()).eval(),
            text_encoder_2=CLIPTextModelWithProjection(_clip_config()).eval(),
            tokenizer=_tokenizer(), tokenizer_2=_tokenizer(), unet=unet,
            scheduler=diffusers.EulerDiscreteScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, timestep_spacing="leading"),
        )
    pipeline.save_pretrained(folder)
    return folder


def build_sd3(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPTextModelWithProjection

    diffusers = untyped_diffusers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = diffusers.SD3Transformer2DModel(
            # SD3's 16 latent channels: its inpainting pipeline checks for them.
            sample_size=8, patch_size=1, in_channels=16, out_channels=16, num_layers=1,
            attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
            joint_attention_dim=CLIP_WIDTH, pooled_projection_dim=2 * CLIP_WIDTH,
        ).eval()
        pipeline = diffusers.StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            vae=_vae(diffusers, latent_channels=16, shift_factor=0.0609, scaling_factor=1.5035,
                     use_quant_conv=False, use_post_quant_conv=False),
            text_encoder=CLIPTextModelWithProjection(_clip_config()).eval(),
            tokenizer=_tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(_clip_config()).eval(),
            tokenizer_2=_tokenizer(),
            text_encoder_3=None,
            tokenizer_3=None,
        )
    pipeline.save_pretrained(folder)
    return folder


def build_lcm(folder: Path) -> Path:
    """The tiny model's parts as a Latent Consistency Model pipeline: a family diffusers has
    an image-to-image pipeline for but no inpainting one, so a server of it must refuse
    masked edits by name."""
    import torch

    diffusers = untyped_diffusers()
    parts = build_tiny_pipeline()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # LCM feeds its guidance scale to the UNet as an embedding of this width.
        unet = diffusers.UNet2DConditionModel.from_config(parts.unet.config,
                                                          time_cond_proj_dim=32).eval()
    pipeline = diffusers.LatentConsistencyModelPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
        unet=unet, scheduler=diffusers.LCMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return folder
