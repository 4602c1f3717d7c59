"""Entry points: the command line (`mistral-align ...`) and the recipes' shared start and exit."""
