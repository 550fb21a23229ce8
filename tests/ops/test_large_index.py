"""64-bit indexing: a row longer than 2**31 elements (4 GiB of bfloat16, no copy of its size)."""

import os

import pytest
import torch

import online_softmax as osm

N = (1 << 31) + 37


@pytest.mark.skipif(os.environ.get("ONLINE_SOFTMAX_SKIP_HUGE") == "1", reason="ONLINE_SOFTMAX_SKIP_HUGE=1")
def test_row_longer_than_int32(device):
    if device == "cuda" and torch.cuda.mem_get_info()[0] < 4 * N * 2:
        pytest.skip("not enough free GPU memory for two 4 GiB rows")
    x = torch.zeros(N, dtype=torch.bfloat16, device=device)
    x[N - 5] = 8.0        # beyond 2**31: the winner's index needs 64 bits
    x[3] = 4.0
    values, indices = osm.softmax_topk(x, 2)
    assert indices.tolist() == [N - 5, 3]
    # d = (N - 2) * e^-8 + 1 + e^-4 relative to m = 8.
    d = (N - 2) * torch.tensor(-8.0, dtype=torch.float64).exp() + 1 + torch.tensor(-4.0, dtype=torch.float64).exp()
    torch.testing.assert_close(values[0].double(), 1 / d, rtol=2e-2, atol=0)
    st = osm.softmax_stats(x)
    assert st.max.item() == 8.0
    torch.testing.assert_close(st.sumexp.double(), d, rtol=1e-3, atol=0)
    y = osm.softmax(x, -1)
    assert y[N - 5].item() == values[0].item() and y[N - 1].item() == y[0].item()
