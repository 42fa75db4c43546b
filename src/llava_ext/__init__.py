"""llava_ext: LLaVA as native Hugging Face Transformers classes.

Importing the package registers its classes with transformers' Auto classes and marks them for `auto_map`, so a
saved checkpoint carries its own code and loads with `trust_remote_code=True` where llava_ext is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from .chat import ChatSession, ContextFullError
from .compat import AutoImageProcessor, auto_model_classes_for, register_stock_checkpoint_layout
from .configuration_llava_ext import LlavaExtConfig
from .image_processing_llava_ext import LlavaExtImageProcessor
from .modeling_llava_ext import (
    ImageTokenMismatchError,
    LlavaExtForConditionalGeneration,
    LlavaExtModel,
    LlavaExtMultiModalProjector,
    LlavaExtPreTrainedModel,
)
from .processing_llava_ext import LlavaExtProcessor
from .vision import STOCK_TOWER_NAMES

__version__ = "0.1.0"

AutoConfig.register(LlavaExtConfig.model_type, LlavaExtConfig, exist_ok=True)
# Every Auto class transformers' own llava is registered under in this release (AutoModel, AutoModelForImageTextToText,
# AutoModelForMultimodalLM, AutoModelForPreTraining, ...), so pipelines and tools that pick a model through those
# tables find ours; AutoModelForCausalLM too, for tools that only know causal LMs.
for _auto_class in {*auto_model_classes_for("llava"), AutoModelForImageTextToText, AutoModelForCausalLM}:
    _auto_class.register(
        LlavaExtConfig, LlavaExtModel if _auto_class is AutoModel else LlavaExtForConditionalGeneration, exist_ok=True
    )
AutoImageProcessor.register(LlavaExtConfig, image_processor_classes={"pil": LlavaExtImageProcessor}, exist_ok=True)
AutoProcessor.register(LlavaExtConfig, LlavaExtProcessor, exist_ok=True)

# Models made here (training, convert) save in the stock llava key layout, as transformers' own LLaVA does.
register_stock_checkpoint_layout(
    {
        LlavaExtConfig.model_type: "llava",
        LlavaExtModel.__name__: "LlavaModel",
        **{tower.__name__: stock for tower, stock in STOCK_TOWER_NAMES.items()},
    }
)

LlavaExtConfig.register_for_auto_class()
LlavaExtModel.register_for_auto_class("AutoModel")
LlavaExtForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
LlavaExtImageProcessor.register_for_auto_class("AutoImageProcessor")
LlavaExtProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "ChatSession",
    "ContextFullError",
    "ImageTokenMismatchError",
    "LlavaExtConfig",
    "LlavaExtForConditionalGeneration",
    "LlavaExtImageProcessor",
    "LlavaExtModel",
    "LlavaExtMultiModalProjector",
    "LlavaExtPreTrainedModel",
    "LlavaExtProcessor",
]
