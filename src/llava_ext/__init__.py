"""llava_ext: LLaVA as native Hugging Face Transformers classes.

Importing the package registers its classes with transformers' Auto classes and marks them for `auto_map`, so a
saved checkpoint carries its own code and loads with `trust_remote_code=True` where llava_ext is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from .chat import ChatSession, ContextFullError
from .compat import AutoImageProcessor, auto_model_classes_for, register_stock_checkpoint_layout
from .configuration_llava_ext import LlavaExtConfig
from .configuration_llava_ext_next import LlavaExtNextConfig
from .image_processing_llava_ext import LlavaExtImageProcessor
from .modeling_llava_ext import (
    ImageTokenMismatchError,
    LlavaExtForConditionalGeneration,
    LlavaExtModel,
    LlavaExtMultiModalProjector,
    LlavaExtPreTrainedModel,
)
from .modeling_llava_ext_next import (
    LlavaExtNextForConditionalGeneration,
    LlavaExtNextModel,
    LlavaExtNextPreTrainedModel,
)
from .modeling_llava_ext_onevision import (
    LlavaExtOnevisionForConditionalGeneration,
    LlavaExtOnevisionModel,
    LlavaExtOnevisionPreTrainedModel,
)
from .processing_llava_ext import LlavaExtProcessor
from .configuration_llava_ext_onevision import LlavaExtOnevisionConfig
from .image_processing_llava_ext_next import LlavaExtNextImageProcessor
from .image_processing_llava_ext_onevision import LlavaExtOnevisionImageProcessor
from .processing_llava_ext_next import LlavaExtNextProcessor
from .processing_llava_ext_onevision import LlavaExtOnevisionProcessor
from .vision import STOCK_TOWER_NAMES

__version__ = "0.1.0"

# Each family: its stock twin's model type -> our config, base model and generation model, and the twin's base model.
MODEL_FAMILIES = {
    "llava": (LlavaExtConfig, LlavaExtModel, LlavaExtForConditionalGeneration, "LlavaModel"),
    "llava_next": (LlavaExtNextConfig, LlavaExtNextModel, LlavaExtNextForConditionalGeneration, "LlavaNextModel"),
    "llava_onevision": (
        LlavaExtOnevisionConfig,
        LlavaExtOnevisionModel,
        LlavaExtOnevisionForConditionalGeneration,
        "LlavaOnevisionModel",
    ),
}
for _stock_type, (_config, _model, _generation, _stock_model) in MODEL_FAMILIES.items():
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    # Every Auto class transformers registers the stock twin under in this release (AutoModel,
    # AutoModelForImageTextToText, AutoModelForMultimodalLM, AutoModelForPreTraining, ...), so pipelines and tools that
    # pick a model through those tables find ours; AutoModelForCausalLM too, for tools that only know causal LMs.
    for _auto_class in {*auto_model_classes_for(_stock_type), AutoModelForImageTextToText, AutoModelForCausalLM}:
        _auto_class.register(_config, _model if _auto_class is AutoModel else _generation, exist_ok=True)
    # Models made here (training, convert) save in the stock key layout, as transformers' own classes do.
    register_stock_checkpoint_layout({_config.model_type: _stock_type, _model.__name__: _stock_model})
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModel")
    _generation.register_for_auto_class("AutoModelForImageTextToText")

# Each family's config -> its image processor (PIL only: llava_ext has no torchvision path) and processor.
PROCESSOR_FAMILIES = {
    LlavaExtConfig: (LlavaExtImageProcessor, LlavaExtProcessor),
    LlavaExtNextConfig: (LlavaExtNextImageProcessor, LlavaExtNextProcessor),
    LlavaExtOnevisionConfig: (LlavaExtOnevisionImageProcessor, LlavaExtOnevisionProcessor),
}
for _config, (_image_processor, _processor) in PROCESSOR_FAMILIES.items():
    AutoImageProcessor.register(_config, image_processor_classes={"pil": _image_processor}, exist_ok=True)
    AutoProcessor.register(_config, _processor, exist_ok=True)
    _image_processor.register_for_auto_class("AutoImageProcessor")
    _processor.register_for_auto_class("AutoProcessor")

# Our towers save under their stock classes' key layout (CLIPVisionModel's, SiglipVisionModel's).
register_stock_checkpoint_layout({tower.__name__: stock for tower, stock in STOCK_TOWER_NAMES.items()})

__all__ = [
    "ChatSession",
    "ContextFullError",
    "ImageTokenMismatchError",
    "LlavaExtConfig",
    "LlavaExtForConditionalGeneration",
    "LlavaExtImageProcessor",
    "LlavaExtModel",
    "LlavaExtMultiModalProjector",
    "LlavaExtNextConfig",
    "LlavaExtNextForConditionalGeneration",
    "LlavaExtNextImageProcessor",
    "LlavaExtNextModel",
    "LlavaExtNextPreTrainedModel",
    "LlavaExtNextProcessor",
    "LlavaExtOnevisionConfig",
    "LlavaExtOnevisionForConditionalGeneration",
    "LlavaExtOnevisionImageProcessor",
    "LlavaExtOnevisionModel",
    "LlavaExtOnevisionPreTrainedModel",
    "LlavaExtOnevisionProcessor",
    "LlavaExtPreTrainedModel",
    "LlavaExtProcessor",
]
