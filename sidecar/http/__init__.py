"""HTTP/1.1 for the proxy path: a lean server, an upstream pool, streaming bodies."""
