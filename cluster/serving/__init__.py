"""Serving: the Ray Serve application (app.py) with its two servers, gRPC (grpc_server.py) and the OpenAI HTTP
API (openai/), and what they share: the settings (config.py), one ``ServingState`` (state.py), the way to the
engine (frontend_client.py), request checks (validation.py), statuses, security, the tokenizer and the text
stream, and the Prometheus target (metrics.py). ``local.py`` runs the application on a Ray cluster from here
(``epserve serve``)."""
