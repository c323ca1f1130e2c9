"""The dream images endpoint: `DreamImagesConsumer` and `DreamWebSocketApp`, ready to mount."""

from __future__ import annotations

from typing import Any

from ..protocol import DREAM_GROUP_KIND, CloseCodes, dream_group
from ..settings import ConfigurationError, Settings
from .app import ConsumerApp
from .auth import Authenticator, Authorizer
from .connection import CloseConnection
from .jobs import JobConsumer
from .schemas import DREAMS


class DreamImagesConsumer(JobConsumer):
    """Streams one dream's image updates to a browser.

    Connect at `/dreams/{dream_id}` with a token; the first message is
    `connection_established`, then every `image_update` of the dream.
    """

    message_schemas = DREAMS
    group_kind = DREAM_GROUP_KIND
    id_param = "dream_id"

    @property
    def dream_id(self) -> int:
        return int(self.job_id)

    def check_job_id(self) -> None:
        dream_id = self.job_id
        if isinstance(dream_id, str) and dream_id.isascii() and dream_id.isdigit():
            dream_id = int(dream_id)  # a route declared with a str converter
        if isinstance(dream_id, bool) or not isinstance(dream_id, int) or dream_id <= 0:
            raise CloseConnection(CloseCodes.POLICY_VIOLATION, "invalid_dream_id", "dream ids are positive integers")

    @property
    def job_id_json(self) -> int:
        return self.dream_id

    @property
    def group_name(self) -> str:
        return dream_group(self.dream_id)

    def authorization_target(self) -> int:
        return self.dream_id

    async def image_update(self, event: dict[str, Any]) -> None:
        """An update of the dream: status, images, message, optional progress."""
        # Producers publish the client message itself (see `image_update_message`).
        await self.send_json(event)


class DreamWebSocketApp(ConsumerApp):
    """The dream images endpoint, `/dreams/{dream_id}`, ready to mount.

    `authorize(user, dream_id)` decides who may watch which dream (it may be async). To let
    every authenticated user watch every dream, pass `allow_any_authenticated_user`.
    `authenticate(connection)` replaces the JWT handshake with the app's own session or cookie
    (see `ConsumerApp`).
    """

    def __init__(
        self,
        *,
        authorize: Authorizer | None,
        authenticate: Authenticator | None = None,
        settings: Settings | None = None,
        consumer: type[DreamImagesConsumer] = DreamImagesConsumer,
        path: str = "/dreams/{dream_id:int}",
        **overrides: Any,
    ) -> None:
        if authorize is None:
            raise ConfigurationError(
                "authorize is required: pass a function (user, dream_id) -> bool, or "
                "allow_any_authenticated_user to let any authenticated user watch any dream"
            )
        super().__init__(
            {path: consumer}, authorize=authorize, authenticate=authenticate, settings=settings, **overrides
        )
