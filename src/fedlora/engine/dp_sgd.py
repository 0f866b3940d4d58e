"""Sample-level DP-SGD of one client's LoRA factors, through Opacus.

Opacus' ``GradSampleModule`` computes per-example gradients with hooks on the modules that own
trainable parameters; under PEFT those are the ``lora_A``/``lora_B`` ``nn.Linear`` layers, which
Opacus supports, so the frozen base model needs nothing (tested against a per-example autograd
computation). Its ``DPOptimizer`` clips each example's gradient over all trainable factors to
``max_grad_norm``, adds N(0, σ²·max_grad_norm²) to the sum and divides by the expected batch.

Two choices make the accountant's assumptions hold:

- Batches are Poisson samples (Opacus' ``UniformWithReplacementSampler``): each example joins a
  step with probability q = batch_size·grad_accum / N, so a step may hold none (it still takes
  the noise). A drawn batch is run in micro-batches of at most ``batch_size``.
- The loss is per example (the mean NLL of its response tokens), not the usual token mean over
  the batch, whose per-example terms would depend on the other examples' lengths.

Batches and noise are seeded by ``task.dp_noise_seed``, or, without it,
from the operating system's entropy: the server derives the plain batch seed, so DP must not use
it (a server that can replay the sampling or the noise removes the protection).
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable, Sequence

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from fedlora.data import TokenizedExample, collate
from fedlora.data.prompts import IGNORE_INDEX
from fedlora.engine.privacy import sample_rate
from fedlora.engine.task import ClientTask
from fedlora.models import model_device

StepCallback = Callable[[int, float], None]
#: xor-ed into the seed for the noise generator, so that it never replays the sampler's stream
NOISE_STREAM = 0x5EED_D1FF


def per_example_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each example's mean NLL over its response tokens (token t predicts label t+1)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    nll = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                      ignore_index=IGNORE_INDEX, reduction="none")
    tokens = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return nll.sum(dim=1) / tokens


def private_steps(model: nn.Module, optimizer: torch.optim.Optimizer, task: ClientTask,
                  examples: Sequence[TokenizedExample], *, pad_token_id: int, batch_size: int, grad_accum: int,
                  on_step: StepCallback | None = None) -> tuple[list[float], int]:
    """Take ``task.local_steps`` DP-SGD steps of ``optimizer`` (over the trainable factors of
    ``model``); returns each step's mean example loss (NaN for a step that drew no example) and
    the examples the steps' Poisson batches held in all."""
    rate = sample_rate(batch_size, grad_accum, len(examples))
    seed = task.dp_noise_seed if task.dp_noise_seed is not None else secrets.randbits(63)
    device = model_device(model)
    # the sampler draws on the CPU, Opacus its noise on the parameters' device: two streams
    sampler = UniformWithReplacementSampler(num_samples=len(examples), sample_rate=rate, steps=task.local_steps,
                                            generator=torch.Generator().manual_seed(seed))
    private_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    dp_optimizer = DPOptimizer(optimizer, noise_multiplier=task.dp_noise_multiplier,
                               max_grad_norm=task.dp_max_grad_norm, expected_batch_size=rate * len(examples),
                               generator=torch.Generator(device=device).manual_seed(seed ^ NOISE_STREAM))
    params = dp_optimizer.params
    model.train()
    losses, processed = [], 0
    try:
        with warnings.catch_warnings():
            # the first LoRA layers' inputs need no gradient (the base model is frozen): expected
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for step, indices in enumerate(sampler, start=1):
                chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
                step_loss = 0.0
                for number, chunk in enumerate(chunks, start=1):
                    batch = {k: v.to(device) for k, v in collate([examples[i] for i in chunk], pad_token_id).items()}
                    loss = per_example_loss(private_model, batch)
                    loss.mean().backward()
                    step_loss += float(loss.detach().sum())
                    if number < len(chunks):  # Opacus' way to clip a micro-batch and keep its sum
                        dp_optimizer.signal_skip_step(do_skip=True)
                        dp_optimizer.step()
                        dp_optimizer.zero_grad()
                if not chunks:  # an empty Poisson batch: no gradients, the noise alone
                    for p in params:
                        p.grad_sample = p.new_zeros((0, *p.shape))
                dp_optimizer.step()
                dp_optimizer.zero_grad(set_to_none=True)
                losses.append(step_loss / len(indices) if indices else float("nan"))
                processed += len(indices)
                if on_step is not None:
                    on_step(step, losses[-1])
    finally:
        private_model.to_standard_module()  # hooks and per-example attributes removed
        model.eval()
    return losses, processed
