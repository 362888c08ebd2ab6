"""CompressExport's CUDA-only path: torchao int4 weight-only (marked `gpu`; never in CI). Run by gpu_check.sh."""

import pytest
import torch
from torch import nn

from lightning_guard import compress as C

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_int4_weight_only_on_cuda_keeps_outputs_close_and_exports(tmp_path):
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 256)).to("cuda", torch.bfloat16).eval()
    x = torch.randn(32, 512, device="cuda", dtype=torch.bfloat16)
    q = C.quantize(model, "int4_weight_only")
    assert C.state_bytes(q) < C.state_bytes(model) / 2.5
    assert C.max_output_error(q, model, [(x,)]) < 0.1
    path = C.export_pt2(q, (x,), tmp_path / "int4.pt2")
    assert C.max_output_error(C.load_artifact(path), q, [(x,)]) < 1e-3
