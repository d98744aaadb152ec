"""The R0 benchmark's bound (scripts/bench.py): the FLOPs it counts and how it turns them into a time."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

_spec = importlib.util.spec_from_file_location(
    "bench", os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "bench.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# H = 8, I = 16, 2 layers, 2 heads of 4, 1 KV head (KV width 4), V = 32, tied head.
CONFIG = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=32, tie_word_embeddings=True)


def test_decoder_params_are_the_models_projection_weights():
    # by hand, per layer: q, o 8 x 8 = 64 each; k, v 8 x 4 = 32 each; gate, up, down 8 x 16 = 128 each: 576; x 2 layers
    assert bench.decoder_params(CONFIG) == 1152
    model = LlamaForCausalLM(CONFIG)
    assert bench.decoder_params(CONFIG) == sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))


@pytest.mark.parametrize("rows,length,keep", [(3, 10, 4), (2, 7, 1)])
def test_forward_flops_match_torchs_flop_counter(rows, length, keep):
    # torch's counter counts the matmuls (aten.mm) of a forward; on the CPU the attention products run inside SDPA,
    # which it does not count, so compare with context = 0. By hand for (3, 10, 4): 2 * 1152 * 30 + 2 * 8 * 32 * 12.
    model = LlamaForCausalLM(CONFIG).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 32, (rows, length)), logits_to_keep=keep)
    assert bench.forward_flops(CONFIG, rows * length, rows * keep, 0) == counter.get_total_flops()
    if (rows, length, keep) == (3, 10, 4):
        assert counter.get_total_flops() == 2 * 1152 * 30 + 2 * 8 * 32 * 12 == 75264
    # the attention term: 4 * context * H * layers per token
    assert bench.forward_flops(CONFIG, 5, 0, 3.0) - bench.forward_flops(CONFIG, 5, 0, 0) == 4 * 3 * 8 * 2 * 5


def test_bound_adds_batch_compute_decode_and_adamw():
    probe = {"bf16_batch_tflops": 2e-6, "bf16_decode_tflops": 1e-6, "fp32_batch_tflops": 1e-6,
             "fp32_decode_tflops": 1e-8, "read_gb_s": 1e-6}  # 2e6, 1e6, 1e6, 1e4 FLOP/s; 1000 B/s
    q, n, r = 10, 32, 24
    out = bench.r0_bound(probe, CONFIG, q)
    f = bench.forward_flops
    batch = f(CONFIG, n * q, n, q / 2) + 4 * f(CONFIG, n * (q + r), n * (r + 1), (q + r) / 2)
    decode = f(CONFIG, n, n, q + r / 2)  # = 2 * 1152 * 32 + 2 * 8 * 32 * 32 + 4 * 22 * 8 * 2 * 32 = 135168
    assert decode == 135168
    weights = 1152 + 8 * 32
    # bf16: a decode step is the larger of 135168 / 1e6 = 0.135 s and 1408 * 2 B / 1000 B/s = 2.816 s (bandwidth)
    assert out["bf16"]["batch_s"] == pytest.approx(batch / 2e6)
    assert out["bf16"]["decode_s"] == pytest.approx(23 * weights * 2 / 1000)
    assert out["bf16"]["adamw_s"] == pytest.approx(7 * 4 * weights / 1000)
    # fp32: 135168 / 1e4 = 13.5 s against 1408 * 4 / 1000 = 5.63 s: compute
    assert out["fp32"]["decode_s"] == pytest.approx(23 * 135168 / 1e4)
    assert out["fp32"]["step_s"] == pytest.approx(batch / 1e6 + 23 * 135168 / 1e4 + 7 * 4 * weights / 1000)
    assert out["tflop_step"] == pytest.approx((batch + 23 * decode) / 1e12)
