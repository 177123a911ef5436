"""SparseLinear captured in a CUDA graph (how decode loops and ``mode="reduce-overhead"`` run
it): the forward of each GPU backend records with no host sync or allocation outside the
graph pool, and replays on new inputs in place, against the float64 oracle (needs a GPU)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsecore as sc
from conftest import assert_close, oracle

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("M", [1, 16, 200])
def test_capture_and_replay(backend, M):
    ok, why = sc.backends.module(backend).available()
    if not ok:
        pytest.skip(why)
    g = torch.Generator().manual_seed(M)
    dense = nn.Linear(512, 320)
    lin = sc.SparseLinear.from_dense(dense, block=(64, 32), sparsity=0.75, backend=backend)
    lin = lin.to("cuda", torch.bfloat16)
    x = torch.randn(M, 512, generator=g).to("cuda", torch.bfloat16)
    side = torch.cuda.Stream()  # warm up (JIT, device queries) off the capture stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            lin(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        y = lin(x)
    w, b = lin.dense_weight().detach(), lin.bias.detach()
    for _ in range(2):  # new inputs written into the captured buffer
        x.copy_(torch.randn(M, 512, generator=g))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(y, oracle(x, w, b), torch.bfloat16)
