"""Between the routes and the engine: prompts, sampling params, tenancy scopes, response building."""
