"""Loading pretrained checkpoints into `LoLALM` parameters.

- `hf`: Hugging Face Llama checkpoints (safetensors + config.json), optional LoLCATs maps.
- `gguf`: llama.cpp GGUF files of Llama models (dequantised to float32), optional linearised
  feature maps and gates.
- `gguf_tokenizer`: the byte-level BPE tokenizer and chat template a GGUF describes.
"""

from lola_jax.convert.gguf import apply_feature_maps, load_gguf_llama
from lola_jax.convert.gguf_tokenizer import ChatTemplate, gguf_chat_template, gguf_tokenizer
from lola_jax.convert.hf import hf_model_config, load_hf_llama, read_hf_config, read_lolcats

__all__ = [
  "ChatTemplate",
  "apply_feature_maps",
  "gguf_chat_template",
  "gguf_tokenizer",
  "hf_model_config",
  "load_gguf_llama",
  "load_hf_llama",
  "read_hf_config",
  "read_lolcats",
]
