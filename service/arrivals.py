"""Requests on their way to a worker: what lets the batcher wait only when more work is coming.

A fixed batching wait (Triton's ``max_queue_delay_microseconds``, LitServe's ``batch_timeout``)
makes every request wait for company, also the lone one whose company never comes. genserve's
batcher waits only while other work requests are inside the app with their whole body received
but not yet in a queue (being parsed, their images decoded): those arrive within a fraction of a
millisecond to a few milliseconds and are worth a batch slot. Nothing else is: not a client still
uploading, however slowly.

Each POST request holds a :class:`Ticket` from the moment its body is complete
(``ArrivalsMiddleware``) until its job is queued at a worker, or it is answered without one (a 4xx,
say); a sampling request gives it back before it waits for a sampling slot. Until the route knows
the model, the ticket counts for every model; then for its own. With several workers for a model, a
batch may wait for a request that another worker then takes: the wait's limit bounds that. Only the
event loop changes the counts; worker threads read them (plain int reads).
"""

from __future__ import annotations

from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass(eq=False)
class Ticket:
    model: str | None = None  # None until the route resolves the model
    done: bool = False  # queued at a worker, or answered


_current: ContextVar[Ticket | None] = ContextVar("genserve_arrival", default=None)


class Arrivals:
    """Counts of work requests inside the app and not yet queued: per model, and not yet assigned."""

    def __init__(self) -> None:
        self.unassigned = 0
        self.by_model: Counter[str] = Counter()

    def expected(self, model: str) -> int:
        """Requests that may still join a batch of ``model`` (called from worker threads)."""
        return self.unassigned + self.by_model.get(model, 0)

    def enter(self) -> Ticket:
        """A work request's body is complete; it becomes the current context's ticket."""
        ticket = Ticket()
        self.unassigned += 1
        _current.set(ticket)
        return ticket

    def assign(self, model: str) -> None:
        """The current request names ``model`` (no-op outside a counted request)."""
        ticket = _current.get()
        if ticket is None or ticket.done or ticket.model is not None:
            return
        self.unassigned -= 1
        self.by_model[model] += 1
        ticket.model = model

    def leave(self, ticket: Ticket | None = None) -> None:
        """The current request (or ``ticket``) was queued at a worker or answered; idempotent."""
        ticket = ticket or _current.get()
        if ticket is None or ticket.done:
            return
        ticket.done = True
        if ticket.model is None:
            self.unassigned -= 1
        else:
            self.by_model[ticket.model] -= 1
            if not self.by_model[ticket.model]:
                del self.by_model[ticket.model]


class ArrivalsMiddleware:
    """Gives every POST request a ticket once the route has read its whole body (in the route's own
    context), returned when it is answered at the latest."""

    def __init__(self, app: ASGIApp, *, arrivals: Arrivals) -> None:
        self.app = app
        self.arrivals = arrivals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        ticket: Ticket | None = None

        async def counted_receive() -> Message:
            nonlocal ticket
            message = await receive()
            if ticket is None and message["type"] == "http.request" and not message.get("more_body", False):
                ticket = self.arrivals.enter()
            return message

        try:
            await self.app(scope, counted_receive, send)
        finally:
            if ticket is not None:
                self.arrivals.leave(ticket)
