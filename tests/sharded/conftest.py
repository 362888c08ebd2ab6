"""The reference every launcher and sharded run is compared with: ``strategy="ddp"`` started as a script."""

import pytest

from tests.sharded.launch import launch


@pytest.fixture(scope="session")
def ddp_reference(tmp_path_factory):
    return launch("ddp", tmp_path_factory.mktemp("ddp_reference"))
