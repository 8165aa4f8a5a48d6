"""Loading pretrained checkpoints into `LoLALM` parameters.

  hf    Hugging Face Llama checkpoints (safetensors + config.json), optional LoLCATs feature maps.
"""

from lola_jax.convert.hf import hf_model_config, load_hf_llama, read_hf_config, read_lolcats

__all__ = ["hf_model_config", "load_hf_llama", "read_hf_config", "read_lolcats"]
