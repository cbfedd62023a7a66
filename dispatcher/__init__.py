"""The dispatcher node: owns videos (rendezvous hashing), sequences their events, keeps
history, and fans events out over XPUB to exactly the frontends subscribed to them.

Endpoints (bind|connect TYPE for PURPOSE):

* bind ROUTER  ``tcp://host:router_port``  publish requests in, acks out (control protocol)
* bind XPUB    ``tcp://host:pub_port``     fan-out to frontends, topic = video; subscriptions in
* bind HTTP    ``http://host:http_port``   ``/healthz``
"""

from .node import Dispatcher, main  # noqa: F401
