"""Hugging Face transformers interoperability: ``hilt export`` writes a folder that ``AutoModelForCausalLM``,
``AutoTokenizer``, ``generate()`` and ``pipeline("text-generation")`` load offline (docs/huggingface.md).

Importing this package registers HiltConfig and HiltForCausalLM with the Auto classes, so an exported folder
also loads without ``trust_remote_code`` wherever HILT is installed. Without transformers (an optional
dependency) only ``hilt.hf.export.load_exported``, folder -> HILT model, works.
"""

try:
    import transformers  # noqa: F401
except ImportError:
    TRANSFORMERS = False
else:
    TRANSFORMERS = True

if TRANSFORMERS:
    from transformers import AutoConfig, AutoModelForCausalLM

    from .configuration_hilt import HiltConfig
    from .modeling_hilt import HiltForCausalLM

    AutoConfig.register(HiltConfig.model_type, HiltConfig, exist_ok=True)
    AutoModelForCausalLM.register(HiltConfig, HiltForCausalLM, exist_ok=True)

__all__ = ["HiltConfig", "HiltForCausalLM", "TRANSFORMERS"]
