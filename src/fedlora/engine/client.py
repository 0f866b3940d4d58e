"""Client training: one fresh LoRA (or AdaLoRA) on the shared base model, a readable AdamW loop, factors out."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from peft import PeftModel
from torch import nn

from fedlora.aggregation import ClientPlan, ClientUpdate, GlobalUpdate, LoraFactors, Regularizer
from fedlora.attention import enable_packing
from fedlora.data import DataError, TokenizedExample
from fedlora.data.batches import token_batch
from fedlora.engine.checkpoint import with_prefix
from fedlora.engine.compute import ComputeOptions
from fedlora.engine.task import ClientResult, ClientTask
from fedlora.errors import FedloraError
from fedlora.forward import summed_nll
from fedlora.models import model_device
from fedlora.lora import attach_lora, get_factors, live_factors, load_merged_state, merge_update, merged_state, \
    remove_lora, set_factors, set_trainable
from fedlora.lora.adalora import allocate, attach_adalora, pruned_factors, singular_vectors
from fedlora.lora.merge import merged_for_now

StepCallback = Callable[[int, float], None]


def batch_stream(examples: Sequence[TokenizedExample], batch_size: int, seed: int) -> Iterator[list]:
    """Endless batches: a seeded permutation per epoch, cut into consecutive batches."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield [examples[i] for i in order[start:start + batch_size]]


class LocalTrainer:
    """Trains one client at a time on a single base model; only adapters are ever created.

    The base model is wrapped in a PEFT adapter for the duration of :meth:`train` and
    unwrapped afterwards (without merging), so between clients it is the plain model the
    server evaluates and merges into.

    With ``packing`` a micro-batch's sequences share one row without padding (the model must
    compute them apart: :func:`fedlora.attention.enable_packing`); either way the LM head runs
    only where a label is, and the loss is the mean NLL over the micro-batch's labelled tokens.
    """

    def __init__(self, model: nn.Module, pad_token_id: int, *, target_modules: Sequence[str],
                 batch_size: int, grad_accum: int = 1, lr: float = 3e-4, weight_decay: float = 0.0,
                 use_rslora: bool = False, compute: ComputeOptions = ComputeOptions(), packing: bool = False):
        self.model = model
        self.pad_token_id = pad_token_id
        self.target_modules = list(target_modules)
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.lr = lr
        self.weight_decay = weight_decay
        self.use_rslora = use_rslora
        self.compute = compute
        self.packing = packing
        self.carry: dict[str, torch.Tensor] = {}
        self.merged_modules: set[str] = set()  # base weights apply_base_update has changed

    @classmethod
    def from_config(cls, model: nn.Module, pad_token_id: int, config,
                    log: Callable[[str], None] = print) -> LocalTrainer:
        """A trainer as ``config`` says; with ``config.packing`` the model is made to compute
        packed batches, and one that cannot trains on padded batches, with a notice."""
        packing = config.packing and enable_packing(model)
        if config.packing and not packing:
            log(f"packing: {type(model).__name__} does not compute packed sequences apart; "
                "training on padded batches")
        return cls(model, pad_token_id, target_modules=config.target_modules, batch_size=config.batch_size,
                   grad_accum=config.grad_accum, lr=config.lr, weight_decay=config.weight_decay,
                   use_rslora=config.use_rslora, compute=ComputeOptions.from_config(config), packing=packing)

    def apply_base_update(self, update: GlobalUpdate) -> None:
        """Merge a logged global update into this replica's base weights (a Flower client
        catching up); the same call the server made, so the replica stays bit-identical."""
        self.carry = merge_update(self.model, update, self.carry)
        self.merged_modules.update(update.residual)
        if update.merge:
            self.merged_modules.update(update.factors)

    def replica_state(self) -> dict[str, torch.Tensor]:
        """What merges changed: with the pristine model this is the replica (a Flower node's snapshot)."""
        return {**{f"weight/{key}": tensor for key, tensor in merged_state(self.model, self.merged_modules).items()},
                **{f"carry/{name}": carry for name, carry in self.carry.items()}}

    def load_replica_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore a :meth:`replica_state` onto the pristine model, bit for bit."""
        self.merged_modules = load_merged_state(self.model, with_prefix("weight/", tensors))
        self.carry = with_prefix("carry/", tensors)

    def train(self, task: ClientTask, examples: Sequence[TokenizedExample],
              on_step: StepCallback | None = None) -> ClientResult:
        if not examples:
            raise DataError(f"client {task.client_id!r} has no training examples")
        started = time.perf_counter()
        plan = task.plan
        with merged_for_now(self.model, plan.folded):  # Fed-PLoRA's untrained modules, for this round
            peft_model = self._attach(task)
            try:
                if plan.adalora is None:
                    self._start(peft_model, plan)
                with self.compute.applied(peft_model):
                    losses, processed = self._optimize(peft_model, task, examples, on_step)
                factors = (get_factors(peft_model) if plan.adalora is None
                           else pruned_factors(peft_model, task.alpha / (math.sqrt(plan.rank) if self.use_rslora
                                                                         else plan.rank)))
            finally:
                self.model = remove_lora(peft_model)
        update = ClientUpdate(factors=factors, num_examples=len(examples), client_id=task.client_id,
                              num_processed=processed)
        # DP-SGD's losses are not privatised: they stay with the client (on_step) and none is sent
        train_loss = None if task.dp_noise_multiplier is not None else sum(losses) / len(losses)
        return ClientResult(update=update, train_loss=train_loss, steps=len(losses),
                            seconds=time.perf_counter() - started)

    def _attach(self, task: ClientTask) -> PeftModel:
        """The client's fresh adapter on the model: a LoRA of the plan's rank, or, where the plan
        says so, PEFT's AdaLoRA from that rank (FLoRA's appendix)."""
        plan = task.plan
        if plan.adalora is None:
            return attach_lora(self.model, plan.rank, task.alpha, self.target_modules, use_rslora=self.use_rslora,
                               seed=task.init_seed)
        if task.dp_noise_multiplier is not None:
            raise FedloraError(f"client {task.client_id!r}: AdaLoRA clients do not train with sample-level DP-SGD "
                               "(its budget allocation runs outside Opacus' steps)")
        return attach_adalora(self.model, plan.rank, task.alpha, self.target_modules, task.local_steps, plan.adalora,
                              seed=task.init_seed)

    @staticmethod
    def _start(peft_model: PeftModel, plan: ClientPlan) -> None:
        """The LoRA as the plan starts it: its start (RAVAN's frozen heads drawn first), only its
        trainable factors trainable."""
        start = plan.drawn(plan.start) if plan.drawn is not None else plan.start
        if start is not None:
            set_factors(peft_model, start, leading=True)
        set_trainable(peft_model, plan.trainable)

    def _optimize(self, model: nn.Module, task: ClientTask, examples: Sequence[TokenizedExample],
                  on_step: StepCallback | None) -> tuple[list[float], int]:
        """Take the task's steps; each step's loss and the examples the steps processed in all."""
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay)
        if task.dp_noise_multiplier is not None:  # sample-level DP: Opacus' loop, loaded for DP runs only
            from fedlora.engine.dp_sgd import private_steps
            return private_steps(model, optimizer, task, examples, pad_token_id=self.pad_token_id,
                                 batch_size=self.batch_size, grad_accum=self.grad_accum, on_step=on_step)
        batches = batch_stream(examples, self.batch_size, task.data_seed)
        device = model_device(model)
        adalora = task.plan.adalora is not None
        factors = singular_vectors(model) if adalora else live_factors(model)  # what a regulariser sees
        model.train()
        losses, processed = [], 0
        for step in range(task.local_steps):
            step_loss = 0.0
            for _ in range(self.grad_accum):
                drawn = next(batches)  # an epoch's last batch may be short
                processed += len(drawn)
                batch = token_batch(drawn, self.pad_token_id, packed=self.packing).to(device)
                nll, tokens = summed_nll(model, batch)
                loss = nll / (tokens * self.grad_accum)
                self._objective(loss, factors, task.plan.regularizer).backward()
                step_loss += loss.item()
            optimizer.step()
            if adalora:  # AdaLoRA scores its triplets on this step's gradients and prunes to its budget
                allocate(model, step + 1)
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            if on_step is not None:
                on_step(step + 1, step_loss)
        model.eval()
        return losses, processed

    def _objective(self, loss: torch.Tensor, factors: dict[str, LoraFactors],
                   regularizer: Regularizer | None) -> torch.Tensor:
        """What a step minimises: the batch's loss plus, where the plan has one, the method's term
        on the live ``factors`` (HetLoRA's rank regulariser), a share per accumulated batch. The
        reported training loss is the batch's alone."""
        term = regularizer(factors) if regularizer is not None else None
        return loss if term is None else loss + term / self.grad_accum
