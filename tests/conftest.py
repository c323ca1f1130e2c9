import pytest


@pytest.fixture
def anyio_backend() -> str:
    # The groups layer and broadcaster are asyncio-only.
    return "asyncio"
