"""Events out: webhooks on what operators want to hear about without polling.

- ``types``: the event types and the patterns endpoints subscribe with (pure);
- ``signing``: the HMAC-SHA256 signature of a delivery's raw body (pure);
- ``receivers``: what a receiver URL may be, and which addresses it may resolve to (pure);
- ``outbox``: ``emit``, one call in the transaction of the change it announces;
- ``watch``: facts nobody writes as a change (an agent gone quiet, a failed activation),
  announced once each;
- ``endpoints``: the service behind REST and the CLI (create, list, delete, deliveries);
- ``delivery``: the loop that fans events out to endpoints and POSTs them, with retries.
"""
