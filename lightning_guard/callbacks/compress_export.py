"""CompressExport: prune and quantise within an accuracy budget, export, and prove the artifact works."""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from typing_extensions import override

from lightning_guard import _wandb
from lightning_guard._checks import check_int, check_number, metric_direction, resolve_mode
from lightning_guard._compat import forget_metric_attributes, val_data_source
from lightning_guard.callbacks._base import GuardCallback
from lightning_guard.callbacks._compress_support import EveryOther, detached_copy, inputs_of, maybe_len, quiet
from lightning_guard.compress import (
    CompressionResult,
    Format,
    PruneMode,
    QuantizeMode,
    check_compress_args,
    compress_and_export,
    export_program,
    prune_structured,
)
from lightning_guard.compress.report import print_report
from lightning_guard.errors import GuardConfigError, GuardRuntimeError

__all__ = ["CompressExport", "metric_direction"]


class CompressExport(GuardCallback):
    r"""At fit end, prune and quantise the best weights as far as an accuracy budget allows, export, and verify.

    Runs in ``on_fit_end`` on rank 0 (after OverfitGuard's best-weight restore, which happens in ``on_train_end``),
    on a copy of the unwrapped LightningModule; the other ranks wait in one agreement collective, and if rank 0
    fails, every rank raises (none is left waiting). The search and the export are
    :func:`~lightning_guard.compress.compress_and_export`, usable without a Trainer:

    1. the monitored metric is measured with the module's own validation loop (a fresh single-device Trainer's
       ``validate`` on the fit's validation data) or ``eval_fn(model)``;
    2. pruning - ``"unstructured"`` (global magnitude, masks made permanent, clean state-dict keys; exact zeros from
       L1Penalty's proximal mode count first) or ``"structured"`` (neurons/channels removed with torch-pruning, so
       layers really shrink) - tries ``prune_amounts`` from the strongest down, with an optional fine-tune of
       ``finetune_epochs`` on the training data, and keeps the first within ``max_metric_drop``;
    3. torchao quantisation (``int8_weight_only``, ``int8_dynamic``; ``int4_weight_only`` on CUDA) is kept if it
       stays within the budget too;
    4. ``<dirpath>/<filename>.pt2`` (``torch.export``) always, ``.onnx`` when ``formats`` asks (exported from the fp32
       pruned model, quantised by onnxruntime); each is loaded back through a fresh load path and must reproduce the
       in-memory model's outputs on held-out validation batches, or the export fails (``verify_failed``); the report
       says how each artifact loads (a torchao-quantised ``.pt2`` runs pickle and needs torchao, ONNX does not);
    5. the report - per stage: size, parameters, sparsity, metric, CPU latency (median), decision - goes to
       ``<dirpath>/compress_report.json``, a rich table, and with a WandbLogger a ``guard/compress`` table plus a
       model artifact with the files.

    Events: ``compressed``, ``budget_backoff``, ``exported``, ``verify_failed``, ``export_failed``. The result is kept
    in :attr:`result` (rank 0).

    Args:
        dirpath: where the artifacts and the report go (default: ``<default_root_dir>/compressed``).
        monitor: the validation metric that makes the budget (default ``"val_loss"``).
        mode: ``"min"`` or ``"max"`` for ``monitor``; default: from the words of its name
            (:func:`metric_direction`: ``val_acc`` max, ``val_mape`` and ``val_iou_loss`` min); a name that does not
            say (``val_score``) is refused.
        max_metric_drop: the largest worsening of ``monitor`` accepted, in its own units (default 0.01).
        prune: ``"auto"`` (default: ``"structured"`` when torch-pruning is installed and a dry run on a copy shows the
            model allows it, else none; the report's ``prune_note`` says which and why), ``None``,
            ``"unstructured"`` or ``"structured"``.
        prune_amounts: fractions tried, strongest first (default ``(0.75, 0.5, 0.25)``).
        quantize: ``None``, ``"int8_weight_only"`` (default; ``"int8"`` is an alias), ``"int8_dynamic"`` or
            ``"int4_weight_only"``.
        formats: ``("pt2",)`` (default) or ``("pt2", "onnx")``.
        finetune_epochs: epochs of fine-tuning after each pruning trial (default 0).
        eval_fn: ``eval_fn(model) -> float`` instead of the validation loop.
        example_input: the model input for export (default: the first validation batch's input).
        verify_batches: validation batches used to verify the artifacts (default 4).
        tolerance: largest relative output error of a verified artifact (default 1e-4).
        onnx_int8_tolerance: the same for the ONNX file quantised by onnxruntime, whose int8 kernels differ from
            torchao's (default 0.05).
        min_size_ratio: a quantised ``.pt2`` is kept only when at least this many times smaller than the fp32 one
            (default 1.5); else the fp32 file is exported.
        max_latency_ratio: ... and only when its CPU latency is at most this multiple of the fp32 file's (default
            1.1: no slower, within timer noise); None: latency is not judged.
        filename: artifact file name without suffix (default ``"model"``).
        strict: raise from ``fit()`` when compression or export fails. Default ``False``: the failure is an
            ``export_failed`` error event (with the message; kept in :attr:`error`) and ``fit()`` returns normally -
            the trained model and its checkpoints are left as they are, since compression works on a copy.

    Example:
        >>> CompressExport(monitor="val_acc", max_metric_drop=0.01, prune="structured").mode
        'max'
    """

    guard_name = "compress"

    def __init__(
        self,
        dirpath: str | None = None,
        monitor: str = "val_loss",
        mode: Literal["min", "max"] | None = None,
        max_metric_drop: float = 0.01,
        prune: PruneMode | Literal["auto"] | None = "auto",
        prune_amounts: Sequence[float] = (0.75, 0.5, 0.25),
        quantize: QuantizeMode | Literal["int8"] | None = "int8_weight_only",
        formats: Sequence[Format] = ("pt2",),
        finetune_epochs: int = 0,
        eval_fn: Callable[[torch.nn.Module], float] | None = None,
        example_input: torch.Tensor | tuple[Any, ...] | None = None,
        verify_batches: int = 4,
        tolerance: float = 1e-4,
        filename: str = "model",
        strict: bool = False,
        onnx_int8_tolerance: float = 0.05,
        min_size_ratio: float = 1.5,
        max_latency_ratio: float | None = 1.1,
    ) -> None:
        super().__init__()
        if quantize == "int8":
            quantize = "int8_weight_only"
        prune_amounts = tuple(prune_amounts) if isinstance(prune_amounts, list | tuple) else prune_amounts
        formats = tuple(formats) if isinstance(formats, list | tuple) else formats
        if prune not in (None, "auto", "unstructured", "structured"):
            raise GuardConfigError(
                f"`prune` must be one of (None, 'auto', 'unstructured', 'structured'), got {prune!r}"
            )
        check_compress_args(None if prune == "auto" else prune, prune_amounts, quantize, formats, max_metric_drop)
        if not isinstance(monitor, str) or not monitor:
            raise GuardConfigError(f"`monitor` must be a non-empty string, got {monitor!r}")
        check_int("finetune_epochs", finetune_epochs, low=0)
        check_int("verify_batches", verify_batches, low=1)
        check_number("tolerance", tolerance, low=0)
        check_number("onnx_int8_tolerance", onnx_int8_tolerance, low=0)
        check_number("min_size_ratio", min_size_ratio, low=1.0, strict=False)
        check_number("max_latency_ratio", max_latency_ratio, low=0, optional=True)
        if eval_fn is not None and not callable(eval_fn):
            raise GuardConfigError(f"`eval_fn` must be callable or None, got {eval_fn!r}")
        if not isinstance(filename, str) or not filename or "/" in filename:
            raise GuardConfigError(f"`filename` must be a file name without directories, got {filename!r}")
        self.dirpath = dirpath
        self.monitor = monitor
        self.mode = resolve_mode("CompressExport", monitor, mode)
        self.max_metric_drop = float(max_metric_drop)
        self.prune = prune
        self.prune_amounts = tuple(float(a) for a in prune_amounts)
        self.quantize = quantize
        self.formats = tuple(formats)
        self.finetune_epochs = finetune_epochs
        self.eval_fn = eval_fn
        self.example_input = example_input
        self.verify_batches = verify_batches
        self.tolerance = float(tolerance)
        self.onnx_int8_tolerance = float(onnx_int8_tolerance)
        self.min_size_ratio = float(min_size_ratio)
        self.max_latency_ratio = None if max_latency_ratio is None else float(max_latency_ratio)
        if not isinstance(strict, bool):
            raise GuardConfigError(f"`strict` must be a bool, got {strict!r}")
        self.filename = filename
        self.strict = strict
        self.result: CompressionResult | None = None
        self.error: BaseException | None = None  # why the compression failed (rank 0), with strict=False
        self._early_error: GuardConfigError | None = None  # found by the trial export at fit start
        self._skeleton: pl.LightningModule | None = None  # FSDP2: rank 0's unsharded copy, filled at fit end

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        supported = DDPStrategy | SingleDeviceStrategy | ModelParallelStrategy
        if stage == "fit" and not isinstance(trainer.strategy, supported):
            raise GuardConfigError(
                f"CompressExport supports single-device, DDP and FSDP2 (ModelParallelStrategy) training, got "
                f"{type(trainer.strategy).__name__}: gather the full model yourself and call "
                "`lightning_guard.compress.compress_and_export`"
            )
        self._skeleton = None
        if stage == "fit" and isinstance(trainer.strategy, ModelParallelStrategy) and trainer.global_rank == 0:
            # configure_model has not sharded the module yet: rank 0 keeps an unsharded copy of it, into which the
            # full weights are gathered at fit end (FSDP2 has no public way back from a sharded module)
            self._skeleton = detached_copy(pl_module)
            # the search's nested single-device Trainers must not shard it again (on rank 0 alone: a collective that
            # the other ranks never join)
            self._skeleton.configure_model = _unsharded_configure_model  # type: ignore[method-assign]
        if stage == "fit" and not self._has_validation(trainer, pl_module):
            # Found now, not after hours of training: without validation data there is no metric budget to check
            # and no input to export with.
            if self.eval_fn is None:
                raise GuardConfigError(
                    "CompressExport needs validation data to measure the metric budget, and this fit has none (no val "
                    "dataloader, no `validation_step`, or `limit_val_batches=0`): give the fit a val dataloader and a "
                    "validation_step, or pass `eval_fn` and `example_input`"
                )
            if self.example_input is None:
                raise GuardConfigError(
                    "CompressExport needs an example input for export, and this fit has no validation data to take "
                    "one from: pass `example_input`"
                )

    @staticmethod
    def _has_validation(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Whether this fit will have validation batches (read at setup, before any data is loaded)."""
        from lightning.pytorch.utilities.model_helpers import is_overridden

        if not trainer.limit_val_batches or not is_overridden("validation_step", pl_module):
            return False
        source = val_data_source(trainer)
        if source.instance is None or not source.is_defined():
            return False
        try:  # the loaders themselves (a datamodule's or the module's method is called, as Lightning will)
            loaders = source.dataloader()
        except Exception:  # building it fails later, in Lightning, with its own message
            return True
        loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
        return any(loader is not None and maybe_len(loader) != 0 for loader in loaders)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._early_error = None
        self._trial_export(trainer, pl_module)

    def _trial_export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Export the forward once now: an untraceable forward is found before training, not after it.

        Every rank tries, and the ranks agree on the outcome (one collective): a failure on any rank refuses the fit
        on every rank with ``strict``; otherwise it is an ``export_failed`` event now (from the rank that failed),
        and every rank skips the compression at fit end.
        """
        error, first = None, ""
        sharded = isinstance(trainer.strategy, ModelParallelStrategy)
        module = self._skeleton if sharded else pl_module  # FSDP2: rank 0 traces its unsharded copy, alone
        try:
            example = None if module is None else self._example_now(trainer, module.device)
        except Exception:  # no example to trace with now: the fit-end path reports its own error
            example = None
        source = (
            "`example_input`"
            if self.example_input is not None
            else "the first element (or first tensor value) of the first validation batch"
        )
        if example is not None and module is not None:
            try:
                with torch.no_grad(), quiet():
                    export_program(module, example)
            except Exception as exc:
                first = " ".join(str(exc).split())[:400]
                error = GuardConfigError(
                    f"CompressExport: torch.export cannot trace this module's forward with the example input "
                    f"({type(exc).__name__}: {first}); the export after training would fail. The example input was "
                    f"{source}: if `forward` takes something else, pass `example_input` (a tuple of forward's "
                    "positional arguments); otherwise make `forward` traceable (no data-dependent Python control "
                    "flow, no unsupported ops; see torch.export's docs), or remove CompressExport"
                )
                self.emit(
                    trainer,
                    "export_failed",
                    f"{error} (found at fit start: "
                    + ("the fit is refused)" if self.strict else "training goes on, compression will be skipped)"),
                    severity="error",
                    data={"error": type(exc).__name__, "message": first, "when": "fit_start"},
                    ranks=(trainer.global_rank,),
                )
        verdict = self.runtime(trainer).agree(error is not None)
        if not verdict.any:
            return
        if error is None:  # another rank failed: this one stops (or skips) with it
            error = GuardConfigError(
                f"CompressExport: torch.export cannot trace this module's forward on rank(s) {list(verdict.ranks)} "
                "(see that rank's export_failed event); the export after training would fail"
            )
        if self.strict:
            self.runtime(trainer).events.dump_outbox()
            raise error
        self._early_error = error

    def _example_now(self, trainer: pl.Trainer, device: torch.device) -> tuple[Any, ...]:
        """The export's example input before any validation ran: ``example_input`` or the first val batch's."""
        if self.example_input is not None:
            example = self.example_input if isinstance(self.example_input, tuple) else (self.example_input,)
        else:
            loaders = val_data_source(trainer).dataloader()
            loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
            example = inputs_of(next(iter(loader)))
        return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in example)

    # ------------------------------------------------------------------ plumbing around the search
    def _nested_trainer(self, device: torch.device, root: str, **kwargs: Any) -> pl.Trainer:
        accelerator = "gpu" if device.type == "cuda" else "cpu"
        devices: Any = [device.index or 0] if device.type == "cuda" else 1
        return pl.Trainer(
            accelerator=accelerator,
            devices=devices,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=root,
            callbacks=[],
            **kwargs,
        )

    @staticmethod
    def _first_val_loader(trainer: pl.Trainer) -> Any:
        loaders = trainer.val_dataloaders
        if isinstance(loaders, list | tuple):
            return loaders[0] if loaders else None
        return loaders

    def _val_loader(self, trainer: pl.Trainer) -> Any:
        loaders = self._first_val_loader(trainer)
        if loaders is None and self.eval_fn is None:
            raise GuardConfigError(
                "CompressExport needs validation data to measure the metric budget: give the fit a val dataloader "
                "or pass `eval_fn`"
            )
        return loaders

    def _resolve_prune(self, model: torch.nn.Module, example: tuple[Any, ...]) -> tuple[PruneMode | None, str]:
        """``prune="auto"``: structured pruning when torch-pruning is installed and the model allows it, else none."""
        if self.prune != "auto":
            return self.prune, f"prune={self.prune!r} as configured"
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            return None, "auto: no pruning, torch-pruning is not installed (pip install 'lightning-guard[export]')"
        try:  # a dry run on a copy at the mildest amount: the model's layers may not be prunable, or not safely
            prune_structured(copy.deepcopy(model), min(self.prune_amounts), example)
        except Exception as exc:
            return (
                None,
                f"auto: no pruning, structured pruning does not apply to this model ({type(exc).__name__}: {exc})"[
                    :600
                ],
            )
        return "structured", "auto: structured pruning within the budget (the model allows it)"

    def _evaluators(
        self, trainer: pl.Trainer, device: torch.device, root: str
    ) -> tuple[Callable[[torch.nn.Module], float], Callable[[torch.nn.Module], float] | None, str]:
        """The evaluation that chooses (pruning, quantisation) and one on held-out data that chooses nothing.

        The validation batches are dealt alternately: even-numbered ones choose, odd-numbered ones are held out and
        only measure the baseline and the exported files. With ``eval_fn``, or fewer than two validation batches,
        there is no held-out split (the third value says so, for the report).
        """
        if self.eval_fn is not None:
            return self.eval_fn, None, "none: `eval_fn` measures the metric"
        loader = self._val_loader(trainer)
        n = maybe_len(loader)

        def evaluator(data: Any) -> Callable[[torch.nn.Module], float]:
            def evaluate(model: torch.nn.Module) -> float:
                if isinstance(model, pl.LightningModule):
                    forget_metric_attributes(model)  # a copy's cached ids point at the original's torchmetrics
                trainer_ = self._nested_trainer(device, root, limit_val_batches=trainer.limit_val_batches)
                metrics = trainer_.validate(model, dataloaders=data, verbose=False)[0]  # type: ignore[arg-type]
                if self.monitor not in metrics:
                    raise GuardConfigError(
                        f"CompressExport: `monitor={self.monitor!r}` is not logged by the validation loop; logged: "
                        f"{sorted(metrics)}"
                    )
                return float(metrics[self.monitor])

            return evaluate

        if n is None or n < 2:
            return evaluator(loader), None, f"none: the validation data has {n if n is not None else 'unknown'} batches"
        choose, held = EveryOther(loader, 0), EveryOther(loader, 1)
        note = (
            f"the odd-numbered {len(held)} of {n} validation batches: not used to choose the pruning or the "
            f"quantisation (chosen on the other {len(choose)})"
        )
        return evaluator(choose), evaluator(held), note

    def _finetuner(self, trainer: pl.Trainer, device: torch.device, root: str) -> Callable[[torch.nn.Module], None]:
        loader = trainer.train_dataloader

        def finetune(model: torch.nn.Module) -> None:
            self._nested_trainer(device, root, max_epochs=self.finetune_epochs, limit_val_batches=0).fit(
                model,  # type: ignore[arg-type]
                train_dataloaders=loader,
            )

        return finetune

    def _inputs(self, trainer: pl.Trainer, device: torch.device) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
        def to_device(args: tuple[Any, ...]) -> tuple[Any, ...]:
            return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in args)

        verify: list[tuple[Any, ...]] = []
        loader = self._first_val_loader(trainer)
        if loader is not None:
            for i, batch in enumerate(loader):
                if i >= self.verify_batches:
                    break
                verify.append(to_device(inputs_of(batch)))
        if self.example_input is not None:  # the batches' inputs may not be what forward takes: verify on it
            example = self.example_input if isinstance(self.example_input, tuple) else (self.example_input,)
            return to_device(example), [to_device(example)]
        if not verify:
            raise GuardConfigError(
                "CompressExport needs an example input for export: give the fit a val dataloader or pass "
                "`example_input`"
            )
        return verify[0], verify

    def compress(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> CompressionResult:
        """Run the search, the export and the verification now (rank 0's work in ``on_fit_end``)."""
        device = pl_module.device
        dirpath = Path(self.dirpath or Path(trainer.default_root_dir) / "compressed")
        model = detached_copy(pl_module).eval()
        example, verify = self._inputs(trainer, device)
        prune, prune_note = self._resolve_prune(model, example)
        report: dict[str, Any] = {
            "monitor": self.monitor,
            "mode": self.mode,
            "max_metric_drop": self.max_metric_drop,
            "prune": prune,
            "prune_note": prune_note,
        }
        try:
            with tempfile.TemporaryDirectory() as root, quiet():
                evaluate, evaluate_held_out, held_out = self._evaluators(trainer, device, root)
                report["held_out"] = held_out
                result = self._search(
                    trainer, model, evaluate, evaluate_held_out, example, verify, dirpath, prune, root
                )
        except Exception as exc:  # the report and the table say what happened, failures too
            partial = getattr(exc, "result", None)
            report.update(partial.to_dict() if partial is not None else {"stages": []})
            report["error"] = f"{type(exc).__name__}: {exc}"
            self._report(trainer, report, dirpath, partial)
            raise
        report.update(result.to_dict())
        self._report(trainer, report, dirpath, result)
        return result

    def _search(
        self,
        trainer: pl.Trainer,
        model: torch.nn.Module,
        evaluate: Callable[[torch.nn.Module], float],
        evaluate_held_out: Callable[[torch.nn.Module], float] | None,
        example: tuple[Any, ...],
        verify: list[tuple[Any, ...]],
        dirpath: Path,
        prune: PruneMode | None,
        root: str,
    ) -> CompressionResult:
        """:func:`compress_and_export` with this callback's settings; its events become guard events."""
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return compress_and_export(
            model,
            evaluate,
            example,
            dirpath,
            higher_is_better=self.mode == "max",
            max_metric_drop=self.max_metric_drop,
            prune=prune,
            prune_amounts=self.prune_amounts,
            quantize_mode=self.quantize,
            formats=self.formats,
            finetune=self._finetuner(trainer, device, root) if self.finetune_epochs else None,
            verify_inputs=verify,
            tolerance=self.tolerance,
            onnx_int8_tolerance=self.onnx_int8_tolerance,
            min_size_ratio=self.min_size_ratio,
            max_latency_ratio=self.max_latency_ratio,
            filename=self.filename,
            on_event=lambda kind, message, data: self.emit(
                trainer,
                kind,
                message,
                severity="error" if kind == "verify_failed" else "info",
                data={k: v for k, v in data.items() if v is not None},
            ),
            evaluate_held_out=evaluate_held_out,
        )

    def _report(
        self, trainer: pl.Trainer, report: dict[str, Any], dirpath: Path, result: CompressionResult | None
    ) -> None:
        """``compress_report.json``, the console table and the wandb table: on success and on failure alike."""
        dirpath.mkdir(parents=True, exist_ok=True)
        report_path = dirpath / "compress_report.json"
        report_path.write_text(json.dumps(report, indent=2, default=str))
        stages = result.stages if result is not None else []
        problems = dict(report.get("rejected") or {})
        if "error" in report:
            problems["error"] = report["error"]
        print_report(stages, self.monitor, problems)
        artifacts = result.artifacts if result is not None else {}
        _wandb.log_compression(trainer, [vars(s) for s in stages], artifacts, str(report_path))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        error: BaseException | None = None
        self.result, self.error = None, None
        if self._early_error is not None:  # on every rank alike; reported at fit start
            self.error = self._early_error
            super().on_fit_end(trainer, pl_module)
            return
        full = self._gather_full(trainer, pl_module)  # FSDP2: a collective, so on every rank
        if trainer.global_rank == 0:
            try:
                self.result = self.compress(trainer, self._unsharded(full) if full is not None else pl_module)
                if self.result.rejected:  # some format verified, another not: kept apart, reported, strict raises
                    rejected = GuardRuntimeError("CompressExport: " + "; ".join(self.result.rejected.values()))
                    if self.strict:
                        raise rejected
                    self.error = rejected
            except Exception as exc:
                if trainer.world_size == 1 and self.strict:
                    self._summary_before_raise(trainer)
                    raise
                error = exc  # with strict=True raised below on every rank, so no rank waits for rank 0 forever
                if not self.strict:
                    self.error = exc
                    self.emit(
                        trainer,
                        "export_failed",
                        f"compression/export failed, the trained model is left as it is: {type(exc).__name__}: {exc}",
                        severity="error",
                        data={"error": type(exc).__name__, "message": str(exc)[:2000]},
                    )
        if trainer.world_size > 1 and self.runtime(trainer).agree(error is not None).any and self.strict:
            message = trainer.strategy.broadcast(f"{type(error).__name__}: {error}", src=0)
            self._summary_before_raise(trainer)  # every rank raises here: the event exchange stays aligned
            if error is not None:
                raise error
            raise GuardRuntimeError(f"CompressExport failed on rank 0, stopping this rank too: {message}")
        self._skeleton = None  # FSDP2: rank 0 held a full copy of the model until now
        super().on_fit_end(trainer, pl_module)  # last: the fit-end summary then lists the compression's events

    @staticmethod
    def _gather_full(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        """Under FSDP2, the full weights, gathered once to rank 0's host (None elsewhere and on other strategies)."""
        if not isinstance(trainer.strategy, ModelParallelStrategy):
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(pl_module, options=options)  # every rank takes part; rank 0 holds the result
        return full if trainer.global_rank == 0 else None

    def _unsharded(self, full: dict[str, Any]) -> pl.LightningModule:
        """Rank 0's unsharded copy of the module (taken at setup, before ``configure_model``) with the full weights."""
        assert self._skeleton is not None
        missing, unexpected = self._skeleton.load_state_dict(full, strict=False)
        if missing or unexpected:
            raise GuardConfigError(
                "CompressExport under FSDP2 gathers the trained weights into a copy of the module taken before "
                "`configure_model`, and they do not fit it (missing "
                f"{sorted(missing)[:10]}, unexpected {sorted(unexpected)[:10]}): build the layers in `__init__` and "
                "only shard them in `configure_model`, or gather the model yourself and call "
                "`lightning_guard.compress.compress_and_export`"
            )
        return self._skeleton

    def _summary_before_raise(self, trainer: pl.Trainer) -> None:
        """``strict=True`` ends the fit with an exception: the guards' summary is printed first, errors included."""
        self._sync_events(trainer, force_table=True)
        self.runtime(trainer).events.print_summary()


def _unsharded_configure_model() -> None:
    """``configure_model`` of CompressExport's unsharded copy under FSDP2: the layers exist, nothing to shard."""
