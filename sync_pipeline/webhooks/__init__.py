"""Unleashed webhooks: the receiver that records signed deliveries, the durable event store it
writes and the sensor reads, and the subscription commands. See docs/webhooks.md."""
