"""A kubeconfig, through kubernetes-asyncio: the only importer of that package.

kubernetes-asyncio knows what a kubeconfig may hold (exec credential plugins, OIDC and the
other auth providers, client certificates) and builds the TLS session to match. Importing it
loads its whole client package, every generated API model with it (~37 MB of RSS), so
``KubeApi.open`` imports this module only when a kubeconfig is given; in a pod
``credentials.InClusterAccess`` serves without it.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from kubernetes_asyncio import client, config

from .api_errors import ConfigurationError


class KubeconfigAccess:
    """The server, session and credentials a kubeconfig describes (kubernetes-asyncio's own)."""

    def __init__(self, configuration: Any, api_client: Any) -> None:
        self._configuration = configuration
        self._api_client = api_client

    @classmethod
    async def open(cls, path: str, pool_size: int) -> KubeconfigAccess:
        configuration = client.Configuration()
        try:
            await config.load_kube_config(config_file=path, client_configuration=configuration)
        except (OSError, config.ConfigException) as error:
            raise ConfigurationError(f"kubeconfig {path}: {error}") from None
        configuration.connection_pool_maxsize = pool_size
        try:
            return cls(configuration, client.ApiClient(configuration))
        except (OSError, ValueError) as error:
            raise ConfigurationError(f"cannot set up TLS to the API server: {error}") from None

    @property
    def host(self) -> str:
        return str(self._configuration.host).rstrip("/")

    @property
    def session(self) -> aiohttp.ClientSession:
        session: aiohttp.ClientSession = self._api_client.rest_client.pool_manager
        return session

    async def authorization(self) -> dict[str, str]:
        # Exec plugins and OIDC refresh their token here (kubernetes-asyncio's refresh hook).
        value = await self._configuration.get_api_key_with_prefix("BearerToken")
        return {"Authorization": value} if value else {}

    def reread_token(self) -> bool:
        return False  # kubernetes-asyncio decides when a kubeconfig's token is refreshed

    async def close(self) -> None:
        await self._api_client.close()
