"""A quantised base model (QLoRA): its linear layers loaded in 4 or 8 bits by bitsandbytes.

transformers quantises the weights as it loads them (``BitsAndBytesConfig``); LoRA then trains
on the quantised linears through PEFT. What a method merges never goes into these weights: it
is kept beside them in full precision (:mod:`fedlora.lora.residual`), so the quantised weights
stay exactly as loaded for the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import BitsAndBytesConfig

#: the ``quantization`` run option's values: NormalFloat4 and plain FP4 (4-bit, QLoRA's), LLM.int8()
QUANTIZATIONS = ("nf4", "fp4", "int8")
FOUR_BIT = ("nf4", "fp4")


@dataclass(frozen=True)
class Quantization:
    """How the base model's linear layers are quantised.

    ``kind``: nf4, fp4 or int8. A 4-bit layer dequantises its weights to ``compute_dtype`` for
    each matmul (None: the dtype of the model's other weights); ``double`` also quantises its
    per-block scales (about 0.4 bits per weight less).
    """

    kind: str
    compute_dtype: torch.dtype | None = None
    double: bool = False

    def __post_init__(self) -> None:
        if self.kind not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.kind!r}")
        if self.kind not in FOUR_BIT and (self.compute_dtype is not None or self.double):
            raise ValueError(f"a compute dtype and double quantisation are options of 4-bit layers, not {self.kind}")

    @classmethod
    def from_config(cls, config) -> Quantization | None:
        """The run options ``quantization``, ``quantization_compute_dtype`` and ``double_quantization``."""
        if config.quantization is None:
            return None
        compute = config.quantization_compute_dtype  # a name of fedlora.models.DTYPES: a torch dtype's
        return cls(config.quantization, getattr(torch, compute) if compute else None, config.double_quantization)

    def bnb_config(self, model_dtype: torch.dtype) -> BitsAndBytesConfig:
        """transformers' loading options for a model whose other weights are in ``model_dtype``."""
        return BitsAndBytesConfig(**self._options(model_dtype))

    def loading_code(self, model_dtype: torch.dtype) -> str:
        """:meth:`bnb_config` as Python source, for a model card."""
        arguments = ", ".join(f"{key}={value!r}" for key, value in self._options(model_dtype).items())
        return f"BitsAndBytesConfig({arguments})"

    def _options(self, model_dtype: torch.dtype) -> dict:
        if self.kind == "int8":
            return {"load_in_8bit": True}
        return {"load_in_4bit": True, "bnb_4bit_quant_type": self.kind,
                "bnb_4bit_compute_dtype": self.compute_dtype or model_dtype, "bnb_4bit_use_double_quant": self.double}


def keep_as_loaded(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights in place on the CPU.

    On a CPU with AVX512-BF16, a ``Linear4bit``'s first forward pass in inference mode converts
    its weight to a layout for a bfloat16 kernel and rounds its block scales to bfloat16: the
    base would change under the run, and a process that evaluated before training (the server)
    would train on other weights than one that trained first (a Flower node). Without it every
    forward pass dequantises the weights as loaded, as on a GPU.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
