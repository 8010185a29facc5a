"""What composes actors into a cluster, and what serves it. A room per role (docs/architecture.md), each
importing only the ones before it: composing the cluster (config.py, launcher.py, supervisor.py; api/, the
generated gRPC modules; fixtures/, the random-weight checkpoints), serving/ (the Serve application and its
servers), tools/ (client, bench, drills), and on top cli.py (the ``epserve`` command) and serve_app.py (the
import path Serve configs name)."""
