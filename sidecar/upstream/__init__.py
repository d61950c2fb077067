"""Forwarders to the agent runtime, one per ``upstream.protocol``, over one pooled client."""
