"""The `tokenyard` command: the top of the house, the one package that imports every driver
(router, sim, learn) to give them subcommands. Nothing imports it back."""
