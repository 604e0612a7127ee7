"""The pure cost model on hand-made profiles and graphs, with numbers worked out by hand."""

from __future__ import annotations

import pytest

from dataclasses import replace

from partitioner.cost_model import build_problem, gemm_efficiency, memory_fraction, narrow_efficiency, layer_fwd_bwd_time, layer_memory, layer_time, layer_time_source, replica_cost, roofline_time
from partitioner.devices import OP_KINDS, Device, DeviceProfile, Link, PeakFlops, link_cost
from partitioner.errors import DeviceError
from partitioner.ir import INPUT, OUTPUT, Layer, LayerGraph, Value
from partitioner.options import Objective, Optimizer, PlanOptions

# A toy GPU with round numbers: compute ceiling 1e12 * 0.5 = 5e11 FLOP/s (bfloat16: 2e12),
# memory ceiling 1e11 * 0.5 = 5e10 B/s; ridge point at 10 FLOP per byte.
HOST = Link(interface="pcie", generation=4, bandwidth_Bps=1e10, latency_s=1e-5, efficiency=1.0)
PEER = Link(interface="nvlink", generation=3, bandwidth_Bps=1e11, latency_s=1e-6, efficiency=1.0)


def toy_profile(name: str = "toy", speed: float = 1.0, peer: bool = True) -> DeviceProfile:
    return DeviceProfile(
        name=name,
        description="toy GPU for tests",
        kind="gpu",
        memory_bytes=10_000,
        memory_bandwidth_Bps=1e11 * speed,
        peak_flops=PeakFlops(float32=1e12 * speed, bfloat16=4e12 * speed),
        compute_efficiency=0.5,
        memory_efficiency=0.5,
        host_link=HOST,
        peer_link=PEER if peer else None,
        source="tests",
    )


def device(name: str, profile: DeviceProfile, memory: int = 10_000) -> Device:
    return Device(name=name, torch_device=None, profile=profile, present=False, memory_bytes=memory)


TOY = toy_profile()
SLOW = toy_profile("slow", speed=0.5)

# Three layers in a chain: L0 compute-bound, L1 timed on "toy", L2 memory-bound.
LAYERS = (
    Layer(index=0, name="l0", param_bytes=1000, buffer_bytes=100, output_bytes=400, saved_bytes=300,
          fwd_flops=10**12, bwd_flops=2 * 10**12, traffic_bytes=10**9),
    Layer(index=1, name="l1", param_bytes=2000, output_bytes=400, saved_bytes=400,
          fwd_flops=10**12, bwd_flops=2 * 10**12, traffic_bytes=10**9,
          fwd_time_s={"toy": 0.25}, bwd_time_s={"toy": 0.5}),
    Layer(index=2, name="l2", param_bytes=0, output_bytes=800, saved_bytes=0,
          fwd_flops=10**9, bwd_flops=0, traffic_bytes=10**11),
)  # fmt: skip
VALUES = (
    Value(name="x", producer=INPUT, consumers=(0,), bytes=1000),
    Value(name="h0", producer=0, consumers=(1,), bytes=400),
    Value(name="h1", producer=1, consumers=(2,), bytes=400),
    Value(name="y", producer=2, consumers=(OUTPUT,), bytes=800),
)
GRAPH = LayerGraph(layers=LAYERS, values=VALUES, fingerprint="toy", batch_size=8)

TRAIN = PlanOptions(training=True, optimizer=Optimizer.ADAM, allow_data_parallel=False)
INFER = PlanOptions(training=False, allow_data_parallel=False)


# --------------------------------------------------------------------------- roofline


def test_roofline_compute_bound() -> None:
    # 1e12 FLOPs at 5e11 FLOP/s = 2 s; 1e9 bytes at 5e10 B/s = 0.02 s.
    assert roofline_time(1e12, 1e9, TOY) == pytest.approx(2.0)


def test_roofline_memory_bound() -> None:
    # 1e9 FLOPs = 0.002 s; 1e11 bytes = 2 s.
    assert roofline_time(1e9, 1e11, TOY) == pytest.approx(2.0)


def test_roofline_dtype_and_fallback() -> None:
    assert roofline_time(1e12, 0, TOY, "bfloat16") == pytest.approx(0.5)  # 4e12 * 0.5
    assert roofline_time(1e12, 0, TOY, "float16") == pytest.approx(2.0)  # no float16 figure: float32 rate
    assert roofline_time(0, 0, TOY) == 0.0
    with pytest.raises(ValueError, match="int8"):
        roofline_time(1, 1, TOY, "int8")
    with pytest.raises(ValueError, match=">= 0"):
        roofline_time(-1, 0, TOY)


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (INFER, 1000 + 100),  # params + buffers (the outputs are room kept on every device)
        (PlanOptions(training=True, optimizer=Optimizer.ADAM), 1000 * 4 + 100 + 300),  # w, grad, 2 moments
        (PlanOptions(training=True, optimizer=Optimizer.MOMENTUM), 1000 * 3 + 100 + 300),
        (PlanOptions(training=True, optimizer=Optimizer.SGD), 1000 * 2 + 100 + 300),
    ],
)
def test_layer_memory(options: PlanOptions, expected: int) -> None:
    assert layer_memory(LAYERS[0], options) == expected


def test_problem_memory_and_capacity() -> None:
    devs = [device("a", TOY, memory=10_000), device("b", TOY, memory=20_000)]
    train = build_problem(GRAPH, devs, PlanOptions(training=True, allow_data_parallel=False, memory_reserve=0.25))
    assert train.memory == (4400, 2000 * 4 + 400, 0)
    assert train.capacity == (7500, 15000)
    infer = build_problem(GRAPH, devs, INFER)
    assert infer.memory == (1100, 2000, 0)
    assert infer.capacity == (9000 - 800, 18000 - 800)  # room for the largest layer's outputs


# --------------------------------------------------------------------------- compute


def test_compute_roofline_training_adds_backward() -> None:
    (dev,) = [device("a", SLOW)]  # "slow" has no measured times: every layer is estimated
    infer = build_problem(GRAPH, [dev], INFER)
    train = build_problem(GRAPH, [dev], TRAIN)
    # SLOW: 2.5e11 FLOP/s, 2.5e10 B/s. l0 fwd: max(4, 0.04) = 4; bwd: max(8, 0.08) = 8.
    assert infer.compute_s[0] == (pytest.approx(4.0),)
    assert train.compute_s[0] == (pytest.approx(12.0),)
    # l2 fwd: max(0.004, 4) = 4; bwd: no FLOPs, 2x the traffic: 8.
    assert infer.compute_s[2] == (pytest.approx(4.0),)
    assert train.compute_s[2] == (pytest.approx(12.0),)


def test_measured_times_are_preferred_on_their_profile_only() -> None:
    devs = [device("a", TOY), device("b", SLOW)]
    infer = build_problem(GRAPH, devs, INFER)
    train = build_problem(GRAPH, devs, TRAIN)
    assert infer.compute_s[1] == (0.25, pytest.approx(4.0))  # measured on toy, roofline on slow
    assert train.compute_s[1] == (0.75, pytest.approx(12.0))


def test_measured_forward_only_falls_back_to_roofline_backward() -> None:
    layer = Layer(index=0, name="f", fwd_flops=10**12, bwd_flops=2 * 10**12, fwd_time_s={"toy": 0.1})
    assert layer_time(layer, TOY, TRAIN) == pytest.approx(0.1 + 4.0)
    assert layer_time(layer, TOY, INFER) == pytest.approx(0.1)


# ------------------------------------------------------------- launch floor, matmul sizes, element-wise bytes

# 1,000 tiny kernels: 1e6 FLOPs and 1e6 bytes take 2 us and 20 us on TOY, far below 1,000 launches.
TINY = Layer(index=0, name="tiny", fwd_flops=10**6, bwd_flops=2 * 10**6, traffic_bytes=10**6,
             fwd_kernels=1000, bwd_kernels=2000)  # fmt: skip


def test_launch_floor_binds_a_layer_of_tiny_kernels_on_a_gpu() -> None:
    gpu = replace(TOY, launch_s=5e-6)
    fwd, bwd = layer_fwd_bwd_time(TINY, gpu)
    assert fwd == pytest.approx(1000 * 5e-6)  # max(20 us of bytes, 5 ms of launches)
    assert bwd == pytest.approx(2000 * 5e-6)
    assert layer_time(TINY, gpu, TRAIN) == pytest.approx((TINY.fwd_kernels + TINY.bwd_kernels) * gpu.launch_s)


def test_launch_floor_hides_behind_a_long_gpu_layer_and_adds_on_a_cpu() -> None:
    big = replace(LAYERS[0], fwd_kernels=10, bwd_kernels=20)  # 2 s forward on TOY
    gpu = replace(TOY, launch_s=1e-3)
    cpu = replace(TOY, kind="cpu", host_link=None, peer_link=None, launch_s=1e-3)
    assert layer_time(big, gpu, INFER) == pytest.approx(2.0)  # the host queues launches while the GPU runs
    assert layer_time(big, cpu, INFER) == pytest.approx(2.0 + 10 * 1e-3)  # one thread does both


def test_layers_without_kernel_counts_keep_the_plain_roofline() -> None:
    gpu = replace(TOY, launch_s=5e-6)
    for layer in (LAYERS[0], LAYERS[2]):
        fwd = roofline_time(layer.fwd_flops, layer.traffic_bytes, gpu)
        bwd = roofline_time(layer.bwd_flops, 2 * layer.traffic_bytes, gpu)
        assert layer_fwd_bwd_time(layer, gpu) == (pytest.approx(fwd), pytest.approx(bwd))


def test_gemm_efficiency_interpolates_in_log_flops_and_holds_the_ends() -> None:
    curved = replace(TOY, gemm_efficiency=((1e6, 0.1), (1e8, 0.5), (1e10, 0.9)))
    assert gemm_efficiency(curved, 1e3) == 0.1
    assert gemm_efficiency(curved, 1e7) == pytest.approx(0.3)
    assert gemm_efficiency(curved, 1e9) == pytest.approx(0.7)
    assert gemm_efficiency(curved, 1e12) == 0.9
    assert gemm_efficiency(TOY, 1e3) == TOY.compute_efficiency  # no curve: the flat figure


def test_small_matmuls_run_below_peak_and_shrink_with_the_batch() -> None:
    curved = replace(TOY, gemm_efficiency=((1e6, 0.1), (1e12, 1.0)))
    # Two matmuls of 5e11 FLOPs: each at the curve's value there, not at compute_efficiency 0.5.
    layer = Layer(index=0, name="mm", fwd_flops=10**12, bwd_flops=2 * 10**12, gemms=((5 * 10**11, 2),))
    eff = gemm_efficiency(curved, 5e11)
    assert 0.9 < eff < 1.0
    assert layer_fwd_bwd_time(layer, curved) == (pytest.approx(1e12 / (1e12 * eff)), pytest.approx(2e12 / (1e12 * eff)))
    # At a tenth of the batch each matmul is a tenth as large, and less efficient.
    fwd, _ = layer_fwd_bwd_time(layer, curved, batch_fraction=0.1)
    assert fwd == pytest.approx(1e11 / (1e12 * gemm_efficiency(curved, 5e10)))
    assert fwd > 0.1 * layer_fwd_bwd_time(layer, curved)[0]


def test_a_narrow_side_slows_a_matmul_below_what_its_flops_give() -> None:
    narrow = replace(TOY, gemm_narrow=(("n", 4.0, 0.1), ("n", 64.0, 1.0), ("k", 16.0, 0.5), ("k", 64.0, 1.0)))
    assert narrow_efficiency(narrow, 512, 16, 512) == pytest.approx(0.55)  # halfway in log between 4 and 64
    assert narrow_efficiency(narrow, 512, 2, 512) == 0.1 and narrow_efficiency(narrow, 512, 512, 8) == 0.5
    assert narrow_efficiency(narrow, 8, 512, 512) == 1.0  # no m curve
    assert narrow_efficiency(narrow, 0, 0, 0) == 1.0 and narrow_efficiency(TOY, 1, 1, 1) == 1.0
    # A 10-class head ((1024 x 1024) @ (1024 x 10)): at the lesser of its FLOPs' and its n's efficiency.
    head = Layer(index=0, name="head", fwd_flops=2 * 1024 * 1024 * 10, bwd_flops=0,
                 gemms=((2 * 1024 * 1024 * 10, 1, 1024, 10, 1024),))
    plain = replace(head, gemms=((2 * 1024 * 1024 * 10, 1),))  # traced before sides were kept
    eff = narrow_efficiency(narrow, 1024, 10, 1024)
    assert 0.1 < eff < 1.0
    assert layer_time(head, narrow, INFER) == pytest.approx(head.fwd_flops / (1e12 * min(eff, TOY.compute_efficiency)))
    assert layer_time(plain, narrow, INFER) == pytest.approx(head.fwd_flops / (1e12 * TOY.compute_efficiency))
    # Traced at one row, priced at 64: m is the batch's rows, and 64 of them are not narrow.
    rows = replace(narrow, gemm_narrow=(("m", 1.0, 0.1), ("m", 64.0, 1.0)))
    one = Layer(index=0, name="fc", fwd_flops=2 * 1024 * 1024, bwd_flops=0, gemms=((2 * 1024 * 1024, 1, 1, 1024, 1024),))
    assert layer_fwd_bwd_time(one, rows)[0] == pytest.approx(one.fwd_flops / (1e12 * 0.1))
    assert layer_fwd_bwd_time(one, rows, batch_fraction=64)[0] == pytest.approx(64 * one.fwd_flops / (1e12 * 0.5))


def test_elementwise_bytes_run_after_the_matmuls_not_beside_them() -> None:
    # 2 s of matmul compute and 1e9 bytes, of which 4e8 are element-wise: 2 s + 4e8 / 5e10 B/s.
    split = replace(LAYERS[0], elementwise_bytes=4 * 10**8)
    assert layer_time(split, TOY, INFER) == pytest.approx(2.0 + 4e8 / 5e10)
    assert layer_time(LAYERS[0], TOY, INFER) == pytest.approx(2.0)  # all of it beside the matmuls


def test_each_elementwise_pass_runs_at_its_size_bandwidth() -> None:
    # 1 MB moved from caches at 2x the bandwidth, 100 MB at a tenth of it (fresh pages each call).
    curved = replace(TOY, memory_curve=((1e6, 2.0), (1e8, 0.1)))
    assert memory_fraction(curved, 1e7) == pytest.approx(1.05)  # halfway in log between 1e6 and 1e8
    assert memory_fraction(curved, 1e3) == 2.0 and memory_fraction(curved, 1e9) == 0.1
    assert memory_fraction(TOY, 1e6) == TOY.memory_efficiency  # no curve: the flat efficiency
    small = Layer(index=0, name="relu", traffic_bytes=4 * 10**6, elementwise_bytes=4 * 10**6, passes=((10**6, 4),))
    big = Layer(index=1, name="gelu", traffic_bytes=10**8, elementwise_bytes=10**8, passes=((10**8, 1),))
    # Seconds: bytes / (1e11 B/s x fraction), backward twice the forward's bytes.
    assert layer_fwd_bwd_time(small, curved) == (pytest.approx(4e6 / 2e11), pytest.approx(8e6 / 2e11))
    assert layer_fwd_bwd_time(big, curved)[0] == pytest.approx(1e8 / 1e10)
    # At half the batch each pass moves half as much: 5e5 bytes, still from caches.
    assert layer_fwd_bwd_time(small, curved, batch_fraction=0.5)[0] == pytest.approx(2e6 / 2e11)
    # Without the curve, or for a layer that does not itemise its passes: bytes at memory_efficiency.
    assert layer_fwd_bwd_time(small, TOY)[0] == pytest.approx(4e6 / 5e10)
    assert layer_fwd_bwd_time(replace(big, passes=()), curved)[0] == pytest.approx(1e8 / 5e10)


def test_kinds_of_ops_run_no_faster_than_their_measured_rates() -> None:
    """A max pooling of 1e6 bytes: the curve says 1e6 / 2e11 s; at a measured 1e9 B/s forward
    and 1e10 B/s backward it takes the longer each way. A plain pass beside it keeps the
    curve's price; a profile without the kind's rate prices it on the curve."""
    curved = replace(TOY, memory_curve=((1e6, 2.0), (1e8, 0.1)))
    pool = OP_KINDS.index("max_pool") + 1
    layer = Layer(index=0, name="pool", traffic_bytes=2 * 10**6, elementwise_bytes=2 * 10**6,
                  passes=((10**6, 1, pool), (10**6, 1)))
    rated = replace(curved, op_rates=(("max_pool", 1e9, 1e10),))
    assert layer_fwd_bwd_time(layer, rated) == (pytest.approx(1e6 / 1e9 + 1e6 / 2e11),
                                                pytest.approx(1e6 / 1e10 + 2e6 / 2e11))
    # A rate faster than the curve changes nothing; another kind's rate does not apply.
    fast = replace(curved, op_rates=(("max_pool", 1e13, 1e13),))
    other = replace(curved, op_rates=(("batch_norm", 1e9, 1e9),))
    plain = (pytest.approx(2e6 / 2e11), pytest.approx(4e6 / 2e11))
    assert layer_fwd_bwd_time(layer, fast) == plain == layer_fwd_bwd_time(layer, other)
    # At half the batch the pass moves half the bytes, at the same rate.
    assert layer_fwd_bwd_time(layer, rated, batch_fraction=0.5)[0] == pytest.approx(5e5 / 1e9 + 5e5 / 2e11)
    # Every kind (a tanh as a max pooling) at its own rate, and only at its own.
    for i, kind in enumerate(OP_KINDS):
        marked = replace(layer, passes=((10**6, 1, i + 1), (10**6, 1)))
        assert layer_fwd_bwd_time(marked, replace(curved, op_rates=((kind, 1e9, 1e10),))) == (
            pytest.approx(1e6 / 1e9 + 1e6 / 2e11), pytest.approx(1e6 / 1e10 + 2e6 / 2e11)), kind
        others = tuple((k, 1e9, 1e10) for k in OP_KINDS if k != kind)
        assert layer_fwd_bwd_time(marked, replace(curved, op_rates=others)) == plain, kind


def test_attention_runs_at_its_curve_by_its_flops_per_head() -> None:
    """A causal and a full attention of 1e9 FLOPs (1e6 per sample and head) and a matmul of
    as many: with both attention curves each attention at its own, read at 1e6 FLOPs
    (causal 1.2, full 0.4), the matmul at the flat efficiency; without the causal curve the
    causal one at the full one's; without either, all three as matmuls."""
    layer = Layer(index=0, name="attention", fwd_flops=3 * 10**9, gemms=((10**9, 3),),
                  attention=((10**9, 1, 1, 10**6), (10**9, 1, 0, 10**6)))
    both = replace(TOY, attention_efficiency=((1e6, 0.4), (1e9, 0.9)), causal_attention_efficiency=((1e6, 1.2), (1e9, 1.8)))
    peak, flat = 1e12, TOY.compute_efficiency
    assert layer_time(layer, both, INFER) == pytest.approx(1e9 / (peak * 1.2) + 1e9 / (peak * 0.4) + 1e9 / (peak * flat))
    full_only = replace(both, causal_attention_efficiency=())
    assert layer_time(layer, full_only, INFER) == pytest.approx(2e9 / (peak * 0.4) + 1e9 / (peak * flat))
    assert layer_time(layer, TOY, INFER) == pytest.approx(3e9 / (peak * flat))
    # Half the batch: half the FLOPs, each head as large, so the same efficiency.
    assert layer_fwd_bwd_time(layer, both, batch_fraction=0.5)[0] == pytest.approx(layer_time(layer, both, INFER) / 2)
    # Its backward keeps the forward's efficiency (twice the FLOPs each).
    fwd, bwd = layer_fwd_bwd_time(replace(layer, bwd_flops=6 * 10**9), both)
    assert bwd == pytest.approx(2 * fwd)


def test_a_convolution_an_attention_and_a_matmul_of_equal_flops_keep_their_own_curves() -> None:
    """1e9 FLOPs each: a convolution (0.2 on its curve), an attention (0.6 at its 1e6 FLOPs
    per head) and a matmul whose sides are known (it is neither: the flat efficiency)."""
    layer = Layer(index=0, name="mixed", fwd_flops=3 * 10**9, gemms=((10**9, 1, 1000, 500, 1000), (10**9, 2)),
                  convs=((10**9, 1),), attention=((10**9, 1, 0, 10**6),))
    profile = replace(TOY, conv_efficiency=((1e9, 0.2),), attention_efficiency=((1e6, 0.6),))
    peak, flat = 1e12, TOY.compute_efficiency
    assert layer_time(layer, profile, INFER) == pytest.approx(1e9 / (peak * 0.2) + 1e9 / (peak * 0.6) + 1e9 / (peak * flat))
    # An attention counted beyond its side-less entries takes only what there is.
    extra = replace(layer, attention=((10**9, 5, 0, 10**6),))
    assert layer_time(extra, profile, INFER) == pytest.approx(layer_time(layer, profile, INFER))


def test_convolutions_run_at_their_curve() -> None:
    """Two convolutions and a matmul of 1e9 FLOPs each: with a convolution curve (0.25 at 1e9
    FLOPs) the convolutions run at a quarter of the peak, the matmul at its own efficiency;
    without the curve all three as matmuls."""
    layer = Layer(index=0, name="convs", fwd_flops=3 * 10**9, bwd_flops=0, gemms=((10**9, 3),),
                  convs=((10**9, 2),))
    convs = replace(TOY, conv_efficiency=((1e6, 0.05), (1e9, 0.25)))
    peak = 1e12
    assert layer_time(layer, convs, INFER) == pytest.approx(2e9 / (peak * 0.25) + 1e9 / (peak * TOY.compute_efficiency))
    assert layer_time(layer, TOY, INFER) == pytest.approx(3e9 / (peak * TOY.compute_efficiency))
    # A matmul of as many FLOPs with its sides known is not taken for a convolution.
    mixed = replace(layer, gemms=((10**9, 1, 1000, 500, 1000), (10**9, 2)))
    assert layer_time(mixed, convs, INFER) == pytest.approx(layer_time(layer, convs, INFER))


def test_module_calls_cost_the_host_in_the_forward_only() -> None:
    # 3 kernels and 2 module calls: a CPU adds 3 x 2 us + 2 x 1 us to its kernels' 1 us; a GPU
    # takes the longer of the host's 8 us and the kernels'. Autograd's backward calls no module.
    layer = Layer(index=0, name="block", traffic_bytes=10**4, elementwise_bytes=10**4, passes=((10**4, 1),),
                  fwd_kernels=3, bwd_kernels=6, module_calls=2)
    gpu = replace(TOY, memory_bandwidth_Bps=2e10, launch_s=2e-6, module_call_s=1e-6)  # 1e4 B at 1e10 B/s: 1 us
    cpu = replace(gpu, kind="cpu", host_link=None, peer_link=None)
    assert layer_fwd_bwd_time(layer, cpu) == (pytest.approx(1e-6 + 6e-6 + 2e-6), pytest.approx(2e-6 + 12e-6))
    assert layer_fwd_bwd_time(layer, gpu) == (pytest.approx(8e-6), pytest.approx(12e-6))
    assert layer_fwd_bwd_time(layer, replace(cpu, module_call_s=0.0))[0] == pytest.approx(7e-6)


def test_time_source_says_measured_calibrated_or_roofline() -> None:
    timed = LAYERS[1]
    assert layer_time_source(timed, TOY, training=True) == "measured"
    assert layer_time_source(replace(timed, bwd_time_s={}), TOY, training=True) == "roofline"
    assert layer_time_source(replace(timed, bwd_time_s={}), TOY, training=False) == "measured"
    assert layer_time_source(timed, SLOW, training=False) == "roofline"
    assert layer_time_source(timed, replace(SLOW, calibrated=True), training=False) == "calibrated"


# --------------------------------------------------------------------------- links and the rest


def test_training_doubles_link_costs() -> None:
    devs = [device("a", TOY), device("b", TOY), device("c", toy_profile("other"))]
    infer = build_problem(GRAPH, devs, INFER)
    train = build_problem(GRAPH, devs, TRAIN)
    for i, a in enumerate(devs):
        for j, b in enumerate(devs):
            per_byte, latency = link_cost(a, b)
            assert infer.seconds_per_byte[i][j] == per_byte and infer.latency_s[i][j] == latency
            assert train.seconds_per_byte[i][j] == 2 * per_byte and train.latency_s[i][j] == 2 * latency
    assert infer.seconds_per_byte[0][1] == pytest.approx(1e-11)  # peer link, same profile
    assert infer.seconds_per_byte[0][2] == pytest.approx(2e-10)  # two PCIe hops: different profiles
    assert infer.seconds_per_byte[1][1] == 0.0
    # A transfer of h0 (400 bytes) from a to b when training: 2 * (400 * 1e-11 + 1e-6).
    assert train.transfer_s(VALUES[1], 0, 1) == pytest.approx(2 * (400e-11 + 1e-6))


def test_problem_carries_names_values_and_objective() -> None:
    devs = [device("a", TOY), device("b", SLOW)]
    options = PlanOptions(objective=Objective.THROUGHPUT, allow_data_parallel=False)
    problem = build_problem(GRAPH, devs, options)
    assert problem.names == ("l0", "l1", "l2") and problem.device_names == ("a", "b")
    assert problem.values == VALUES and problem.objective is Objective.THROUGHPUT and problem.replica is None


def test_build_problem_rejects_bad_input() -> None:
    with pytest.raises(DeviceError, match="at least one device"):
        build_problem(GRAPH, [], TRAIN)
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        build_problem(GRAPH, [device("a", TOY)], TRAIN, dtype="fp8")
    with pytest.raises(DeviceError, match="links must be 2 x 2"):
        build_problem(GRAPH, [device("a", TOY), device("b", TOY)], TRAIN, links=[[(0.0, 0.0)]])


def test_given_links_price_moves_and_the_replicas_ring() -> None:
    # Two nodes' links (a cluster's): dearer than the devices' own peer link.
    a, b = device("a", TOY), device("b", TOY)
    slow = (1e-9, 1e-4)
    links = [[(0.0, 0.0), slow], [slow, (0.0, 0.0)]]
    options = PlanOptions(training=True, optimizer=Optimizer.ADAM)
    problem = build_problem(BIG_GRAPH, [a, b], options, links=links)
    # Training: a value and its gradient cross, so both prices double.
    assert problem.seconds_per_byte[0][1] == 2 * slow[0] and problem.latency_s[1][0] == 2 * slow[1]
    assert problem.replica == replica_cost(BIG_GRAPH, [a, b], options, links=links)
    assert problem.replica is not None
    own = replica_cost(BIG_GRAPH, [a, b], options)
    assert own is not None and problem.replica.time_s > own.time_s
    assert build_problem(BIG_GRAPH, [a, b], options) == build_problem(
        BIG_GRAPH, [a, b], options, links=[[link_cost(x, y) for y in (a, b)] for x in (a, b)]
    )


# --------------------------------------------------------------------------- data parallelism

# One compute-bound layer of 1 GB of parameters, batch 4.
BIG = Layer(index=0, name="big", param_bytes=10**9, saved_bytes=10**6, output_bytes=10**6,
            fwd_flops=10**12, bwd_flops=2 * 10**12, traffic_bytes=10**9)  # fmt: skip
BIG_VALUES = (
    Value(name="x", producer=INPUT, consumers=(0,), bytes=10**6),
    Value(name="y", producer=0, consumers=(OUTPUT,), bytes=10**6),
)
BIG_GRAPH = LayerGraph(layers=(BIG,), values=BIG_VALUES, fingerprint="big", batch_size=4)


def test_replica_cost_by_hand_training() -> None:
    a, b = device("a", TOY), device("b", TOY)
    replica = replica_cost(BIG_GRAPH, [a, b], PlanOptions(training=True, optimizer=Optimizer.ADAM))
    assert replica is not None
    # Each replica: half the FLOPs. fwd 5e11 / 5e11 = 1 s, bwd 2 s; the parameter reads do
    # not shrink (1e9 B / 5e10 = 0.02 s fwd) and stay under the compute time.
    compute = 3.0
    # Scatter half the input to b, gather half the output back, its gradient out again.
    per_byte, latency = link_cost(a, b)
    scatter = 0.5e6 * per_byte + latency + 2 * (0.5e6 * per_byte + latency)
    # Ring all-reduce of 1e9 gradient bytes over k = 2: 2 (k-1)/k = 1 pass, two latencies.
    allreduce = 1e9 * per_byte + 2 * latency
    assert replica.time_s == pytest.approx(compute + scatter + allreduce)
    assert allreduce == pytest.approx(0.01 + 2e-6)
    # Memory: weights, grads, Adam's two moments, and half the saved activations.
    assert replica.memory == (4 * 10**9 + 500_000, 4 * 10**9 + 500_000)


def test_replica_cost_inference_has_no_allreduce() -> None:
    a, b = device("a", TOY), device("b", TOY)
    replica = replica_cost(BIG_GRAPH, [a, b], PlanOptions(training=False))
    assert replica is not None
    per_byte, latency = link_cost(a, b)
    assert replica.time_s == pytest.approx(1.0 + 2 * (0.5e6 * per_byte + latency))
    assert replica.memory == (10**9 + 500_000,) * 2


def test_replicas_beat_one_device_on_compute_heavy_layers() -> None:
    options = PlanOptions(training=True)
    devs = [device(f"g{i}", TOY) for i in range(4)]
    one = build_problem(BIG_GRAPH, devs[:1], options)
    four = build_problem(BIG_GRAPH, devs, options)
    assert one.replica is None
    assert four.replica is not None
    single = sum(row[0] for row in one.compute_s)  # 9 s on one device
    assert four.replica.time_s < single / 3  # ~9/4 s plus a small all-reduce


def test_uneven_batch_and_slowest_replica_set_the_time() -> None:
    graph = LayerGraph(layers=(BIG,), values=BIG_VALUES, fingerprint="big", batch_size=5)
    options = PlanOptions(training=False)
    even = replica_cost(graph, [device("a", TOY), device("b", TOY)], options)
    assert even is not None
    # Shares 3 and 2 of 5: the larger replica does 3/5 of 2 s of forward.
    assert even.time_s == pytest.approx(1.2, rel=1e-3)
    assert even.memory == (10**9 + 600_000, 10**9 + 400_000)
    mixed = replica_cost(graph, [device("a", TOY), device("b", SLOW)], options)
    assert mixed is not None
    # The slow device (half speed) gets 2/5: 2/5 of 4 s = 1.6 s, slower than 1.2 s.
    assert mixed.time_s == pytest.approx(1.6, rel=1e-2)


def test_measured_time_scales_with_the_batch_share() -> None:
    timed = Layer(index=0, name="t", fwd_flops=10**12, traffic_bytes=10**6, fwd_time_s={"toy": 3.0})
    assert layer_time(timed, TOY, INFER, batch_fraction=0.25) == pytest.approx(0.75)
    untimed_zero = Layer(index=0, name="z", fwd_time_s={"toy": 1.0})  # nothing to estimate with
    assert layer_time(untimed_zero, TOY, INFER, batch_fraction=0.5) == pytest.approx(0.5)


def test_no_replica_when_not_allowed_or_batch_too_small() -> None:
    devs = [device("a", TOY), device("b", TOY)]
    assert build_problem(BIG_GRAPH, devs, PlanOptions(allow_data_parallel=False)).replica is None
    assert build_problem(BIG_GRAPH, devs, PlanOptions(allow_data_parallel=True)).replica is not None
    tiny = LayerGraph(layers=(BIG,), values=BIG_VALUES, fingerprint="big", batch_size=1)
    assert build_problem(tiny, devs, PlanOptions()).replica is None


def test_parameter_reads_do_not_shrink_with_the_batch() -> None:
    # Memory-bound: 1e10 parameter bytes plus 2e9 activation bytes of traffic.
    layer = Layer(index=0, name="emb", param_bytes=10**10, fwd_flops=10**6, traffic_bytes=12 * 10**9)
    assert layer_time(layer, TOY, INFER) == pytest.approx(12e9 / 5e10)
    assert layer_time(layer, TOY, INFER, batch_fraction=0.5) == pytest.approx(11e9 / 5e10)
