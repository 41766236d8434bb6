"""``qwenrt serve``: an OpenAI-compatible chat-completions server in front of one engine."""
