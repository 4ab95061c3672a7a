"""OAuth 2.0 protocol pieces (pure, one module per RFC) and the HTTP client that uses them."""
