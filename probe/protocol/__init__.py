"""Protocol stage: reassembles each connection's two byte streams, parses
HTTP/1.x messages and pairs every request with its response."""
