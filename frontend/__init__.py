"""The frontend node: holds viewers' SSE streams, accepts likes and comments over HTTP.

Endpoints (bind|connect TYPE for PURPOSE):

* bind HTTP       ``http://host:port``         SSE streams, publish API, ``/healthz``
* connect SUB     every dispatcher's XPUB      events in, topic = video (subscribed on the
                                               first local viewer, unsubscribed on the last)
* connect DEALER  every dispatcher's ROUTER    publish requests out, acks in (one per dispatcher)
"""

from .node import Frontend, main  # noqa: F401
