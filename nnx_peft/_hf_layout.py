"""An adapted NNX weight as PyTorch's ``Linear``: which axes are ``in`` and ``out``.

PyTorch's ``Linear`` stores ``weight`` as ``(out, in)``; PEFT's ``lora_A.weight``
is ``(r, in)`` and ``lora_B.weight`` ``(out, r)``. The adapter's recorded layout
(``_layout.LoraLayout``) says which weight axes the matmul contracts (``in``) and
which it keeps (``out``); each side is flattened in C order, in the order the
matmul's input and output hold its axes, as PyTorch models flatten heads
(head-major, ``n * H + h``). A weight for which that is not one ``Linear``
(fused, batched, a convolution) is refused.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from nnx_peft._errors import FusedWeightError, HfShapeError, UnsupportedLayerError
from nnx_peft._factors import Subscripts
from nnx_peft._layout import LoraLayout


@dataclasses.dataclass(frozen=True)
class HfLinear:
    """An adapted NNX weight as PyTorch's ``Linear``.

    Attributes:
        sub: The adapter's subscripts (``_factors.Subscripts``).
        inputs: Weight letters of ``in``, in the order HF flattens them.
        outputs: Weight letters of ``out``, in the order HF flattens them.
        sizes: Size of every letter, the rank's included.
    """

    sub: Subscripts
    inputs: str
    outputs: str
    sizes: dict[str, int]

    def size(self, letters: str) -> int:
        return int(np.prod([self.sizes[c] for c in letters], dtype=np.int64))

    def a_to_nnx(self, hf_a: np.ndarray, a_shape: tuple[int, ...]) -> np.ndarray:
        """HF's ``(r, in)`` as the NNX ``A``."""
        r, s = self.sub.rank, self.sizes
        unflat = hf_a.reshape((s[r], *(s[c] for c in self.inputs)))
        return np.einsum(f"{r}{self.inputs}->{self.sub.a}", unflat).reshape(a_shape)

    def b_to_nnx(self, hf_b: np.ndarray, b_shape: tuple[int, ...]) -> np.ndarray:
        """HF's ``(out, r)`` as the NNX ``B``."""
        r, s = self.sub.rank, self.sizes
        unflat = hf_b.reshape((*(s[c] for c in self.outputs), s[r]))
        return np.einsum(f"{self.outputs}{r}->{self.sub.b}", unflat).reshape(b_shape)

    def a_to_hf(self, a: np.ndarray) -> np.ndarray:
        r, s = self.sub.rank, self.sizes
        unflat = a.reshape(tuple(s[c] for c in self.sub.a))
        return np.einsum(f"{self.sub.a}->{r}{self.inputs}", unflat).reshape(s[r], -1)

    def b_to_hf(self, b: np.ndarray) -> np.ndarray:
        r, s = self.sub.rank, self.sizes
        unflat = b.reshape(tuple(s[c] for c in self.sub.b))
        return np.einsum(f"{self.sub.b}->{self.outputs}{r}", unflat).reshape(-1, s[r])

    def weight_to_hf(self, weight: np.ndarray) -> np.ndarray:
        """The NNX weight as PyTorch's ``Linear.weight``, ``(out, in)``."""
        unflat = weight.reshape(tuple(self.sizes[c] for c in self.sub.weight))
        moved = np.einsum(f"{self.sub.weight}->{self.outputs}{self.inputs}", unflat)
        return moved.reshape(self.size(self.outputs), self.size(self.inputs))

    def magnitude_to_nnx(self, hf_m: np.ndarray) -> np.ndarray:
        unflat = hf_m.reshape(tuple(self.sizes[c] for c in self.outputs))
        return np.einsum(f"{self.outputs}->{self.sub.features}", unflat)

    def magnitude_to_hf(self, m: np.ndarray) -> np.ndarray:
        return np.einsum(f"{self.sub.features}->{self.outputs}", m).reshape(-1)


def hf_linear(
    layout: LoraLayout, a_shape: tuple[int, ...], b_shape: tuple[int, ...], where: str
) -> HfLinear:
    """How the weight of ``layout`` stands for one PyTorch ``Linear``.

    Raises:
        FusedWeightError: The weight has batch axes, or output axes that do not
            trail the input's own axes (a fused weight such as a ``(2, K, D, H)``
            ``kv_einsum``), or contracts axes that are not the input's last ones.
        UnsupportedLayerError: A convolution, or a weight the module transforms
            before its matmul.
    """
    sub = layout.subscripts
    if layout.kind == "conv" or sub is None:
        raise UnsupportedLayerError(
            f"{where} is a convolution; the PEFT import and export handle Linear-like weights "
            "only. Leave the module out of module_map."
        )
    if not layout.operand_is_weight:
        raise UnsupportedLayerError(
            f"{where} is transformed by its module before the matmul, so its update is no "
            "change of a Linear weight. Leave the module out of module_map."
        )
    shared = [c for c in sub.a if c in sub.b and c != sub.rank]
    fix = (
        "PEFT has one Linear (one A, one B) per module name: unfuse the weight in the model "
        "(separate modules), or leave the module out of module_map."
    )
    if shared:
        raise FusedWeightError(
            f"{where} has batch axes {shared} shared by its input and output (one matmul per "
            f"batch entry), which no single PyTorch Linear has. {fix}"
        )
    if layout.kind == "einsum":
        x, _, _, out = (
            s.replace("...", "") for s in re.split(",|->", layout.einsum_str, maxsplit=3)
        )
        k, m = len(sub.contracting), len(sub.features)
        inputs, outputs = x[len(x) - k :], out[len(out) - m :]
        if (
            set(inputs) != set(sub.contracting)
            or set(outputs) != set(sub.features)
            or (out[: len(out) - m] != x[: len(x) - k])
        ):
            raise FusedWeightError(
                f"{where} enters einsum {layout.einsum_str!r} (input, A, B -> output) whose "
                f"output keeps weight axes {sub.features!r} not as the trailing axes after the "
                f"input's own, or contracts {sub.contracting!r} not as the input's trailing "
                "axes: it is no single PyTorch Linear (a fused weight, such as a (2, K, D, H) "
                f"kv_einsum standing for both k_proj and v_proj with one A). {fix}"
            )
    else:
        if list(layout.contracting) != sorted(layout.contracting):
            raise FusedWeightError(
                f"{where} contracts its axes {layout.contracting} out of order, so HF's flat "
                f"input features have no fixed order on them. {fix}"
            )
        inputs = "".join(c for c in sub.a if c != sub.rank)
        outputs = "".join(c for c in sub.b if c != sub.rank)
    # A and B hold every letter unflattened, except a dot_general's flattened axes: then
    # the weight's shape gives them (A's first axis flattens the contracting ones).
    sizes: dict[str, int] = {sub.rank: a_shape[-1]}
    if len(a_shape) == len(sub.a) and len(b_shape) == len(sub.b):
        sizes.update(zip(sub.a, a_shape, strict=True))
        sizes.update(zip(sub.b, b_shape, strict=True))
    return HfLinear(sub, inputs, outputs, sizes)


def with_weight_sizes(lin: HfLinear, weight_shape: tuple[int, ...]) -> HfLinear:
    sizes = {**dict(zip(lin.sub.weight, weight_shape, strict=True)), **lin.sizes}
    return dataclasses.replace(lin, sizes=sizes)


def check_explained(
    lin: HfLinear, a_shape: tuple[int, ...], b_shape: tuple[int, ...], where: str
) -> None:
    """Raises :class:`HfShapeError` unless the layout accounts for the factors' shapes."""
    sub, sizes = lin.sub, lin.sizes
    letters = set(sub.weight + sub.a + sub.b)
    if letters <= set(sizes) and all(
        int(np.prod(shape, dtype=np.int64)) == lin.size(axes)
        and shape[-1 if x == "a" else 0] == sizes[sub.rank]
        for x, axes, shape in (("a", sub.a, a_shape), ("b", sub.b, b_shape))
    ):
        return
    raise HfShapeError(
        f"The adapter of {where} has factors of shapes {a_shape} and {b_shape}, which its "
        f"recorded layout (weight axes {sub.weight!r}, A {sub.a!r}, B {sub.b!r}) does not "
        "explain: a scanned stack (a layer axis in front of every weight) or a factor "
        "replaced after wrapping. PEFT has one Linear per layer: convert a scanned model to "
        "one module per layer before importing or exporting."
    )
