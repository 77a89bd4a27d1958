"""Building blocks of fastrlhf/models/decoder.py: rope.py (RoPE scaling kinds), attention.py (flash / SDPA / eager),
checkpoint.py (HF safetensors folders in and out). Import the model from ``fastrlhf.models.decoder``."""
