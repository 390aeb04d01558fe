"""The shared test toolkit: the generators, the ground-truth test vector, the compaction
helper, the dtype tolerance table and the backend x device parametrisation used by every test
(``tests/``) and by the benchmarks (:mod:`stoichconv.bench`).

It ships with the package but needs nothing beyond its dependencies: ``pytest`` (a test
dependency) is imported only inside the functions that build pytest params.

Backend parametrisation (pyg-lib style)
---------------------------------------
:func:`backend_params` turns the op's declared backends (``stoichconv.backends.OPS[op].backends``)
into ``pytest.param(backend, device)`` pairs, one per device the backend runs on: ``cpu`` on CPU
tensors, ``cuda`` on CUDA tensors, ``triton`` on CUDA tensors and on CPU tensors through the
Triton interpreter, ``reference`` on both. A param is skipped only when it cannot run here, with
the reason (:func:`skip_reason`): a CUDA device when no GPU is visible, CPU Triton when
``TRITON_INTERPRET=1`` was not set before ``stoichconv`` was imported. Anything else that keeps a
backend from running (``stoichconv._C`` not built, a GPU visible but the CUDA kernels missing,
``triton`` not installed) is a failure, raised by the op with the backend table's reason: a
broken build never hides behind a skip. CUDA params carry the ``cuda`` marker (``-m cuda``).

Usage::

    @pytest.mark.parametrize("backend,device", backend_params("stoich_conv"))
    def test_matches_reference(backend, device): ...
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from stoichconv.backends import OPS, select, triton_interpreted
from stoichconv.data.cell_graph import random_perturbations
from stoichconv.data.relations import GPR, METABOLISM, PHYSICAL, REGULATORY

__all__ = [
    "DEVICE_TYPES",
    "SpecTestVector",
    "assert_advised_into_huge_pages",
    "assert_close",
    "assert_close_scaled",
    "model_tolerance",
    "INTERPRETED",
    "is_interpreted",
    "ROUNDINGS",
    "CudaSyncCounter",
    "backend_cases",
    "backend_devices",
    "backend_params",
    "compact_metabolic_batch",
    "device_params",
    "huge_page_eligible",
    "kernel_op",
    "param_id",
    "random_cell_graph",
    "random_deletions",
    "random_edge_index",
    "random_edge_set",
    "random_hypergraph",
    "random_keep",
    "random_perturbations",
    "skip_reason",
    "spec_test_vector",
    "tolerance",
    "transparent_huge_page_mode",
]

DEVICE_TYPES = ("cpu", "cuda")

# --------------------------------------------------------------------------- generators


def random_hypergraph(num_metabolites: int = 9, num_reactions: int = 7, nnz: int = 30, seed: int = 0,
                      dtype: torch.dtype = torch.float64, device=None, zero_coefficient: bool = False
                      ) -> tuple[Tensor, Tensor]:
    """A random metabolic hypergraph ``(edge_index [2, nnz], stoich [nnz])`` with the awkward
    cases: metabolite ``N - 1`` isolated, reaction ``M - 1`` without incidences, a repeated
    (metabolite, reaction) pair (columns 0 and 1), fractional stoichiometry of both signs
    (``stoich[2] = -3``) and, with ``zero_coefficient``, one exact zero (``stoich[3] = 0``)."""
    gen = torch.Generator().manual_seed(seed)
    metabolites = torch.randint(0, num_metabolites - 1, (nnz,), generator=gen)
    reactions = torch.randint(0, num_reactions - 1, (nnz,), generator=gen)
    if nnz > 1:
        metabolites[1], reactions[1] = metabolites[0], reactions[0]  # a repeated incidence
    stoich = torch.randn(nnz, generator=gen, dtype=dtype) * 2.5  # fractional, both signs
    if nnz > 2:
        stoich[2] = -3.0
    if zero_coefficient and nnz > 3:
        stoich[3] = 0.0
    edge_index = torch.stack([metabolites, reactions])
    return edge_index.to(device), stoich.to(device)


def random_keep(batch_size: int, num_reactions: int, seed: int = 0, p: float = 0.3, device=None) -> Tensor:
    """A [B, M] bool reaction keep-mask dropping about ``p`` of the reactions; the last sample
    (when B > 1) is unmasked."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch_size, num_reactions, generator=gen) > p
    if batch_size > 1:
        keep[-1] = True  # one unmasked sample
    return keep.to(device)


def random_edge_index(num_nodes: int, num_edges: int, seed: int = 0, isolated: int = 0) -> Tensor:
    """A homogeneous relation [2, E] among the first ``num_nodes - isolated`` nodes (the last
    ``isolated`` have no edge), with a self-loop (column 0), a multi-edge (column 1 = column 2)
    and a reversed edge (column 3 = column 2 reversed) when E allows."""
    gen = torch.Generator().manual_seed(seed)
    active = max(num_nodes - isolated, 1)
    edge_index = torch.randint(active, (2, num_edges), generator=gen)
    if num_edges >= 1:
        edge_index[1, 0] = edge_index[0, 0]  # self-loop
    if num_edges >= 3:
        edge_index[:, 1] = edge_index[:, 2]  # multi-edge
    if num_edges >= 4:
        edge_index[:, 3] = edge_index[:, 2].flip(0)  # reverse edge
    return edge_index


def random_edge_set(num_src: int = 30, num_dst: int = 20, num_rows: int = 25, num_edges: int = 150, seed: int = 0,
                    empty_rows: Sequence[int] = (3, 7), device="cpu"):
    """A row-sorted :class:`~stoichconv.types.EdgeSet` (the GATv2 op's edges) with random
    sources and destinations and the rows ``empty_rows`` without edges (they must give 0)."""
    from stoichconv.types import EdgeSet

    g = torch.Generator().manual_seed(seed)
    row = torch.randint(0, num_rows, (num_edges,), generator=g)
    for r in empty_rows:
        row[row == r] = (r + 1) % num_rows
    row = torch.sort(row).values
    src = torch.randint(0, num_src, (num_edges,), generator=g)
    dst = torch.randint(0, num_dst, (num_edges,), generator=g)
    crow = torch.zeros(num_rows + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=num_rows), 0)
    return EdgeSet(src.to(device), dst.to(device), row.to(device), crow.to(device), num_rows)


class CudaSyncCounter:
    """Context manager counting the host syncs of CUDA work that
    ``torch.cuda.set_sync_debug_mode("warn")`` reports (its warnings), in ``.count``."""

    def __enter__(self):
        import warnings

        self._mode = torch.cuda.get_sync_debug_mode()
        self._catch = warnings.catch_warnings(record=True)
        self.caught = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self._mode)
        self._catch.__exit__(*exc)

    @property
    def messages(self) -> list:
        return [str(w.message) for w in self.caught if "synchroniz" in str(w.message)]

    @property
    def count(self) -> int:
        return len(self.messages)


def random_deletions(num_genes: int, batch_size: int, seed: int = 0, max_size: int = 5) -> tuple[Tensor, Tensor]:
    """A CSR batch of gene-deletion sets ``(pert, pert_ptr)`` for the tests, drawn by
    :func:`~stoichconv.data.random_perturbations` (sizes 0..``max_size``, draw order, i.e.
    unsorted), with the cases the ops must handle forced in: sample 0 deletes one gene twice
    (ids may repeat; they count once) and, for B >= 3, sample 1 deletes nothing."""
    sizes = tuple(range(0, min(max_size, num_genes) + 1))
    pert, ptr = random_perturbations(num_genes, batch_size, sizes=sizes, seed=seed)
    sets = [pert[ptr[b]:ptr[b + 1]] for b in range(batch_size)]
    if batch_size > 0:
        first = sets[0] if sets[0].numel() else torch.tensor([seed % num_genes])
        sets[0] = torch.cat([first, first[:1]])  # a duplicate deletion
    if batch_size >= 3:
        sets[1] = sets[1][:0]  # an empty deletion set
    counts = torch.tensor([s.numel() for s in sets], dtype=torch.long)
    pert = torch.cat(sets) if sets else torch.empty(0, dtype=torch.long)
    return pert.long(), torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])


def random_cell_graph(seed: int = 0, num_genes: int = 40, num_reactions: int = 25, num_metabolites: int = 30):
    """A small random cell graph (``HeteroData``) with the wildtype's fields and its awkward
    cases: physical self-loops (first 5 edges) and a multi-edge, the last 4 genes without
    physical edges, reactions without GPR genes (the last 3), reaction 0 needing genes 1 and 2,
    reactions with several genes, and the last 2 metabolites without incidences."""
    from torch_geometric.data import HeteroData

    g = torch.Generator().manual_seed(seed)
    data = HeteroData()
    data["gene"].num_nodes = num_genes
    data["reaction"].num_nodes = num_reactions
    data["metabolite"].num_nodes = num_metabolites
    phys = torch.randint(num_genes - 4, (2, 120), generator=g)  # genes >= N-4 isolated
    phys[1, :5] = phys[0, :5]  # self-loops
    phys[:, 5] = phys[:, 6]  # multi-edge
    data[PHYSICAL].edge_index = phys
    data[REGULATORY].edge_index = torch.randint(num_genes, (2, 60), generator=g)
    gpr = torch.stack([torch.randint(num_genes, (40,), generator=g),
                       torch.randint(num_reactions - 3, (40,), generator=g)])  # last 3 reactions: no gene
    data[GPR].edge_index = torch.cat([gpr, torch.tensor([[1, 2], [0, 0]])], dim=1)  # reaction 0 has genes 1, 2
    inc = torch.stack([torch.randint(num_metabolites - 2, (90,), generator=g),
                       torch.randint(num_reactions, (90,), generator=g)])
    data[METABOLISM].hyperedge_index = inc
    data[METABOLISM].stoichiometry = torch.randn(90, generator=g)
    data[METABOLISM].num_edges = num_reactions
    return data


# --------------------------------------------------------------------------- ground truth


class SpecTestVector(NamedTuple):
    """The hand-computed stoich conv example: Theta = I, one reaction ``{0: -1, 1: -2, 2: +1}``,
    metabolite 3 isolated. ``expected`` is the layer's output without bias (= the op's output
    with ``weight = stoich``)."""

    x: Tensor  # [4, 3]
    edge_index: Tensor  # [2, 3]
    stoich: Tensor  # [3]
    num_nodes: int
    num_edges: int
    expected: Tensor  # [4, 3]


def spec_test_vector(dtype: torch.dtype = torch.float64, device=None) -> SpecTestVector:
    """The ground-truth example of the stoich conv (see :class:`SpecTestVector`). Degrees:
    ``D = 1 / (1, 2, 1, 0)``, ``B = 1 / 4``; hidden ``= (-1 * x0 - 2 * x1 + x2) / 4``."""
    x = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=dtype, device=device)
    edge_index = torch.tensor([[0, 1, 2], [0, 0, 0]], device=device)
    stoich = torch.tensor([-1.0, -2.0, 1.0], dtype=dtype, device=device)
    expected = torch.tensor([[0.25, 0.5, -0.25], [0.25, 0.5, -0.25], [-0.25, -0.5, 0.25], [0.0, 0.0, 0.0]],
                            dtype=dtype, device=device)
    return SpecTestVector(x, edge_index, stoich, 4, 1, expected)


def compact_metabolic_batch(edge_index: Tensor, stoich: Tensor, reaction_keep: Tensor, num_metabolites: int
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """Block-diagonal compaction of a shared-topology batch (wildtype incidences + a [B, M]
    reaction keep-mask): sample b's kept incidences, metabolites offset by ``b * N``, reactions
    renumbered by the kept reaction counts (the collation fix of
    :mod:`stoichconv.ops.pert_mask`). Returns ``(edge_index, stoich, kept reaction wildtype ids)``;
    the stoich conv on it (B = 1) equals the masked shared-topology run."""
    B, M = reaction_keep.shape
    incidence_keep = reaction_keep[:, edge_index[1]]  # [B, nnz]
    sample, k = incidence_keep.nonzero(as_tuple=True)  # sample-major, wildtype order within
    new_reaction = torch.cumsum(reaction_keep.reshape(-1).long(), 0) - 1
    compact = torch.stack([edge_index[0, k] + sample * num_metabolites, new_reaction[sample * M + edge_index[1, k]]])
    kept_reactions = reaction_keep.nonzero(as_tuple=True)[1]
    return compact, stoich[k], kept_reactions


# --------------------------------------------------------------------------- tolerances

# The bounds the op tests hold every backend to, per dtype: float64 results agree to ~1e-12,
# float32 to ~1e-5 (rtol = atol).
_BASE_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
# Roundings of a stored value to the result's dtype along one output's chain of computation
# (inputs, degree norms, the stage-1 rows, the reaction-side gradient, the result, ...).
ROUNDINGS = 6


def tolerance(dtype: torch.dtype, reduction_length: int = 1) -> tuple[float, float]:
    """``(rtol, atol)`` for comparing a result of ``dtype`` with its reference.

    float64: 1e-12, float32: 1e-5 (the values the tests always used). Below that the bound is
    derived from the unit roundoff ``u = eps / 2``: ``ROUNDINGS * u(dtype)`` for the roundings of
    stored values to ``dtype`` plus ``reduction_length * u(accumulation dtype)`` for the longest
    sum behind one output (the ops accumulate float16 / bfloat16 / float32 in float32, float64
    in float64). So float16 and bfloat16 get bounds from their eps (bfloat16 ~2.3e-2, float16
    ~2.9e-3 at length 1), and a float32 sum of thousands of terms a bound above 1e-5; at
    ``reduction_length=1`` float32 and float64 get the table's values."""
    if not dtype.is_floating_point:
        return 0.0, 0.0
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    derived = (ROUNDINGS * torch.finfo(dtype).eps + max(int(reduction_length), 1) * torch.finfo(accumulate).eps) / 2
    bound = max(_BASE_TOLERANCE.get(dtype, 0.0), derived)
    return bound, bound


def model_tolerance(dtype: torch.dtype, num_layers: int) -> float:
    """Relative bound (to the largest reference magnitude) for a whole network of ``num_layers``
    message-passing layers run in ``dtype`` against its float64 reference: the per-op bound of
    :func:`tolerance` at length 1 for each layer plus the input and head stages
    (``(num_layers + 2) * tolerance(dtype)``); normalisations between layers keep the error
    from compounding further. bfloat16 at 2 layers: ~9e-2, float16: ~1.2e-2."""
    return (num_layers + 2) * tolerance(dtype)[0]


def assert_close_scaled(actual: Tensor, expected: Tensor, bound: float, name: str = "") -> None:
    """``max |actual - expected| <= bound * max |expected|`` (a norm-wise relative error: the
    measure for low-precision results whose entries cancel)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert err <= bound * max(scale, 1e-30), f"{name}: max error {err:.3e} > {bound:.3e} * {scale:.3e}"


def assert_close(actual: Tensor, expected: Tensor, dtype: Optional[torch.dtype] = None, reduction_length: int = 1,
                 **kwargs) -> None:
    """``torch.testing.assert_close`` with :func:`tolerance` of ``dtype`` (default: the dtype
    of ``actual``)."""
    rtol, atol = tolerance(dtype or actual.dtype, reduction_length)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, **kwargs)


# --------------------------------------------------------------------------- backend x device params


def backend_devices(op: str, *, reference: bool = False) -> list[tuple[str, str]]:
    """The (backend, device type) pairs ``op`` declares, in table order: ``cpu`` runs CPU
    tensors, ``cuda`` CUDA tensors, ``triton`` both (CPU ones through the interpreter),
    ``reference`` both (only with ``reference=True``)."""
    pairs = []
    for backend in OPS[op].backends:
        if backend == "reference" and not reference:
            continue
        devices = (backend,) if backend in DEVICE_TYPES else DEVICE_TYPES
        pairs += [(backend, device) for device in devices]
    return pairs


def param_id(backend: str, device) -> str:
    """``"cpu"``, ``"cuda"``, ``"triton-cpu"``, ``"triton-cuda"``, ``"reference-cpu"``, ..."""
    device_type = torch.device(device).type
    return backend if backend == device_type else f"{backend}-{device_type}"


def skip_reason(backend: str, device) -> Optional[str]:
    """Why ``backend`` on ``device`` cannot run here, or None. Only two reasons exist: no
    visible GPU for a CUDA device, no Triton interpreter for CPU Triton."""
    device_type = torch.device(device).type
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU visible"
    if backend == "triton" and device_type == "cpu" and not triton_interpreted():
        return "CPU Triton needs TRITON_INTERPRET=1 (set before stoichconv is imported)"
    return None


def _marks(backend: str, device_type: str) -> list:
    import pytest

    marks = [pytest.mark.cuda] if device_type == "cuda" else []
    reason = skip_reason(backend, device_type)
    if reason is not None:
        marks.append(pytest.mark.skip(reason=reason))
    return marks


def backend_params(op: str, *, reference: bool = False, devices: Sequence[str] = DEVICE_TYPES,
                   exclude: Sequence[str] = ()) -> list:
    """``pytest.param(backend, torch.device)`` for every (backend, device) pair of
    :func:`backend_devices` on one of ``devices`` (ids from :func:`param_id`), skipped only as
    :func:`skip_reason` says. ``exclude`` drops pairs by id (e.g. ``"triton-cpu"`` for a
    real-size graph the interpreter would take minutes on)."""
    import pytest

    params = []
    for backend, device_type in backend_devices(op, reference=reference):
        pid = param_id(backend, device_type)
        if pid in exclude or device_type not in devices:
            continue
        params.append(pytest.param(backend, torch.device(device_type), id=pid, marks=_marks(backend, device_type)))
    return params


INTERPRETED = "triton-cpu"  # the id of the one param that runs kernels through the Triton interpreter


def is_interpreted(backend: str, device) -> bool:
    """Whether ``backend`` on ``device`` runs through the Triton interpreter (size tests for it)."""
    return backend == "triton" and torch.device(device).type == "cpu"


def _value_id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


def backend_cases(params: Sequence, values: Sequence[tuple], interpreted: Optional[Sequence[tuple]] = None) -> list:
    """Cross backend params (:func:`backend_params`) with ``values`` (tuples of the test's
    further arguments): ``pytest.param(backend, device, *value)``, the backend param's marks
    kept. The Triton interpreter (param ``"triton-cpu"``), which runs the kernels program by
    program in numpy, takes ``interpreted`` instead when given: a subset of small cases, so that
    the suite stays fast; every other backend runs all of ``values``."""
    import pytest

    cases = []
    for param in params:
        for value in (interpreted if interpreted is not None and param.id == INTERPRETED else values):
            value = tuple(value)
            pid = "-".join([param.id, *map(_value_id, value)])
            cases.append(pytest.param(*param.values, *value, id=pid, marks=param.marks))
    return cases


def device_params(devices: Sequence[str] = DEVICE_TYPES) -> list:
    """``pytest.param(torch.device)`` for each of ``devices`` (CPU and CUDA), a CUDA one marked
    ``cuda`` and skipped only when no GPU is visible."""
    import pytest

    return [pytest.param(torch.device(d), id=d, marks=_marks("reference", d)) for d in devices]


def kernel_op(op: str, backend: str, device, name: Optional[str] = None):
    """The ``torch.ops`` overload (``.default``) that ``backend`` runs for ``op`` on ``device``
    (the compiled ``stoichconv::<compiled>`` for cpu / cuda, the ``stoichconv::triton_*`` custom
    op for triton), for opcheck and raw-op tests. ``name`` picks a sibling operator of the same
    backend: ``name="backward"`` turns ``stoich_conv_forward`` into ``stoich_conv_backward`` and
    ``group_softmax`` into ``group_softmax_backward`` (a ``_forward`` suffix is replaced, else
    ``_<name>`` appended). Raises
    :class:`~stoichconv.backends.BackendUnavailableError` when the backend cannot run."""
    fn = select(op, backend, torch.device(device)).fn
    qualname = getattr(fn, "_qualname", None) or getattr(fn, "_qualified_op_name", None)
    if qualname is None:
        raise TypeError(f"{op}: backend {backend!r} runs {fn!r}, not a torch.ops operator")
    namespace, _, opname = qualname.partition("::")
    if name is not None:
        opname = (opname.removesuffix("_forward") if opname.endswith("_forward") else opname) + "_" + name
    return getattr(getattr(torch.ops, namespace), opname).default


# --------------------------------------------------------------------------- huge pages

TRANSPARENT_HUGE_PAGES = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_huge_page_mode() -> str:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or "absent"."""
    import re

    try:
        with open(TRANSPARENT_HUGE_PAGES) as f:
            return re.search(r"\[(\w+)\]", f.read()).group(1)
    except (OSError, AttributeError):
        return "absent"


def huge_page_eligible(address: int) -> Optional[int]:
    """The ``THPeligible`` flag of this process's mapping that holds ``address`` (from
    ``/proc/self/smaps``; None where the kernel reports none)."""
    import re

    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
                if head:
                    inside = int(head.group(1), 16) <= address < int(head.group(2), 16)
                elif inside and line.startswith("THPeligible:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def assert_advised_into_huge_pages(tensor: Tensor) -> None:
    """Where this kernel has transparent huge pages on request ("madvise" or "always" mode) and
    reports them per mapping, the mapping holding the middle of ``tensor`` must be eligible;
    elsewhere the advice is a no-op and nothing is asserted beyond the mode."""
    import os

    eligible = huge_page_eligible(tensor.data_ptr() + tensor.nbytes // 2)
    mode = transparent_huge_page_mode()
    if os.uname().sysname == "Linux" and mode in ("madvise", "always") and eligible is not None:
        assert eligible == 1, f"mapping not eligible for huge pages (THP mode {mode})"
    else:
        assert mode not in ("madvise", "always") or eligible is None

