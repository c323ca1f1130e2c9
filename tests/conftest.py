import pytest


@pytest.fixture
def anyio_backend() -> str:
    # The groups layer is asyncio-only.
    return "asyncio"
