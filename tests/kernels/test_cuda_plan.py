"""online_softmax.cuda_plan: the launch plans of csrc/kernels/launch_plan.h, read on any machine.

That the launchers run exactly these plans is tested in test_kernels_host.py and
test_sample_kernels_host.py (every host-executed launch is compared with cuda_plan's kernels, grids,
blocks and shared memory). Here: the plans of the shapes that decide the speed (MoE routers, long
dims, few long rows, LLM vocabularies for sampling), on the h100 preset, fill the GPU and move the
bytes the model says; device="cuda" is this machine's GPU; bad arguments raise.
"""

import pytest
import torch

import online_softmax as osm

H100_SMS = 132


def x_bytes(shape, dtype):
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


@pytest.mark.parametrize("k", [2, 4, 8])
def test_moe_router_uses_a_sub_warp_per_row_and_reads_once(k):
    shape = (1 << 20, 64)
    for dtype in (torch.float32, torch.bfloat16):
        plan = osm.cuda_plan("softmax_topk", shape, dtype, k=k, device="h100")
        assert plan.path == "topk_warp"
        (launch,) = plan.launches
        assert launch.threads_per_row <= 32
        assert launch.grid >= H100_SMS
        assert launch.bytes_read == x_bytes(shape, dtype)
        assert plan.bytes_written == shape[0] * (k * (dtype.itemsize + 8) + 8)


def test_softmax_over_a_long_dim_zero_fills_the_gpu():
    """(1M, 8) over dim 0: one tile of columns, so each column is split along the dim. (Stats'
    second launch only merges each column's partial states: one block.)"""
    for op in ("forward", "stats", "backward"):
        plan = osm.cuda_plan(op, (1 << 20, 8), torch.float32, dim=0, device="h100")
        assert plan.path == "strided_split"
        launches = plan.launches[:1] if op == "stats" else plan.launches
        assert all(launch.grid >= H100_SMS for launch in launches)
        assert plan.launches[0].block[0] * plan.launches[0].block[1] == 256
        assert plan.launches[0].bytes_read == (2 if op == "backward" else 1) * x_bytes((1 << 20, 8), torch.float32)


def test_strided_rows_that_fit_are_read_once():
    """Short columns stay in registers: forward and stats read x once (up to 8 positions per thread
    along the dim), backward dy and y once (up to 4: it keeps two values per position)."""
    for op, reads, shape in (("forward", 1, (4096, 64, 128)), ("stats", 1, (4096, 64, 128)),
                             ("backward", 2, (4096, 32, 128))):
        plan = osm.cuda_plan(op, shape, torch.float32, dim=1, device="h100")
        assert plan.path == "strided"
        assert plan.bytes_read == reads * x_bytes(shape, torch.float32)
        assert plan.launches[0].grid >= H100_SMS


@pytest.mark.parametrize("op", ["forward", "stats", "softmax_topk"])
@pytest.mark.parametrize("shape", [(4096, 1024), (132, 16384), (264, 56000), (1 << 20, 64)])
def test_rows_that_fit_on_chip_read_x_once(op, shape):
    plan = osm.cuda_plan(op, shape, torch.float32, k=8 if op == "softmax_topk" else None, device="h100")
    assert plan.path in ("registers", "shared", "topk_warp", "topk_block")
    assert plan.bytes_read == x_bytes(shape, torch.float32)
    assert all(launch.grid >= min(H100_SMS, shape[0]) for launch in plan.launches)


def test_few_long_rows_are_split_to_fill_the_gpu():
    for op, k in (("forward", None), ("stats", None), ("softmax_topk", 64), ("softmax_topk_backward", 8)):
        for shape in ((1, 262144), (4, 262144), (64, 32768)):
            plan = osm.cuda_plan(op, shape, torch.float32, k=k, device="h100")
            assert plan.chunks > 1, (op, shape)
            assert plan.launches[0].grid >= H100_SMS, (op, shape, plan.launches[0])
            # The first launch reads x once (the top-k backward's blocks each re-read the row's k
            # index/gradient pairs: a small fraction).
            assert plan.launches[0].bytes_reread <= plan.launches[0].bytes_read // 16


def test_topk_backward_is_one_launch_without_a_host_sync_in_its_plan():
    plan = osm.cuda_plan("softmax_topk_backward", (4, 262144), torch.float32, k=8, device="h100")
    assert [launch.kernel for launch in plan.launches] == ["topk_backward_kernel"]
    assert plan.launches[0].bytes_written == x_bytes((4, 262144), torch.float32)


def test_presets_and_device_dicts():
    h100 = osm.cuda_plan("forward", (8, 1 << 20), torch.float32, device="h100")
    h200 = osm.cuda_plan("forward", (8, 1 << 20), torch.float32, device="h200")
    assert h100.dram_bytes == h200.dram_bytes
    assert h200.roofline_seconds < h100.roofline_seconds
    a100 = osm.cuda_plan("forward", (8, 1 << 20), torch.float32, device="a100")
    assert a100.device["sm_count"] == 108
    custom = osm.cuda_plan("forward", (2, 40000), torch.float32,
                           device={"sm_count": 1, "max_smem_per_block": 48 * 1024, "l2_bytes": 0, "cc": 90})
    assert custom.path == "split"  # 160 KB rows cannot be cached in 48 KB
    assert custom.roofline_seconds is None
    if not torch.cuda.is_available():
        assert osm.cuda_plan("forward", (3, 5), torch.float32).device["sm_count"] == H100_SMS


def test_the_summary_names_every_launch():
    plan = osm.cuda_plan("forward", (2, 262144), torch.float16, device="h100")
    text = plan.summary()
    for launch in plan.launches:
        assert launch.kernel in text
    assert "us at 3.35 TB/s" in text


def test_split_rows_count_their_second_read_as_l2_when_the_input_fits():
    small = osm.cuda_plan("forward", (4, 262144), torch.float32, device="h100")  # 4 MB: fits in L2
    assert small.path == "split"
    # x read once and y written once; the partial states written once (their reads hit L2 too).
    assert small.dram_bytes == 2 * x_bytes((4, 262144), torch.float32) + small.workspace_bytes
    huge = osm.cuda_plan("forward", (4, 1 << 25), torch.float32, device="h100")  # 512 MB: does not
    assert huge.dram_bytes == huge.bytes_read + huge.bytes_written


def test_empty_and_zero_d_shapes():
    assert osm.cuda_plan("forward", (0, 5), torch.float32, device="h100").launches == []
    assert osm.cuda_plan("forward", (), torch.float32, device="h100").path == "registers"
    assert osm.cuda_plan("softmax_topk", (3, 5), torch.float32, k=0, device="h100").launches == []
    assert osm.cuda_plan("softmax_topk", (3, 4096), torch.float32, k=3000, device="h100").path == "topk_sort"


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="op"):
        osm.cuda_plan("softmax2", (3, 5), torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        osm.cuda_plan("forward", (3, 5), torch.int32)
    with pytest.raises(IndexError, match="dim"):
        osm.cuda_plan("forward", (3, 5), torch.float32, dim=2)
    with pytest.raises(ValueError, match="needs k"):
        osm.cuda_plan("softmax_topk", (3, 5), torch.float32)
    with pytest.raises(ValueError, match="k=6"):
        osm.cuda_plan("softmax_topk", (3, 5), torch.float32, k=6)
    with pytest.raises(ValueError, match="only for the top-k"):
        osm.cuda_plan("forward", (3, 5), torch.float32, k=2)
    with pytest.raises(ValueError, match="preset"):
        osm.cuda_plan("forward", (3, 5), torch.float32, device="v100")
    with pytest.raises(ValueError, match="lacks"):
        osm.cuda_plan("forward", (3, 5), torch.float32, device={"sm_count": 4})
    with pytest.raises(ValueError, match="negative"):
        osm.cuda_plan("forward", (3, -5), torch.float32)


# ---- the sampling ops ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sample_categorical_reads_x_once_a_block_per_row(dtype):
    rows, vocab, draws = 64, 128256, 4
    acc = 8 if dtype == torch.float64 else 4
    chunks = -(-vocab // 256)
    states = rows * chunks * 2 * acc
    plan = osm.cuda_plan("sample_categorical", (rows, vocab), dtype, num_samples=draws, device="h100")
    assert plan.path == "sample"
    (launch,) = plan.launches
    assert launch.kernel == "sample_kernel"
    assert (launch.grid, launch.block, launch.threads_per_row, launch.rows_per_block) == (rows, (256, 1), 256, 1)
    assert plan.workspace_bytes == states and plan.chunks == chunks
    # x once, temperature per row, a uniform per draw, and the chunk states (from cache) for the total.
    assert launch.bytes_read == x_bytes((rows, vocab), dtype) + rows * 8 + rows * draws * 8 + states
    assert launch.bytes_reread == states
    assert launch.bytes_written == states + rows * draws * (8 + acc)
    assert plan.num_samples == draws and f"num_samples={draws}" in plan.summary()


def test_sample_categorical_with_a_cut_reads_x_twice():
    shape = (8, 50000)
    plain = osm.cuda_plan("sample_categorical", shape, torch.float32, device="h100")
    cut = osm.cuda_plan("sample_categorical", shape, torch.float32, min_log_ratio=True, device="h100")
    assert plain.num_samples == 1
    assert cut.launches[0].bytes_read - plain.launches[0].bytes_read == x_bytes(shape, torch.float32) + 8 * 8
    assert cut.launches[0].bytes_reread - plain.launches[0].bytes_reread == x_bytes(shape, torch.float32)
    # Its second read of x is served by L2 when x fits: the same DRAM traffic as without the cut,
    # but for the cut's own (rows,) values.
    assert cut.dram_bytes == plain.dram_bytes + 8 * 8


def test_sampling_edits_add_their_bytes_to_each_read_of_x():
    shape, edits = (8, 50000), 300
    edit_bytes = 8 * edits * (8 + 4)  # an int64 id and a float32 value each
    for op, reads in (("sample_categorical", 1), ("top_p_threshold", 2)):
        plain = osm.cuda_plan(op, shape, torch.bfloat16, device="h100")
        edited = osm.cuda_plan(op, shape, torch.bfloat16, num_edits=edits, device="h100")
        assert [l.kernel for l in edited.launches] == [l.kernel for l in plain.launches]
        assert edited.launches[0].grid == plain.launches[0].grid
        assert edited.bytes_read - plain.bytes_read == reads * edit_bytes
    with pytest.raises(ValueError, match="num_edits is only for"):
        osm.cuda_plan("forward", (8, 100), torch.float32, num_edits=3)
    with pytest.raises(ValueError, match="num_edits must be an int >= 0"):
        osm.cuda_plan("top_p_threshold", (8, 100), torch.float32, num_edits=-1)


def test_sampling_grids_are_capped_and_loop_over_rows():
    rows = 132 * 64 + 5
    for op in ("sample_categorical", "top_p_threshold"):
        plan = osm.cuda_plan(op, (rows, 300), torch.float16, device="h100")
        assert plan.launches[0].grid == 132 * 64


def test_top_p_threshold_reads_x_from_memory_once():
    shape = (16, 32000)
    plan = osm.cuda_plan("top_p_threshold", shape, torch.float32, device="h100")
    assert plan.path == "top_p"
    assert [launch.kernel for launch in plan.launches] == ["top_p_kernel"]
    assert plan.workspace_bytes == 0
    # The max pass and the first probe pass; the narrowing passes re-read the row from cache.
    assert plan.bytes_read == 2 * x_bytes(shape, torch.float32) + 16 * 16
    assert plan.dram_bytes == x_bytes(shape, torch.float32) + 16 * 16 + 16 * 16


def test_sampling_plans_of_empty_shapes_launch_nothing():
    assert osm.cuda_plan("sample_categorical", (0, 5), torch.float32, device="h100").launches == []
    assert osm.cuda_plan("sample_categorical", (3, 5), torch.float32, num_samples=0, device="h100").launches == []
    assert osm.cuda_plan("top_p_threshold", (0, 7), torch.float32, device="h100").path == "nothing"


def test_sampling_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="2-D"):
        osm.cuda_plan("sample_categorical", (2, 3, 5), torch.float32)
    with pytest.raises(ValueError, match="last dim"):
        osm.cuda_plan("top_p_threshold", (3, 5), torch.float32, dim=0)
    with pytest.raises(ValueError, match="at least one column"):
        osm.cuda_plan("sample_categorical", (3, 0), torch.float32)
    with pytest.raises(ValueError, match="num_samples=-1"):
        osm.cuda_plan("sample_categorical", (3, 5), torch.float32, num_samples=-1)
    with pytest.raises(TypeError, match="num_samples"):
        osm.cuda_plan("sample_categorical", (3, 5), torch.float32, num_samples=2.0)
    with pytest.raises(ValueError, match="only for sample_categorical"):
        osm.cuda_plan("top_p_threshold", (3, 5), torch.float32, min_log_ratio=True)
    with pytest.raises(ValueError, match="only for sample_categorical"):
        osm.cuda_plan("forward", (3, 5), torch.float32, num_samples=2)
    with pytest.raises(ValueError, match="only for the top-k"):
        osm.cuda_plan("sample_categorical", (3, 5), torch.float32, k=2)


# ---- rejection_sample ----

def test_rejection_sample_fills_the_gpu_at_batch_one():
    """A speculative step at batch 1: 8 drafts, 9 target rows of a 128256-token vocabulary. The state
    kernel cuts each row into parts of 8 chunks (a chunk per warp), so the GPU fills; the decisions
    take a block per batch row."""
    batch, n, vocab = 1, 8, 128256
    plan = osm.cuda_plan("rejection_sample", (batch, n + 1, vocab), torch.bfloat16, device="h100")
    assert plan.path == "rejection"
    assert [launch.kernel for launch in plan.launches] == ["rejection_states_kernel", "rejection_sample_kernel"]
    states, decide = plan.launches
    chunks = -(-vocab // 256)
    assert plan.chunks == chunks and plan.chunk == 256
    parts = states.threads_per_row // 256
    assert parts > 1 and states.grid == (n + 1) * parts >= 4 * H100_SMS and states.rows_per_block == 0
    assert (decide.grid, decide.block, decide.rows_per_block) == (batch, (256, 1), 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("draft", [None, "float32", "same"])
def test_rejection_sample_reads_the_targets_once_for_their_states(dtype, draft):
    batch, n, vocab = 16, 4, 32000
    shape = (batch, n + 1, vocab)
    draft_dtype = None if draft is None else (torch.float32 if draft == "float32" else dtype)
    qb = 0 if draft_dtype is None else draft_dtype.itemsize
    acc = 8 if dtype == torch.float64 else 4
    plan = osm.cuda_plan("rejection_sample", shape, dtype, draft_dtype=draft_dtype, device="h100")
    states, decide = plan.launches
    rows, chunks = batch * (n + 1), -(-vocab // 256)
    state_bytes = rows * chunks * (acc + 8)
    params = batch * 16  # temperature and num_draft_tokens
    assert states.bytes_read == x_bytes(shape, dtype) + params and states.bytes_reread == 0
    assert states.bytes_written == state_bytes
    # The states, a uniform per position, per draft its id, logit and q; at the rejection (every row
    # is counted with one) the target row again, the draft row, and the residual's chunk masses.
    row_again = batch * vocab * dtype.itemsize
    residual = batch * chunks * 8
    assert decide.bytes_read == (state_bytes + params + rows * 8 + batch * n * (8 + dtype.itemsize + qb) + row_again
                                 + batch * vocab * qb + residual)
    assert decide.bytes_reread == state_bytes + params + row_again + residual
    assert decide.bytes_written == rows * (8 + acc) + batch * 8 + residual
    assert plan.workspace_bytes >= state_bytes + residual


def test_rejection_sample_with_cuts_reads_the_targets_twice():
    shape = (4, 6, 50000)
    plain = osm.cuda_plan("rejection_sample", shape, torch.float32, device="h100")
    cut = osm.cuda_plan("rejection_sample", shape, torch.float32, min_log_ratio=True, device="h100")
    assert [launch.kernel for launch in cut.launches] == ["rejection_max_kernel", "rejection_states_kernel",
                                                          "rejection_sample_kernel"]
    mx, states, _ = cut.launches
    assert mx.bytes_read == x_bytes(shape, torch.float32) + 4 * 16 + 4 * 6 * 8
    assert states.bytes_reread >= x_bytes(shape, torch.float32)
    assert mx.grid == states.grid == plain.launches[0].grid
    assert cut.workspace_bytes > plain.workspace_bytes  # the parts' maxima
    # The second read comes from L2 when the target fits: DRAM traffic grows only by the cuts and maxima.
    assert cut.dram_bytes - plain.dram_bytes < x_bytes(shape, torch.float32) // 100


def test_rejection_sample_many_rows_take_a_block_each():
    plan = osm.cuda_plan("rejection_sample", (256, 5, 32000), torch.bfloat16, device="h100")
    states = plan.launches[0]
    assert states.threads_per_row == 256 and states.rows_per_block == 1 and states.grid == 256 * 5
    assert plan.launches[1].grid == 256


def test_rejection_sample_plans_of_empty_batches_launch_nothing():
    assert osm.cuda_plan("rejection_sample", (0, 3, 100), torch.float32, device="h100").launches == []
    assert osm.cuda_plan("rejection_sample", (0, 3, 0), torch.float32, device="h100").path == "nothing"
    assert len(osm.cuda_plan("rejection_sample", (2, 1, 7), torch.float32, device="h100").launches) == 2  # n = 0


def test_rejection_sample_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="batch, n \\+ 1, vocab"):
        osm.cuda_plan("rejection_sample", (3, 5), torch.float32)
    with pytest.raises(ValueError, match="batch, n \\+ 1, vocab"):
        osm.cuda_plan("rejection_sample", (3, 5, 7), torch.float32, dim=1)
    with pytest.raises(ValueError, match="batch, n \\+ 1, vocab"):
        osm.cuda_plan("rejection_sample", (3, 0, 7), torch.float32)
    with pytest.raises(ValueError, match="vocabulary"):
        osm.cuda_plan("rejection_sample", (3, 2, 0), torch.float32)
    with pytest.raises(TypeError, match="draft_dtype"):
        osm.cuda_plan("rejection_sample", (3, 2, 7), torch.bfloat16, draft_dtype=torch.float16)
    with pytest.raises(ValueError, match="draft_dtype is only for rejection_sample"):
        osm.cuda_plan("sample_categorical", (3, 7), torch.float32, draft_dtype=torch.float32)
    with pytest.raises(ValueError, match="only for sample_categorical"):
        osm.cuda_plan("rejection_sample", (3, 2, 7), torch.float32, num_samples=2)
    with pytest.raises(ValueError, match="out_dtype"):
        osm.cuda_plan("rejection_sample", (3, 2, 7), torch.bfloat16, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="only for the top-k"):
        osm.cuda_plan("rejection_sample", (3, 2, 7), torch.float32, k=2)


# ---- cross_entropy_backward ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(8192, 32000), (4096, 128256), (16, 262144), (1 << 16, 10), (2048, 4096)])
@pytest.mark.parametrize("smooth,weight", [(False, False), (True, False), (True, True), (False, True)])
def test_cross_entropy_backward_reads_x_once_and_writes_out_once(dtype, shape, smooth, weight):
    rows, classes = shape
    acc = 8 if dtype == torch.float64 else 4
    plan = osm.cuda_plan("cross_entropy_backward", shape, dtype, smooth_scale=smooth, weight=weight, device="h100")
    (launch,) = plan.launches
    assert plan.workspace_bytes == 0
    assert launch.grid >= min(H100_SMS, rows)
    # x once, out once; max, sumexp, p_scale, target_scale (and smooth_scale) and the int64 target
    # per row, the class weights once (weight only counts with smooth_scale); every chunk of a row
    # reads the row's scalars again.
    per_row = (5 if smooth else 4) * acc + 8
    weights = classes * acc if smooth and weight else 0
    assert launch.bytes_written == x_bytes(shape, dtype)
    assert launch.bytes_read == x_bytes(shape, dtype) + rows * plan.chunks * per_row + weights
    assert launch.bytes_reread == rows * (plan.chunks - 1) * per_row
    if plan.path == "registers":
        assert launch.kernel == "cross_entropy_backward_rows_kernel" and plan.chunks == 1
        assert launch.threads_per_row * launch.rows_per_block == launch.block[0]
    else:
        assert plan.path == "split" and launch.kernel == "cross_entropy_backward_chunks_kernel"
        assert plan.chunks > 1 and launch.threads_per_row == 256 * plan.chunks


def test_cross_entropy_backward_plans_by_row_length():
    """Short rows share a warp, vocabulary-sized rows take a block, rows past the register
    configurations and too few rows to fill the GPU are cut into chunks."""
    short = osm.cuda_plan("cross_entropy_backward", (1 << 16, 10), torch.float32, device="h100")
    assert short.path == "registers" and short.launches[0].threads_per_row < 32
    vocab = osm.cuda_plan("cross_entropy_backward", (8192, 32000), torch.bfloat16, device="h100")
    assert vocab.path == "registers" and vocab.launches[0].threads_per_row == vocab.launches[0].block[0]
    long_rows = osm.cuda_plan("cross_entropy_backward", (4096, 128256), torch.float32, device="h100")
    assert long_rows.path == "split"
    few = osm.cuda_plan("cross_entropy_backward", (16, 32000), torch.float32, device="h100")
    assert few.path == "split" and few.launches[0].grid >= H100_SMS
    assert osm.cuda_plan("cross_entropy_backward", (0, 7), torch.float32, device="h100").path == "nothing"
    assert osm.cuda_plan("cross_entropy_backward", (7, 0), torch.float32, device="h100").launches == []


def test_cross_entropy_backward_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="2-D"):
        osm.cuda_plan("cross_entropy_backward", (2, 3, 5), torch.float32)
    with pytest.raises(ValueError, match="last dim"):
        osm.cuda_plan("cross_entropy_backward", (3, 5), torch.float32, dim=0)
    with pytest.raises(ValueError, match="out_dtype"):
        osm.cuda_plan("cross_entropy_backward", (3, 5), torch.bfloat16, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="only for the top-k"):
        osm.cuda_plan("cross_entropy_backward", (3, 5), torch.float32, k=2)
    with pytest.raises(ValueError, match="only for sample_categorical"):
        osm.cuda_plan("cross_entropy_backward", (3, 5), torch.float32, num_samples=2)
    for flag in ("smooth_scale", "weight"):
        with pytest.raises(ValueError, match="only for cross_entropy_backward"):
            osm.cuda_plan("backward", (3, 5), torch.float32, **{flag: True})


# ---- device="cuda" ----

@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_cuda_device_is_a_gpu_of_this_machine(device):
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"device=.cuda.*names a GPU, but torch sees none"):
            osm.cuda_plan("forward", (3, 5), torch.float32, device=device)
        return
    index = torch.cuda.current_device() if device in ("cuda", torch.device("cuda")) else 0
    props = torch.cuda.get_device_properties(index)
    plan = osm.cuda_plan("forward", (3, 5), torch.float32, device=device)
    assert plan.device["sm_count"] == props.multi_processor_count
    assert plan.device["cc"] == (props.major, props.minor)


def test_cuda_device_names_that_name_no_gpu_raise():
    with pytest.raises(ValueError, match="device='cuda:x'"):
        osm.cuda_plan("forward", (3, 5), torch.float32, device="cuda:x")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda:99'"):
            osm.cuda_plan("forward", (3, 5), torch.float32, device="cuda:99")
    with pytest.raises(TypeError, match="device"):
        osm.cuda_plan("forward", (3, 5), torch.float32, device=torch.device("cpu"))


# ---- token_logprobs ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_token_logprobs_reads_x_once_a_block_per_row(dtype):
    rows, vocab, top_n = 4096, 128256, 5
    plan = osm.cuda_plan("token_logprobs", (rows, vocab), dtype, k=top_n, device="h100")
    assert plan.path == "token_logprobs" and plan.workspace_bytes == 0
    (launch,) = plan.launches
    assert launch.kernel == "token_logprobs_kernel" and launch.rows_per_block == 1
    acc = 8 if dtype == torch.float64 else 4
    assert launch.bytes_read == x_bytes((rows, vocab), dtype) + rows * (8 + dtype.itemsize)
    assert launch.bytes_written == rows * (4 * acc + 8) + rows * top_n * (8 + acc)  # nothing of (rows, vocab)
    values = osm.cuda_plan("token_logprobs", (rows, vocab), dtype, token_values=True, device="h100")
    assert values.launches[0].bytes_read == x_bytes((rows, vocab), dtype) + rows * (8 + acc)


def test_token_logprobs_plan_arguments():
    assert osm.cuda_plan("token_logprobs", (0, 5), torch.float32, device="h100").launches == []
    # top_n beyond the fused buffer: the kernel selects nothing (the binding asks softmax_topk)
    big = osm.cuda_plan("token_logprobs", (2, 5000), torch.float32, k=3000, device="h100")
    assert big.launches[0].bytes_written == 2 * (4 * 4 + 8)
    with pytest.raises(ValueError, match="top_n"):
        osm.cuda_plan("token_logprobs", (3, 5), torch.float32, k=6)
    with pytest.raises(ValueError, match="2-D"):
        osm.cuda_plan("token_logprobs", (3, 5, 2), torch.float32)
    with pytest.raises(ValueError, match="token_values is only for token_logprobs"):
        osm.cuda_plan("forward", (3, 5), torch.float32, token_values=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_distillation_reads_both_rows_once_a_block_per_row(dtype):
    rows, vocab = 4096, 128256
    both = 2 * x_bytes((rows, vocab), dtype)
    acc = 4
    plan = osm.cuda_plan("distillation_forward", (rows, vocab), dtype, target=True, device="h100")
    assert plan.path == "distillation" and plan.workspace_bytes == 0
    (launch,) = plan.launches
    assert launch.kernel == "distillation_forward_kernel" and launch.rows_per_block == 1
    assert launch.bytes_read == both + rows * (8 + dtype.itemsize) and launch.bytes_reread == rows * dtype.itemsize
    assert launch.bytes_written == rows * 8 * acc  # the loss and 7 stats: nothing of (rows, vocab)
    jsd = osm.cuda_plan("distillation_forward", (rows, vocab), dtype, kind="jsd", device="h100")
    assert jsd.launches[0].bytes_read == 2 * both and jsd.launches[0].bytes_reread == both
    back = osm.cuda_plan("distillation_backward", (rows, vocab), dtype, target=True, device="h100")
    read = sum(l.bytes_read for l in back.launches)
    # Each chunk of a split row reads the row's stats again (the reread); the teacher rides with the student.
    reread = sum(l.bytes_reread for l in back.launches)
    assert read == both + rows * (8 * acc + 8) + reread and sum(l.bytes_written for l in back.launches) == both // 2


def test_distillation_plan_arguments():
    assert osm.cuda_plan("distillation_forward", (0, 5), torch.float32, device="h100").launches == []
    # An empty vocabulary still takes a block per row: its loss is NaN (0 where ignored).
    assert len(osm.cuda_plan("distillation_forward", (3, 0), torch.float32, device="h100").launches) == 1
    with pytest.raises(ValueError, match="kind must be one of"):
        osm.cuda_plan("distillation_forward", (3, 5), torch.float32, kind="kld")
    with pytest.raises(ValueError, match="2-D student"):
        osm.cuda_plan("distillation_backward", (3, 5, 2), torch.float32)
    with pytest.raises(ValueError, match="target and kind are only for the distillation ops"):
        osm.cuda_plan("forward", (3, 5), torch.float32, target=True)
