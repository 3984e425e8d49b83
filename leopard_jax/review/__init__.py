"""Match review: a local web page where a person confirms or rejects the 5 most similar
candidates of each image; decisions go to a durable SQLite match graph (`store`), candidates
skip what is already decided (`candidates`), and `export` writes one folder per individual.
Run `python -m leopard_jax.review --help`."""
