"""Checkpoint conversion: original LLaVA and llava-hf checkpoints -> llava_ext, llava_ext -> stock transformers llava
or GGUF for llama.cpp.

    convert_checkpoint(SRC, OUT)   original LLaVA (`LlavaLlamaForCausalLM` + a separate CLIP tower) or llava-hf
                                   (`llava`) -> `llava_ext` with its code attached (loads with trust_remote_code=True)
    export_checkpoint(SRC, OUT)    `llava_ext` -> stock `llava` (no remote code) for `LlavaForConditionalGeneration`
    export_gguf(SRC, OUT)          `llava_ext` -> OUT/model-{outtype}.gguf + OUT/mmproj-model-{outtype}.gguf for
                                   llama.cpp (`llama-mtmd-cli` / `llama-server --mmproj`), via the `gguf` package
    push_to_hub(OUT, REPO_ID)      one commit with the whole directory
    refresh_checkpoint_code(CKPT)  the code shipped inside a llava_ext checkpoint -> the installed llava_ext's

Every writer first checks the source's files (`io.check_checkpoint_files`: a truncated or missing file is named
before any work), then streams tensors (see `io.py`) into a temporary sibling of OUT that is renamed into place only
when complete, so a failure, Ctrl-C or SIGKILL never leaves a half-written OUT (a killed run's sibling is removed by
the next run over the same OUT).

    to_llava_ext.py  convert_checkpoint, detect_layout    original.py  the original format's key tables
    to_stock.py      export_checkpoint                     plan.py      tensor plans: cast, grown embeddings
    hub.py           push_to_hub, the model card           io.py        reading, sharded writing, atomic OUT
    refresh.py       refresh_checkpoint_code               to_gguf.py   export_gguf, the GGUF key tables

The `llava-ext convert` / `export` / `refresh-code` commands are `llava_ext/cli/convert.py`.
"""

from .hub import push_to_hub
from .refresh import refresh_checkpoint_code
from .to_llava_ext import convert_checkpoint, detect_layout
from .to_gguf import export_gguf
from .to_stock import export_checkpoint

__all__ = [
    "convert_checkpoint",
    "detect_layout",
    "export_checkpoint",
    "export_gguf",
    "push_to_hub",
    "refresh_checkpoint_code",
]
