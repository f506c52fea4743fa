"""Everything that speaks Gemini's private REST API: signing, nonces, errors, replies."""
