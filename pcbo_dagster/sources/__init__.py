"""Where records come from: inline in the request, or a file the request's `source` names."""
