import math

import pytest
import torch

from rlhf.core.logprobs import CHUNK_BYTES, _blocks, chunk_rows, entropy_from_logits, selective_log_softmax

# (batch=3, seq_len=5) = 15 rows. Chunk sizes cover both tiling branches (chunk <= seq_len splits each sequence,
# chunk > seq_len groups whole sequences) and sizes that do not divide 15 or 5.
CHUNK_SIZES = [1, 2, 4, 5, 7, 11, 15, 100]


def _ref_logprobs(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


def _ref_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 13, generator=g) * 3
    index = torch.randint(0, 13, (3, 5), generator=g)
    return logits, index


@pytest.mark.parametrize("batch_size, seq_len", [(3, 5), (4, 1), (1, 9), (5, 6)])
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_blocks_tile_the_grid_within_the_chunk_budget(batch_size, seq_len, chunk_size):
    # The memory bound: every block holds at most chunk_size rows, and together they cover each
    # (batch, position) cell exactly once.
    hits = torch.zeros(batch_size, seq_len, dtype=torch.long)
    for rows, cols in _blocks(batch_size, seq_len, chunk_size):
        assert hits[rows, cols].numel() <= chunk_size
        hits[rows, cols] += 1
    assert (hits == 1).all()


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_selective_log_softmax_matches_log_softmax_gather(batch, chunk_size):
    logits, index = batch
    out = selective_log_softmax(logits, index, chunk_size=chunk_size)
    assert out.shape == (3, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _ref_logprobs(logits, index), rtol=1e-5, atol=1e-5)


def test_selective_log_softmax_hand_example():
    # logits [0, 0, ln 2] -> softmax [1/4, 1/4, 1/2]; token 2 -> ln(1/2), token 0 -> ln(1/4)
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)], [0.0, 0.0, math.log(2.0)]]])
    out = selective_log_softmax(logits, torch.tensor([[2, 0]]), chunk_size=1)
    torch.testing.assert_close(out, torch.tensor([[math.log(0.5), math.log(0.25)]]))


def test_selective_log_softmax_non_contiguous_view(batch):
    # The LM-loss use: logits[:, :-1] scored against ids[:, 1:], a strided view that must not be misread.
    logits, index = batch
    view = logits[:, :-1]
    assert not view.is_contiguous()
    out = selective_log_softmax(view, index[:, 1:], chunk_size=3)
    torch.testing.assert_close(out.double(), _ref_logprobs(view, index[:, 1:]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 4, 7])
def test_selective_log_softmax_gradient_matches_autograd(batch, chunk_size):
    logits, index = batch
    weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    x = logits.double().requires_grad_()
    (selective_log_softmax(x, index, chunk_size=chunk_size) * weights).sum().backward()
    y = logits.double().requires_grad_()
    (_ref_logprobs(y, index) * weights).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_selective_log_softmax_gradcheck():
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[0, 3, 1], [2, 2, 0]])
    assert torch.autograd.gradcheck(lambda z: selective_log_softmax(z, index, chunk_size=2), (x,))


def test_selective_log_softmax_bf16(batch):
    logits, index = batch
    bf16 = logits.bfloat16().requires_grad_()
    out = selective_log_softmax(bf16, index, chunk_size=4)
    # Computed in float32, so it equals the exact log-softmax of the bf16-rounded values up to float32 error...
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _ref_logprobs(bf16.detach(), index), rtol=1e-5, atol=1e-5)
    # ...and the float32 answer up to bf16 input rounding (|logit| <~ 10, bf16 relative step 2^-8 -> ~0.04 each).
    torch.testing.assert_close(out.double(), _ref_logprobs(logits, index), rtol=0, atol=0.1)
    out.sum().backward()
    assert bf16.grad.dtype == torch.bfloat16 and torch.isfinite(bf16.grad.float()).all()


def test_selective_log_softmax_neg_inf_logits():
    # Masked vocab entries (-inf) have probability 0: [0, 0, -inf] -> [1/2, 1/2, 0]
    logits = torch.tensor([[[0.0, 0.0, -math.inf]]], requires_grad=True)
    out = selective_log_softmax(logits, torch.tensor([[1]]))
    torch.testing.assert_close(out, torch.tensor([[math.log(0.5)]]))
    out.sum().backward()
    # d log p_1 / dz = onehot(1) - p = [-1/2, 1/2, 0]
    torch.testing.assert_close(logits.grad, torch.tensor([[[-0.5, 0.5, 0.0]]]))


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_entropy_matches_reference(batch, chunk_size):
    logits, _ = batch
    out = entropy_from_logits(logits, chunk_size=chunk_size)
    assert out.shape == (3, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _ref_entropy(logits), rtol=1e-5, atol=1e-5)


def test_entropy_hand_examples():
    logits = torch.tensor(
        [
            [
                [0.0, 0.0, 0.0, 0.0],  # uniform over 4 -> ln 4
                [0.0, 0.0, -math.inf, -math.inf],  # uniform over 2 -> ln 2 (and no 0 * -inf NaN)
                [5.0, -math.inf, -math.inf, -math.inf],  # one certain outcome -> 0
                [
                    0.0,
                    0.0,
                    math.log(2.0),
                    -math.inf,
                ],  # [1/4, 1/4, 1/2, 0] -> 2 * (1/4) ln 4 + (1/2) ln 2 = 1.5 ln 2
            ]
        ]
    )
    out = entropy_from_logits(logits, chunk_size=3)
    expected = torch.tensor([[math.log(4.0), math.log(2.0), 0.0, 1.5 * math.log(2.0)]])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("chunk_size", [1, 4, 7])
def test_entropy_gradient_matches_autograd(batch, chunk_size):
    logits, _ = batch
    weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    x = logits.double().requires_grad_()
    (entropy_from_logits(x, chunk_size=chunk_size) * weights).sum().backward()
    y = logits.double().requires_grad_()
    (_ref_entropy(y) * weights).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_entropy_gradcheck():
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: entropy_from_logits(z, chunk_size=4), (x,))


def test_entropy_gradient_with_neg_inf_logits():
    # A -inf class is absent from the distribution: the gradient on the live classes must equal that of the
    # entropy over the live classes alone, and the -inf class gets 0, not NaN.
    logits = torch.tensor([[[0.0, math.log(2.0), -math.inf]]], requires_grad=True)
    entropy_from_logits(logits).sum().backward()
    live = torch.tensor([0.0, math.log(2.0)], dtype=torch.float64, requires_grad=True)
    _ref_entropy(live).backward()
    # p = [1/3, 2/3]; H = (1/3) ln 3 + (2/3) ln (3/2); dH/dz_j = -p_j (ln p_j + H), nonzero for both
    assert live.grad.abs().min() > 0.1
    torch.testing.assert_close(logits.grad[0, 0, :2].double(), live.grad)
    assert logits.grad[0, 0, 2] == 0


def test_entropy_bf16(batch):
    logits, _ = batch
    out = entropy_from_logits(logits.bfloat16(), chunk_size=4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _ref_entropy(logits.bfloat16()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), _ref_entropy(logits), rtol=0, atol=0.1)


def test_chunk_rows_keep_a_float32_block_under_16_mib():
    # 16 MiB = 16777216 bytes; one float32 row of a 49152-token vocabulary is 196608 bytes: 85.3 -> 85 rows.
    assert CHUNK_BYTES == 16777216
    assert chunk_rows(49152) == 85
    assert chunk_rows(151936) == 27  # 16777216 / 607744 = 27.6 (Qwen's vocabulary)
    assert chunk_rows(10**8) == 1  # a row larger than the budget is still one row
    assert chunk_rows(49152, 7) == 7  # an explicit size wins
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_rows(49152, 0)


def test_default_chunks_by_bytes_and_matches_the_reference():
    """vocab 2**17: chunk_rows = 16777216 / 524288 = 32 rows, so 2 x 40 = 80 rows run as 3 blocks."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 40, 2**17, generator=g)
    index = torch.randint(0, 2**17, (2, 40), generator=g)
    blocks = list(_blocks(2, 40, chunk_rows(2**17)))
    assert [r.stop - r.start for _, r in blocks] == [32, 8, 32, 8]  # seq_len 40 >= 32: each sequence split
    torch.testing.assert_close(selective_log_softmax(logits, index).double(), _ref_logprobs(logits, index),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy_from_logits(logits).double(), _ref_entropy(logits), rtol=0, atol=1e-4)


def test_empty_sequence_gives_empty_output():
    assert selective_log_softmax(torch.zeros(2, 0, 5), torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0)
    assert entropy_from_logits(torch.zeros(0, 3, 5)).shape == (0, 3)


@pytest.mark.parametrize(
    "logits, index, chunk_size, error, match",
    [
        (torch.zeros(2, 3, 5, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), 4, TypeError, "logits"),
        (torch.zeros(6, 5), torch.zeros(6, dtype=torch.long), 4, ValueError, "logits"),
        (torch.zeros(2, 3, 5), torch.zeros(2, 3), 4, TypeError, "index"),
        (torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long), 4, ValueError, "index"),
        (torch.zeros(2, 3, 5), torch.full((2, 3), 5), 4, ValueError, "index"),
        (torch.zeros(2, 3, 5), torch.full((2, 3), -1), 4, ValueError, "index"),
        (torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), 0, ValueError, "chunk_size"),
        (torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), 2.0, ValueError, "chunk_size"),
    ],
)
def test_selective_log_softmax_rejects_bad_input(logits, index, chunk_size, error, match):
    with pytest.raises(error, match=match):
        selective_log_softmax(logits, index, chunk_size=chunk_size)


def test_entropy_rejects_bad_input():
    with pytest.raises(TypeError, match="logits"):
        entropy_from_logits(torch.zeros(2, 3, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="logits"):
        entropy_from_logits(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        entropy_from_logits(torch.zeros(2, 3, 5), chunk_size=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak-memory accounting needs the CUDA allocator")
@pytest.mark.parametrize("fn", ["selective", "entropy"])
def test_peak_memory_stays_chunk_sized_on_cuda(fn):
    # bf16 logits (8, 512, 32000) = 262 MB; a full float32 log_softmax copy would be 524 MB.
    # With 256 rows per chunk, one float32 chunk is 256 * 32000 * 4 = 33 MB, so the extra peak over the inputs
    # (forward) or over inputs + the unavoidable bf16 gradient (backward) must stay a few chunks, far below 524 MB.
    batch, seq_len, vocab, chunk = 8, 512, 32000, 256
    logits = torch.randn(batch, seq_len, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    index = torch.randint(0, vocab, (batch, seq_len), device="cuda")
    full_f32 = batch * seq_len * vocab * 4
    chunk_f32 = chunk * vocab * 4

    def run():
        if fn == "selective":
            return selective_log_softmax(logits, index, chunk_size=chunk)
        return entropy_from_logits(logits, chunk_size=chunk)

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = run()
    torch.cuda.synchronize()
    forward_extra = torch.cuda.max_memory_allocated() - base
    assert forward_extra < 6 * chunk_f32 < full_f32

    grad_bytes = logits.numel() * logits.element_size()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out.sum().backward()
    torch.cuda.synchronize()
    backward_extra = torch.cuda.max_memory_allocated() - base
    assert backward_extra < grad_bytes + 6 * chunk_f32

    ref_in = logits.detach().float()
    if fn == "selective":
        ref = torch.log_softmax(ref_in, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    else:
        ref = -(torch.softmax(ref_in, -1) * torch.log_softmax(ref_in, -1)).sum(-1)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=1e-4)
