"""The reference every launcher and sharded run is compared with: ``strategy="ddp"`` started as a script."""

import pytest

from tests.sharded.launch import launch


@pytest.fixture(scope="session")
def ddp_reference(tmp_path_factory):
    return launch("ddp", tmp_path_factory.mktemp("ddp_reference"))


#: the launcher runs add OOMGuard and out-of-memory on rank 1 (OOMGuard is DDP-only: not in the FSDP2 comparison)
LAUNCHER_GUARDS = ("--guards", "wc,gg,l1,of,oom")


@pytest.fixture(scope="session")
def ddp_oom_reference(tmp_path_factory):
    return launch("ddp", tmp_path_factory.mktemp("ddp_oom_reference"), *LAUNCHER_GUARDS)
