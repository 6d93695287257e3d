"""Fixtures shared by the hardening tests."""

from __future__ import annotations

import pytest

from ._certs import Creds, make_creds


@pytest.fixture(scope="session")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    return make_creds(tmp_path_factory.mktemp("tls"))
