"""``lightning_guard.compress`` is the package of compression; ``lightning_guard.functional`` says where it went."""

from __future__ import annotations

import pytest

import lightning_guard.compress
import lightning_guard.functional

MOVED = (
    "CompressionResult",
    "compress_and_export",
    "export_onnx",
    "export_pt2",
    "load_artifact",
    "prune_structured",
    "prune_unstructured",
    "quantize",
)


def test_the_package_exports_the_public_names():
    for name in lightning_guard.compress.__all__:
        assert getattr(lightning_guard.compress, name) is not None, name
    assert set(MOVED) <= set(lightning_guard.compress.__all__)


@pytest.mark.parametrize("name", MOVED)
def test_the_old_import_path_names_the_new_one(name):
    assert name not in lightning_guard.functional.__all__
    with pytest.raises(ImportError) as err:
        exec(f"from lightning_guard.functional import {name}", {})
    assert str(err.value) == (
        f"lightning_guard.functional.{name} moved: import it as `from lightning_guard.compress import {name}`"
    )
    with pytest.raises(ImportError, match=f"import it as `from lightning_guard.compress import {name}`"):
        getattr(lightning_guard.functional, name)


def test_the_old_module_names_the_new_package():
    with pytest.raises(ImportError) as err:
        exec("from lightning_guard.functional import compress", {})
    assert str(err.value) == (
        "lightning_guard.functional.compress moved: it is the package `lightning_guard.compress` now "
        "(`from lightning_guard import compress`)"
    )
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        lightning_guard.functional.no_such_name  # noqa: B018
