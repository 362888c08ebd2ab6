"""One compatibility layer: only ``lightning_guard._compat`` touches private names of other libraries, and each of its
functions works on the installed Lightning, torch and torchmetrics (or says clearly what an upgrade removed)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from torch.utils.data import DataLoader, TensorDataset

from lightning_guard import _compat
from lightning_guard._compat import UpstreamChangedError

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_guard"
COMPAT = PACKAGE / "_compat.py"
#: private-looking names that are public API (namedtuple's documented members)
PUBLIC_UNDERSCORED = {"_fields", "_asdict", "_replace", "_make"}
#: attributes this package sets on other objects is namespaced so
OWN_PREFIX = "_lightning_guard"


def _own_names(trees: list[ast.Module]) -> set[str]:
    """Private names the package defines itself: functions, classes, and attributes it assigns on self/cls."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            for target in targets:
                for sub in ast.walk(target):
                    if (
                        isinstance(sub, ast.Attribute)
                        and isinstance(sub.value, ast.Name)
                        and sub.value.id in ("self", "cls")
                    ):
                        names.add(sub.attr)
                    elif isinstance(sub, ast.Name):
                        names.add(sub.id)
    return names


def private_reach_ins(sources: dict[Path, str]) -> list[str]:
    """``file:line what`` for each private attribute, private import or ``getattr(x, "_name")`` of another library."""
    trees = {path: ast.parse(text) for path, text in sources.items()}
    own = _own_names(list(trees.values()))
    found = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            what = None
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
                ours = node.attr in own or node.attr.startswith(OWN_PREFIX)
                if not on_self and not ours and node.attr not in PUBLIC_UNDERSCORED:
                    what = ast.unparse(node)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module != "__future__":
                if not node.module.startswith("lightning_guard") and (
                    any(p.startswith("_") for p in node.module.split("."))
                    or any(a.name.startswith("_") for a in node.names)
                ):
                    what = f"from {node.module} import {', '.join(a.name for a in node.names)}"
            elif isinstance(node, ast.Import):
                private = [a.name for a in node.names if any(p.startswith("_") for p in a.name.split("."))]
                what = f"import {', '.join(private)}" if private else None
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr")
            ):
                arg = node.args[1] if len(node.args) > 1 else None
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    name = arg.value
                    if (
                        re.match(r"_[^_]", name)
                        and not name.startswith(OWN_PREFIX)
                        and name not in own | PUBLIC_UNDERSCORED
                    ):
                        what = f"{node.func.id}(..., {name!r})"
            if what:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {what}")
    return found


def test_only_the_compat_layer_reaches_into_private_names():
    sources = {p: p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py")) if p != COMPAT}
    found = private_reach_ins(sources)
    assert not found, "private names of other libraries outside lightning_guard/_compat.py:\n" + "\n".join(found)


def test_the_reach_in_check_sees_each_kind(tmp_path):
    src = (
        "import torch\nimport torch.utils._pytree as p\nfrom torch.amp.grad_scaler import _refresh\n"
        "def f(trainer, scaler, self):\n    self._mine = 1\n    x = trainer._results\n"
        "    y = getattr(scaler, '_scale', None)\n    return self._mine, x, y, torch._foreach_norm\n"
    )
    path = PACKAGE / "example.py"
    found = [line.split(" ", 1)[1] for line in private_reach_ins({path: src})]
    assert sorted(found) == [
        "from torch.amp.grad_scaler import _refresh",
        "getattr(..., '_scale')",
        "import torch.utils._pytree",
        "torch._foreach_norm",
        "trainer._results",
    ]


# ------------------------------------------------------------------ each function on the installed versions
def test_a_removed_private_name_is_a_clear_error():
    with pytest.raises(UpstreamChangedError, match=r"torch\.amp\.GradScaler\._per_optimizer_states.*torch \d"):
        _compat.scaler_optimizer_state(object(), None)
    with pytest.raises(UpstreamChangedError, match=r"Trainer\._results.*lightning \d"):
        _compat.logged_results(object())
    with pytest.raises(UpstreamChangedError, match=r"torchmetrics\.Metric\._defaults.*torchmetrics \d"):
        _compat.metric_state_names(object())


def test_torch_internals():
    ts = [torch.tensor([3.0, -4.0]), torch.tensor([1.0])]
    assert [float(n) for n in _compat.foreach_norm(ts, 2.0)] == [5.0, 1.0]
    out = [t.clone() for t in ts]
    _compat.foreach_mul_(out, 2.0)
    _compat.foreach_add_(out, _compat.foreach_sign(ts), alpha=1.0)
    _compat.foreach_sub_(out, ts)
    assert out[0].tolist() == [4.0, -5.0]
    clipped = _compat.foreach_clamp_min(ts, -1.0)
    _compat.foreach_clamp_max_(clipped, 1.0)
    assert clipped[0].tolist() == [1.0, -1.0]
    dst = [torch.zeros(2), torch.zeros(1)]
    _compat.foreach_copy_(dst, ts)
    assert dst[0].tolist() == [3.0, -4.0]
    leaves, spec = _compat.tree_flatten({"a": (ts[0], 1)})
    assert len(_compat.tree_leaves({"a": (ts[0], 1)})) == 2
    assert _compat.tree_unflatten(leaves, spec)["a"][1] == 1
    assert _compat.tree_map(lambda x: x, [1]) == [1]
    assert issubclass(torch.nn.BatchNorm1d, _compat.NORM_BASE)
    t = torch.zeros(1)
    before = _compat.tensor_version(t)
    t.add_(1)
    assert _compat.tensor_version(t) == before + 1


def test_module_buffer_slots():
    bn = torch.nn.BatchNorm1d(2)
    bn.register_buffer("mask", torch.ones(1), persistent=False)
    bn.register_buffer("empty", None)
    assert set(_compat.buffer_slots(bn)) == {"running_mean", "running_var", "num_batches_tracked", "empty"}
    assert _compat.non_persistent_buffer_names(bn) == {"mask"}
    assert _compat.get_buffer(bn, "empty") is None
    new = torch.full((2,), 7.0)
    _compat.set_buffer(bn, "running_mean", new)
    assert bn.running_mean is new


def test_grad_scaler_internals():
    lin = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    assert _compat.scaler_scale(scaler) is None  # before first use
    scaler.scale(lin(torch.ones(1, 2)).sum()).backward()
    assert float(_compat.scaler_scale(scaler)) == 4.0
    state = _compat.scaler_optimizer_state(scaler, opt)
    assert "stage" in state
    _compat.scaler_check_inf(scaler, opt)
    assert state["found_inf_per_device"]
    _compat.scaler_forget_step(scaler)
    assert _compat.scaler_optimizer_state(scaler, opt)["found_inf_per_device"] == {}  # a fresh record
    fused = torch.optim.Adam(lin.parameters(), fused=True)
    assert _compat.steps_unscale_inside(fused)
    assert not _compat.steps_unscale_inside(opt)


def test_process_group_sequence_numbers_without_a_group():
    assert _compat.collectives_issued() in (0, None)


class _Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=2)
        self.seen: dict[str, object] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.lin(x)
        self.acc(out, y)
        self.log("acc", self.acc, on_step=True)
        trainer = self.trainer
        self.seen["attached"] = _compat.attached_trainer(self)
        self.seen["results"] = _compat.logged_results(trainer)
        self.seen["accumulate"] = _compat.should_accumulate(trainer)
        self.seen["val_source"] = _compat.val_data_source(trainer).is_defined()
        self.seen["unwrapped"] = _compat.unwrap_optimizer(self.optimizers())
        if batch_idx == 0 and "nested_step" not in self.seen:
            self.seen["nested_step"] = None
            self.seen["nested_step"] = _compat.call_training_step(trainer, batch, 1)
        return torch.nn.functional.cross_entropy(out, y)

    def validation_step(self, batch, batch_idx):
        self.seen["epoch_done"] = _compat.epoch_batches_done(self.trainer)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_and_torchmetrics_internals(tmp_path):
    data = TensorDataset(torch.randn(8, 2), torch.randint(0, 2, (8,)))
    net = _Net()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=2,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(net, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    assert net.seen["attached"] is trainer
    assert "acc" in "".join(net.seen["results"].keys())  # type: ignore[attr-defined]
    assert net.seen["accumulate"] is False  # the last batch of the window of 2
    assert net.seen["val_source"] is True
    assert net.seen["unwrapped"] is trainer.optimizers[0]
    assert net.seen["epoch_done"] is True
    assert _compat.spawn_launched(trainer) is False
    metric = net.acc
    assert set(_compat.metric_state_names(metric)) >= {"tp", "fp"}
    assert _compat.metric_reduction(metric, "tp") is not None
    count, computed, cache = _compat.metric_bookkeeping(metric)
    assert _compat.update_count(metric) == count
    _compat.set_metric_bookkeeping(metric, count + 1, computed, cache)
    assert _compat.update_count(metric) == count + 1
    _compat.set_forward_cache(metric, torch.tensor(0.5))
    assert float(_compat.forward_cache(metric)) == 0.5
    _compat.forget_metric_attributes(net)
    assert net._metric_attributes is None
    assert _compat.wandb_init_kwargs(object()) == {}
    assert net.seen["nested_step"] is not None  # training_step run again through the strategy, as the loop does
