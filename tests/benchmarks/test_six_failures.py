"""The six failures side by side: bare Lightning, its nearest built-in, lightning_guard (run with `make bench`)."""

from pathlib import Path

import pytest

from tests.benchmarks.six_failures import main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


@pytest.mark.benchmark
def test_six_failures():
    r = main(str(DOCS))
    final = {s: {k: v["final"] for k, v in r[s].items()} for s in r if s[0] in "1234"}
    s1, s2, s3, s4 = (final[k] for k in sorted(final))
    assert s1["WarmupCosine"]["val_acc"] > s1["constant_lr"]["val_acc"] + 0.1
    assert s1["WarmupCosine"]["val_acc"] >= s1["cosine_no_warmup"]["val_acc"]
    assert s2["GradientGuard"]["val_acc"] > 0.9 > s2["gradient_clip_val"]["val_acc"]
    assert s3["OverfitGuard"]["val_loss"] < s3["EarlyStopping"]["val_loss"] < s3["no_stopping"]["val_loss"]
    assert s4["ClassBalance"]["val_balanced_acc"] > s4["plain_cross_entropy"]["val_balanced_acc"] + 0.05
    assert r["5_out_of_memory"]["oom_guard"]["effective_batch"] == 256
    assert r["6_deployment"]["structured_search+int8"]["smaller_than_fp32"] >= 4.0
    for n in "1234":
        assert (DOCS / f"six_failures_{n}.png").stat().st_size > 10_000
