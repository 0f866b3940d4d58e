"""What is merged into a quantised linear: a full-precision residual beside it, never requantised.

A 4-bit or 8-bit weight cannot absorb a merged update: dequantise → add → requantise rounds
afresh every round, so the model would drift away from base + Σ updates. The quantised weight
therefore stays exactly as loaded, and every update merged into its layer is summed in a
:class:`MergedResidual` kept beside it in float32 (the layer's ``merged_residual`` child), which
a forward hook adds to the layer's output: the layer computes x·(dequant(Q(W₀)) + R)ᵀ with
R = Σ merged updates. A LoRA adapter PEFT wraps around the layer sees the hook fire inside its
base layer's forward, so clients train on the merged model too.

R is kept as factors U·V while they are smaller than R itself. A merge appends its factors
(scale·B to U, A to V), which is exact. Where the stacked factors have a lower numerical rank
than their width (updates sharing a subspace: clients with the same A, terms that cancel) they
are recompressed to that rank: QR of both factors and an SVD of the small core, in float64,
dropping only what cancels exactly (:func:`recompressed`). Recompressed factors are rounded to
float32, so a later merge shrinks them again only where it cancels exactly against those. Once
the factors would outgrow d×n, R becomes one dense float32 matrix that later merges add into.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedlora.aggregation.factors import LoraFactors

#: the child of a quantised linear that holds its residual
RESIDUAL = "merged_residual"
#: the residual's tensors: its factors, or its dense matrix
PARTS = ("U", "V", "dense")


def is_quantized(layer: nn.Linear) -> bool:
    """Whether ``layer`` stores its weight as integers (bitsandbytes' packed 4-bit, int8), which
    cannot absorb a float update."""
    return not layer.weight.is_floating_point()


class MergedResidual(nn.Module):
    """R = Σ of the updates merged into one d×n quantised linear, in float32 (module docstring)."""

    def __init__(self, out_features: int, in_features: int, device: torch.device | str):
        super().__init__()
        self.shape = (out_features, in_features)
        # not persistent: fedlora's checkpoints and replica snapshots store them, a model's own
        # state dict (save_pretrained) never does
        self.register_buffer("U", torch.zeros(out_features, 0, device=device), persistent=False)
        self.register_buffer("V", torch.zeros(0, in_features, device=device), persistent=False)
        self.register_buffer("dense", None, persistent=False)

    @property
    def empty(self) -> bool:
        """Nothing merged yet (or only updates that cancelled out)."""
        return self.dense is None and self.U.shape[1] == 0

    def add(self, updates: Iterable[LoraFactors]) -> None:
        updates = list(updates)
        for update in updates:
            if update.shape != self.shape:
                raise ValueError(f"update shape {update.shape} does not match the layer's {self.shape}")
        device = self.U.device
        if self.dense is not None:
            for update in updates:
                self.dense += update.delta(torch.float32, device)
            return
        U = torch.cat([self.U, *(update.scale * update.B.to(device, torch.float32) for update in updates)], dim=1)
        V = torch.cat([self.V, *(update.A.to(device, torch.float32) for update in updates)])
        U, V = recompressed(U, V)
        d, n = self.shape
        if U.shape[1] * (d + n) >= d * n:  # the factors would outgrow R itself
            self.dense = (U.double() @ V.double()).float()
            self.U, self.V = U[:, :0], V[:0]
        else:
            self.U, self.V = U, V

    def delta(self) -> Tensor:
        """R as a dense d×n float32 matrix."""
        return self.dense.clone() if self.dense is not None else (self.U.double() @ self.V.double()).float()

    def forward(self, x: Tensor) -> Tensor:
        """x·Rᵀ in float32."""
        if self.dense is not None:
            return F.linear(x.float(), self.dense)
        return F.linear(F.linear(x.float(), self.V), self.U)

    def state(self) -> dict[str, Tensor]:
        """Copies of what R is kept as: ``dense``, or ``U`` and ``V`` (empty before any merge)."""
        parts = {"dense": self.dense} if self.dense is not None else {"U": self.U, "V": self.V}
        return {name: tensor.detach().clone() for name, tensor in parts.items()}

    def load(self, parts: dict[str, Tensor]) -> None:
        """Take back a :meth:`state`."""
        tensors = {name: tensor.to(self.U.device, torch.float32).clone() for name, tensor in parts.items()}
        d, n = self.shape
        if set(tensors) == {"dense"} and tuple(tensors["dense"].shape) == (d, n):
            self.dense, self.U, self.V = tensors["dense"], self.U[:, :0], self.V[:0]
        elif set(tensors) == {"U", "V"} and tensors["U"].shape[0] == d and tensors["V"].shape[1] == n \
                and tensors["U"].shape[1] == tensors["V"].shape[0]:
            self.dense, self.U, self.V = None, tensors["U"], tensors["V"]
        else:
            raise ValueError(f"residual parts { {k: tuple(t.shape) for k, t in tensors.items()} } do not make "
                             f"a {d}×{n} matrix")


def recompressed(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """U·V at its numerical rank: the factors as given where that is their width, else new
    float32 factors from a QR of each and an SVD of the core R_U·R_Vᵀ, all in float64.

    A direction is dropped only below float64 round-off of the computation, max(d, n, k)·eps·
    ‖U‖·‖V‖: the stacked float32 factors are exact in float64, so what falls there is what
    cancels exactly (updates sharing a subspace, or undoing each other). Anything the float32
    factors hold is kept, so no merge is ever approximated.
    """
    width = U.shape[1]
    if width == 0:
        return U, V
    Q_u, R_u = torch.linalg.qr(U.double())
    Q_v, R_v = torch.linalg.qr(V.double().T)
    left, singular, right = torch.linalg.svd(R_u @ R_v.T)
    size = torch.linalg.matrix_norm(R_u, 2) * torch.linalg.matrix_norm(R_v, 2)
    tolerance = max(*U.shape, V.shape[1]) * torch.finfo(torch.float64).eps * size
    rank = int((singular > tolerance).sum())
    if rank == width:
        return U, V
    return (Q_u @ (left[:, :rank] * singular[:rank])).float(), (right[:rank] @ Q_v.T).float()


def residual_of(layer: nn.Linear) -> MergedResidual:
    """The residual of the quantised ``layer``, attached (empty) with its forward hook on first use."""
    if not hasattr(layer, RESIDUAL):
        layer.add_module(RESIDUAL, MergedResidual(layer.out_features, layer.in_features, layer.weight.device))
        layer.register_forward_hook(_add_residual)
    return getattr(layer, RESIDUAL)


def _add_residual(layer: nn.Linear, args: tuple, output: Tensor) -> Tensor:
    residual = getattr(layer, RESIDUAL)
    if residual.empty:
        return output
    # summed in float32, rounded once to the layer's output dtype
    return (output.float() + residual(args[0])).to(output.dtype)


def full_precision(model: nn.Module) -> nn.Module:
    """``model`` with every quantised linear replaced by a plain one holding dequant(Q(W₀)) + R:
    the full-precision model it computes (in place; for export). A model that transformers did
    not quantise is returned as it is."""
    if getattr(model, "hf_quantizer", None) is None:
        return model
    residuals = {name: getattr(module, RESIDUAL).delta() for name, module in model.named_modules()
                 if isinstance(getattr(module, RESIDUAL, None), MergedResidual)}
    model = model.dequantize()  # transformers: every quantised linear back to nn.Linear, its hook gone
    with torch.no_grad():
        for name, delta in residuals.items():
            weight = model.get_submodule(name).weight
            weight.copy_((weight.double() + delta.to(weight.device).double()).to(weight.dtype))
    return model
