"""llava_ext: LLaVA as native Hugging Face Transformers classes.

Importing the package registers its classes with transformers' Auto classes and marks them for `auto_map`, so a
saved checkpoint carries its own code and loads with `trust_remote_code=True` where llava_ext is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from .configuration_llava_ext import LlavaExtConfig
from .modeling_llava_ext import (
    LlavaExtForConditionalGeneration,
    LlavaExtModel,
    LlavaExtMultiModalProjector,
    LlavaExtPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register(LlavaExtConfig.model_type, LlavaExtConfig, exist_ok=True)
AutoModel.register(LlavaExtConfig, LlavaExtModel, exist_ok=True)
AutoModelForImageTextToText.register(LlavaExtConfig, LlavaExtForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(LlavaExtConfig, LlavaExtForConditionalGeneration, exist_ok=True)

LlavaExtConfig.register_for_auto_class()
LlavaExtModel.register_for_auto_class("AutoModel")
LlavaExtForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "LlavaExtConfig",
    "LlavaExtForConditionalGeneration",
    "LlavaExtModel",
    "LlavaExtMultiModalProjector",
    "LlavaExtPreTrainedModel",
]
