"""Export targets: `backend` (the shape every target has), `registry` (every target by
name), `pipeline` (stage, write, prove, gate, move into place) and one module per format."""
