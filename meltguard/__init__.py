"""meltguard: GPU-aware admission control for OpenAI-compatible image generation."""

__version__ = "0.1.0"
