"""Stored responses of the Responses API (what `previous_response_id` continues)."""
