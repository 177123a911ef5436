"""Hugging Face ``transformers`` integration: sparsify, save and reload pretrained models.

A saved sparse model is a ``save_pretrained``-style folder::

    path/
      config.json               the model's config + "sparsity_config" (sparsecore.io.sparsity_config)
      sparsecore.safetensors    sparsecore.io.save: kept blocks, masks, every dense tensor
      generation_config.json    when the model has one

The weights file is deliberately not named ``model.safetensors``: a plain
``AutoModel.from_pretrained(path)`` fails loudly ("no model.safetensors") instead of silently
building random dense layers. ``from_pretrained(AutoModel, path)`` below rebuilds the
``SparseLinear`` layers. ``save_pretrained(model, path, dense=True)`` writes an ordinary
``model.safetensors`` (pruned blocks as zeros) that stock ``transformers`` loads.
"""
from __future__ import annotations

import contextlib
import fnmatch
import logging
import os

import torch
from torch import nn

from . import io
from .errors import SparseCoreError, check, fail
from .sparsify import sparsify as _sparsify

log = logging.getLogger(__name__)

WEIGHTS_NAME = "sparsecore.safetensors"
DENSE_WEIGHTS_NAME = "model.safetensors"


def _output_embedding_names(model: nn.Module) -> set[str]:
    """fqns of the LM head (kept dense by default: usually tied to the input embeddings)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {fqn for fqn, m in model.named_modules() if head is not None and m is head}


def sparsify(model: nn.Module, block=(64, 64), sparsity: float | None = None, method: str = "magnitude",
             filter_fn=None, ignore=(), **kwargs) -> nn.Module:
    """``sparsecore.sparsify`` for a ``transformers`` model; records ``config.sparsity_config``.

    ``ignore``: fqns or glob patterns (``"*pooler*"``) of Linear layers to keep dense (a
    pattern that matches no Linear is logged as a warning); the output embeddings (LM head)
    are always kept dense. GPT-2-style ``Conv1D`` layers are not converted (warned). ``filter_fn(module, fqn)`` further
    restricts the layers, as in ``sparsecore.sparsify``. Other kwargs go to
    ``sparsecore.sparsify`` (calibration, reconstruct, balanced, backend, ...).
    """
    check(isinstance(model, nn.Module) and hasattr(model, "config"), "model",
          "a transformers PreTrainedModel (an nn.Module with .config)", type(model).__name__)
    check(isinstance(ignore, (list, tuple, set)) and all(isinstance(p, str) for p in ignore), "ignore",
          "a list of fqns or glob patterns", repr(ignore))
    skip = _output_embedding_names(model)
    linears = [fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear)]
    for p in ignore:
        if not any(fnmatch.fnmatchcase(fqn, p) for fqn in linears):
            log.warning("hf.sparsify: ignore pattern %r matches no nn.Linear", p)
    conv1d = [fqn for fqn, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    if conv1d:
        log.warning("hf.sparsify: %d transformers Conv1D layers (GPT-2 style, weight [in, out]) are not supported "
                    "and stay dense, e.g. %s", len(conv1d), conv1d[0])

    def keep(module, fqn):
        if fqn in skip or any(fnmatch.fnmatchcase(fqn, p) for p in ignore):
            return False
        return filter_fn is None or filter_fn(module, fqn)

    _sparsify(model, block=block, sparsity=sparsity, method=method, filter_fn=keep, **kwargs)
    model.config.sparsity_config = io.sparsity_config(model)
    return model


def _check_no_dense_weights(path: str, arg: str) -> None:
    """A sparse save must not land beside dense weights: stock loaders would read those instead."""
    stale = [n for n in (DENSE_WEIGHTS_NAME, DENSE_WEIGHTS_NAME + ".index.json", "pytorch_model.bin",
                         "pytorch_model.bin.index.json") if os.path.exists(os.path.join(path, n))]
    check(not stale, arg, "a folder without dense weights (stock loaders would read them instead of ours; a "
          "source model's would be mixed with its pruned copy)", f"{path!r} holding {stale[0] if stale else ''}")


def save_pretrained(model: nn.Module, path, dense: bool = False) -> None:
    """Write ``config.json`` (+ ``sparsity_config``) and the weights to the folder ``path``.

    ``dense=True``: an ordinary dense ``model.safetensors`` (zeros where pruned) and a config
    without ``sparsity_config``, for tools that know nothing of sparsecore. A sparse save
    refuses a folder that holds dense weights (``model.safetensors``, ``pytorch_model.bin``).
    """
    check(isinstance(model, nn.Module) and hasattr(getattr(model, "config", None), "save_pretrained"), "model",
          "a transformers PreTrainedModel", type(model).__name__)
    path = io._path(path)
    if not dense:
        _check_no_dense_weights(path, "path")
    os.makedirs(path, exist_ok=True)
    config = model.config
    config.architectures = [type(model).__name__]  # as transformers' save_pretrained
    had = hasattr(config, "sparsity_config")
    saved = getattr(config, "sparsity_config", None)
    try:
        if dense:
            if had:
                del config.sparsity_config
            config.save_pretrained(path)
        else:
            config.sparsity_config = io.sparsity_config(model)
            config.save_pretrained(path)
    finally:
        if had:
            config.sparsity_config = saved
        elif hasattr(config, "sparsity_config"):
            del config.sparsity_config
    generation = getattr(model, "generation_config", None)
    if generation is not None and callable(getattr(model, "can_generate", None)) and model.can_generate():
        generation.save_pretrained(path)
    if dense:
        io.export_dense(model, os.path.join(path, DENSE_WEIGHTS_NAME))
    else:
        io.save(model, os.path.join(path, WEIGHTS_NAME))


def from_pretrained(cls_or_auto, path, dtype=None, device=None) -> nn.Module:
    """Rebuild a model saved by ``save_pretrained``: ``from_pretrained(AutoModel, path)``.

    ``cls_or_auto``: a ``transformers`` Auto class (``AutoModel``, ``AutoModelForCausalLM``,
    ...) or a concrete model class. The architecture comes from ``config.json``; its
    ``nn.Linear`` layers named in the checkpoint become ``SparseLinear`` and every tensor
    is loaded (validated first, see ``sparsecore.io.load``). ``dtype``: default each tensor's
    dtype in the checkpoint (as ``dtype="auto"`` in transformers, which is accepted: fp32 modules
    of an fp16 model stay fp32), else every floating tensor cast to it (a floating
    ``torch.dtype`` or its name, "bfloat16"). Returned in eval mode.
    """
    from transformers import AutoConfig, PreTrainedModel

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, dtype)
    dtype = None if dtype == "auto" else dtype
    check(dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point, "dtype",
          "None, 'auto' or a floating torch.dtype", repr(dtype))
    try:
        device = None if device is None else torch.device(device)
    except (RuntimeError, TypeError):
        fail("device", "None or a torch.device (or its name)", repr(device))

    path = io._path(path)
    check(os.path.isdir(path), "path", "a folder written by sparsecore.hf.save_pretrained", repr(path))
    config = AutoConfig.from_pretrained(path)
    sparse_cfg = getattr(config, "sparsity_config", None)
    check(isinstance(sparse_cfg, dict) and sparse_cfg.get("format") == io.SPARSITY_FORMAT, "path",
          f"a config.json with sparsity_config.format {io.SPARSITY_FORMAT!r}",
          f"sparsity_config {sparse_cfg!r:.200}")
    weights = os.path.join(path, WEIGHTS_NAME)
    check(os.path.isfile(weights), "path", f"a {WEIGHTS_NAME} file in the folder", f"none in {path!r}")
    is_model_class = isinstance(cls_or_auto, type) and issubclass(cls_or_auto, PreTrainedModel)
    check(is_model_class or hasattr(cls_or_auto, "from_config"), "cls_or_auto",
          "a transformers Auto class or PreTrainedModel subclass", repr(cls_or_auto))

    built = []

    def build():  # the skeleton: no memory and no random init for the dense weights
        with _parameters_on_meta():
            built.append(cls_or_auto(config) if is_model_class else cls_or_auto.from_config(config))
        return built[0]

    saved_as = (getattr(config, "architectures", None) or [None])[0]
    try:
        model = io.load(build, weights)
    except SparseCoreError as e:  # e.g. a ForCausalLM checkpoint into AutoModel: other layer names
        if built and saved_as and type(built[0]).__name__ != saved_as:
            raise SparseCoreError(f"{e} (the checkpoint holds a {saved_as}, this built a {type(built[0]).__name__}: "
                                  f"load it with {saved_as} or its Auto class)") from None
        raise
    model = model.to(device=device, dtype=dtype)
    model.config.sparsity_config = sparse_cfg
    return model.eval()


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device (initializers do nothing
    there) and real buffers: RoPE tables and position ids are computed, not loaded."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


# -- console: `sparsecore sparsify SRC OUT` -------------------------------------------------
def _load_source(src: str):
    """``(model, tokenizer or None)`` from a local transformers folder, each tensor in its
    saved dtype; the class is the one config.json names (else ``AutoModel``)."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    check(os.path.isfile(os.path.join(src, "config.json")), "src", "a transformers model folder with config.json",
          repr(src))
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    try:
        config = AutoConfig.from_pretrained(src, local_files_only=True)
        name = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, name, None) if name else None
        model = (cls or AutoModel).from_pretrained(src, local_files_only=True, **{dtype_kw: "auto"}).eval()
    except (OSError, ValueError) as e:  # bad JSON, unknown model_type, no weights: transformers' own words
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SparseCoreError(f"src: expected a folder transformers can load, got {src!r} ({reason})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:  # a folder of weights only
        log.info("sparsify: no tokenizer in %s (%s)", src, type(e).__name__)
        tokenizer = None
    return model, tokenizer


def _calibration(tokenizer, path, samples: int, device) -> list[dict]:
    from .demo import DATA, batches

    check(tokenizer is not None, "--calibration", "a source folder with a tokenizer (to tokenize the text)",
          "no tokenizer")
    path = path or str(DATA / "calibration.txt")
    check(os.path.exists(path) and not os.path.isdir(path), "--calibration", "a text file, one sample per line",
          repr(path))
    try:
        with open(path, encoding="utf-8") as f:
            texts = [s for s in f.read().splitlines() if s.strip()][:samples]
    except UnicodeDecodeError as e:
        raise SparseCoreError(f"--calibration: expected UTF-8 text, got {repr(path)} ({e.reason} at byte "
                              f"{e.start})") from None
    check(len(texts) > 0, "--calibration", "a file with at least one non-empty line", repr(path))
    if tokenizer.pad_token is None:  # decoder-only tokenizers: pad with EOS (masked anyway)
        tokenizer.pad_token = tokenizer.eos_token
    check(tokenizer.pad_token is not None, "src", "a tokenizer with a pad or EOS token (to batch the calibration "
          "text)", "one with neither")
    return batches(tokenizer, texts, 16, device)


def _device(name: str):
    """``--device``: auto, or a device of a kind torch has here (cpu, cuda, cuda:N, ...)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    kind = getattr(torch, dev.type, None) if dev is not None and dev.type != "cpu" else None
    ok = dev is not None and (dev.type == "cpu" or (callable(getattr(kind, "is_available", None)) and
                                                    kind.is_available() and (dev.index or 0) < kind.device_count()))
    check(ok, "--device", "auto, cpu, or an available accelerator (cuda, cuda:N)", f"{name!r} (none such here)")
    return dev


def _check_args(args) -> tuple[int, int]:
    """Validate the flags before the (slow) model load; returns the block."""
    from .format import BLOCK_SIDES

    parts = args.block.lower().split("x")
    ok = len(parts) <= 2 and all(p.isdigit() and int(p) in BLOCK_SIDES for p in parts)
    check(ok, "--block", f"a side or BNxBK with sides in {BLOCK_SIDES}, e.g. 32 or 64x32", repr(args.block))
    if args.method == "nonzero":
        check(args.sparsity is None, "--sparsity", "none with --method nonzero (the weights' zero blocks decide)",
              args.sparsity)
        check(not args.reconstruct, "--reconstruct", "not with --method nonzero (it changes no value)", "the flag")
    elif args.sparsity is not None:
        check(0.0 <= args.sparsity <= 1.0, "--sparsity", "a fraction of blocks in [0, 1]", args.sparsity)
    check(args.samples > 0, "--samples", "a positive number of calibration lines", args.samples)
    check(args.calibration is None or args.method == "wanda" or args.reconstruct, "--calibration",
          "a file only with --method wanda or --reconstruct (nothing else reads it)", repr(args.calibration))
    check(not os.path.isfile(args.out), "out", "a folder (new or existing)", f"the file {args.out!r}")
    _check_no_dense_weights(args.out, "out")
    try:  # before the slow part: a folder we cannot write fails now
        os.makedirs(args.out, exist_ok=True)
        writable = os.access(args.out, os.W_OK)
    except OSError:
        writable = False
    check(writable, "out", "a folder that can be written", repr(args.out))
    return tuple(int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2


def _cli_sparsify(args) -> int:
    block = _check_args(args)
    device = _device(args.device)
    model, tokenizer = _load_source(args.src)
    model.to(device)
    needs_data = args.method == "wanda" or args.reconstruct
    calibration = _calibration(tokenizer, args.calibration, args.samples, device) if needs_data else None
    sparsify(model, block=block, sparsity=args.sparsity, method=args.method, ignore=args.ignore,
             calibration=calibration, reconstruct=args.reconstruct)
    save_pretrained(model.cpu(), args.out)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out)
    cfg = model.config.sparsity_config
    if not cfg["targets"]:
        log.warning("sparsify: no Linear layer became block-sparse%s", " (no weight has an all-zero %dx%d block)"
                    % block if args.method == "nonzero" else "")
    print(f"sparsecore sparsify: {len(cfg['targets'])} Linear layers block-sparse ({block[0]}x{block[1]}), "
          f"{1 - cfg['global_sparsity']:.1%} of their weights kept -> {args.out} "
          f"(load: sparsecore.hf.from_pretrained({type(model).__name__}, {args.out!r}))")
    return 0


def add_parser(sub):
    p = sub.add_parser("sparsify", help="prune a Hugging Face model folder and save it block-sparse",
                       description="Prune every Linear of a local transformers model folder to block masks "
                                   "(sparsecore.hf.sparsify) and save it with sparsecore.hf.save_pretrained.")
    p.add_argument("src", help="a transformers model folder (config.json + weights)")
    p.add_argument("out", help="output folder; load it with sparsecore.hf.from_pretrained")
    p.add_argument("--block", default="64", help="block: a side or BNxBK (default 64)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of blocks pruned per layer (default 0.5; none with --method nonzero)")
    p.add_argument("--method", default="magnitude", choices=("magnitude", "wanda", "nonzero"),
                   help="magnitude (default); wanda (activation-aware, uses calibration text); nonzero (weights "
                        "already pruned elsewhere: keep the blocks that hold a nonzero)")
    p.add_argument("--reconstruct", action="store_true", help="refit the kept blocks on the calibration text")
    p.add_argument("--calibration", default=None,
                   help="text file, one sample per line (default: sparsecore's built-in English sentences)")
    p.add_argument("--samples", type=int, default=256, help="calibration lines used (default 256)")
    p.add_argument("--ignore", action="append", default=[], help="fqn or glob of a Linear to keep dense (repeatable)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (where pruning runs)")
    p.set_defaults(fn=_cli_sparsify)
