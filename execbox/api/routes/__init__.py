"""The routers of the HTTP API, one per part of the contract (mounted by ``create_app``)."""

__all__: list[str] = []
