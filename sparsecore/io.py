"""Compressed checkpoints: safetensors files that hold only the kept blocks.

``save(model, path)`` writes the model's ``state_dict`` as is — for every ``SparseLinear``
that is ``values [nnzb, BN, BK]`` + ``mask bool [R, C]`` (+ ``bias``), for everything else
the dense tensors — so the file is about ``density`` times the dense size of the sparse
layers. The safetensors header metadata (a str -> str map) carries::

    "format"           "sparsecore"
    "format_version"   "1"
    "sparsecore"       JSON {"layers":  {fqn: {"shape": [N, K], "block": [BN, BK], "nnzb": n,
                                               "density": d, "bias": bool}},
                             "aliases": {key: stored_key},      # tied tensors, stored once
                             "sha256":  hex digest of every stored tensor (name, dtype, shape, bytes)}
    "sparsity_config"  JSON shaped like compressed-tensors' sparsity config (see sparsity_config)

``load(model_or_factory, path)`` validates the whole file against the model (format
version, digest, every layer's shape/block/mask/values, every other key's shape and dtype)
before touching the model, then swaps ``nn.Linear`` -> ``SparseLinear`` where the file has
sparse layers and loads the state dict. Any failure raises ``SparseCoreError`` and leaves the
model as it was.

``to_dense_state_dict`` / ``export_dense`` give the checkpoint of the original dense
architecture (every ``SparseLinear`` as an ``nn.Linear`` weight with zeros where pruned).
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from torch import nn

from .errors import SparseCoreError, check
from .format import META_FIELDS, BlockSparseWeight, grid_shape, normalize_block
from .nn import SparseLinear

FORMAT = "sparsecore"
FORMAT_VERSION = 1
SPARSITY_FORMAT = "block-sparse-bsr"


def _path(path) -> str:
    check(isinstance(path, (str, os.PathLike)), "path", "a str or os.PathLike", type(path).__name__)
    return os.fspath(path)


# -- model description -------------------------------------------------------------------
def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, SparseLinear)}


def sparsity_config(model: nn.Module) -> dict:
    """compressed-tensors-style sparsity config for ``model``'s ``SparseLinear`` layers.

    ``targets``: the sparse layers; ``ignore``: the ``nn.Linear`` layers left dense;
    ``global_sparsity``: pruned fraction of the targets' weight entries (padding excluded);
    ``sparsity_structure``: ``"block-BNxBK"`` (``"block"`` when layers differ, see ``blocks``).
    """
    layers = sparse_layers(model)
    blocks = sorted({m.block for m in layers.values()})
    total = sum(m.out_features * m.in_features for m in layers.values())
    kept = sum(int(m.block_mask().to_dense().sum()) for m in layers.values())
    structure = f"block-{blocks[0][0]}x{blocks[0][1]}" if len(blocks) == 1 else "block"
    return {
        "format": SPARSITY_FORMAT,
        "format_version": FORMAT_VERSION,
        "targets": sorted(layers),
        "ignore": sorted(fqn for fqn, m in model.named_modules() if type(m) is nn.Linear),
        "global_sparsity": round(1.0 - kept / total, 6) if total else 0.0,
        "sparsity_structure": structure,
        "blocks": [list(b) for b in blocks],
    }


def _layer_meta(m: SparseLinear) -> dict:
    return {"shape": [m.out_features, m.in_features], "block": list(m.block), "nnzb": int(m.values.shape[0]),
            "density": round(m.density, 6), "bias": m.bias is not None}


# -- writing -----------------------------------------------------------------------------
def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor shard (FSDP2) gathered into a plain tensor (collective), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _storable(state: dict[str, torch.Tensor], dedupe: bool):
    """CPU, contiguous, storage-exclusive tensors (safetensors forbids shared storage).

    With ``dedupe``, tensors that are the same view of the same storage (tied weights) are
    stored once and returned in ``aliases`` (key -> stored key); else each is copied.
    """
    on_meta = [key for key, t in state.items() if t.is_meta]
    check(not on_meta, "model", "a model with data (nothing on the meta device)", f"{on_meta[:3]} on meta")
    out, aliases, seen, storages = {}, {}, {}, set()
    for key, t in state.items():
        t = _full(t.detach())
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if dedupe and t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen.setdefault(ident, key)
        t = t.cpu().contiguous()
        storage = t.untyped_storage()
        if t.numel() and (storage.nbytes() != t.numel() * t.element_size() or storage.data_ptr() in storages):
            t = t.clone()  # a slice of a larger storage, or a storage already written
        storages.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out, aliases


def _write(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path = _path(path)
    check(os.path.isdir(os.path.dirname(os.path.abspath(path))) and not os.path.isdir(path), "path",
          "a file path in an existing folder", repr(path))
    tmp = path + ".tmp"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)  # never leave a half-written checkpoint under the real name
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _writer() -> bool:
    """In a torch.distributed job only rank 0 writes (every rank must still call: FSDP2 gathers)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save(model: nn.Module, path) -> dict:
    """Write ``model`` (kept blocks + masks + dense rest) to a safetensors file at ``path``.

    Under ``torch.distributed`` call it on every rank (FSDP2 shards are gathered); rank 0
    writes. Returns the header metadata (decoded JSON values).
    """
    check(isinstance(model, nn.Module), "model", "an nn.Module", type(model).__name__)
    for m in sparse_layers(model).values():
        m._check_structure()  # a mask left uninitialized by to_empty() must not be written
    tensors, aliases = _storable(model.state_dict(), dedupe=True)
    info = {"layers": {fqn: _layer_meta(m) for fqn, m in sparse_layers(model).items()}, "aliases": aliases,
            "sha256": _digest(tensors)}
    config = sparsity_config(model)
    if _writer():
        _write(tensors, path, {"format": FORMAT, "format_version": str(FORMAT_VERSION), FORMAT: json.dumps(info),
                               "sparsity_config": json.dumps(config)})
    return {"format": FORMAT, "format_version": FORMAT_VERSION, FORMAT: info, "sparsity_config": config}


def to_dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as if every ``SparseLinear`` were an ``nn.Linear``.

    ``prefix.values`` + ``prefix.mask`` become ``prefix.weight [out, in]`` (zeros where
    pruned), in the key order ``nn.Linear`` uses; every other entry is unchanged. FSDP2
    shards are gathered (collective: call it on every rank).
    """
    check(isinstance(model, nn.Module), "model", "an nn.Module", type(model).__name__)
    sparse = {(fqn + "." if fqn else ""): m for fqn, m in sparse_layers(model).items()}
    for m in sparse.values():
        m._check_structure()  # its metadata would index out of bounds
    out = {}
    for key, t in model.state_dict().items():
        prefix, _, name = key.rpartition(".")
        prefix = prefix + "." if prefix else ""
        t = _full(t.detach())
        if prefix in sparse and name == "values":
            m = sparse[prefix]
            meta = {field: getattr(m, field) for field in META_FIELDS}
            out[prefix + "weight"] = BlockSparseWeight(t, (m.out_features, m.in_features), m.block, meta,
                                                       validate=False).to_dense()
        elif not (prefix in sparse and name == "mask"):
            out[key] = t
    return out


def export_dense(model: nn.Module, path) -> None:
    """Write ``to_dense_state_dict(model)`` as a plain safetensors file (``format: pt``).

    Every key is present (tied tensors are written twice), so ``load_state_dict(strict=True)``
    of the original dense architecture, and Hugging Face loaders, accept it.
    """
    tensors, _ = _storable(to_dense_state_dict(model), dedupe=False)
    if _writer():
        _write(tensors, path, {"format": "pt"})


# -- reading -----------------------------------------------------------------------------
def read(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(header info, tensors)`` of a sparsecore checkpoint, checked for format and integrity.

    ``header info`` has ``layers``, ``aliases``, ``sparsity_config``; ``tensors`` includes
    the aliased keys. Raises ``SparseCoreError`` for a missing, truncated or corrupted file.
    """
    from safetensors import SafetensorError, safe_open

    path = _path(path)
    check(os.path.isfile(path), "path", "an existing sparsecore safetensors file", repr(path))
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            _check_header(meta, path)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:  # truncated, bad header, offsets past the end ...
        raise SparseCoreError(f"path: expected a readable safetensors file, got {path!r} ({e})") from None
    try:
        info = json.loads(meta[FORMAT])
        config = json.loads(meta["sparsity_config"])
        layers, aliases, digest = info["layers"], info["aliases"], info["sha256"]
    except (KeyError, TypeError, ValueError) as e:
        raise SparseCoreError(f"path: expected sparsecore header metadata, got a broken entry in {path!r} ({e!r})") \
            from None
    check(_digest(tensors) == digest, "path", "tensor bytes matching the header's sha256",
          f"a mismatch in {path!r} (the file is corrupted)")
    check(isinstance(aliases, dict) and all(v in tensors and k not in tensors for k, v in aliases.items()),
          "path", "aliases naming stored tensors", repr(aliases)[:200])
    tensors.update({k: tensors[v] for k, v in aliases.items()})
    return {"layers": layers, "aliases": aliases, "sparsity_config": config}, tensors


def _check_header(meta: dict, path: str) -> None:
    check(meta.get("format") == FORMAT, "path", f"a file written by sparsecore.io.save (format {FORMAT!r})",
          f"format {meta.get('format')!r} in {path!r}")
    version = meta.get("format_version")
    check(version == str(FORMAT_VERSION), "path", f"format_version {FORMAT_VERSION}",
          f"{version!r} in {path!r} (written by another sparsecore version)")


def _check_layer(fqn: str, spec: dict, tensors: dict, module) -> tuple:
    """Validate one sparse layer of the file (and the module it loads into); return its state."""
    where = f"layer {fqn!r}"
    try:
        N, K = (int(s) for s in spec["shape"])
        block = normalize_block(tuple(spec["block"]))
        nnzb, has_bias = int(spec["nnzb"]), bool(spec["bias"])
    except (KeyError, TypeError, ValueError) as e:
        raise SparseCoreError(f"{where}: expected shape/block/nnzb/bias metadata, got {spec!r} ({e!r})") from None
    p = fqn + "." if fqn else ""
    mask, values = tensors.get(p + "mask"), tensors.get(p + "values")
    grid = grid_shape((N, K), block)
    check(isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and tuple(mask.shape) == grid,
          f"{where} mask", f"bool {grid}", None if mask is None else f"{mask.dtype} {tuple(mask.shape)}")
    check(int(mask.sum()) == nnzb, f"{where} mask", f"{nnzb} kept blocks (header)", int(mask.sum()))
    check(isinstance(values, torch.Tensor) and values.dtype.is_floating_point
          and tuple(values.shape) == (nnzb, *block), f"{where} values", f"float {(nnzb, *block)}",
          None if values is None else f"{values.dtype} {tuple(values.shape)}")
    check(module is not None, where, "a module of the model at this name", "none")
    kind = type(module)
    check(kind in (nn.Linear, SparseLinear), where, "an nn.Linear or SparseLinear in the model", kind.__name__)
    check((module.out_features, module.in_features) == (N, K), where,
          f"shape (out, in) = {(N, K)} as in the file", f"{(module.out_features, module.in_features)} in the model")
    check((module.bias is not None) == has_bias, where, f"bias={has_bias} as in the file",
          f"bias={module.bias is not None} in the model")
    if kind is SparseLinear:
        check(module.block == block, where, f"block {block} as in the file", f"block {module.block} in the model")
    return block, mask


def load(model_or_factory, path, strict: bool = True) -> nn.Module:
    """Load a file written by ``save`` into a model and return it.

    ``model_or_factory``: the model (its dense ``nn.Linear`` layers or ``SparseLinear`` layers
    of the same block), or a zero-argument callable building one. Sparse layers of the file
    replace the model's ``nn.Linear`` in place (dtype and device of the model are kept).
    A model whose parameters are on the meta device (built without memory or init, e.g. under
    ``torch.device("meta")``) takes the file's tensors as they are: on the CPU, in the file's
    dtypes, tied parameters tied again. ``strict``: every key of the model must be in the
    file and vice versa (as ``load_state_dict``). Everything is validated before the model changes.
    """
    info, tensors = read(path)
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else None
    if model is None:
        check(callable(model_or_factory), "model_or_factory", "an nn.Module or a callable returning one",
              type(model_or_factory).__name__)
        model = model_or_factory()
        check(isinstance(model, nn.Module), "model_or_factory()", "an nn.Module", type(model).__name__)
    check(isinstance(info["layers"], dict), "path", "a dict of sparse layers in the header", type(info["layers"]))
    modules = dict(model.named_modules())

    # 1. validate: layers of the file against the model, then every key's shape and dtype
    expected = {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict().items()}
    swaps = {}
    for fqn, spec in info["layers"].items():
        module = modules.get(fqn)
        if module is None and not strict:  # as load_state_dict: the file's extra keys are ignored
            continue
        block, mask = _check_layer(fqn, spec, tensors, module)
        p = fqn + "." if fqn else ""
        ref = module.values if isinstance(module, SparseLinear) else module.weight
        for name in ("weight", "values", "mask", "bias"):
            expected.pop(p + name, None)
        expected[p + "values"] = ((int(mask.sum()), *block), ref.dtype)
        expected[p + "mask"] = (tuple(mask.shape), torch.bool)
        if module.bias is not None:
            expected[p + "bias"] = ((module.out_features,), module.bias.dtype)
        if type(module) is nn.Linear:
            check(fqn != "", "model_or_factory", "a module containing the nn.Linear (the root cannot be swapped)",
                  "a bare nn.Linear")
            swaps[fqn] = (module, block, mask)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    check(not strict or not (missing or unexpected), "path", "the model's keys (strict=True)",
          f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
          f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for key in set(expected) & set(tensors):
        (shape, dtype), t = expected[key], tensors[key]
        check(tuple(t.shape) == shape, key, f"shape {shape} (model)", f"shape {tuple(t.shape)} in the file")
        check(t.dtype == dtype or (t.dtype.is_floating_point and dtype.is_floating_point), key,
              f"dtype {dtype} (model)", f"{t.dtype} in the file")

    # on the meta device everything must come from the file (a sparse layer's metadata is
    # rebuilt from its mask; a swapped nn.Linear's weight becomes its values)
    named = (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
    on_meta = [k for k, t in named if t.is_meta]
    left = [k for k in on_meta if k not in tensors
            and not (k.rpartition(".")[0] in info["layers"] and k.rpartition(".")[2] in ("weight", *META_FIELDS))]
    check(not left, "model_or_factory", "a model whose meta-device tensors all come from the file",
          f"{left[:5]} not in it")

    # 2. mutate: build replacements, swap them in, load
    new = {fqn: SparseLinear(lin.in_features, lin.out_features, lin.bias is not None, block=block, mask=mask,
                             device=lin.weight.device, dtype=lin.weight.dtype)
           for fqn, (lin, block, mask) in swaps.items()}
    for fqn, m in new.items():
        m.train(swaps[fqn][0].training)
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, m)
    if not on_meta:
        model.load_state_dict(tensors, strict=strict)
        return model
    # the file's tensors become the model's: each in an aligned allocation of its own (safetensors
    # hands some out at an offset, where CPU kernels take other code paths and round differently)
    own: dict[int, torch.Tensor] = {}
    for t in tensors.values():
        if id(t) not in own:
            own[id(t)] = t if t.data_ptr() % 64 == 0 else t.clone()
    tensors = {k: own[id(t)] for k, t in tensors.items()}
    ties: dict[int, list[str]] = {}  # parameter -> all its names (tied weights)
    for name, prm in model.named_parameters(remove_duplicate=False):
        ties.setdefault(id(prm), []).append(name)
    model.load_state_dict(tensors, strict=strict, assign=True)
    for first, *others in ties.values():  # assign made a parameter per name: tie them again
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, model.get_parameter(first))
    return model
