"""The site's trusted trainer for ``custom_code: private``: DP-SGD on a team's computation graph.

The team sends no Python. The bundle holds one ``torch.export`` program, ``program.pt2``
(written by ``torch.export.save``), and this trainer, which is the site's code, runs it.

The graph's contract
    * one input: the token ids of ONE training example, ``int64[block_size]``;
    * one output: that example's loss, a scalar float tensor;
    * the program's parameters exported with ``requires_grad=True`` are trained (for example a
      LoRA-style adapter's ``adapter_a``/``adapter_b``); every other parameter and buffer is
      frozen. The starting values are the program's own, fixed before the team saw any data;
    * only ``aten`` operators (and ``operator.getitem``): no higher-order operators, no custom
      or extension operators, no opaque or script objects.

Loading without running the bundle's Python. ``torch.export.load`` is NOT used: it unpickles
weights and constants with ``torch.load(weights_only=False)`` and ``pickle.loads`` and, for
the example inputs, falls back to ``weights_only=False`` when the safe load fails, any of which
runs code the archive chose; its operator lookup also resolves any ``torch.*`` attribute (for
example ``torch.os.system``) as a node's target. :func:`load_program` reads the archive itself:
the program as JSON, which is checked against the operator allow-list BEFORE it is turned into
a graph (node metadata such as stack traces is dropped, so nothing from the bundle reaches the
generated code but identifiers FX sanitises); tensors from raw little-endian bytes only (a
pickled tensor is loaded with ``torch.load(weights_only=True)``, which unpickles tensors and
plain containers only); constants that are objects, and example inputs, are refused or ignored.

DP-SGD (:func:`dp_sgd`), whatever the graph computes: each step samples every example with
probability ``q = batch_size / N`` (Poisson), computes each sampled example's gradient of the
trainable parameters (``torch.func``: ``functional_call`` + ``grad`` + ``vmap``), clips it to
``max_grad_norm`` in L2 over all trainable parameters together, sums, adds Gaussian noise of
standard deviation ``noise_multiplier x max_grad_norm`` to every coordinate, divides by the
expected batch size and takes a plain SGD step. The noise multiplier is the one Opacus' RDP
accountant says reaches the job's ``dp_epsilon`` at ``dp_delta`` after ``max_steps`` steps at
rate ``q``; ε is computed again by the accountant from the parameters used and is the only
figure this trainer reports (no loss: a loss on the data is not private). The released
weights are the trainable parameters only (``weights/model.safetensors``), so the release is
(ε, δ)-DP for each training example. The site knows that layout before it reads the output:
:func:`released_layout` computes it from the bundle's program, the same way the trainer loads it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainers import contract
from trainers.contract import DPParameters
from trainers.errors import ConfigError, DataError, TrainerError
from trainers.private_hparams import PREFIX as _PREFIX
from trainers.private_hparams import PrivateHyperparameters
from trainers.runtime import RunContext, find_text_files
from trainers.weights import TensorLayout

PROGRAM_FILE = "program.pt2"
"""Where the team's graph sits in the code bundle."""
MAX_PROGRAM_BYTES = 512 * 1024 * 1024
MAX_UNPACKED_BYTES = 2 * MAX_PROGRAM_BYTES
"""The archive's members together, as declared (zipfile reads no member past its declared
size): the site loads the program too (:func:`released_layout`), outside any container, so a
zip bomb must not get to inflate there."""
MAX_MEMBERS = 10_000
MAX_NODES = 100_000
RELEASED_DTYPE = "F32"
"""What :func:`run` writes every trainable parameter as (:func:`dp_sgd` trains in float32)."""
ALLOWED_NAMESPACES = ("torch.ops.aten.",)
ALLOWED_TARGETS = frozenset({"_operator.getitem"})
REFUSED_OPS = frozenset(
    {
        # Side effects or host access are not aten's business, but refuse the few that touch
        # the outside or the random state anyway: the graph computes a loss, nothing else.
        "torch.ops.aten._local_scalar_dense.default",
        "torch.ops.aten.item.default",
        "torch.ops.aten.set_.source_Storage",
        "torch.ops.aten.from_file.default",
        "torch.ops.aten._print.default",
        "torch.ops.aten.seed.default",
    }
)
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,199}$")


class GraphRefused(TrainerError):
    """The bundle's program breaks the graph contract; nothing of it ran."""


# --- loading the graph without running the bundle -----------------------------------------


def _check_serialized(program: dict[str, Any]) -> None:
    """Refuse a serialized program (JSON) whose nodes call anything but allowed aten ops."""
    graph = program.get("graph_module", {}).get("graph", {})
    nodes = graph.get("nodes")
    if not isinstance(nodes, list) or len(nodes) > MAX_NODES:
        raise GraphRefused("the program has no node list, or too many nodes")
    for node in nodes:
        target = node.get("target") if isinstance(node, dict) else None
        if not isinstance(target, str):
            raise GraphRefused("a node has no operator")
        if target in REFUSED_OPS or not (
            target in ALLOWED_TARGETS or target.startswith(ALLOWED_NAMESPACES)
        ):
            raise GraphRefused(f"operator {target[:80]!r} is not allowed in a private graph")
        node["metadata"] = {}  # stack traces etc.: nothing of the bundle's text goes further


def _tensor(raw: bytes, meta: Mapping[str, Any]) -> torch.Tensor:
    from torch._export.serde.serialize import deserialize_scalar_type

    dtype = deserialize_scalar_type(meta["dtype"])
    sizes = [int(s["as_int"]) for s in meta["sizes"]]
    strides = [int(s["as_int"]) for s in meta["strides"]]
    offset = int(meta["storage_offset"]["as_int"])
    flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.zeros(0, dtype=dtype)
    need = offset + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True)) + 1
    if any(n == 0 for n in sizes):
        return torch.zeros(sizes, dtype=dtype)
    if need > flat.numel():
        raise GraphRefused("a tensor's payload is shorter than its shape")
    return torch.as_strided(flat, sizes, strides, offset).clone()


def _payloads(
    archive: zipfile.ZipFile, base: str, config_name: str
) -> dict[str, tuple[torch.Tensor, bool, bool]]:
    """name -> (tensor, is_param, requires_grad), from raw bytes (or weights-only pickles)."""
    config = json.loads(archive.read(config_name)).get("config", {})
    out: dict[str, tuple[torch.Tensor, bool, bool]] = {}
    for name, meta in config.items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise GraphRefused("a tensor has a malformed name")
        path = str(meta.get("path_name", ""))
        if not re.fullmatch(r"[A-Za-z0-9_]{1,100}", path):
            raise GraphRefused("a tensor payload has a malformed path")
        if not path.startswith(("weight_", "tensor_")):
            # custom_obj_*, opaque_obj_*: objects, not tensors, and unpickling them runs code.
            raise GraphRefused("the program holds objects, not only tensors")
        data = archive.read(f"{base}{path}")
        tmeta = meta.get("tensor_meta") or {}
        if meta.get("use_pickle"):
            with warnings.catch_warnings():  # a protocol warning is no reason to stop: refuse
                warnings.simplefilter("ignore")
                tensor = torch.load(io.BytesIO(data), weights_only=True)
            if not isinstance(tensor, torch.Tensor):
                raise GraphRefused("a pickled payload is not a tensor")
        else:
            tensor = _tensor(data, tmeta)
        out[name] = (tensor, bool(meta.get("is_param")), bool(tmeta.get("requires_grad")))
    return out


def load_program(path: Path) -> tuple[torch.fx.GraphModule, dict[str, torch.Tensor], set[str]]:
    """Load ``path`` (a ``torch.export.save`` archive) without running anything it holds.

    Returns the graph as a module, its parameters and buffers by name, and the names of the
    trainable parameters. Raises :class:`GraphRefused` for anything outside the contract."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    if path.is_symlink() or not path.is_file():
        raise GraphRefused(f"no {PROGRAM_FILE} in the bundle")
    if path.stat().st_size > MAX_PROGRAM_BYTES:
        raise GraphRefused(f"{PROGRAM_FILE} is over {MAX_PROGRAM_BYTES} bytes")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > MAX_MEMBERS:
                raise GraphRefused(f"{PROGRAM_FILE} holds over {MAX_MEMBERS} files")
            if sum(m.file_size for m in members) > MAX_UNPACKED_BYTES:
                raise GraphRefused(f"{PROGRAM_FILE} unpacks to over {MAX_UNPACKED_BYTES} bytes")
            names = archive.namelist()
            models = [n for n in names if re.fullmatch(r"[^/]+/models/[^/]+\.json", n)]
            if len(models) != 1:
                raise GraphRefused("the archive must hold exactly one program")
            root, model = models[0].split("/models/")
            model = model[: -len(".json")]
            raw = json.loads(archive.read(models[0]))
            _check_serialized(raw)
            weights = _payloads(
                archive,
                f"{root}/data/weights/",
                f"{root}/data/weights/{model}_weights_config.json",
            )
            constants = _payloads(
                archive,
                f"{root}/data/constants/",
                f"{root}/data/constants/{model}_constants_config.json",
            )
    except (
        zipfile.BadZipFile,
        KeyError,
        ValueError,
        TypeError,
        RuntimeError,
        pickle.UnpicklingError,
    ) as e:
        raise GraphRefused(f"{PROGRAM_FILE} is not a torch.export archive: {e}") from None
    state = {
        n: (torch.nn.Parameter(t, requires_grad=g) if p else t) for n, (t, p, g) in weights.items()
    }
    trainable = {n for n, (_, p, g) in weights.items() if p and g}
    if not trainable:
        raise GraphRefused("the program has no trainable parameter (requires_grad=True)")
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, raw)  # type: ignore[no-untyped-call]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = ExportedProgramDeserializer().deserialize(
                serialized, state, {n: t for n, (t, _, _) in constants.items()}, b""
            )
    except GraphRefused:
        raise
    except Exception as e:  # the deserializer's own errors: malformed, not hostile-by-itself
        raise GraphRefused(
            f"{PROGRAM_FILE} cannot be read as a program: {type(e).__name__}"
        ) from None
    _check_graph(program.graph)
    module = program.module()
    tensors = {n: t.detach() for n, t in module.named_parameters()}
    tensors.update({n: t.detach() for n, t in module.named_buffers()})
    missing = trainable - tensors.keys()
    if missing:
        raise GraphRefused("a trainable parameter is not one of the program's parameters")
    return module, tensors, trainable


def released_layout(path: Path) -> TensorLayout:
    """What :func:`run` releases for the program at ``path``: each trainable parameter, as
    :data:`RELEASED_DTYPE`, in its own shape. The site calls this on the bundle it unpacked
    (never on the job's output) to know the release before reading it; it loads the program
    as the trainer does, so the two agree, and raises :class:`GraphRefused` where the trainer
    would have."""
    _, tensors, trainable = load_program(path)
    return {n: (RELEASED_DTYPE, tuple(int(d) for d in tensors[n].shape)) for n in trainable}


def _check_graph(graph: torch.fx.Graph) -> None:
    """The deserialized graph again: every call is an aten OpOverload (or getitem)."""
    import operator

    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.op != "call_function":
            raise GraphRefused(f"a {node.op} node is not allowed in a private graph")
        target = node.target
        if target is operator.getitem:
            continue
        if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
            raise GraphRefused("only aten operators may appear in a private graph")


# --- DP-SGD ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DPRun:
    """What the site set and what it gives: ``epsilon`` computed by the accountant."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    max_grad_norm: float
    epsilon: float


def noise_for(*, epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier that reaches ``epsilon`` (Opacus' RDP accountant)."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(
                get_noise_multiplier(
                    target_epsilon=epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant="rdp",
                    alphas=RDP_ORDERS,
                )
            )
    except ValueError as e:
        raise ConfigError(f"{_PREFIX}.dp_epsilon", f"{epsilon} cannot be reached: {e}") from e


def epsilon_of(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε after ``steps`` Poisson-sampled steps (Opacus' RDP accountant)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta, alphas=RDP_ORDERS))


def per_example_grads(
    module: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor],
    trainable: set[str],
    batch: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Each row of ``batch``'s gradient of its loss, per trainable parameter: ``[B, *shape]``."""
    from torch.func import functional_call, grad, vmap

    frozen = {n: t for n, t in tensors.items() if n not in trainable}

    def loss(params: dict[str, torch.Tensor], example: torch.Tensor) -> torch.Tensor:
        out = functional_call(module, {**frozen, **params}, (example,))
        if not isinstance(out, torch.Tensor) or out.dim() != 0:
            raise GraphRefused("the graph must return one scalar loss per example")
        return out

    params = {n: tensors[n] for n in sorted(trainable)}
    grads: dict[str, torch.Tensor] = vmap(grad(loss), in_dims=(None, 0))(params, batch)
    return grads


def dp_sgd(
    module: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor],
    trainable: set[str],
    examples: torch.Tensor,
    hp: PrivateHyperparameters,
    *,
    on_step: Callable[[int, int], None] | None = None,
    site: DPParameters | None = None,
) -> tuple[dict[str, torch.Tensor], DPRun]:
    """Train the trainable parameters on ``examples`` (``int64[N, block]``) with DP-SGD, with
    the ``site``'s noise multiplier and sample rate where it set them (inside a site)."""
    n = int(examples.shape[0])
    if n == 0:
        raise DataError("no training examples")
    q = min(1.0, hp.batch_size / n)
    sigma = 0.0
    if site is not None:
        if (site.steps, site.max_grad_norm, site.delta) != (
            hp.max_steps,
            hp.dp_max_grad_norm,
            hp.dp_delta,
        ):
            raise ConfigError(f"{_PREFIX}.dp_epsilon", "the site's DP-SGD parameters differ")
        q, sigma = site.sample_rate, site.noise_multiplier
    else:
        sigma = noise_for(
            epsilon=hp.dp_epsilon, delta=hp.dp_delta, sample_rate=q, steps=hp.max_steps
        )
    gen = torch.Generator().manual_seed(hp.seed)
    # The noise must not be predictable by whoever chose the seed: fresh entropy for it.
    noise_gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    # float32 whatever the graph's dtype: the released layout (RELEASED_DTYPE) says so.
    params = {k: tensors[k].detach().clone().float() for k in sorted(trainable)}
    clip = hp.dp_max_grad_norm
    expected = q * n
    for step in range(hp.max_steps):
        mask = torch.rand(n, generator=gen) < q
        total = {k: torch.zeros_like(v) for k, v in params.items()}
        if bool(mask.any()):
            state = {**tensors, **params}
            grads = per_example_grads(module, state, trainable, examples[mask])
            norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
            scale = (clip / (norms + 1e-12)).clamp(max=1.0)
            for k, g in grads.items():
                g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
                total[k] = (g * scale.view(-1, *([1] * (g.dim() - 1)))).sum(0)
        for k, p in params.items():
            noise = torch.normal(0.0, sigma * clip, size=p.shape, generator=noise_gen)
            p -= hp.learning_rate * (total[k] + noise) / expected
        if on_step is not None:
            on_step(step + 1, hp.max_steps)
    eps = epsilon_of(noise_multiplier=sigma, sample_rate=q, steps=hp.max_steps, delta=hp.dp_delta)
    return params, DPRun(sigma, q, hp.max_steps, hp.dp_delta, clip, eps)


# --- the run in the container ---------------------------------------------------------------


def token_blocks(ctx: RunContext, block_size: int) -> torch.Tensor:
    """The datasets' text, tokenised by the base model's tokenizer, in blocks of ``block_size``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ctx.model_dir))
    ids: list[int] = []
    for path in find_text_files(ctx.dataset_dirs):
        ids.extend(tokenizer(path.read_text(encoding="utf-8", errors="replace"))["input_ids"])
    count = len(ids) // block_size
    if count == 0:
        raise DataError(f"the datasets hold fewer than {block_size} tokens")
    return torch.tensor(ids[: count * block_size], dtype=torch.long).view(count, block_size)


def run_bundle(hp: PrivateHyperparameters, ctx: RunContext) -> dict[str, float]:
    """The harness's entry: the graph is in the job's code directory."""
    root = os.environ.get("SEALROOM_ROOT")
    code_dir = Path(root) / "code" if root else Path(str(contract.CODE_DIR))
    return run(hp, ctx, code_dir=code_dir)


def run(hp: PrivateHyperparameters, ctx: RunContext, *, code_dir: Path) -> dict[str, float]:
    """Load the bundle's graph, DP-SGD it on the datasets, write the trainable parameters."""
    from safetensors.torch import save_file

    module, tensors, trainable = load_program(code_dir / PROGRAM_FILE)
    examples = token_blocks(ctx, hp.block_size)

    def progress(step: int, total: int) -> None:
        line = json.dumps({"step": step, "total": total, "loss": 0.0})
        with ctx.progress_file.open("a", encoding="utf-8") as f:
            f.write(line + "\n")

    params, dp = dp_sgd(module, tensors, trainable, examples, hp, on_step=progress, site=ctx.dp)
    ctx.weights_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in params.items()}, str(ctx.weights_file))
    return {"epsilon": dp.epsilon, "steps": float(dp.steps)}
