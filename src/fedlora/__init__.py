"""fedlora: federated LoRA fine-tuning of LLMs with exact aggregation."""

__version__ = "0.1.0"
