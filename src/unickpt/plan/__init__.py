"""Planning: who writes which box on save; which byte ranges each rank reads on load."""
