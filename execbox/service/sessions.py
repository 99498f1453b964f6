"""Sessions: one sandbox held for one caller, whose interpreter runs cells that share state.

A session's sandbox comes from the same backend, spec and limits as a one-shot
execution, but it is never returned to a pool: it is destroyed when the session is
closed, idles out, reaches its lifetime, or a cell ends its interpreter (memory, a kill,
a time limit the interpreter did not stop at).

Interface (implemented in stages; the API, MCP and the client code against it):

- ``await manager.create(SessionRequest, owner) -> SessionInfo``
- ``await manager.execute(session_id, CellRequest, owner, on_output=None) -> ExecutionResult``
- ``manager.describe(session_id, owner) -> SessionInfo``
- ``manager.list(owner) -> list[SessionInfo]``
- ``await manager.delete(session_id, owner) -> None``
- ``await manager.put_file(session_id, path, data, owner) -> SessionFile``
- ``await manager.get_file(session_id, path, owner) -> bytes``
- ``await manager.list_files(session_id, owner) -> list[SessionFile]``

``owner`` is the API key's name (None when keys are off): a session of another owner is
:class:`~execbox.errors.NotFoundError`, like an unknown one. Above SANDBOX_MAX_SESSIONS,
``create`` raises :class:`~execbox.errors.LimitExceededError`; a bad path is
:class:`~execbox.errors.BadRequestError`.
"""

from __future__ import annotations

__all__ = ["SessionManager"]


class SessionManager:
    """Placeholder until the implementation lands (see the module docstring)."""
