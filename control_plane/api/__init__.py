"""The REST API: the route type and table, middleware, one module per resource, OpenAPI."""
