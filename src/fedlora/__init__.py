"""fedlora: federated LoRA fine-tuning of LLMs with exact aggregation.

    import fedlora
    result = fedlora.run("configs/demo.toml", out="runs/demo")   # or a RunConfig, or a dict
    result.rows[-1].eval_loss, result.summary, result.paths.report
    fedlora.resume("runs/demo", rounds=5)
    fedlora.load_run("runs/demo")

Names are imported on first use, so ``import fedlora`` (and ``fedlora --help``) stays light.
"""

import logging
from fedlora.imports import resolve

__version__ = "0.1.0"

# bitsandbytes, imported by PEFT whenever it is installed, warns on every import of its CPU
# backend that an optional kernel package (fetched from the Hub) is missing; it falls back to
# plain torch, which fedlora's quantised runs on a CPU say themselves
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_EXPORTS = {
    **dict.fromkeys(("run", "resume", "load_run", "RunResult"), "fedlora.api"),
    "RunConfig": "fedlora.engine.config",
    "RunObserver": "fedlora.runtime.observer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return resolve(f"{_EXPORTS[name]}:{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
