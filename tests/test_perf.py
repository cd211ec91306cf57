import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dfm_cli.errors import DfmError
from dfm_cli.method.decompose import LaplacianPyramid
from dfm_cli.models.dit import DFMDiT, model_size
from dfm_cli.training.perf import autocast_dtype, forward_flops, peak_memory_gb, peak_tflops, train_flops


@pytest.mark.parametrize("levels,name,res", [(1, "DFM-N/2", 16), (2, "DFM-N/4", 32), (3, "DFM-T/4", 32)])
def test_analytic_flops_match_torch_flop_counter(levels, name, res):
    sizes = LaplacianPyramid(levels, [2] * (levels - 1)).level_sizes((res, res))
    model = DFMDiT(model_size(name), sizes, channels=3, num_classes=10)
    b = 2
    xs = [torch.randn(b, 3, *s) for s in sizes]
    with FlopCounterMode(display=False) as counter:
        model(xs, torch.rand(b, levels), torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long))
    measured = counter.get_total_flops()
    # the counter sees every matmul; whether it sees the CPU SDPA kernel depends on the build
    n, d = model.grid[1] * model.grid[2], model.blocks[0].attn.qkv.in_features
    attention = 4 * n * n * d * len(model.blocks) * b
    counted_sdpa = any("attention" in str(op) for op in counter.get_flop_counts()["Global"])
    expected = measured if counted_sdpa else measured + attention
    assert forward_flops(model) * b == pytest.approx(expected, rel=1e-6)
    assert train_flops(model, b) == 3 * forward_flops(model) * b


def test_dfm_flops_overhead_over_fm_is_small_at_xl():
    with torch.device("meta"):  # shapes only: no 675M-parameter allocation
        fm = DFMDiT(model_size("DFM-XL/2"), [(64, 64)], 4, 1000)
        dfm = DFMDiT(model_size("DFM-XL/2"), LaplacianPyramid(2, [2]).level_sizes((64, 64)), 4, 1000)
    assert 0 < forward_flops(dfm) / forward_flops(fm) - 1 < 0.005  # paper: +0.025 GFLOPs
    params = [sum(p.numel() for p in m.parameters()) for m in (fm, dfm)]
    assert 0 < params[1] / params[0] - 1 < 0.01  # paper: about +0.6%


def test_peak_table_and_precision_choices():
    assert peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16, True) == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", torch.bfloat16, True) == 756.5
    assert peak_tflops("NVIDIA H200", None, True) == 494.7  # fp32 math on tensor cores: TF32
    assert peak_tflops("NVIDIA A100-SXM4-80GB", None, False) == 19.5
    assert peak_tflops("cpu", None, False) is None  # unknown: no MFU rather than a guess
    assert peak_tflops("cpu", None, False, override=0.5) == 0.5
    assert autocast_dtype("cuda", "auto") is torch.bfloat16
    assert autocast_dtype("cpu", "auto") is None
    assert autocast_dtype("cuda", "fp32") is None
    assert autocast_dtype("cpu", "bf16") is torch.bfloat16
    with pytest.raises(DfmError, match="train.precision"):
        autocast_dtype("cuda", "fp8")
    assert peak_memory_gb(torch.device("cpu")) > 0


def test_bf16_autocast_forward_runs_and_keeps_float32_weights():
    model = DFMDiT(model_size("DFM-N/4"), LaplacianPyramid(2, [2]).level_sizes((16, 16)), 1, 10)
    xs = [torch.randn(2, 1, 8, 8), torch.randn(2, 1, 16, 16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(xs, torch.rand(2, 2), torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long))
    assert out[1].dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_flash_path():
    model = DFMDiT(model_size("DFM-N/2"), LaplacianPyramid(2, [2]).level_sizes((32, 32)), 4, 10).cuda()
    xs = [torch.randn(2, 4, 16, 16, device="cuda"), torch.randn(2, 4, 32, 32, device="cuda")]
    t, z = torch.rand(2, 2, device="cuda"), torch.zeros(2, dtype=torch.long, device="cuda")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = model(xs, t, z, z)
    assert out[1].dtype == torch.bfloat16
