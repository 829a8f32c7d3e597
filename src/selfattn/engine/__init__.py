"""The torch-op engine: FlashAttention-2 (Dao, 2023) written in torch operations, O(N) memory.

Its internal API, used by the ``tiled`` backend, ring attention and the custom op's backward:

- :class:`Problem` (``problem.py``): a validated call or part of one (``Problem.of(spec, seed)``,
  ``.part(...)``), its dropout numbering and its non-finite keys.
- :func:`forward` / :func:`probabilities` (``forward.py``): online softmax over the key chunks
  that ``rules.key_spans`` plans; exact probabilities from the lse.
- :func:`statistics` (``stats.py``): column sums/maxima, row entropies and top-k of the
  probabilities, tile by tile from the lse (``attention_stats``).
- :func:`backward` (``backward.py``): gradients by recomputation from the lse.
- :func:`attention` (``autograd.py``): forward with autograd when the inputs need it;
  differentiable twice and in forward mode.
- :func:`jvp` (``tangent.py``): the output's and lse's tangents in one pass over tiles.
- :func:`double_backward` (``hessian.py``): the VJP of the first-order backward, tile by tile;
  :func:`differentiable_backward` (``second_order.py``) wraps any first-order backward with it.
- ``tiles.py``: operand matrices, the reusable score workspace, dropout tiles.
- ``threads.py``: splitting one call across CPU threads by heads or by row bands.

Names follow the paper and the Triton kernels (``m_i``, ``l_i``, ``acc``, ``BLOCK_N``); scores
are in natural-log units, so a score near the float32 maximum never overflows. Written in torch ops, the engine's cost beyond its
two GEMMs per tile is the passes over each tile, so it keeps them few: subtractions ride inside
the GEMMs, the running maximum is frozen after the first chunk when a Cauchy-Schwarz bound
allows, masks are cached additive tiles, and tiles live in one reusable workspace.
"""

from .autograd import attention, tangent_pass, vmap_slices, with_inputs
from .backward import Grads, backward
from .forward import forward, probabilities
from .hessian import HessianGrads, double_backward
from .problem import BLOCK_N, ROWS_PER_TILE, Dropout, Problem, acc_dtype, all_finite, bad_keys
from .second_order import differentiable_backward, tangents_out
from .stats import statistics
from .tangent import jvp
from .tiles import bad_values

__all__ = [
    "BLOCK_N",
    "ROWS_PER_TILE",
    "Dropout",
    "Grads",
    "HessianGrads",
    "Problem",
    "acc_dtype",
    "all_finite",
    "attention",
    "backward",
    "bad_keys",
    "bad_values",
    "differentiable_backward",
    "double_backward",
    "forward",
    "jvp",
    "probabilities",
    "statistics",
    "tangent_pass",
    "tangents_out",
    "vmap_slices",
    "with_inputs",
]
