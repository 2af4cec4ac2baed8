"""HTTP routes: thin handlers that decode a Struct, call a service and encode the answer."""
