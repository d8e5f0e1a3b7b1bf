"""The embedded `tiny` model: a real StableDiffusionPipeline with random weights, built in
code so that every laptop and CI box can run the whole daemon with no download.

Random but fixed weights make output a deterministic function of (prompt, seed): the
pictures are noise-like, but they exercise the real tokenizer, text encoder, UNet,
scheduler, VAE and PNG path. The VAE has four blocks (scale factor 8, as real Stable
Diffusion): a 64x64 image runs the UNet on 8x8 latents, which keeps it near 0.04 s per
image at 2 steps on 2 CPU cores; a 2-block VAE would quadruple the latent area.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from meltguard.inference.loading import stage, text_to_image_pipeline, untyped_diffusers

TINY_NAME = "tiny"
TINY_WEIGHT_SEED = 0
TINY_TEXT_LENGTH = 77  # CLIP's context length; prompts are padded to it as in real SD

# A handful of merges so the BPE actually merges something; every byte is in the vocab,
# so any prompt tokenizes without unknown tokens.
_MERGES = ("t h", "th e</w>", "c a", "ca t</w>", "a n", "an d</w>", "i n", "in g</w>")


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte-to-unicode table: the symbols byte-level BPE works on."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def tiny_vocab() -> dict[str, int]:
    symbols = _byte_symbols()
    tokens = ["<|startoftext|>", "<|endoftext|>", *symbols, *(s + "</w>" for s in symbols)]
    tokens += ["".join(merge.split()) for merge in _MERGES]
    return {token: index for index, token in enumerate(tokens)}


def _write_tokenizer_files(folder: Path, vocab: dict[str, int]) -> None:
    # Files rather than in-memory arguments: from_pretrained on a folder is the one
    # CLIPTokenizer constructor that behaves the same in transformers 4 and 5.
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", "utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": TINY_TEXT_LENGTH}), encoding="utf-8"
    )


def build_tiny_pipeline(seed: int = TINY_WEIGHT_SEED) -> Any:
    """Build the tiny StableDiffusionPipeline on the CPU in fp32; the caller moves it.

    The global torch RNG is forked, so building the model does not disturb anyone else's
    random stream (and nobody else's draws change the weights).
    """
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    diffusers = untyped_diffusers()

    vocab = tiny_vocab()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with stage(TINY_NAME, "tokenizer"), tempfile.TemporaryDirectory() as folder:
            _write_tokenizer_files(Path(folder), vocab)
            tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        with stage(TINY_NAME, "text_encoder"):
            config = CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                max_position_embeddings=TINY_TEXT_LENGTH,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
            )
            text_encoder: Any = CLIPTextModel(config)
            text_encoder.eval()
        with stage(TINY_NAME, "unet"):
            unet = diffusers.UNet2DConditionModel(
                sample_size=8,
                in_channels=4,
                out_channels=4,
                block_out_channels=(32, 64),
                layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=32,
                attention_head_dim=(2, 4),
                norm_num_groups=32,
            ).eval()
        with stage(TINY_NAME, "vae"):
            vae = diffusers.AutoencoderKL(
                sample_size=64,
                in_channels=3,
                out_channels=3,
                latent_channels=4,
                block_out_channels=(32, 64, 64, 64),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=1,
                norm_num_groups=32,
            ).eval()
    with stage(TINY_NAME, "scheduler"):
        # Euler: one UNet call per step and no noise after the first latents, so the seed
        # alone fixes the picture.
        scheduler = diffusers.EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        )
        pipeline = text_to_image_pipeline(diffusers, vae, text_encoder, tokenizer, unet,
                                          scheduler)
    return pipeline
